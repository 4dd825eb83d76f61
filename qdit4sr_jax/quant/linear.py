"""The one linear layer every model linear goes through.

`linear(x, w, bias=None, *, act_bits=None, step=None, execution=None)`:
  x:    [..., d_in] activations (compute dtype)
  w:    float kernel [d_in, d_out] (Flax layout), a `QuantizedWeight` node (see quant/qweight.py), or its
        prepared form `quant.kernels.prepared.KernelWeight` (run by the fused path)
  bias: [d_out] or None
  act_bits: overrides the node's activation bits (Python int or traced int32 scalar in 2..8)
  step: sampling-step index (int or traced int32 scalar); a node with an `a_schedule` [T] uses
        a_schedule[clip(step, 0, T-1)] as activation bits (no recompilation per step)
  execution: overrides the node's execution mode ("fake" | "int" | "fused": quant/kernels.fused_linear)
  shared: the `SharedDown` that a prepared tree holds beside w and the other layers reading x (e.g. to_q / to_k /
        to_v: `kernels.prepared.SHARED_INPUTS`), where w's branch down-projection lives; None elsewhere
Returns [..., d_out] in x.dtype. `linear_group(x, params, parts, step=...)`: layers reading x whose weights a
tree stacked into one (`kernels.merged.merge_inputs`), run as one and split.

Dispatch: a float kernel -> one einsum; a `QuantizedWeight` with execution "fake" | "int" -> the reference
`quant.reference.quantized_linear`; execution "fused" or a prepared `KernelWeight` -> `quant.kernels.fused_linear`.
Both import nothing from here (every import points down); `quantized_linear`, `resolve_act_bits`,
`transform_input` and `branches` stay importable from this module for callers.

The reference's modes "fake" (float fake-quant, the definition) and "int" (int8 x int8 -> int32 GEMMs with the
scales after) agree to float rounding; quant/reference.py describes them.
"""
from __future__ import annotations

import jax.numpy as jnp

from qdit4sr_jax.quant.kernels.prepared import KernelWeight
from qdit4sr_jax.quant.qweight import QuantizedWeight
from qdit4sr_jax.quant.reference import (GROUP_CHUNK_ELEMENTS, branches, quantized_linear,  # noqa: F401 (re-exported)
                                         resolve_act_bits, transform_input)


def linear_group(x, params: dict, parts: int, *, step=None):
    """The outputs of `parts` layers of equal width that read x, run as one: params {"kernel", "bias"} holds their
    weights stacked along N (`quant.kernels.merged.merge_inputs`). x [..., K] -> a list of `parts` arrays
    [..., N / parts] in x.dtype, in the members' order."""
    y = linear(x, params["kernel"], params.get("bias"), step=step)
    if y.shape[-1] % parts:
        raise ValueError(f"linear_group: {y.shape[-1]} output features do not split into {parts} equal parts")
    return jnp.split(y, parts, axis=-1)


def linear(x, w, bias=None, *, act_bits=None, step=None, execution=None, shared=None):
    if isinstance(w, KernelWeight):                  # a prepared fused node (quant/kernels/prepared.py)
        if execution in (None, "fused"):
            from qdit4sr_jax.quant.kernels import fused_linear
            return fused_linear(x, w, bias, act_bits=act_bits, step=step, shared=shared)
        w = w.reference_node()                       # the same function through the reference paths
    if isinstance(w, QuantizedWeight) and (execution or w.execution) == "fused":
        # the fused GPU kernel (same function; XLA fallback off GPU): quant/kernels
        from qdit4sr_jax.quant.kernels import fused_linear
        return fused_linear(x, w, bias, act_bits=act_bits, step=step)
    if isinstance(w, QuantizedWeight):
        y = quantized_linear(x, w, act_bits=act_bits, step=step, execution=execution)
    else:
        # no astype when the dtype already matches: keeps wrapped kernels (e.g. qwix PTQ) intact
        y = jnp.einsum("...k,kn->...n", x, w if w.dtype == x.dtype else w.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


__all__ = ["linear", "linear_group", "quantized_linear", "resolve_act_bits", "transform_input", "branches"]
