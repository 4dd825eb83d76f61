"""Baseline PTQ methods in one framework: each is a set of transforms applied to a linear weight
before its residual is quantized, and mirrored online on the activation inside `linear`.

`quantize_linear(w_nk, ch_absmax, a_schedule, spec)` composes, in this order:
  1. smoothing (SmoothQuant / SVDQuant): W' = W diag(s), x' = x / s (online, inside `linear`), with
     s_j = max|X_j|^alpha / max_n |W_nj|^(1 - alpha)   (Xiao et al., "SmoothQuant", ICML 2023, eq. 4;
     SVDQuant, Li et al., ICLR 2025, sec. 4.1, uses the same migration before its low-rank split).
  2. rotation (QuaRot-style, Ashkboos et al., NeurIPS 2024): W' = W H, x' = x H with H an orthonormal
     Walsh-Hadamard matrix, applied to the weight offline and to the activation online. QuaRot uses a
     full Hadamard of size d_in (Kronecker products with a stored 12/20/28/.. Hadamard when d_in is not a
     power of 2); we use the block-diagonal Hadamard of the largest power of 2 dividing d_in (e.g. 512
     for 1536, 2048 for 6144), computed with a fast Walsh-Hadamard transform: outliers are spread within
     blocks, not across the whole row.
  3. low-rank branch (SVDQuant): the rank-r truncated SVD L = U_r S_r V_r^T of the (smoothed) weight is
     kept in 16-bit (lr_a = V_r S_r^1/2 [K, r], lr_b = S_r^1/2 U_r^T [r, N]); the residual W' - L (computed
     from the 16-bit-rounded factors) is quantized (SVDQuant: rank 32, 4-bit, group 64).
  4. RTN of what remains: round-to-nearest with clipping, per output channel or per group along d_in.
RTN alone is the plain baseline (weights RTN per channel/group, activations dynamic per token).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp

from qdit4sr_jax.quant.hsvd import lowrank_split, top_svd  # noqa: F401  (re-exported)
from qdit4sr_jax.quant.plan import LayerSpec
from qdit4sr_jax.quant.qweight import QuantizedWeight, make_qweight
from qdit4sr_jax.quant.transforms import sign_weight, hadamard_transform, largest_pow2_divisor, smooth_scale  # noqa: F401


def quantize_linear(w_nk, ch_absmax=None, a_schedule=None, *, spec: LayerSpec) -> QuantizedWeight:
    """Quantize W [N, K] (out, in) with `spec` (smoothing needs ch_absmax [K] from calibration).
    Pure and traceable: jit with `spec` static."""
    w = w_nk.astype(jnp.float32)
    smooth = None
    if spec.smooth:
        if ch_absmax is None:
            raise ValueError("smoothing needs per-channel activation absmax (calibration statistics)")
        smooth = smooth_scale(ch_absmax, w, spec.smooth_alpha)
        w = w * smooth[None, :]
    if spec.rotate and spec.rotate_signs:                 # randomised Hadamard: the node multiplies x by the signs
        w = sign_weight(w)
    if spec.rotate:
        w = hadamard_transform(w, spec.rotate)
    lr_a = lr_b = None
    if spec.lowrank_rank:
        lr_a, lr_b, w = lowrank_split(w, spec.lowrank_rank, spec.branch_dtype, spec.lowrank_svd)
    return make_qweight(
        w, w_bits=spec.w_bits, group_size=spec.group_size, w_symmetric=spec.w_symmetric,
        a_bits=spec.a_bits, a_symmetric=spec.a_symmetric, clip_ratio=spec.clip_ratio,
        clip_search=spec.clip_search, pack=spec.pack, execution=spec.execution, dtype=spec.dtype,
        smooth=smooth, lr_a=lr_a, lr_b=lr_b, rotate=spec.rotate, signs=bool(spec.rotate and spec.rotate_signs),
        a_schedule=a_schedule,
        branch_dtype=spec.branch_dtype, group_scale=spec.group_scale, lowrank_bits=spec.lowrank_bits)


def rtn(w_nk, spec: LayerSpec) -> QuantizedWeight:
    """Round-to-nearest: weights per channel / group with clipping, activations per token (dynamic)."""
    return quantize_linear(w_nk, spec=dataclasses.replace(spec, smooth=False, rotate=0, lowrank_rank=0))


def smoothquant(w_nk, ch_absmax, spec: LayerSpec, alpha: float = 0.5) -> QuantizedWeight:
    """SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weight with s_j =
    max|X_j|^alpha / max|W_j|^(1-alpha), then RTN (the paper: per-channel W8, per-token A8)."""
    return quantize_linear(w_nk, ch_absmax, spec=dataclasses.replace(
        spec, smooth=True, smooth_alpha=alpha, rotate=0, lowrank_rank=0))


def svdquant(w_nk, ch_absmax, spec: LayerSpec, rank: int = 32, alpha: float = 0.5) -> QuantizedWeight:
    """SVDQuant (Li et al., ICLR 2025): smoothing, a rank-32 16-bit branch from the SVD of the smoothed
    weight, the residual in 4 bits with group-64 scales; activations per token (the paper uses 4-bit
    group-64 activations on its kernels; we keep per-token as for every other method here)."""
    return quantize_linear(w_nk, ch_absmax, spec=dataclasses.replace(
        spec, smooth=True, smooth_alpha=alpha, rotate=0, lowrank_rank=rank))


def rotation(w_nk, spec: LayerSpec, block: Optional[int] = None) -> QuantizedWeight:
    """QuaRot-style (Ashkboos et al. 2024) Hadamard rotation of the input dimension, weight rotated
    offline, activation online; RTN after it (QuaRot-RTN). Block-diagonal when d_in is not a power of 2."""
    k = w_nk.shape[1]
    return quantize_linear(w_nk, spec=dataclasses.replace(
        spec, smooth=False, lowrank_rank=0, rotate=block or largest_pow2_divisor(k)))
