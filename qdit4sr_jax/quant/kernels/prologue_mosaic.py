"""The prologue of a rotated layer as one Mosaic GPU GEMM (`prepare(..., prologue="mosaic")`, Hopper).

A layer whose Hadamard block is its whole input (w.rotate == K <= `transforms.FULL_CAP`: every 1536-input layer
of the paper preset), without smoothing, prepared with its branch down-projection on the layer's input
(down="input", `branch_ops.input_space_down`) and a VaTMP level table, gets from one kernel
(`mosaic_gemm.mosaic_bf16_gemm_rowmax`, layout "kn"):

  y = [x (D H_K sqrt(K)) / sqrt(K) | x jd]   bf16 [Mp, K + W]   (the +-1 matrix exact in bf16, float32 sums)
  amax[j, m] = max |y[m, j tile]| over the K / tile_n tiles of x'      (from the epilogue: no reduce pass)

x' = y[:, :K] is what the XLA prologue computes with xprime="bfloat16" (the "full" Hadamard: one +-1 GEMM,
scaled in float32, rounded once), up to the order of the float32 sums; the features x jd (own jd or the
`SharedDown` of to_q / to_k / to_v) are the same GEMM's columns K.., read in place by the int8 GEMM kernel
(`Operands.col` = K + the layer's first column). What stays in XLA is one elementwise pass: the codes
clip(round(x' / s)) with s from the row maxima and the level table (`operands.scale_from_max`), and the max over
the K / tile_n partial maxima. The layers reading one x (to_q / to_k / to_v) run the same kernel on the same
operands: one kernel after XLA's common-subexpression elimination (the custom call has no side effect).

This replaces, per q/k/v group, the rotation GEMM, the max-reduce over x' and the split-K down-projection GEMM(s)
(benchmarks/gpu_notes.md). Elsewhere (other layers, the CPU, the interpreter) the XLA prologue runs.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import jax.numpy as jnp
import numpy as np

from qdit4sr_jax.quant.kernels.branch_ops import BranchWeights, SharedDown
from qdit4sr_jax.quant.kernels.operands import Operands, scale_from_max
from qdit4sr_jax.quant.qweight import QuantizedWeight

# The rotation GEMM's tiles: two 64 x 128 warpgroup tiles along M, so that x' and the features need column counts
# that are multiples of 128 only (one q/k/v group's features: 3 x 128).
ROTATION_TILES = dict(tile_m=64, tile_n=128, wg_dim="m", stages=4, in_flight=1)
COLUMN_TILE = 128


@lru_cache(maxsize=None)
def rotation_matrix_np(k: int, signs: bool) -> np.ndarray:
    """D H_K sqrt(K) (+-1, float32 [K, K], input k by output n): x' = x D H_K = (x @ this) / sqrt(K)."""
    from qdit4sr_jax.quant.transforms import hadamard_matrix, rotation_signs
    h = np.rint(hadamard_matrix(k) * np.sqrt(k)).astype(np.float32)
    return (rotation_signs(k)[:, None] * h).astype(np.float32) if signs else h


def _jd(bw: Optional[BranchWeights], shared: Optional[SharedDown]):
    """The down-projection this layer's features come from, [K, W]: the group's shared one, its own, or None."""
    if bw is None:
        return None
    if bw.jd_col is not None:
        return None if shared is None else shared.jd
    return bw.jd


def fits(x2, w: QuantizedWeight, bw: Optional[BranchWeights], shared: Optional[SharedDown], levels,
         pad_to: int) -> bool:
    """Whether this layer's prologue can be the rotation kernel: rotated over all of K (<= FULL_CAP), no
    smoothing, bf16 input, a level table, branches (if any) from an input-space bf16 jd whose column count and
    feature offsets tile, rows padded to a multiple of the kernel's row tile."""
    from qdit4sr_jax.quant.kernels.mosaic_gemm import _cta
    from qdit4sr_jax.quant.transforms import FULL_CAP, is_hadamard_block
    k = w.k
    if (w.rotate != k or k > FULL_CAP or not is_hadamard_block(k) or w.smooth is not None or levels is None
            or x2.dtype != jnp.bfloat16 or k % COLUMN_TILE):
        return False
    cta_m, _ = _cta(ROTATION_TILES["tile_m"], ROTATION_TILES["tile_n"], ROTATION_TILES["wg_dim"])
    if -(-x2.shape[0] // pad_to) * pad_to % cta_m:
        return False
    if bw is None:
        return True
    jd = _jd(bw, shared)
    if jd is None or not bw.jd_input or jd.dtype != jnp.bfloat16 or jd.shape[0] != k:
        return False
    if k % bw.joint_align or (bw.has_blocks and bw.dt_col % bw.rb):     # read in place from column K + col
        return False
    return True


def mosaic_prologue(x2, w: QuantizedWeight, bw: Optional[BranchWeights], *, pad_to: int, levels, inv_levels,
                    step, shared: Optional[SharedDown] = None, rotation_gemm=None) -> Operands:
    """x2 bf16 [M, K] -> `Operands` for the GEMM kernels (module docstring): int8 codes [Mp, K], sx the row maxima
    of x' (deferred scale: sx_inv / sx_step), the joint features read in place from the kernel's output (joint,
    col = K + the layer's first feature column). Call only where `fits`. rotation_gemm: the GEMM with row maxima
    (default `mosaic_gemm.mosaic_bf16_gemm_rowmax`; tests on the CPU pass its XLA form `rowmax_reference`)."""
    from qdit4sr_jax.quant.kernels.mosaic_gemm import mosaic_bf16_gemm_rowmax
    rotation_gemm = rotation_gemm or mosaic_bf16_gemm_rowmax
    m, k = x2.shape
    mp = -(-m // pad_to) * pad_to
    if mp != m:
        x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
    r = jnp.asarray(rotation_matrix_np(k, bool(w.signs)), jnp.bfloat16)
    jd = _jd(bw, shared)
    if jd is not None and jd.shape[1] % COLUMN_TILE:                 # zero columns: exact, never read
        jd = jnp.pad(jd, ((0, 0), (0, -jd.shape[1] % COLUMN_TILE)))
    y, amax_t = rotation_gemm(x2, r, jd, layout="kn", b_scale=float(np.float32(1.0 / np.sqrt(k))),
                                  **ROTATION_TILES)
    amax = jnp.max(amax_t, axis=0)                                   # [Mp] float32
    s = scale_from_max(amax, inv_levels, step)[:, None]
    i = jnp.clip(jnp.asarray(step, jnp.int32), 0, levels.shape[0] - 1)
    lev = levels[i]
    q = jnp.clip(jnp.round(y[:, :k].astype(jnp.float32) / s), -lev, lev).astype(jnp.int8)
    deferred = dict(sx_inv=inv_levels, sx_step=jnp.reshape(jnp.asarray(step, jnp.int32), (1,)))
    if bw is None:
        return Operands(q, amax, None, None, None, m, 0, **deferred)
    col = k + (bw.jd_col or 0)
    return Operands(q, amax, y if bw.has_lowrank else None, y if bw.has_blocks else None, bw, m, 0, True, col,
                    **deferred)


__all__ = ["ROTATION_TILES", "fits", "mosaic_prologue", "rotation_matrix_np"]
