"""One quantized linear at DiT4SR shapes: bf16 vs the XLA int8 path vs the fused kernel (tile sweep), plus
bf16 attention through XLA vs cuDNN. Checks the fused kernel against the fake-quant reference first.

Weights: "w8" (8-bit per channel), "w4pc" (4-bit per channel, packed, H-SVD-shaped branches: rank 22 +
256x256 block rank-1), "w4g64" (4-bit group 64, packed, same branches), "w4g64i" (4-bit group 64 with
two-level integer group scales, `group_scale="int"`: per-channel float scale x 4-bit integer factor per
group, folded into the int8 codes once per call, then the per-channel kernel; same branches); activations
8 / 4 bits per token.

  python benchmarks/gpu/linear_latency.py --out $OUT/linear.json
  python benchmarks/gpu/linear_latency.py --small        # CPU smoke test (interpreter / XLA paths only)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))      # the repository root
sys.path.insert(0, os.path.dirname(_HERE))                       # benchmarks/ (common, step_latency)
sys.path.insert(0, _HERE)                                        # benchmarks/gpu/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import environment, rel_err, write_json  # noqa: E402

# (M, K, N) of the step's linears with CFG (make_jaxpr count): 1024x1024 has 111 x (16384, 1536, 1536),
# 24 x (16384, 1536, 6144), 24 x (16384, 6144, 1536), 185 x (8192, 1536, 1536); 512x512 the same at M / 4.
SHAPES = [(16384, 1536, 1536), (16384, 1536, 6144), (16384, 6144, 1536), (8192, 1536, 1536),
          (4096, 1536, 6144), (8525, 1536, 6144), (666, 1536, 1536)]
CONFIGS = [  # (block_m, block_n, block_k, num_warps, num_stages, unpack); most useful first (--configs N)
    (128, 128, 128, 8, 3, "xla"), (128, 128, 128, 4, 3, "xla"), (128, 128, 256, 8, 3, "xla"),
    (128, 128, 128, 4, 3, "kernel"), (256, 128, 128, 8, 3, "xla"), (128, 256, 128, 8, 3, "xla"),
    (128, 256, 64, 8, 4, "xla"), (256, 128, 128, 8, 3, "kernel"), (128, 128, 64, 4, 4, "xla"),
]


def make_node(k, n, recipe, a_bits, seed=0):
    from qdit4sr_jax.quant.qweight import make_qweight
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n, k)).astype(np.float32) / np.sqrt(k)
    kw = {}
    if recipe != "w8":
        r, (bo, bi) = 22, (256, 256)
        nbo, nbi = -(-n // bo), -(-k // bi)
        kw = dict(lr_a=rng.normal(size=(k, r)) * 0.05, lr_b=rng.normal(size=(r, n)) * 0.05,
                  block_u=rng.normal(size=(nbo, nbi, bo)) * 0.05, block_v=rng.normal(size=(nbo, nbi, bi)) * 0.05,
                  block=(bo, bi))
    bits = 8 if recipe == "w8" else 4
    gs = 64 if recipe in ("w4g64", "w4g64i") else None
    return make_qweight(jnp.asarray(w), w_bits=bits, group_size=gs, a_bits=a_bits, dtype="bfloat16",
                        group_scale="int" if recipe == "w4g64i" else "float", **kw)


def time_call(fn, *args, inner=10, reps=7):
    """Median ms per call of a jitted fn: `inner` back-to-back calls (dispatch pipelined), `reps` times."""
    out = fn(*args)
    jax.block_until_ready(out)
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(ts), min(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes, for a CPU smoke test")
    ap.add_argument("--recipes", nargs="+", default=["w8", "w4pc", "w4g64", "w4g64i"],
                    choices=["w8", "w4pc", "w4g64", "w4g64i"])
    ap.add_argument("--configs", type=int, default=len(CONFIGS), help="how many tile configs to sweep")
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="how many shapes")
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--deadline", type=float, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from qdit4sr_jax.quant.kernels import KernelConfig, fused_linear, tiles_ok
    from qdit4sr_jax.quant.linear import linear
    t_start = time.perf_counter()
    gpu = jax.default_backend() == "gpu"
    shapes = [(40, 512, 256)] if a.small else SHAPES[: a.shapes]
    configs = [KernelConfig(*c) for c in (CONFIGS[: a.configs] if not a.small else [(16, 64, 128, 4, 2, "xla"), (16, 64, 128, 4, 2, "kernel")])]
    kernel_backend = "pallas" if gpu else "interpret"
    res = {"env": environment(), "check": [], "linear": [], "attention": [], "notes": []}
    print(res["env"], flush=True)

    # ---- correctness of the fused kernel on this device (float32 in/out, vs the fake-quant reference)
    for recipe in a.recipes:
        m, k, n = (40, 512, 256) if a.small else (1000, 1536, 1536)
        node = make_node(k, n, recipe, 4, seed=1)
        x = jax.random.normal(jax.random.PRNGKey(1), (m, k), jnp.float32)
        bias = jax.random.normal(jax.random.PRNGKey(2), (n,), jnp.float32)
        ref = jax.jit(lambda x: linear(x, node, bias, execution="fake"))(x)
        in_kernel = [c for c in configs if c.unpack == "kernel"][:1]
        for be, cfg in [(kernel_backend, configs[0])] + [(kernel_backend, c) for c in in_kernel] + [("xla", configs[0])]:
            if be != "xla" and not tiles_ok(node, cfg):
                continue
            try:
                out = jax.jit(lambda x: fused_linear(x, node, bias, backend=be, config=cfg))(x)
            except Exception as e:                            # keep the other recipes' checks
                res["check"].append({"recipe": recipe, "backend": be, "unpack": cfg.unpack, "error": repr(e)[:300]})
                print(f"check {recipe} {be} (unpack {cfg.unpack}) failed: {e!r:.300}", flush=True)
                continue
            e = rel_err(out, ref)
            res["check"].append({"recipe": recipe, "backend": be, "unpack": cfg.unpack, "rel_err": e})
            print(f"check {recipe} {be} (unpack {cfg.unpack}): rel err vs fake-quant {e:.2e}", flush=True)

    # ---- timings
    for (m, k, n) in shapes:
        x = (jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32)).astype(jnp.bfloat16)
        wb = (jax.random.normal(jax.random.PRNGKey(3), (k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
        bias = jnp.zeros((n,), jnp.bfloat16)
        t_bf16, _ = time_call(jax.jit(lambda x, w: x @ w + bias), x, wb)
        row = {"shape": [m, k, n], "bf16_ms": t_bf16, "bf16_tflops": 2 * m * k * n / t_bf16 / 1e9}
        # ceilings through XLA: the int8 GEMM alone (int32 out), and with the scale epilogue to bf16
        xi = jnp.clip(jnp.round(x.astype(jnp.float32) * 20), -127, 127).astype(jnp.int8)
        wi = jnp.clip(jnp.round(wb.T.astype(jnp.float32) * 300), -127, 127).astype(jnp.int8)      # [N, K]
        dn = (((1,), (1,)), ((), ()))
        row["int8_gemm_ms"], _ = time_call(jax.jit(
            lambda a, b: jax.lax.dot_general(a, b, dn, preferred_element_type=jnp.int32)), xi, wi)
        sxv, swv = jnp.ones((m, 1), jnp.float32), jnp.ones((1, n), jnp.float32)
        row["int8_gemm_epi_ms"], _ = time_call(jax.jit(
            lambda a, b, s1, s2: (jax.lax.dot_general(a, b, dn, preferred_element_type=jnp.int32)
                                  .astype(jnp.float32) * s1 * s2).astype(jnp.bfloat16)), xi, wi, sxv, swv)
        print(f"\n(M,K,N)={m},{k},{n}: bf16 {t_bf16:.3f} ms ({row['bf16_tflops']:.0f} TF/s); XLA int8 GEMM alone "
              f"{row['int8_gemm_ms']:.3f} ms, + scale epilogue {row['int8_gemm_epi_ms']:.3f} ms", flush=True)
        for recipe in a.recipes:
            if a.deadline and time.perf_counter() - t_start > a.deadline:
                res["notes"].append(f"deadline: skipped {recipe} at {m},{k},{n}")
                continue
            a_bits = 8 if recipe == "w8" else 4
            node = make_node(k, n, recipe, a_bits)
            r = {"recipe": recipe}
            try:
                r["int_ms"], _ = time_call(jax.jit(lambda x, w: linear(x, w, bias, execution="int")), x, node)
                r["fused_xla_ms"], _ = time_call(jax.jit(lambda x, w: fused_linear(x, w, bias, backend="xla")),
                                                 x, node)
            except Exception as e:                            # a failure in one recipe must not stop the others
                r["error"] = repr(e)[:300]
                row[recipe] = r
                print(f"  {recipe:6s} failed: {r['error']}", flush=True)
                continue
            if gpu:
                best = None
                for cfg in configs:
                    if not tiles_ok(node, cfg):
                        continue
                    try:
                        t, _ = time_call(jax.jit(lambda x, w, cfg=cfg: fused_linear(x, w, bias, backend="pallas",
                                                                                  config=cfg)), x, node)
                    except Exception as e:
                        r.setdefault("errors", []).append(f"{cfg}: {e!r}"[:300])
                        continue
                    r.setdefault("pallas_ms", {})[str(tuple(cfg.__dict__.values()))] = t
                    if best is None or t < best[0]:
                        best = (t, cfg)
                if best:
                    r["pallas_best_ms"], r["pallas_best_cfg"] = best[0], list(best[1].__dict__.values())
            for key in ("int_ms", "fused_xla_ms", "pallas_best_ms"):
                if key in r:
                    r[key.replace("_ms", "_x_bf16")] = t_bf16 / r[key]
            row[recipe] = r
            print(f"  {recipe:6s} int {r['int_ms']:.3f} ms (x{r['int_x_bf16']:.2f})  fused-xla {r['fused_xla_ms']:.3f} "
                  f"(x{r['fused_xla_x_bf16']:.2f})" + (f"  pallas {r['pallas_best_ms']:.3f} (x{r['pallas_best_x_bf16']:.2f}) "
                                                       f"{r['pallas_best_cfg']}" if "pallas_best_ms" in r else "")
                  + (f"  errors: {r['errors'][:1]}" if r.get("errors") else ""), flush=True)
        res["linear"].append(row)
        write_json(a.out, res)

    # ---- attention: XLA vs cuDNN (bf16), joint attention of one 1024x1024 CFG step
    if gpu and not a.no_attention:
        for (b, t) in ((2, 8525), (2, 2381), (2, 8192)):
            q, kk, v = (jax.random.normal(jax.random.PRNGKey(i), (b, t, 24, 64), jnp.float32).astype(jnp.bfloat16)
                        for i in range(3))
            r = {"batch": b, "tokens": t}
            outs = {}
            for impl in ("xla", "cudnn"):
                f = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(q, k, v, implementation=impl))
                try:
                    r[impl + "_ms"], _ = time_call(f, q, kk, v, inner=5, reps=5)
                    outs[impl] = f(q, kk, v)
                except Exception as e:
                    r[impl + "_error"] = repr(e)[:300]
            if len(outs) == 2:
                r["rel_err"] = rel_err(outs["cudnn"].astype(jnp.float32), outs["xla"].astype(jnp.float32))
                r["tflops_cudnn"] = 4 * b * 24 * t * t * 64 / r["cudnn_ms"] / 1e9
            res["attention"].append(r)
            print("attention", r, flush=True)
    write_json(a.out, res)
    return res


if __name__ == "__main__":
    main()
