"""The prologue of a rotated layer on Mosaic GPU kernels (`prepare(..., prologue="mosaic" | "mosaic-gemm")`, Hopper).

A layer whose Hadamard block is its whole input (w.rotate == K: every layer of the paper preset), without
smoothing, prepared with its branch down-projection on the layer's input (down="input",
`branch_ops.input_space_down`) and a VaTMP level table, gets the codes of its rotated x' (bf16, what the XLA
prologue computes with xprime="bfloat16", up to the order of the float32 sums) and the row maxima of |x'| with no
reduce pass over x'. Two routes:

- "hadamard" (prologue="mosaic"): `mosaic_hadamard.mosaic_hadamard_codes`, x' per row as G^T (X o D) S_c on the
  tensor cores (4.7x / 10x fewer multiply-adds than a dense +-1 GEMM at K = 1536 / 6144); each tile holds whole
  rows, so the kernel makes the codes itself (x' is never written; to_q / to_k / to_v get all their codes from
  one call, with their level tables stacked in the `SharedDown`); the branch features x jd from one Mosaic bf16 GEMM
  on x (`mosaic_gemm.mosaic_bf16_gemm_rowmax(rowmax=False)`; XLA's GEMM where the rows do not tile).
- "gemm" (prologue="mosaic-gemm", K <= `transforms.FULL_CAP`): one `mosaic_gemm.mosaic_bf16_gemm_rowmax`,
  y = [x (D H_K sqrt(K)) / sqrt(K) | x jd] bf16 [Mp, K + W] (the +-1 matrix exact in bf16) with the row maxima of
  the rotation's column tiles from its epilogue; the features are its columns K.., read in place by the int8 GEMM
  (`Operands.col` = K + the layer's first feature column); the codes in one XLA pass (clip(round(x' / s)), s from
  the row maxima and the level table: `operands.scale_from_max`).

The layers reading one x (to_q / to_k / to_v) run the same kernel on the same operands: one kernel after XLA's
common-subexpression elimination (the custom call has no side effect). Elsewhere (other layers, the CPU, the
interpreter) the XLA prologue runs.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from qdit4sr_jax.quant.kernels.branch_ops import BranchWeights, SharedDown
from qdit4sr_jax.quant.kernels.operands import Operands, codes_from_scale, scale_from_max
from qdit4sr_jax.quant.qweight import QuantizedWeight

# The rotation GEMM's tiles: two 64 x 128 warpgroup tiles along M, so that x' and the features need column counts
# that are multiples of 128 only (one q/k/v group's features: 3 x 128).
ROTATION_TILES = dict(tile_m=64, tile_n=128, wg_dim="m", stages=4, in_flight=1)
COLUMN_TILE = 128
ROW_TILE = 2 * ROTATION_TILES["tile_m"]      # rows per CTA of those tiles (`mosaic_gemm._cta`)
# The run maxima per row that the int8 GEMM's epilogue reduces must be a multiple of this. 16: K = 6144 (48 runs)
# checked right on an H100 (2026-12-07 10:22). K = 1536 (24 runs: the GEMM's overlapping 16-column blocks) is
# unchecked: `mosaic_fused_check.py --run-tile 8`.
RUN_TILE = 16
# Run lengths of the Hadamard plan (`mosaic_hadamard.hadamard_plan`: 64 at K = 1536, 128 at K = 6144) for which the
# kernel makes the codes itself (others: the kernel's x' and XLA codes). At 64 they were wrong on an H100 (fused
# checks of 2026-12-07 10:22 / 10:29, rel. 0.07 vs the Triton path, differing between runs): the row max was a
# reduction across warps through a scratch area that both warpgroups of a CTA share (Pallas' reduction scratch). With
# scalar reads of the run maxima instead they are right (fused check of 2026-12-07 16:05, H100: rel. 7.6e-5 vs
# the Triton path, as with XLA's codes).
CODES_IN_KERNEL = (64, 128)


def pad_columns(jd):
    """jd [K, W] with zero columns up to a multiple of `COLUMN_TILE` (exact; the GEMM kernels never read them).
    `prepare` pads the down-projections of layers on these routes once (a pad kernel per layer and step when it
    ran here: 128 per 512-px W4A4 step, H100 2026-12-07 10:06); here it is a no-op then."""
    return jd if jd.shape[1] % COLUMN_TILE == 0 else jnp.pad(jd, ((0, 0), (0, -jd.shape[1] % COLUMN_TILE)))


def rotation_matrix(k: int, signs: bool):
    """D H_K sqrt(K) (+-1, bf16 [K, K], input k by output n): x' = x D H_K = (x @ this) / sqrt(K). Built in the
    graph from H_m's +-1 (m <= 20) and the Sylvester entries (-1)^popcount(a & b), not captured as a [K, K]
    constant per layer (that put 2.1 GB of constants into the 512-px step's lowering: H100, 2026-12-07 08:06)."""
    from qdit4sr_jax.quant.transforms import hadamard_base, hadamard_factors, rotation_signs
    m, p = hadamard_factors(k)
    a = jax.lax.broadcasted_iota(jnp.int32, (p, p), 0)
    b = jax.lax.broadcasted_iota(jnp.int32, (p, p), 1)
    s_p = 1 - 2 * (jax.lax.population_count(a & b) & 1)
    hm = jnp.asarray(np.rint(hadamard_base(m) * np.sqrt(m)), jnp.int32)
    r = jnp.kron(hm, s_p)
    if signs:
        r = r * jnp.asarray(rotation_signs(k), jnp.int32)[:, None]
    return r.astype(jnp.bfloat16)


def _jd(bw: Optional[BranchWeights], shared: Optional[SharedDown]):
    """The down-projection this layer's features come from, [K, W]: the group's shared one, its own, or None."""
    if bw is None:
        return None
    if bw.jd_col is not None:
        return None if shared is None else shared.jd
    return bw.jd


ROUTES = ("hadamard", "gemm")
PROLOGUE_ROUTES = {"mosaic": "hadamard", "mosaic-gemm": "gemm"}      # `KernelWeight.prologue` -> route


def fits(x2, w: QuantizedWeight, bw: Optional[BranchWeights], shared: Optional[SharedDown], levels,
         pad_to: int, route: str = "hadamard") -> bool:
    """Whether this layer's prologue can run on `route`: rotated over all of K, no smoothing, bf16 input, a level
    table, branches (if any) from an input-space bf16 jd; "hadamard": K with a `mosaic_hadamard.hadamard_plan` (1536,
    6144) and the padded rows a multiple of its rows per tile; "gemm": K <= FULL_CAP, the padded rows a multiple of
    the GEMM's row tile and the feature offsets readable in place from column K."""
    from qdit4sr_jax.quant.kernels import mosaic_hadamard as mh
    from qdit4sr_jax.quant.transforms import FULL_CAP, is_hadamard_block
    k = w.k
    mp = -(-x2.shape[0] // pad_to) * pad_to
    if (route not in ROUTES or w.rotate != k or not is_hadamard_block(k) or w.smooth is not None or levels is None
            or x2.dtype != jnp.bfloat16):
        return False
    if route == "hadamard" and not mh.fits(mp, k):
        return False
    if route == "gemm" and (k > FULL_CAP or k % COLUMN_TILE or mp % ROW_TILE):
        return False
    if bw is None:
        return True
    jd = _jd(bw, shared)
    if jd is None or not bw.jd_input or jd.dtype != jnp.bfloat16 or jd.shape[0] != k:
        return False
    if (bw.has_blocks and bw.dt_col % bw.rb) or (route == "gemm" and k % bw.joint_align):   # read in place
        return False
    if route == "gemm" and bw.lr_block:             # merged layers' blocked low-rank: the Hadamard route only
        return False
    return True


def _features(x2, jd, gemm=None):
    """x2 [Mp, K] @ jd [K, W] -> bf16 [Mp, W'] (W' >= W; zero columns past W, never read): the branch features on the
    Mosaic bf16 GEMM (one kernel, where XLA ran the 2048-row layers' as a split-K GEMM and a reduce: 148 GEMMs of
    ~10 us and 148 reduces per 512-px step, H100 2026-12-06), or XLA's GEMM where the rows do not tile."""
    from qdit4sr_jax.quant.kernels.branch_ops import down_features
    from qdit4sr_jax.quant.kernels.mosaic_gemm import mosaic_bf16_gemm_rowmax
    mp, k = x2.shape
    if mp % ROW_TILE or k % 64 or jd.dtype != jnp.bfloat16:
        return down_features(x2, jd)
    return (gemm or mosaic_bf16_gemm_rowmax)(x2, pad_columns(jd), layout="kn", rowmax=False, **ROTATION_TILES)[0]


def mosaic_prologue(x2, w: QuantizedWeight, bw: Optional[BranchWeights], *, pad_to: int, levels, inv_levels,
                    step, shared: Optional[SharedDown] = None, route: str = "hadamard", kernel=None,
                    gemm=None, rowmax_kernel=None) -> Operands:
    """x2 bf16 [M, K] -> `Operands` for the GEMM kernels (module docstring): int8 codes [Mp, K], sx the row maxima
    of x' (deferred scale: sx_inv / sx_step) and the branch features. Call only where `fits`.
    route "hadamard": the codes and run maxima from `mosaic_hadamard.mosaic_hadamard_codes` (with a `SharedDown`
    holding the group's level tables: every member's codes from one call, this member's taken), the features x jd
    from one GEMM (`_features`: the same for the layers sharing x, one after XLA's CSE);
    "gemm": x' and the features from one `mosaic_gemm.mosaic_bf16_gemm_rowmax` (the features then read in place at
    column K + the layer's first column). kernel: the route's kernel, gemm: the Mosaic bf16 GEMM (the features'
    GEMM of the "hadamard" route where the rows tile), rowmax_kernel: the Hadamard kernel's x' mode, which the
    "hadamard" route runs instead of the codes mode where the plan's run length is not in `CODES_IN_KERNEL`, the
    codes then made by XLA (tests on the CPU pass their XLA forms, `mosaic_hadamard.codes_reference` /
    `hadamard_reference` / `mosaic_gemm.rowmax_reference`)."""
    from qdit4sr_jax.quant.kernels.mosaic_gemm import mosaic_bf16_gemm_rowmax
    from qdit4sr_jax.quant.kernels.mosaic_hadamard import hadamard_plan, mosaic_hadamard_codes, mosaic_hadamard_rowmax
    if route not in ROUTES:
        raise ValueError(f"rotation prologue route must be one of {ROUTES}, got {route!r}")
    m, k = x2.shape
    mp = -(-m // pad_to) * pad_to
    if mp != m:
        x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
    jd = _jd(bw, shared)
    deferred = dict(sx_inv=inv_levels, sx_step=jnp.reshape(jnp.asarray(step, jnp.int32), (1,)))
    xla_codes = lambda xp, amax: codes_from_scale(  # noqa: E731 - XLA's codes of x' [Mp, K] from the row maxima [Mp]
        xp.astype(jnp.float32), scale_from_max(amax, inv_levels, step)[:, None],
        levels[jnp.clip(jnp.asarray(step, jnp.int32), 0, levels.shape[0] - 1)])
    if route == "hadamard" and hadamard_plan(k)[1] in CODES_IN_KERNEL:
        if shared is not None and bw is not None and bw.jd_col is not None and shared.levels is not None:
            tabs, member = (shared.levels, shared.inv_levels), shared.member(bw.jd_col)     # every member's codes,
        else:                                                                               # one call
            tabs, member = (levels[None], inv_levels[None]), 0
        codes, run_max = (kernel or mosaic_hadamard_codes)(x2, *tabs, step, signs=bool(w.signs))
        q = codes[member]                                            # int8 [Mp, K]
        # the run maxima [Mp, g]: the Mosaic GEMM takes each row's max in its epilogue where g is a multiple of
        # RUN_TILE (`mosaic_gemm.fits`), else one reduce here
        amax = run_max if run_max.shape[1] % RUN_TILE == 0 else jnp.max(run_max, axis=1)
    elif route == "hadamard":                # x' and run maxima from the kernel, the codes from XLA
        y, run_max = (rowmax_kernel or mosaic_hadamard_rowmax)(x2, signs=bool(w.signs))
        amax = jnp.max(run_max, axis=1)
        q = xla_codes(y, amax)
    else:
        y, amax_t = (kernel or gemm or mosaic_bf16_gemm_rowmax)(
            x2, rotation_matrix(k, bool(w.signs)), None if jd is None else pad_columns(jd), layout="kn",
            b_scale=float(np.float32(1.0 / np.sqrt(k))), **ROTATION_TILES)
        amax = jnp.max(amax_t, axis=0)                               # [Mp] float32
        q = xla_codes(y[:, :k], amax)
    if route == "hadamard":                  # the features from one GEMM on x (one for the layers sharing x)
        feats, col = (None, 0) if jd is None else (_features(x2, jd, gemm), bw.jd_col or 0)
    else:                                    # ... or the rotation GEMM's columns K..
        feats, col = y, k + ((bw.jd_col or 0) if bw is not None else 0)
    if bw is None:
        return Operands(q, amax, None, None, None, m, 0, **deferred)
    return Operands(q, amax, feats if bw.has_lowrank else None, feats if bw.has_blocks else None, bw, m, 0, True,
                    col, **deferred)


__all__ = ["ROTATION_TILES", "ROUTES", "PROLOGUE_ROUTES", "fits", "mosaic_prologue", "pad_columns", "rotation_matrix"]
