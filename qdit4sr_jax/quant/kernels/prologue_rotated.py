"""The prologue kernel of a rotated layer (`prologue_kernel.pallas_prologue` picks it): the online Hadamard H_b
(with or without QuaRot's signs), the per-token codes and the branch down-projections in one Pallas kernel.

The rotation runs in the "dense" form of `transforms.kronecker_plan` (H_b sqrt(b) = G (x) S_c, c = min(p, 128),
g = b / c): every run j of c inputs is loaded once and multiplied by diag(signs_j) S_c (one +-1 dot per run, the
signs folded into the stacked [K, c] matrix `hs`: exact, like the dots of `transforms._pm1_dot`; a float32 x'
(smoothing, or a float32 x) enters as its exact three-part bf16 split), then x'_i = (sum_j G[j, i] u_j) / sqrt(b)
as unrolled additions. The whole rotated row tile stays in registers (bm * K float32, `ROT_TILE` elements at
most), so x is read from memory once; pass 1 (amax, branch features) and pass 2 (codes) run over it. The codes
equal the XLA prologue's up to the float32 rounding of the differently ordered sums (a code can move by one where
x' / s falls within that rounding of a half-integer; on an H100, 0 of 12.6 M codes of the paper layer differ).

Measured (H100, benchmarks/RESULTS.md 2026-12-06 04:25): the 8192 x 1536 -> 1536 paper layer 180.6 us vs 207.1
with the XLA rotation, but the 512-px step 0.37x vs 0.47x of bf16 (the kernel is latency-bound, and XLA rotates
the input shared by to_q / to_k / to_v once): opt-in through `prepare(..., prologue="pallas")`.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from qdit4sr_jax.quant.kernels.branch_ops import BranchWeights
from qdit4sr_jax.quant.kernels.prologue_ops import codes, dot as _dot, level, placement, store_scale, unpack_refs
from qdit4sr_jax.quant.qweight import QuantizedWeight
from qdit4sr_jax.quant.transforms import kronecker_plan, rotation_signs, split_bf16, sylvester

ROT_TILE = 16 * 2048  # float32 elements of the rotated row tile held in registers (bm * K) at most


def rotation_unit(w: QuantizedWeight, bw: Optional[BranchWeights]) -> int:
    """Columns of x' computed per dot in a rotated layer (w.rotate > 0): min(c, b_in), c of
    `transforms.kronecker_plan`, b_in only with block branches."""
    c = kronecker_plan(w.rotate)[0]
    if bw is not None and bw.has_blocks:
        c = min(c, bw.block[1])
    return c


def rotated_tile(x_ref, sm_ref, hs_ref, *, k, c, e, g, gmat, scale, parts, dot):
    """x' of the row tile (module docstring, rotated layers) as K / e float32 [bm, e] tiles in column order.
    hs_ref [K, c]: run j's rows hold diag(signs_j) S_c; gmat: G as nested tuples of +-1."""
    f32 = jnp.float32
    cols = []
    for blk in range(k // (c * g)):
        u = []                                             # u[j][s] = x_j diag(signs_j) S_c[:, s e:(s + 1) e]
        for j in range(g):
            col = (blk * g + j) * c
            xc = x_ref[:, pl.ds(col, c)]
            if sm_ref is not None:
                xc = xc.astype(f32) / sm_ref[pl.ds(col, c)][None, :]
            ops = [xc] if parts == 1 else list(split_bf16(xc.astype(f32)))
            row = []
            for s_ in range(c // e):
                mat = hs_ref[pl.ds(col, c), pl.ds(s_ * e, e)]
                acc = dot(ops[0], mat)
                for op in ops[1:]:
                    acc = acc + dot(op, mat)
                row.append(acc)
            u.append(row)
        for i in range(g):
            for s_ in range(c // e):
                z = None
                for j in range(g):
                    t, plus = u[j][s_], gmat[j][i] > 0
                    z = (t if plus else -t) if z is None else (z + t if plus else z - t)
                cols.append(z * scale)
    return cols


def kernel_rotated(*refs, k, c, e, g, gmat, scale, parts, bk_in, lev_static, lev_steps, has_smooth,
                    has_lowrank, has_blocks, rb, upcast):
    """The prologue of a rotated layer: x' in registers (`_rotated_tile`), then pass 1 and pass 2 over it."""
    r = unpack_refs(refs, has_smooth=has_smooth, has_rotation=True, lev_static=lev_static, lev_steps=lev_steps,
                    has_lowrank=has_lowrank, has_blocks=has_blocks)
    la_ref, vt_ref = r.la, r.vt
    dot = functools.partial(_dot, upcast=upcast)
    xp = rotated_tile(r.x, r.sm, r.hs, k=k, c=c, e=e, g=g, gmat=gmat, scale=scale, parts=parts, dot=dot)
    amax = None
    dh = dt = t = None
    for u, xu in enumerate(xp):                            # pass 1: amax and the branch features
        col = u * e
        m_u = jnp.max(jnp.abs(xu), axis=1)
        amax = m_u if amax is None else jnp.maximum(amax, m_u)
        if has_lowrank or has_blocks:
            xb = xu.astype((la_ref if has_lowrank else vt_ref).dtype)
        if has_lowrank:
            d = dot(xb, la_ref[pl.ds(col, e), :])
            dh = d if dh is None else dh + d
        if has_blocks:
            cb, sub = col // bk_in, (col % bk_in) // e
            d = dot(xb, vt_ref[cb, pl.ds(sub * e, e), :])
            t = d if t is None else t + d
            if sub == bk_in // e - 1:                      # input block cb complete: place t[:, i] at i Rb + cb
                d = dot(t.astype(vt_ref.dtype), placement(vt_ref.shape[2], rb, cb, vt_ref.dtype))
                dt, t = (d if dt is None else dt + d), None
    if has_lowrank:
        r.dh[...] = dh.astype(r.dh.dtype)
    if has_blocks:
        r.dt[...] = dt.astype(r.dt.dtype)
    lev = level(lev_static, lev_steps, r.lev, r.step)
    s = store_scale(amax, lev, r.s)
    for u, xu in enumerate(xp):                            # pass 2: the codes
        r.q[:, pl.ds(u * e, e)] = codes(xu, s, lev)


def rotation_operands(w: QuantizedWeight, bw: Optional[BranchWeights], x_dtype):
    """(static plan, hs) of a rotated layer for `_kernel_rotated`: the plan's c, e, g, G (nested tuples),
    1/sqrt(b) and the number of bf16 parts of x' (1: a bf16 / f16 x without smoothing enters as is; 3: the
    exact split of a float32 x'); hs [K, c] in the dots' dtype, run j's rows diag(signs_j) S_c."""
    c, g, gmat = kronecker_plan(w.rotate)
    plain = x_dtype in (jnp.bfloat16, jnp.float16) and w.smooth is None
    dtype = x_dtype if plain else jnp.bfloat16
    hs = np.tile(sylvester(c), (w.k // c, 1))
    if w.signs:
        hs = hs * rotation_signs(w.k)[:, None]
    plan = dict(c=c, e=rotation_unit(w, bw), g=g, gmat=tuple(tuple(float(v) for v in r) for r in gmat),
                scale=float(np.float32(1.0 / np.sqrt(w.rotate))), parts=1 if plain else 3)
    return plan, jnp.asarray(hs, dtype)


__all__ = ["kernel_rotated", "rotated_tile", "rotation_operands", "rotation_unit", "ROT_TILE"]
