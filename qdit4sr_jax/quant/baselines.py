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

from qdit4sr_jax.quant.qweight import QuantizedWeight, make_qweight


def largest_pow2_divisor(d: int, cap: Optional[int] = None) -> int:
    """Largest power of 2 dividing d (and <= cap)."""
    b = d & -d
    if cap is not None:
        while b > cap:
            b //= 2
    return b


def hadamard_transform(x, block: int):
    """x [..., K] -> x @ blockdiag(H_b, ..., H_b), H_b the orthonormal Sylvester Hadamard matrix of size
    b = `block` (a power of 2 dividing K). H_b is symmetric and H_b H_b = I. float32, O(K log b)."""
    k = x.shape[-1]
    if block < 1 or block & (block - 1) or k % block:
        raise ValueError(f"Hadamard block {block} must be a power of 2 dividing d_in={k}")
    return _hadamard(x, int(block))


@partial(jax.jit, static_argnums=1)
def _hadamard(x, block: int):
    """x [..., K] -> x @ blockdiag(H_b, ..., H_b), H_b the orthonormal Sylvester Hadamard matrix of size
    b = `block` (a power of 2 dividing K). H_b is symmetric and H_b H_b = I. float32, O(K log b)."""
    k = x.shape[-1]
    if block < 1 or block & (block - 1) or k % block:
        raise ValueError(f"Hadamard block {block} must be a power of 2 dividing d_in={k}")
    lead = x.shape[:-1]
    y = x.astype(jnp.float32).reshape(*lead, k // block, block)
    h = 1
    while h < block:
        y = y.reshape(*lead, k // block, block // (2 * h), 2, h)
        a, c = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + c, a - c], axis=-2)
        h *= 2
    return (y.reshape(*lead, k) * (1.0 / jnp.sqrt(jnp.float32(block))))


def smooth_scale(ch_absmax, w_nk, alpha: float, eps: float = 1e-5):
    """SmoothQuant migration scale s [K] = max|X_j|^alpha / max_n|W_nj|^(1-alpha) (float32).
    Channels never active (max|X_j| = 0) or with an all-zero weight column get s = 1."""
    xa = jnp.asarray(ch_absmax, jnp.float32)
    wa = jnp.max(jnp.abs(w_nk.astype(jnp.float32)), axis=0)
    s = jnp.power(jnp.maximum(xa, eps), alpha) / jnp.power(jnp.maximum(wa, eps), 1.0 - alpha)
    ok = (xa > 0) & (wa > 0) & jnp.isfinite(s)
    return jnp.where(ok, jnp.maximum(s, eps), 1.0)


def top_svd(w, rank: int, method: str = "exact", oversample: int = 16, iters: int = 4):
    """Top-`rank` singular triplets (u [N, r], s [r], vt [r, K]) of w [N, K] float32.

    method "exact": `jnp.linalg.svd`. "randomized": randomized range finder with `iters` orthonormalised
    power iterations and `oversample` extra columns (Halko, Martinsson & Tropp 2011, alg. 4.4), then an exact
    SVD of the small projected matrix; O(N K (r + p)) instead of O(N K min(N, K)), with a fixed PRNG key
    (deterministic)."""
    if method == "exact":
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
        return u[:, :rank], s[:rank], vt[:rank]
    if method != "randomized":
        raise ValueError(f"svd method must be 'exact' or 'randomized', got {method!r}")
    n, k = w.shape
    p = min(rank + oversample, n, k)
    omega = jax.random.normal(jax.random.PRNGKey(0), (k, p), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    q, _ = jnp.linalg.qr(jnp.dot(w, omega, precision=hi))
    for _ in range(iters):
        z, _ = jnp.linalg.qr(jnp.dot(w.T, q, precision=hi))
        q, _ = jnp.linalg.qr(jnp.dot(w, z, precision=hi))
    ub, s, vt = jnp.linalg.svd(jnp.dot(q.T, w, precision=hi), full_matrices=False)
    return jnp.dot(q, ub[:, :rank], precision=hi), s[:rank], vt[:rank]


def lowrank_split(w_nk, rank: int, dtype="bfloat16", method: str = "exact"):
    """Rank-r SVD branch of W [N, K]: (lr_a [K, r], lr_b [r, N]) in `dtype`, residual W - lr_b^T lr_a^T
    [N, K] float32 computed from the rounded factors (so the quantized residual absorbs their rounding).
    method: "exact" or "randomized" (see `top_svd`)."""
    w = w_nk.astype(jnp.float32)
    r = min(rank, *w.shape)
    u, s, vt = top_svd(w, r, method)
    rs = jnp.sqrt(s)
    lr_a = (vt.T * rs[None, :]).astype(dtype)                 # [K, r]
    lr_b = (u * rs[None, :]).T.astype(dtype)                  # [r, N]
    resid = w - (lr_a.astype(jnp.float32) @ lr_b.astype(jnp.float32)).T
    return lr_a, lr_b, resid


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Static recipe for one linear (hashable: a jit static argument)."""
    w_bits: int
    a_bits: Optional[int]
    group_size: Optional[int] = 64
    w_symmetric: bool = True
    a_symmetric: bool = True
    clip_ratio: float = 1.0
    clip_search: bool = False
    smooth: bool = False
    smooth_alpha: float = 0.5
    rotate: int = 0                  # Hadamard block, 0 = off
    lowrank_rank: int = 0
    lowrank_svd: str = "exact"       # "exact" | "randomized"
    pack: bool = True
    execution: str = "fake"
    branch_dtype: str = "bfloat16"
    dtype: str = "float32"           # original kernel dtype
    group_scale: str = "float"       # "float" | "int" (two-level integer group scales, qweight.make_qweight)
    lowrank_bits: Optional[int] = None   # None: branch factors in branch_dtype; 8: int8 (qweight.make_qweight)


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
    if spec.rotate:
        w = hadamard_transform(w, spec.rotate)
    lr_a = lr_b = None
    if spec.lowrank_rank:
        lr_a, lr_b, w = lowrank_split(w, spec.lowrank_rank, spec.branch_dtype, spec.lowrank_svd)
    return make_qweight(
        w, w_bits=spec.w_bits, group_size=spec.group_size, w_symmetric=spec.w_symmetric,
        a_bits=spec.a_bits, a_symmetric=spec.a_symmetric, clip_ratio=spec.clip_ratio,
        clip_search=spec.clip_search, pack=spec.pack, execution=spec.execution, dtype=spec.dtype,
        smooth=smooth, lr_a=lr_a, lr_b=lr_b, rotate=spec.rotate, a_schedule=a_schedule,
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
