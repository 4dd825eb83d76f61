"""In-kernel helpers shared by the prologue kernels (`prologue_kernel.py`, `prologue_rotated.py`): rounding, the
float32-accumulating dot, the placement matrix of the block-branch features and the code level."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def round_half_even(v):
    """jnp.round (round half to even) from floor, compares and selects: Pallas' Triton lowering has no round
    (jax 0.10). Exact for |v| < 2^23: v - floor(v) is exact there."""
    f = jnp.floor(v)
    d = v - f
    odd = (f - 2.0 * jnp.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return jnp.where(up, f + 1.0, f)


def dot(a, b, *, upcast):
    """a @ b with float32 accumulation (a [m, k], b [k, n]). upcast: the interpreter on CPU, where XLA:CPU has no
    bf16 x bf16 -> f32 dot; the products of the kernel's operands are exact in float32."""
    if upcast:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def placement(bo_pad: int, rb: int, c, dtype):
    """E_c [Bo, Bo Rb]: E_c[i, i Rb + c] = 1 (c: int or traced int32), placing t[:, i] at column i Rb + c."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (bo_pad, bo_pad * rb), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (bo_pad, bo_pad * rb), 1)
    return (cols == rows * rb + c).astype(dtype)


def level(lev_static, lev_steps, lev_ref, step_ref):
    """The code level 2^(bits-1) - 1: static, from the per-step table at the traced step, or a traced scalar."""
    if lev_static is not None:
        return lev_static
    if lev_steps:                          # per-step table: lev[clip(step, 0, T - 1)], looked up here
        return lev_ref[jnp.clip(step_ref[0], 0, lev_steps - 1)]
    return lev_ref[...]


__all__ = ["round_half_even", "dot", "placement", "level"]
