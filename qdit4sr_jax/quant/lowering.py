"""Which platform the quantized linears are traced for: the default backend, or the one named by
`lowering_for` while lowering for another machine (a GPU step lowered for CUDA on a CPU: the fused layers
then pick the Pallas kernels). A leaf: imports nothing of the project, so the reference paths
(`quant.reference`) and the kernels (`quant.kernels`) both read it without importing each other.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_TARGET = []          # platform being lowered for (`lowering_for`), innermost last


def target_platform() -> str:
    """The platform the kernels are traced for: "cpu" | "gpu" | "tpu" (the default backend, unless inside
    `lowering_for`)."""
    return _TARGET[-1] if _TARGET else jax.default_backend()


class lowering_for:
    """Context manager: trace the fused path as for `platform` ("gpu" picks the Pallas kernels) while
    lowering for it on another machine, e.g. `jit(f).trace(...).lower(lowering_platforms=("cuda",))` on a
    CPU (tests/quant/test_triton_lowering.py, benchmarks/gpu/lower_check.py)."""

    def __init__(self, platform: str):
        if platform not in ("cpu", "gpu", "tpu"):
            raise ValueError(f"platform must be 'cpu', 'gpu' or 'tpu', got {platform!r}")
        self.platform = platform

    def __enter__(self):
        _TARGET.append(self.platform)
        return self

    def __exit__(self, *exc):
        _TARGET.pop()
        return False


def has_wgmma() -> bool:
    """Whether the GPU kernels are traced for a card with Hopper's wgmma (compute capability 9.x, what the Mosaic
    GPU kernels need): the default device's, or assumed while lowering for a GPU on a machine without one."""
    if target_platform() != "gpu":
        return False
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return True                                   # lowering only (`lowering_for("gpu")` on a CPU)
    cc = str(getattr(dev, "compute_capability", "") or "")
    return cc.split(".")[0] == "9"


def widen_on_cpu(*arrays):
    """XLA:CPU has no batched bf16 x bf16 -> f32 dot: widen to float32 there (exact: bf16 products are
    exact in float32 and the accumulation is float32 either way)."""
    if target_platform() != "cpu":
        return arrays
    return tuple(None if a is None else a.astype(jnp.float32) for a in arrays)


__all__ = ["target_platform", "lowering_for", "has_wgmma", "widen_on_cpu"]
