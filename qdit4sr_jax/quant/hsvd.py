"""H-SVD: hierarchical low-rank branches of a linear weight (Q-DiT4SR, MISSION.md "The method").

A weight W [d_out, d_in] (PyTorch layout; a Flax kernel is W^T) is split as W = L_g + L_b + R:
  L_g = U V^T          global truncated SVD of rank r_g          U [d_out, r_g], V [d_in, r_g]
  L_b = blockwise u v^T best rank-1 of each (b_out x b_in) block of W - L_g
                        u [n_bo, n_bi, b_out], v [n_bo, n_bi, b_in]
  R   = W - L_g - L_b   the residual that gets quantized.
The branches are meant to be stored in 16 bits. Singular values are split evenly between the two
factors (U = U_svd sqrt(S), V = V_svd sqrt(S), same for every block), which keeps both factors in
the same range for bf16.

Ragged edges: n_bo = ceil(d_out / b_out), n_bi = ceil(d_in / b_in); the last row/column of blocks
is smaller. The block factors are stored padded to full blocks; the padded entries are exactly 0
(edge block (i, j) has rows i*b_out .. min((i+1)*b_out, d_out)). A block larger than the matrix is
clamped to the matrix (`effective_block`).

Parameter count (what is stored, padding excluded): r_g (d_out + d_in) + n_bi d_out + n_bo d_in,
which for exact tiling equals r_g (d_out + d_in) + n_blocks (b_out + b_in).
`matched_global_rank` picks the largest r_g with that count <= rank (d_out + d_in), the count of a
plain rank-`rank` SVD branch (d = 1536, rank 32, 256 x 256 blocks -> r_g = 26).

Every function is a pure jnp function of static shapes; `hsvd`, `svd_branch` and `apply_branches`
are jit-compiled, and vmap over a leading layer axis of equal-shape weights
(`jax.vmap(functools.partial(hsvd, rank=32, block=(256, 256)))(ws)`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp


class HSVD(NamedTuple):
    """H-SVD factors of W [d_out, d_in]. U [d_out, r_g], V [d_in, r_g] (L_g = U V^T);
    u [n_bo, n_bi, b_out], v [n_bo, n_bi, b_in] (block (i, j) of L_b = outer(u[i, j], v[i, j]),
    zero-padded at ragged edges); residual [d_out, d_in] = W - L_g - L_b. Float dtype of W."""
    U: jax.Array
    V: jax.Array
    u: jax.Array
    v: jax.Array
    residual: jax.Array


class SVDBranch(NamedTuple):
    """Plain low-rank branch (SVDQuant): U [d_out, r], V [d_in, r]; residual = W - U V^T."""
    U: jax.Array
    V: jax.Array
    residual: jax.Array


def effective_block(d_out: int, d_in: int, block: Tuple[int, int]) -> Tuple[int, int]:
    """The block shape actually used: (min(b_out, d_out), min(b_in, d_in))."""
    b_out, b_in = (int(b) for b in block)
    if b_out < 1 or b_in < 1:
        raise ValueError(f"H-SVD block must be positive, got {block}")
    return min(b_out, d_out), min(b_in, d_in)


def block_grid(d_out: int, d_in: int, block: Tuple[int, int]) -> Tuple[int, int]:
    """(n_bo, n_bi) = number of block rows and columns (ceil division; edges may be ragged)."""
    b_out, b_in = effective_block(d_out, d_in, block)
    return -(-d_out // b_out), -(-d_in // b_in)


def block_params(d_out: int, d_in: int, block: Tuple[int, int]) -> int:
    """Parameters of the block rank-1 branch, padding excluded: n_bi d_out + n_bo d_in."""
    n_bo, n_bi = block_grid(d_out, d_in, block)
    return n_bi * d_out + n_bo * d_in


def hsvd_params(d_out: int, d_in: int, global_rank: int, block: Tuple[int, int]) -> int:
    """Parameters of both H-SVD branches: r_g (d_out + d_in) + block_params."""
    return global_rank * (d_out + d_in) + block_params(d_out, d_in, block)


def matched_global_rank(d_out: int, d_in: int, rank: int, block: Tuple[int, int]) -> int:
    """Largest r_g >= 0 with hsvd_params(d_out, d_in, r_g, block) <= rank (d_out + d_in).

    Capped at min(d_out, d_in). Raises ValueError when even r_g = 0 does not fit (the block branch
    alone holds more than a rank-`rank` branch): use larger blocks or a larger rank.
    """
    d_out, d_in, rank = int(d_out), int(d_in), int(rank)
    if d_out < 1 or d_in < 1 or rank < 0:
        raise ValueError(f"matched_global_rank: bad shape/rank d_out={d_out}, d_in={d_in}, rank={rank}")
    budget = rank * (d_out + d_in)
    left = budget - block_params(d_out, d_in, block)
    if left < 0:
        raise ValueError(
            f"H-SVD block branch with blocks {effective_block(d_out, d_in, block)} on a {d_out}x{d_in} "
            f"weight needs {block_params(d_out, d_in, block)} parameters, more than the rank-{rank} "
            f"budget {budget}; use larger blocks or a larger rank")
    return min(left // (d_out + d_in), d_out, d_in)


def _split_sv(u, s, vt, r):
    """Top-r factors with sqrt(S) on each side: U [m, r], V [n, r]."""
    rs = jnp.sqrt(s[..., :r])
    return u[..., :, :r] * rs[..., None, :], jnp.swapaxes(vt[..., :r, :], -1, -2) * rs[..., None, :]


def _to_blocks(m, block):
    """[d_out, d_in] -> zero-padded [n_bo, n_bi, b_out, b_in]."""
    d_out, d_in = m.shape
    b_out, b_in = effective_block(d_out, d_in, block)
    n_bo, n_bi = block_grid(d_out, d_in, block)
    m = jnp.pad(m, ((0, n_bo * b_out - d_out), (0, n_bi * b_in - d_in)))
    return m.reshape(n_bo, b_out, n_bi, b_in).transpose(0, 2, 1, 3)


def _from_blocks(b, d_out, d_in):
    """[n_bo, n_bi, b_out, b_in] -> [d_out, d_in] (padding cropped)."""
    n_bo, n_bi, b_out, b_in = b.shape
    return b.transpose(0, 2, 1, 3).reshape(n_bo * b_out, n_bi * b_in)[:d_out, :d_in]


def _block_masks(d_out, d_in, block, dtype):
    """Validity masks of the padded block factors: [n_bo, 1, b_out] and [1, n_bi, b_in]."""
    b_out, b_in = effective_block(d_out, d_in, block)
    n_bo, n_bi = block_grid(d_out, d_in, block)
    mo = (jnp.arange(n_bo * b_out) < d_out).astype(dtype).reshape(n_bo, 1, b_out)
    mi = (jnp.arange(n_bi * b_in) < d_in).astype(dtype).reshape(1, n_bi, b_in)
    return mo, mi


# ---- top singular pairs without one cuSOLVER call per matrix (GPU) ---------------------------------
# On CUDA, jnp.linalg.svd runs one solver call per matrix (gesvd for the global SVD, gesvdj for each
# 256x256 block: ~78k blocks for the full DiT4SR), which made the full-model quantize take 409 s on an
# H100 (benchmarks/RESULTS.md). There H-SVD takes its top singular pairs from iterations made of batched
# matmuls instead: power iteration for the block rank-1, subspace iteration + Rayleigh-Ritz for the
# global rank-r_g. Elsewhere (CPU, TPU) the exact SVD is used. Results agree with the exact SVD to the
# iteration tolerance (tests/method/test_hsvd_fast.py).
FAST_TOP_SVD_BACKENDS = ("gpu",)
BLOCK_POWER_ITERS = 150
GLOBAL_SUBSPACE_ITERS = 12
GLOBAL_SUBSPACE_EXTRA = 8


def _fast_top_svd() -> bool:
    return jax.default_backend() in FAST_TOP_SVD_BACKENDS


def top1_power(b, iters: int = BLOCK_POWER_ITERS):
    """Top singular triplet of each matrix of b [..., p, q] by power iteration on b^T b (matmuls only).
    Returns (u [..., p] unit, s [...], v [..., q] unit); a zero matrix gives zeros."""
    g = jnp.swapaxes(b, -1, -2) @ b
    unit = lambda y: y * jax.lax.rsqrt(jnp.maximum(jnp.sum(y * y, -1, keepdims=True), 1e-30))
    v0 = unit(jnp.ones(b.shape[:-2] + (b.shape[-1],), b.dtype)
              + 0.01 * jnp.arange(b.shape[-1], dtype=b.dtype) / b.shape[-1])
    v = jax.lax.fori_loop(0, iters, lambda _, v: unit((g @ v[..., None])[..., 0]), v0)
    bv = (b @ v[..., None])[..., 0]
    s = jnp.sqrt(jnp.sum(bv * bv, -1))
    return bv / jnp.maximum(s[..., None], 1e-30), s, v


def top_svd_subspace(m, r: int, iters: int = GLOBAL_SUBSPACE_ITERS, extra: int = GLOBAL_SUBSPACE_EXTRA):
    """Top-r singular triplets of m [p, q] by subspace iteration (QR) on the smaller Gram matrix and a
    Rayleigh-Ritz step. Returns (u [p, r], s [r] descending, v [q, r])."""
    p, q = m.shape
    tall = p >= q
    g = m.T @ m if tall else m @ m.T
    d = g.shape[0]
    k = min(d, r + extra)
    x = jax.random.normal(jax.random.PRNGKey(0), (d, k), m.dtype)
    x, _ = jnp.linalg.qr(x)
    x = jax.lax.fori_loop(0, iters, lambda _, x: jnp.linalg.qr(g @ x)[0], x)
    w, e = jnp.linalg.eigh(x.T @ g @ x)
    y = x @ e[:, ::-1][:, :r]
    s = jnp.sqrt(jnp.maximum(w[::-1][:r], 0.0))
    other = (m @ y if tall else m.T @ y) / jnp.maximum(s[None, :], 1e-30)
    return (other, s, y) if tall else (y, s, other)


BLOCK_SOLVERS = ("svd", "subspace")


def orthonormal_columns(y, rtol: float = 1e-4):
    """Orthonormal basis of the columns of y [..., m, k] (float32) by classical Gram-Schmidt with one
    re-orthogonalisation (CGS2) in a loop over the k columns: elementwise products and sums in float32
    (no dot, so no reduced-precision matmul on GPU), no solver call. Used on GPU by the "subspace"
    block solver instead of jnp.linalg.qr, whose Householder product (cuSOLVER orgqr) runs one call per
    matrix for m > 128 (17 calls per 256 x 256 block: ~670k calls for the full DiT4SR). Spans the same
    subspace as QR's Q. A column whose norm after projection is <= rtol times its norm before
    (numerically in the span of the previous ones, or zero) becomes zero.
    Returns q [..., m, k]: q^T q = identity on the non-zero columns, zeros elsewhere."""
    yt = jnp.moveaxis(y, -1, 0)                                     # [k, ..., m]: columns leading

    def body(j, q):
        v = yt[j]
        n0 = jnp.sqrt(jnp.sum(v * v, -1))
        for _ in range(2):                                          # rows >= j of q are still zero
            c = jnp.sum(q * v[None], -1)                            # [k, ...]
            v = v - jnp.sum(q * c[..., None], 0)
        n = jnp.sqrt(jnp.sum(v * v, -1))
        keep = (n > rtol * n0) & (n0 > 0)
        v = jnp.where(keep[..., None], v / jnp.where(keep, n, 1.0)[..., None], 0.0)
        return q.at[j].set(v)

    return jnp.moveaxis(jax.lax.fori_loop(0, yt.shape[0], body, jnp.zeros_like(yt)), 0, -1)


def _top1_subspace(blocks, k: int = 8, iters: int = 8):
    """Top singular triple of each block [..., bo, bi] by subspace iteration (k vectors, `iters` rounds,
    fixed start so it is deterministic) and Rayleigh-Ritz: only batched matmuls, thin QRs and a k x k
    eigh; on GPU the QRs are `orthonormal_columns` (same subspaces, no per-matrix solver calls).
    Returns u [..., bo], sigma [...], v [..., bi]."""
    bo, bi = blocks.shape[-2:]
    k = max(1, min(k, bo, bi))
    bt = jnp.swapaxes(blocks, -1, -2)
    y = blocks @ jax.random.normal(jax.random.PRNGKey(0), (bi, k), blocks.dtype)
    if _fast_top_svd():                  # GPU: no per-matrix cuSOLVER calls (see orthonormal_columns);
        orth = orthonormal_columns       # a loop, so that the program holds 3 orthonormalisations, not 17
        y = jax.lax.fori_loop(0, iters, lambda _, y: blocks @ orth(bt @ orth(y)), y)
    else:
        orth = lambda a: jnp.linalg.qr(a)[0]
        for _ in range(iters):
            y = blocks @ orth(bt @ orth(y))
    q = orth(y)                                                     # [..., bo, k]
    sm = jnp.swapaxes(q, -1, -2) @ blocks                           # [..., k, bi]
    ev, evec = jnp.linalg.eigh(sm @ jnp.swapaxes(sm, -1, -2))      # ascending
    us = evec[..., -1]
    sig = jnp.sqrt(jnp.maximum(ev[..., -1], 0.0))
    u = jnp.einsum("...ak,...k->...a", q, us)
    v = jnp.einsum("...kb,...k->...b", sm, us) / jnp.maximum(sig, 1e-30)[..., None]
    return u, sig, v


def fit_block_rank1(m, block, solver: str = "svd"):
    """Rank-1 approximation of every (b_out x b_in) block of m [d_out, d_in].

    solver: "svd" (best rank-1: batched SVD; power iteration on GPU, see above) or "subspace" (subspace iteration, 8 vectors x 8
      rounds: ~100x faster than XLA:CPU's batched SVD on 256 x 256 blocks; on Gaussian random blocks,
      the hardest case, it keeps 99.4% of the top singular value on average and the rank-1 residual
      grows by <= 0.1%; exact in practice when the top singular value is separated).
    Returns u [n_bo, n_bi, b_out], v [n_bo, n_bi, b_in] (sqrt of the singular value on each),
    exactly zero at padded (ragged-edge) positions.
    """
    if solver not in BLOCK_SOLVERS:
        raise ValueError(f"block solver must be one of {BLOCK_SOLVERS}, got {solver!r}")
    d_out, d_in = m.shape
    blocks = _to_blocks(m.astype(jnp.float32), block)
    if solver == "svd" and _fast_top_svd():          # GPU: power iteration instead of one SVD per block
        bu, bs, bv = top1_power(blocks)
        u, v = _split_sv(bu[..., None], bs[..., None], bv[..., None, :], 1)
        u, v = u[..., 0], v[..., 0]
    elif solver == "svd":
        bu, bs, bvt = jnp.linalg.svd(blocks, full_matrices=False)
        u, v = _split_sv(bu, bs, bvt, 1)
        u, v = u[..., 0], v[..., 0]
    else:
        u1, sig, v1 = _top1_subspace(blocks)
        rs = jnp.sqrt(sig)[..., None]
        u, v = u1 * rs, v1 * rs
    mo, mi = _block_masks(d_out, d_in, block, jnp.float32)
    return (u * mo).astype(m.dtype), (v * mi).astype(m.dtype)


def block_dense(u, v, d_out: int, d_in: int):
    """Dense L_b [d_out, d_in] from block factors u [n_bo, n_bi, b_out], v [n_bo, n_bi, b_in]."""
    return _from_blocks(jnp.einsum("ija,ijb->ijab", u, v), d_out, d_in)


def _top_factors(m, r: int, solver: str):
    """Top-r factors (U sqrt(S) [m, r], V sqrt(S) [n, r]) of m [m, n] float32. solver "exact"
    (jnp.linalg.svd; subspace iteration on GPU, see above) or "randomized" (`top_svd`)."""
    if solver == "exact":
        if _fast_top_svd():
            su, ss, sv = top_svd_subspace(m, r)
            return _split_sv(su, ss, sv.T, r)
        su, ss, svt = jnp.linalg.svd(m, full_matrices=False)
        return _split_sv(su, ss, svt, r)
    if solver != "randomized":
        raise ValueError(f"global SVD solver must be 'exact' or 'randomized', got {solver!r}")
    u, s, vt = top_svd(m, r, "randomized")
    return _split_sv(u, s, vt, r)


@functools.partial(jax.jit, static_argnames=("rank", "solver"))
def svd_branch(w, rank: int, solver: str = "exact") -> SVDBranch:
    """Rank-`rank` truncated SVD branch of w [d_out, d_in] (SVD-only baseline / ablation).
    rank is capped at min(d_out, d_in); solver "exact" | "randomized". Computed in float32; factors in w.dtype."""
    if w.ndim != 2:
        raise ValueError(f"svd_branch expects a 2-D weight [d_out, d_in], got shape {w.shape}")
    r = min(int(rank), *w.shape)
    wf = w.astype(jnp.float32)
    U, V = _top_factors(wf, r, solver)
    return SVDBranch(U.astype(w.dtype), V.astype(w.dtype), (wf - U @ V.T).astype(w.dtype))


@functools.partial(jax.jit, static_argnames=("rank", "block", "global_rank", "refine_iters", "block_solver",
                                                   "global_solver"))
def hsvd(w, *, rank: int, block: Tuple[int, int], global_rank: int | None = None,
         refine_iters: int = 0, block_solver: str = "svd", global_solver: str = "exact") -> HSVD:
    """H-SVD of w [d_out, d_in] at the parameter budget of a rank-`rank` SVD branch.

    global_rank: r_g override (default `matched_global_rank(d_out, d_in, rank, block)`).
    refine_iters: 0 (the formulation in MISSION.md: global SVD first, block rank-1 fitted on what
      remains, W - L_g). k > 0 runs k extra rounds of block-coordinate descent (refit L_g on W - L_b,
      then L_b on W - L_g); each round cannot increase ||R||_F (block_solver "svd").
    block_solver: "svd" (exact) | "subspace" (fast; see `fit_block_rank1`).
    global_solver: "exact" | "randomized" SVD of the global branch (see `_top_factors`).
    Computed in float32; returns `HSVD` in w.dtype.
    """
    if w.ndim != 2:
        raise ValueError(f"hsvd expects a 2-D weight [d_out, d_in], got shape {w.shape}")
    d_out, d_in = w.shape
    block = tuple(int(b) for b in block)
    r = matched_global_rank(d_out, d_in, rank, block) if global_rank is None else min(int(global_rank), d_out, d_in)
    wf = w.astype(jnp.float32)

    def fit_global(m):
        return _top_factors(m, r, global_solver)

    U, V = fit_global(wf)
    u, v = fit_block_rank1(wf - U @ V.T, block, block_solver)
    for _ in range(int(refine_iters)):
        U, V = fit_global(wf - block_dense(u, v, d_out, d_in))
        u, v = fit_block_rank1(wf - U @ V.T, block, block_solver)
    resid = wf - U @ V.T - block_dense(u, v, d_out, d_in)
    dt = w.dtype
    return HSVD(U.astype(dt), V.astype(dt), u.astype(dt), v.astype(dt), resid.astype(dt))


def branch_dense(f) -> jax.Array:
    """Dense L_g + L_b [d_out, d_in] of an `HSVD` (or L_g of an `SVDBranch`)."""
    dense = f.U @ f.V.T
    if isinstance(f, HSVD):
        dense = dense + block_dense(f.u, f.v, f.U.shape[0], f.V.shape[0]).astype(dense.dtype)
    return dense


def reconstruct(f) -> jax.Array:
    """W = branches + residual, [d_out, d_in]."""
    return branch_dense(f) + f.residual


def apply_block(x, u, v, d_out: int):
    """Block rank-1 branch on activations: x [..., d_in] -> [..., d_out] (two batched einsums).

    For block (i, j): y_i += u[i, j] * <v[i, j], x_j>. Works for padded v (zeros in padding).
    """
    n_bo, n_bi, b_out = u.shape
    b_in = v.shape[-1]
    d_in = x.shape[-1]
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n_bi * b_in - d_in)])
    xb = xp.reshape(x.shape[:-1] + (n_bi, b_in))
    t = jnp.einsum("...jb,ijb->...ij", xb, v.astype(x.dtype))          # [..., n_bo, n_bi]
    y = jnp.einsum("...ij,ija->...ia", t, u.astype(x.dtype))           # [..., n_bo, b_out]
    return y.reshape(x.shape[:-1] + (n_bo * b_out,))[..., :d_out]


@jax.jit
def apply_branches(f, x):
    """x [..., d_in] -> [..., d_out] = (x V) U^T (+ blockwise(x) for an `HSVD`), in x.dtype."""
    y = (x @ f.V.astype(x.dtype)) @ f.U.T.astype(x.dtype)
    if isinstance(f, HSVD):
        y = y + apply_block(x, f.u, f.v, f.U.shape[0])
    return y


def branch_param_count(f) -> int:
    """Stored branch parameters (padding excluded) of an `HSVD` or `SVDBranch` (static shapes)."""
    d_out, r = f.U.shape[-2:]
    d_in = f.V.shape[-1 - 1]
    n = r * (d_out + d_in)
    if isinstance(f, HSVD):
        n_bo, n_bi = f.u.shape[-3], f.u.shape[-2]
        n += n_bi * d_out + n_bo * d_in
    return n


def relative_error(w, approx) -> jax.Array:
    """||w - approx||_F / ||w||_F (float32 scalar)."""
    w = w.astype(jnp.float32)
    return jnp.linalg.norm(w - approx.astype(jnp.float32)) / jnp.maximum(jnp.linalg.norm(w), 1e-30)


__all__ = ["HSVD", "SVDBranch", "hsvd", "svd_branch", "top_svd", "lowrank_split", "matched_global_rank", "effective_block",
           "block_grid", "block_params", "hsvd_params", "fit_block_rank1", "block_dense", "branch_dense",
           "reconstruct", "apply_block", "apply_branches", "branch_param_count", "relative_error"]


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
