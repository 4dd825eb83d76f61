"""In-kernel helpers shared by the prologue kernels (`prologue_kernel.py`, `prologue_rotated.py`): their refs,
rounding, the float32-accumulating dot, the placement matrix of the block-branch features, the code level, the
per-token scale and the codes."""
from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp


def unpack_refs(refs, *, has_smooth, has_rotation, lev_static, lev_steps, has_lowrank, has_blocks):
    """The kernel's refs in `prologue_kernel.pallas_prologue`'s order -> a namespace x, sm, hs, lev, step, la,
    vt (inputs), q, s, dh, dt (outputs); the absent ones None."""
    refs = list(refs)
    take = lambda present: refs.pop(0) if present else None
    r = SimpleNamespace(x=take(True), sm=take(has_smooth), hs=take(has_rotation), lev=take(lev_static is None),
                        step=take(bool(lev_steps)), la=take(has_lowrank), vt=take(has_blocks))
    r.q, r.s, r.dh, r.dt = take(True), take(True), take(has_lowrank), take(has_blocks)
    return r


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


def store_scale(amax, lev, s_ref):
    """Per-token scale s = amax / lev (1 where amax is 0), float32 [bm], written to s_ref and returned."""
    s = amax / lev
    s = jnp.where(s > 0, s, 1.0)
    s_ref[...] = s
    return s


def codes(xc, s, lev):
    """int8 codes clip(round(x' / s), +-lev) of x' [bm, c] float32 with the per-token scales s [bm]."""
    return jnp.clip(round_half_even(xc / s[:, None]), -lev, lev).astype(jnp.int8)


__all__ = ["unpack_refs", "round_half_even", "dot", "placement", "level", "store_scale", "codes"]
