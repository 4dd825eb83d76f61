"""Fast execution of quantized linears: a fused Pallas (Triton on GPU) kernel with an XLA fallback.

`fused_linear(x, w, bias, ...)` computes the same function as `quant.linear.linear` for a
`QuantizedWeight` node; see fused.py for the stages and pallas_gpu.py for the kernel.
"""
from qdit4sr_jax.quant.kernels.fused import (BACKENDS, DEFAULT_CONFIG, GROUPED_CONFIG, KernelConfig,  # noqa: F401
                                             default_config, fused_linear,
                                             supports_fused, tiles_ok, with_execution)
from qdit4sr_jax.quant.kernels.prepared import KernelWeight, prepare, prepare_weight  # noqa: F401
from qdit4sr_jax.quant.kernels.branch_ops import lowering_for  # noqa: F401
