"""Layer-level checks of two issue-24 routes for the W4A4 linear, on whatever backend runs it (the GPU figures
are the point; the CPU run is a smoke test).

1. `gemm`: exact 4-bit codes on FP8 units. Activation codes q_x in -7..7 [M, K] and weight codes q_w in -7..7
   [N, K] (every integer of |v| <= 16 is exact in float8_e4m3fn, and the float32 sums of their products are exact
   below 2^24) through four routes, each ending in y = s_x[m] s_w[n] acc[m, n] in bf16:
     bf16   x [M, K] bf16 . w [N, K] bf16 (cuBLAS; the float baseline, scales not applied)
     int8   int8 . int8 -> int32 (cuBLASLt), then the scales (what the "xla" fused backend runs)
     fp8    e4m3 . e4m3 -> float32 (cuBLASLt FP8), then the scales
     fp8b   e4m3 . e4m3 -> bf16 out, then the scales (not exact: the sum is rounded to bf16; for contrast)
   The int32 and float32 accumulators are compared exactly (max |int8 acc - fp8 acc| must be 0).
2. `hadamard`: the online rotation of a layer's input (the paper preset's): `transforms.hadamard_transform` with
   each of its implementations (`transforms.HADAMARD_IMPLS`: butterflies, one XLA fusion per stage on the GPU,
   the implementation before 2026-12-05; dense +-1 factors as exact bf16 GEMMs, the default since), each checked
   against float64, and the float32 dense Kronecker factors of 12-05's call (`kron_hadamard`).
3. `down`: the branch down-projections of a prepared H-SVD layer (low-rank rank r, 256-blocks) as the fused
   prologue computes them today (`branch_ops.branch_features`: one GEMM for lr_a, a batched einsum over the input
   blocks, a pad / reshape into the kernel layout) against one GEMM of x' with the joint matrix
   [lr_a | V_d] (V_d [K, n_bo Rb] zero except v_ij at rows of input block j, column i Rb + j: exact, since the
   zeros add nothing). Same outputs up to float32 summation order (dh, dt compared).
Each route: device kernel time per call and kernels per call from a profiler trace (`step_profile.profile_step`),
and the host wall time of a pipelined loop of calls.

    python benchmarks/gpu/routes.py --out $OUT/routes.json                  # GPU: DiT4SR shapes at 512 / 1024 px
    python benchmarks/gpu/routes.py --small                                  # CPU smoke test
"""
from __future__ import annotations

import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))      # the repository root
sys.path.insert(0, os.path.dirname(_HERE))                       # benchmarks/ (common, step_latency)
sys.path.insert(0, _HERE)                                        # benchmarks/gpu/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import environment, write_json  # noqa: E402

F8 = jnp.float8_e4m3fn
NT = (((1,), (1,)), ((), ()))                  # contract the last axis of both operands ([M, K] . [N, K])


def wall_ms(f, args, reps: int = 20) -> float:
    """Host wall time per call of a pipelined loop (dispatch overlaps the device), best of 3 loops."""
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        out = None
        for _ in range(reps):
            out = f(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / reps * 1e3)
    return best


def device(f, args, iters: int = 5) -> dict:
    """{us, kernels} per call from a profiler trace (None where the trace has no device kernels, e.g. CPU)."""
    from step_profile import profile_step
    try:
        p = profile_step(f, args, iters=iters, warmup=1)
        return {"device_us": p["kernel_us_per_step"], "kernels": p["kernels_per_step"],
                "top": [(t["name"][:70], round(t["us"], 1)) for t in p.get("top_kernels", [])[:4]]}
    except Exception as e:                      # the profiler is best-effort (CPU: no device kernels)
        return {"device_us": None, "kernels": None, "profile_error": repr(e)[:200]}


def gemm_routes():
    def scale(acc, sx, sw):
        return (acc.astype(jnp.float32) * sx[:, None] * sw[None, :]).astype(jnp.bfloat16)
    return {
        "bf16": jax.jit(lambda x, w, xq, wq, sx, sw: jax.lax.dot_general(x, w, NT)),
        "int8": jax.jit(lambda x, w, xq, wq, sx, sw: scale(
            jax.lax.dot_general(xq, wq, NT, preferred_element_type=jnp.int32), sx, sw)),
        "fp8": jax.jit(lambda x, w, xq, wq, sx, sw: scale(
            jax.lax.dot_general(xq, wq, NT, preferred_element_type=jnp.float32), sx, sw)),
        "fp8b": None if os.environ.get("ROUTES_NO_FP8B") else jax.jit(lambda x, w, xq, wq, sx, sw: scale(
            jax.lax.dot_general(xq, wq, NT, preferred_element_type=jnp.bfloat16), sx, sw)),
    }


def run_gemm(shapes, reps: int, log):
    rows = []
    routes = gemm_routes()
    for m, k, n in shapes:
        rng = np.random.default_rng(m + k + n)
        xq = jnp.asarray(rng.integers(-7, 8, size=(m, k)), jnp.int8)
        wq = jnp.asarray(rng.integers(-7, 8, size=(n, k)), jnp.int8)
        x, w = xq.astype(jnp.bfloat16), wq.astype(jnp.bfloat16)
        sx = jnp.asarray(rng.uniform(0.01, 0.1, size=m), jnp.float32)
        sw = jnp.asarray(rng.uniform(0.01, 0.1, size=n), jnp.float32)
        args = (x, w, xq, wq, sx, sw)
        args8 = (x, w, xq.astype(F8), wq.astype(F8), sx, sw)         # the prologue would write e4m3 codes directly
        acc_i = jax.lax.dot_general(xq, wq, NT, preferred_element_type=jnp.int32)
        acc_f = jax.jit(lambda a, b: jax.lax.dot_general(a.astype(F8), b.astype(F8), NT,
                                                         preferred_element_type=jnp.float32))(xq, wq)
        exact_diff = float(jnp.max(jnp.abs(acc_i.astype(jnp.float32) - acc_f)))
        row = {"m": m, "k": k, "n": n, "fp8_vs_int8_acc_max_abs_diff": exact_diff, "routes": {}}
        ref = routes["int8"](*args).astype(jnp.float32)
        for name, f in [(n, f) for n, f in routes.items() if f is not None]:
            a_ = args8 if name.startswith("fp8") else args
            r = {"wall_ms": wall_ms(f, a_, reps), **device(f, a_)}
            if name != "bf16":
                y = f(*a_).astype(jnp.float32)
                r["rel_err_vs_int8"] = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
            row["routes"][name] = r
        base = row["routes"]["bf16"]
        for name, r in row["routes"].items():
            if r.get("device_us") and base.get("device_us"):
                r["x_bf16_device"] = base["device_us"] / r["device_us"]
            r["x_bf16_wall"] = base["wall_ms"] / r["wall_ms"]
        rows.append(row)
        log(f"gemm {m}x{k}x{n}: acc diff {exact_diff} | " + " | ".join(
            f"{nm} {r['wall_ms']:.3f} ms wall, {r.get('device_us') or float('nan'):.1f} us dev, "
            f"{r.get('kernels')} k" for nm, r in row["routes"].items()))
    return rows


def run_down(shapes, rank: int, block: int, log):
    from qdit4sr_jax.quant.kernels.branch_ops import branch_features, branch_weights, joint_down
    from qdit4sr_jax.quant.qweight import make_qweight
    rows = []
    for m, k, n in shapes:
        rng = np.random.default_rng(7)
        nbo, nbi = -(-n // block), -(-k // block)
        q = make_qweight(jnp.asarray(rng.normal(size=(n, k)) / k ** 0.5, jnp.float32), w_bits=4, a_bits=4,
                         execution="fused", lr_a=rng.normal(size=(k, rank)) / k ** 0.5,
                         lr_b=rng.normal(size=(rank, n)), block_u=rng.normal(size=(nbo, nbi, block)),
                         block_v=rng.normal(size=(nbo, nbi, block)) / block, block=(block, block), dtype="bfloat16")
        bw = branch_weights(q)
        jd = joint_down(bw, k)                          # the one `prepare(down="joint")` builds
        if jd is None:
            raise ValueError(f"{m}x{k}x{n}: low-rank and block factors differ in dtype: no joint down-projection")
        rl = bw.lr_a.shape[1]
        xt = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
        cur = jax.jit(lambda xt, bw: branch_features(xt, bw))
        dt_ = bw.lr_a.dtype

        @jax.jit
        def joint(xt, jd):
            d = jnp.dot(xt.astype(dt_), jd, preferred_element_type=jnp.float32).astype(dt_)
            return d[:, :rl], d[:, rl:]
        dh0, dt0 = cur(xt, bw)
        dh1, dt1 = joint(xt, jd)
        err = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                                 / (jnp.max(jnp.abs(a.astype(jnp.float32))) + 1e-30))
        row = {"m": m, "k": k, "n": n, "rank": rank, "block": block, "joint_cols": int(jd.shape[1]),
               "dh_max_rel_diff": err(dh0, dh1), "dt_max_rel_diff": err(dt0, dt1[:, : dt0.shape[1]]),
               "current": {"wall_ms": wall_ms(cur, (xt, bw)), **device(cur, (xt, bw))},
               "joint": {"wall_ms": wall_ms(joint, (xt, jd)), **device(joint, (xt, jd))}}
        rows.append(row)
        log(f"down {m}x{k}->{n}: current {row['current']}, joint {row['joint']}, dh diff {row['dh_max_rel_diff']:.2e}, "
            f"dt diff {row['dt_max_rel_diff']:.2e}")
    return rows


def kron_factors(block: int, cap: int = 64):
    """Dense orthonormal factors [H_m, H_{2^a}, H_{2^b}, ...] (each <= cap, except a stored H_m) whose Kronecker
    product is `transforms.hadamard_matrix(block)` (Sylvester: H_{2^(a+b)} = H_{2^a} (x) H_{2^b})."""
    from qdit4sr_jax.quant import transforms as T
    m, p = T.hadamard_factors(block) if hasattr(T, "hadamard_factors") else (1, block)
    out = [T.hadamard_matrix(m)] if m > 1 else []
    while p > 1:
        f = min(p, cap)
        out.append(T.hadamard_matrix(f) if hasattr(T, "hadamard_matrix") else _sylvester(f))
        p //= f
    return out


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def kron_hadamard(x, block: int):
    """x [M, K] float32 -> x @ blockdiag(H_block) as one small dense matmul per Kronecker factor (float32,
    HIGHEST precision): the same H as `transforms.hadamard_transform`, summed in another order."""
    mats = [jnp.asarray(f, jnp.float32) for f in kron_factors(block)]
    m, k = x.shape
    y = x.astype(jnp.float32).reshape(m, k // block, *[f.shape[0] for f in mats])
    for i, f in enumerate(mats):
        y = jnp.moveaxis(jnp.tensordot(y, f, axes=([2 + i], [0]), precision=jax.lax.Precision.HIGHEST), -1, 2 + i)
    return y.reshape(m, k)


def hadamard_ref64(x: np.ndarray, block: int) -> np.ndarray:
    """x [M, K] (float64) @ blockdiag(H_block) in float64, through the Kronecker factors (cheap at M = 8192)."""
    from qdit4sr_jax.quant import transforms as T
    m, p = T.hadamard_factors(block)
    mm, k = x.shape
    y = x.reshape(mm, k // block, m, p) @ (T.hadamard_matrix(p))              # S_p / sqrt(p) on the last axis
    if m > 1:
        y = np.einsum("nbap,ca->nbcp", y, T.hadamard_base(m))
    return y.reshape(mm, k)


def run_hadamard(shapes, log, impls=("butterfly", "dense", "dense-sum", "dense-wide", "wide-sum", "full")):
    """The online rotation of a layer's input x [M, K] as `transforms.hadamard_transform` runs it with each
    implementation (bf16 x in, float32 out, as `transform_input` runs it without smoothing; "dense f32-in": a
    float32 x, as after smoothing, through the three-part bf16 split), for the 2^k and full blocks; each checked
    against float64 (max |y - ref| / max |ref|) on fresh random inputs; and the dense Kronecker factors of
    2026-12-05's call (`kron_hadamard`) for contrast."""
    from qdit4sr_jax.quant import transforms as T
    rows = []
    for m, k in shapes:
        blocks = [T.largest_pow2_divisor(k), T.rotation_block(k, "full")]
        rng = np.random.default_rng(3)
        x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
        xf = jnp.asarray(rng.normal(size=(m, k)) * np.exp(rng.normal(size=(1, k))), jnp.float32)
        for b in dict.fromkeys(blocks):
            ref = hadamard_ref64(np.asarray(x.astype(jnp.float32), np.float64), b)
            reff = hadamard_ref64(np.asarray(xf, np.float64), b)
            row = {"m": m, "k": k, "block": b, "impls": {}}
            variants = [(i, x, ref) for i in impls if i != "full" or b <= 2048] + [("dense f32-in", xf, reff)]
            for name, xin, r in variants:
                impl = name.split()[0]
                f = jax.jit(lambda v, b=b, impl=impl: T.hadamard_transform(v, b, impl=impl))
                y = np.asarray(f(xin), np.float64)
                err = float(np.max(np.abs(y - r)) / np.max(np.abs(r)))
                row["impls"][name] = {"max_rel_err_f64": err, "wall_ms": wall_ms(f, (xin,)), **device(f, (xin,))}
            alt = jax.jit(lambda v, b=b: kron_hadamard(v, b))
            row["impls"]["kron f32 (12-05)"] = {"wall_ms": wall_ms(alt, (x,)), **device(alt, (x,))}
            rows.append(row)
            log(f"hadamard {m}x{k} block {b}: " + " | ".join(
                f"{n} {v.get('device_us')} us {v.get('kernels')} k err {v.get('max_rel_err_f64', float('nan')):.1e}"
                for n, v in row["impls"].items()))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--parts", nargs="+", default=["gemm", "down", "hadamard"], choices=["gemm", "down", "hadamard"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--hadamard-k", type=int, nargs="+", default=None, help="the hadamard part's input sizes K "
                    "(default 1536 and 6144; rows 8192)")
    ap.add_argument("--hadamard-impls", nargs="+", default=None, help="the hadamard part's implementations")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t_start:7.1f}s] {s}", flush=True)
    if a.small:
        gshapes, dshapes, rank, block, hshapes = [(64, 128, 64)], [(64, 128, 64)], 8, 32, [(64, 192)]
    else:                       # image-stream rows at 512 / 1024 px (CFG: 2 x 1024 / 2 x 4096 tokens)
        gshapes = [(8192, 1536, 1536), (8192, 1536, 6144), (8192, 6144, 1536)]
        dshapes = [(8192, 1536, 1536), (8192, 1536, 6144), (8192, 6144, 1536)]
        rank, block = 26, 256
        hshapes = [(8192, 1536), (8192, 6144)]
    res = {"env": environment(), "args": vars(a)}
    if "gemm" in a.parts:
        res["gemm"] = run_gemm(gshapes, a.reps, log)
        write_json(a.out, res)
    if "hadamard" in a.parts:
        if a.hadamard_k:
            hshapes = [(hshapes[0][0], k) for k in a.hadamard_k]
        res["hadamard"] = run_hadamard(hshapes, log, **({"impls": tuple(a.hadamard_impls)} if a.hadamard_impls else {}))
        write_json(a.out, res)
    if "down" in a.parts:
        res["down"] = run_down(dshapes, rank, block, log)
        write_json(a.out, res)
    print(f"\n{res['env']['device']}  jax {jax.__version__}")
    print("| M x K x N | acc diff | bf16 us | int8 us (x bf16) | fp8 us (x bf16) | fp8->bf16 us |")
    print("|---|---|---|---|---|---|")
    for r in res.get("gemm", []):
        g = {n: v.get("device_us") or float("nan") for n, v in r["routes"].items()}
        print(f"| {r['m']}x{r['k']}x{r['n']} | {r['fp8_vs_int8_acc_max_abs_diff']} | {g['bf16']:.1f} | "
              f"{g['int8']:.1f} ({g['bf16'] / g['int8']:.2f}) | {g['fp8']:.1f} ({g['bf16'] / g['fp8']:.2f}) | "
              f"{g.get('fp8b', float('nan')):.1f} |")
    for r in res.get("hadamard", []):
        print(f"hadamard {r['m']}x{r['k']} block {r['block']}: " + "; ".join(
            f"{n} {v.get('device_us')} us / {v.get('kernels')} k (err {v.get('max_rel_err_f64', float('nan')):.1e})"
            for n, v in r["impls"].items()))
    for r in res.get("down", []):
        print(f"down {r['m']}x{r['k']}->{r['n']}: current {r['current'].get('device_us')} us in "
              f"{r['current'].get('kernels')} kernels, joint {r['joint'].get('device_us')} us in "
              f"{r['joint'].get('kernels')} kernels ({r['joint_cols']} cols)")
    return res


if __name__ == "__main__":
    main()
