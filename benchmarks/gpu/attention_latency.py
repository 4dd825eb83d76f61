"""Joint attention of a full-size DiT4SR step at its real shapes: cuDNN bf16 vs cuDNN FP8 vs XLA, timed, with
the error of each against float32 attention and of cuDNN FP8 against the jnp FP8 reference.

Shapes: B = 2 (classifier-free guidance), H = 24, D = 64, bf16 inputs; T = 2 x 1024 + 333 = 2381 (512x512
output) and 2 x 4096 + 333 = 8525 (1024x1024). q, k, v ~ N(0, 1) (q times --q-scale: larger = peakier
softmax). Modes (each in its own try/except; a failure is recorded and the others run):
  cudnn         jax.nn.dot_product_attention(implementation="cudnn"), bf16
  fp8           qdit4sr_jax.model.attention.fp8_attention_cudnn: per-tensor e4m3 quantization of q, k, v
                (included in the time) + cuDNN FP8 flash attention + dequantized output
  fp8-direct    the same without the per-example vmap wrapper (custom_vmap) the model's path carries
  fp8-prequant  the cuDNN FP8 call alone on inputs quantized beforehand (fp8 minus this = quantization cost)
  xla           jax.nn.dot_product_attention through XLA (materialises the [B, H, T, T] scores), bf16
  fp8-ref       the jnp FP8 reference (not in the default list: slow, for CPU runs)
Errors (relative Frobenius norm on --error-queries queries spread over T, all keys): each mode vs float32
attention; fp8 vs the FP8 reference in both P modes ("flash": un-normalised exp(S - max) rounded to e4m3,
"normalized": softmax rounded), which tells which one cuDNN computes; the reference vs float32.

  python benchmarks/gpu/attention_latency.py --out $OUT/attention.json
  python benchmarks/gpu/attention_latency.py --small --out /tmp/attention_small.json   # CPU smoke run
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

from common import compile_and_time, environment, write_json  # noqa: E402
from qdit4sr_jax.model import attention as A  # noqa: E402

MODES = ("cudnn", "fp8", "fp8-direct", "fp8-prequant", "xla", "fp8-ref")
DEFAULT_MODES = MODES[:5]
CUDNN_MODES = ("cudnn", "fp8", "fp8-direct", "fp8-prequant")
SEQS = {512: 2 * 1024 + 333, 1024: 2 * 4096 + 333}


def make_fns():
    """mode -> (jitted function, how to build its arguments from (q, k, v))."""
    ident = lambda q, k, v: (q, k, v)

    def prequant(q, k, v):
        (q8, dq), (k8, dk), (v8, dv) = A.quantize_fp8(q), A.quantize_fp8(k), A.quantize_fp8(v)
        return (q8, k8, v8, dq, dk, dv)

    return {
        "cudnn": (jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")), ident),
        "fp8": (jax.jit(A.fp8_attention_cudnn), ident),
        "fp8-direct": (jax.jit(lambda q, k, v: A.fp8_attention_cudnn(q, k, v, return_stats=True)[0]), ident),
        "fp8-prequant": (jax.jit(lambda *a: A.cudnn_fp8_quantized(*a, jnp.bfloat16)), jax.jit(prequant)),
        "xla": (jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v)), ident),
        "fp8-ref": (jax.jit(A.fp8_attention_reference), ident),
    }


def padded_timing(fn, prep, q, k, v, T, a) -> dict:
    """Timing only, with T zero-padded to a multiple of 128 (padded keys change the softmax: the output is
    not comparable); tells whether a failure at T is about the sequence length."""
    Tp = -(-T // 128) * 128
    pad = lambda x: jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    try:
        args = jax.block_until_ready(prep(pad(q), pad(k), pad(v)))
        r = compile_and_time(fn, args, warmup=a.warmup, iters=a.iters)
        r["T_padded"] = Tp
        r["tflops_at_T"] = 4.0 * q.shape[0] * q.shape[2] * T * T * q.shape[3] / (r["median_ms"] * 1e-3) / 1e12
        return r
    except Exception as e:
        return {"T_padded": Tp, "error": repr(e)[:500]}


def rel(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], choices=sorted(SEQS),
                    help="output sizes in pixels (T = 2 x tokens + 333)")
    ap.add_argument("--seqs", type=int, nargs="+", default=None, help="explicit T values instead of --sizes")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--q-scale", type=float, nargs="+", default=[1.0], help="q ~ N(0, s^2): 1 flat, 3 peaky")
    ap.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=MODES)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--error-queries", type=int, default=256)
    ap.add_argument("--deadline", type=float, default=None, help="skip remaining work after this many seconds")
    ap.add_argument("--small", action="store_true", help="CPU smoke run: B=1, H=2, T=(2*64+16,)")
    ap.add_argument("--out", default=None, help="JSON results file")
    a = ap.parse_args(argv)
    if a.small:
        a.batch, a.heads, a.seqs, a.iters, a.warmup = 1, 2, [2 * 64 + 16], 3, 1
        a.error_queries = min(a.error_queries, 32)
        if a.modes == list(DEFAULT_MODES):
            a.modes = list(DEFAULT_MODES) + ["fp8-ref"]
    seqs = a.seqs or [SEQS[s] for s in a.sizes]
    t_start = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t_start:7.1f}s] {s}", flush=True)
    on_gpu = jax.default_backend() == "gpu"
    res = {"env": environment(), "args": vars(a), "scale_s": A.SCALE_S, "o_headroom": A.O_HEADROOM,
           "runs": [], "notes": []}
    log(f"env {res['env']}")
    fns = make_fns()
    B, H, D = a.batch, a.heads, a.head_dim
    for T in seqs:
        for qs in a.q_scale:
            key = jax.random.split(jax.random.PRNGKey(T), 3)
            q, k, v = (jax.random.normal(kk, (B, T, H, D), jnp.float32).astype(jnp.bfloat16) for kk in key)
            q = (q.astype(jnp.float32) * qs).astype(jnp.bfloat16)
            idx = jnp.asarray(np.linspace(0, T - 1, min(a.error_queries, T)).round().astype(np.int32))
            flops = 4.0 * B * H * T * T * D
            ref32 = err_ref = None
            try:
                ref32 = jax.jit(A.float_attention_reference)(q[:, idx], k, v)
                err_ref = {m: jax.jit(lambda q_, k_, v_, am, m=m: A.fp8_attention_reference(
                    q_, k_, v_, p_mode=m, amax_q=am))(q[:, idx], k, v, A.amax(q)) for m in A.P_MODES}
                ref_row = {"mode": "fp8-ref (subsample)", "T": T, "q_scale": qs,
                           **{f"rel_err_{m}_vs_f32": rel(o, ref32) for m, o in err_ref.items()},
                           "f32_amax_o_subsample": float(jnp.max(jnp.abs(ref32)))}
                res["runs"].append(ref_row)
                log(f"T={T} q*{qs}: fp8-ref vs f32 " + ", ".join(f"{m} {ref_row[f'rel_err_{m}_vs_f32']:.4f}"
                                                              for m in A.P_MODES))
            except Exception as e:
                res["notes"].append(f"T={T} q*{qs}: references failed: {e!r:.400}")
                log(res["notes"][-1])
            for mode in a.modes:
                run = {"mode": mode, "T": T, "q_scale": qs, "B": B, "H": H, "D": D, "gflop": flops / 1e9}
                if a.deadline and time.perf_counter() - t_start > a.deadline:
                    run["skipped"] = "deadline"
                    res["runs"].append(run)
                    continue
                if mode in CUDNN_MODES and not on_gpu:
                    run["skipped"] = f"cuDNN needs a GPU (backend {jax.default_backend()})"
                    res["runs"].append(run)
                    continue
                fn, prep = fns[mode]
                try:
                    args = jax.block_until_ready(prep(q, k, v))
                    left = None if not a.deadline else max(5.0, a.deadline - (time.perf_counter() - t_start))
                    run.update(compile_and_time(fn, args, warmup=a.warmup, iters=a.iters, budget_s=left))
                    run["tflops"] = flops / (run["median_ms"] * 1e-3) / 1e12
                    out = fn(*args)
                    if ref32 is not None:
                        run["rel_err_vs_f32"] = rel(out[:, idx], ref32)
                        if mode.startswith("fp8"):
                            for m, o in (err_ref or {}).items():
                                run[f"rel_err_vs_fp8ref_{m}"] = rel(out[:, idx], o)
                    if mode == "fp8":
                        _, amax_s, amax_o = jax.jit(lambda *x: A.fp8_attention_cudnn(*x, return_stats=True))(q, k, v)
                        run["cudnn_amax_s"], run["cudnn_amax_o"] = float(amax_s.ravel()[0]), float(amax_o.ravel()[0])
                    del out, args
                except Exception as e:
                    run["error"] = repr(e)[:800]
                    if mode in CUDNN_MODES[1:] and T % 128:
                        run["padded"] = padded_timing(fn, prep, q, k, v, T, a)
                res["runs"].append(run)
                if "error" in run:
                    log(f"{mode:12s} T={T} q*{qs}: FAILED {run['error'][:300]}"
                        + (f"; padded to {run['padded']['T_padded']}: "
                           f"{run['padded'].get('median_ms', run['padded'].get('error', ''))}" if "padded" in run else ""))
                else:
                    extra = "".join(f", {kk[8:]} {vv:.4f}" for kk, vv in run.items() if kk.startswith("rel_err_"))
                    log(f"{mode:12s} T={T} q*{qs}: {run['median_ms']:.3f} ms (p10 {run['p10_ms']:.3f}, p90 "
                        f"{run['p90_ms']:.3f}, n={run['n']}), {run['tflops']:.1f} TFLOP/s, compile "
                        f"{run['compile_s']:.1f} s{extra}")
                write_json(a.out, res)
    write_json(a.out, res)
    print_table(res)
    return res


def print_table(res):
    print(f"\n{res['env']['device']}  jax {res['env']['jax']}")
    print("| mode | T | q scale | median ms | p10-p90 ms | TFLOP/s | x cudnn | rel err vs f32 | vs fp8-ref flash "
          "| vs fp8-ref normalized |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {(r["T"], r["q_scale"]): r["median_ms"] for r in res["runs"] if r["mode"] == "cudnn" and "median_ms" in r}
    f = lambda r, kk: "-" if kk not in r else f"{r[kk]:.4f}"
    for r in res["runs"]:
        if r["mode"].startswith("fp8-ref ("):
            print(f"| fp8-ref | {r['T']} | {r['q_scale']} | | | | | flash {f(r, 'rel_err_flash_vs_f32')}, "
                  f"normalized {f(r, 'rel_err_normalized_vs_f32')} | | |")
            continue
        if "median_ms" not in r:
            print(f"| {r['mode']} | {r['T']} | {r['q_scale']} | {r.get('skipped') or 'error'} | | | | | | |")
            continue
        b = base.get((r["T"], r["q_scale"]))
        xc = "-" if b is None else f"{b / r['median_ms']:.2f}"
        print(f"| {r['mode']} | {r['T']} | {r['q_scale']} | {r['median_ms']:.3f} | {r['p10_ms']:.3f}-{r['p90_ms']:.3f} "
              f"| {r['tflops']:.1f} | {xc} | {f(r, 'rel_err_vs_f32')} "
              f"| {f(r, 'rel_err_vs_fp8ref_flash')} | {f(r, 'rel_err_vs_fp8ref_normalized')} |")
    for n in res.get("notes", []):
        print("note:", n)


if __name__ == "__main__":
    main()
