"""Where H-SVD's quantize time goes on a GPU: the SVDs it needs, by algorithm.

H-SVD of one d_out x d_in weight needs a truncated global SVD (rank r_g ~ 22-26) and the best rank-1 of each
256x256 block of the remainder (144 blocks for a 1536 x 6144 weight; ~78k blocks for the whole DiT4SR).
Times `jnp.linalg.svd` (cuSOLVER, one matrix after the other), lax.linalg.svd's Jacobi and polar
algorithms, and matmul-only alternatives (subspace iteration with Rayleigh-Ritz for the block rank-1,
randomized range finder for the global rank-r), with their error against the exact SVD.

  python benchmarks/gpu/svd_latency.py --out $OUT/svd.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))                       # benchmarks/ (common)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from common import environment, write_json  # noqa: E402


def timed(f, *a, reps=3):
    jax.block_until_ready(f(*a))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*a))
        ts.append(time.perf_counter() - t0)
    return min(ts)


def _orthonormalize(y):
    """Columns of y [..., n, k] orthonormalised through the k x k Gram matrix (batched small eigh; no QR,
    whose GPU lowering loops over the batch for tall matrices)."""
    g = jnp.swapaxes(y, -1, -2) @ y
    w, e = jnp.linalg.eigh(g)
    return (y @ e) * lax.rsqrt(jnp.maximum(w, 1e-30))[..., None, :]


def top1_subspace(b, k=8, iters=30):
    """Best rank-1 of each matrix of b [..., m, n] by subspace iteration on b^T b (k vectors) + Rayleigh-Ritz.
    Returns (s1 [...], u [..., m], v [..., n]) with u unit, v unit. k=1 is plain power iteration."""
    n = b.shape[-1]
    g = jnp.swapaxes(b, -1, -2) @ b                                   # [..., n, n]
    q = jax.random.normal(jax.random.PRNGKey(0), b.shape[:-2] + (n, k), b.dtype)
    norm = (lambda y: y * lax.rsqrt(jnp.maximum(jnp.sum(y * y, -2, keepdims=True), 1e-30))) if k == 1 else _orthonormalize
    q = lax.fori_loop(0, iters, lambda _, q: norm(g @ q), norm(q))
    h = jnp.swapaxes(q, -1, -2) @ g @ q                               # [..., k, k]
    w, e = jnp.linalg.eigh(h)
    v = (q @ e[..., :, -1:])[..., 0]
    v = v * lax.rsqrt(jnp.maximum(jnp.sum(v * v, -1, keepdims=True), 1e-30))
    bv = (b @ v[..., None])[..., 0]
    s1 = jnp.sqrt(jnp.sum(bv * bv, -1))
    return s1, bv / jnp.maximum(s1[..., None], 1e-30), v


def randomized_svd(w, r, p=10, q=4):
    """Rank-r truncated SVD of w [..., m, n] by the randomized range finder with q power iterations."""
    m, n = w.shape[-2:]
    om = jax.random.normal(jax.random.PRNGKey(1), w.shape[:-2] + (n, r + p), w.dtype)
    y, _ = jnp.linalg.qr(w @ om)
    for _ in range(q):
        z, _ = jnp.linalg.qr(jnp.swapaxes(w, -1, -2) @ y)
        y, _ = jnp.linalg.qr(w @ z)
    bsm = jnp.swapaxes(y, -1, -2) @ w                                 # [..., r+p, n]
    ub, s, vt = jnp.linalg.svd(bsm, full_matrices=False)
    return (y @ ub)[..., :, :r], s[..., :r], vt[..., :r, :]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=144)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    res = {"env": environment(), "blocks": {}, "global": {}}
    print(res["env"], flush=True)
    bs = 64 if a.small else 256
    blocks = jax.random.normal(jax.random.PRNGKey(0), (a.blocks, bs, bs), jnp.float32)
    exact = jax.jit(lambda b: jnp.linalg.svd(b, full_matrices=False))
    u0, s0, vt0 = exact(blocks)
    algs = {"default": exact}
    if jax.default_backend() != "cpu":
        for name, alg in (("jacobi", lax.linalg.SvdAlgorithm.JACOBI), ("polar", lax.linalg.SvdAlgorithm.POLAR)):
            algs[name] = jax.jit(lambda b, alg=alg: lax.linalg.svd(b, full_matrices=False, algorithm=alg))
    for name, f in algs.items():
        try:
            t = timed(f, blocks)
            s = f(blocks)[1]
            res["blocks"][name] = {"s": t, "s1_rel_err": float(jnp.max(jnp.abs(s[:, 0] - s0[:, 0]) / s0[:, 0]))}
        except Exception as e:
            res["blocks"][name] = {"error": repr(e)[:300]}
        print("blocks", name, res["blocks"][name], flush=True)
    for k, iters in ((8, 10), (8, 30), (1, 50), (1, 150)):
        name = f"subspace{k}x{iters}"
        f = jax.jit(lambda b, it=iters, k=k: top1_subspace(b, k=k, iters=it))
        t = timed(f, blocks)
        s1, u, v = f(blocks)
        r0 = blocks - s0[:, 0, None, None] * u0[:, :, :1] * vt0[:, :1, :]
        r1 = blocks - s1[:, None, None] * u[:, :, None] * v[:, None, :]
        res["blocks"][name] = {
            "s": t, "s1_rel_err": float(jnp.max(jnp.abs(s1 - s0[:, 0]) / s0[:, 0])),
            "resid_excess": float(jnp.max(jnp.linalg.norm(r1, axis=(1, 2)) / jnp.linalg.norm(r0, axis=(1, 2)) - 1))}
        print("blocks", name, res["blocks"][name], flush=True)
    shapes = [(8, 96, 384)] if a.small else [(8, 1536, 6144), (8, 6144, 1536), (8, 1536, 1536)]
    for shp in shapes:
        w = jax.random.normal(jax.random.PRNGKey(2), shp, jnp.float32)
        key = "x".join(map(str, shp))
        row = {}
        u0, s0, vt0 = exact(w)
        r = 26
        opt = jnp.linalg.norm(w - (u0[..., :r] * s0[..., None, :r]) @ vt0[..., :r, :], axis=(1, 2))
        row["default_s"] = timed(exact, w, reps=1)
        if jax.default_backend() != "cpu":
            try:
                f = jax.jit(lambda x: lax.linalg.svd(x, full_matrices=False, algorithm=lax.linalg.SvdAlgorithm.POLAR))
                row["polar_s"] = timed(f, w, reps=1)
            except Exception as e:
                row["polar_error"] = repr(e)[:200]
        f = jax.jit(lambda x: randomized_svd(x, r))
        row["randomized_s"] = timed(f, w)
        u, s, vt = f(w)
        got = jnp.linalg.norm(w - (u * s[..., None, :]) @ vt, axis=(1, 2))
        row["randomized_resid_excess"] = float(jnp.max(got / opt - 1))
        res["global"][key] = row
        print("global", key, row, flush=True)
    write_json(a.out, res)


if __name__ == "__main__":
    main()
