"""The persistent warp-specialized Mosaic int8 GEMM (`mosaic_gemm.mosaic_int8_gemm_ws`) against cuBLAS bf16, XLA's
int8 dot with the same epilogue and our Triton fused GEMM, at the W4A4 step's linear shapes (512 and 1024 px, CFG).

Kernel time without host dispatch: each timed jit runs the GEMM on R different activation matrices ([R, M, K]
stacked; XLA issues them back to back on one stream) and the median ms per call is divided by R. Exactness first
(float32 outputs at stages 3, whose epilogue tiles fit in shared memory: equal to `mosaic_gemm.reference` up to
float32 rounding of the epilogue), then a tile / pipeline sweep on the first shape, then the best `--keep`
configurations on every shape.

  python benchmarks/gpu/ws_gemm.py --out $OUT/ws_gemm.json             # GPU (Hopper)
  python benchmarks/gpu/ws_gemm.py --lower                              # any machine: every config lowers for CUDA
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))      # the repository root
sys.path.insert(0, os.path.dirname(_HERE))                       # benchmarks/ (common)
sys.path.insert(0, _HERE)                                        # benchmarks/gpu/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import environment, write_json  # noqa: E402
from linear_latency import rel_err, time_call  # noqa: E402

# (M, K, N): the 512-px step's quantized linears (4096 rows: image + LR tokens x CFG; 2048: the LR-only layers),
# then the 1024-px ones (benchmarks/gpu/roofline.py lists them)
SHAPES = [(4096, 1536, 1536), (4096, 1536, 6144), (4096, 6144, 1536), (2048, 1536, 1536),
          (16384, 1536, 1536), (16384, 1536, 6144), (16384, 6144, 1536), (8192, 1536, 1536)]
# (tile_m, tile_n, wg_dim, stages, in_flight): per-warpgroup tiles; the CTA tile is two of them along wg_dim
TILES = [(128, 128, "m", 4, 1), (128, 128, "n", 4, 1), (64, 256, "m", 4, 1), (64, 128, "n", 4, 1),
         (64, 128, "m", 4, 1), (128, 128, "m", 4, 0), (128, 128, "m", 3, 1), (64, 256, "m", 3, 0)]
GRIDS = [(1, 8), (0, 8), (1, 4), (1, 16)]                        # (grid_minor, grid_width)


def operands(m, k, n, reps, seed=0):
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.integers(-127, 128, size=(reps, m, k), dtype=np.int8))
    wq = jnp.asarray(rng.integers(-127, 128, size=(n, k), dtype=np.int8))
    sx = jnp.asarray(rng.uniform(0.5, 2.0, size=(m,)).astype(np.float32) / 127)
    sw = jnp.asarray(rng.uniform(0.5, 2.0, size=(n,)).astype(np.float32) / (127 * np.sqrt(k)))
    bias = jnp.asarray(rng.normal(size=(n,)).astype(np.float32))
    return xs, wq, sx, sw, bias


def per_call_ms(fn, xs, *rest):
    """Median ms of one call of fn(x, *rest), from one jit over the R activations in xs [R, M, K]."""
    many = jax.jit(lambda xs, *r: [fn(xs[i], *r) for i in range(xs.shape[0])])
    ms, _ = time_call(many, xs, *rest, inner=3, reps=5)
    return ms / xs.shape[0]


def config_name(c):
    (tm, tn, wd, st, fl), (gm, gw) = c
    return f"{tm}x{tn}{wd}_s{st}_f{fl}_g{'MN'[gm]}{gw}"


def ws_fn(c, out_dtype=jnp.bfloat16, stages=None):
    from qdit4sr_jax.quant.kernels.mosaic_gemm import mosaic_int8_gemm_ws
    (tm, tn, wd, st, fl), (gm, gw) = c
    st = stages or st
    return lambda x, w, sx, sw, b: mosaic_int8_gemm_ws(x, w, sx, sw, b, out_dtype=out_dtype, tile_m=tm, tile_n=tn,
                                                       wg_dim=wd, stages=st, in_flight=min(fl, st - 1),
                                                       grid_minor=gm, grid_width=gw)


def grouped_rows(shapes, reps, group=64):
    """Group-wise W4 weights (float group scales, layout "gnk": the plain paper preset): the Mosaic kernel's grouped
    path vs the Triton kernel (GROUPED_CONFIG) vs cuBLAS bf16, with the float32 check against XLA's path."""
    from qdit4sr_jax.quant.kernels.fused import GROUPED_CONFIG, Operands, xla_gemm_epilogue
    from qdit4sr_jax.quant.kernels.mosaic_gemm import mosaic_int8_gemm_ws
    from qdit4sr_jax.quant.kernels.pallas_gpu import pallas_gemm_epilogue
    from qdit4sr_jax.quant.qweight import make_qweight
    rows = []
    for (m, k, n) in shapes:
        xs, wq, sx, _, bias = operands(m, k, n, reps)
        node = make_qweight(jnp.asarray(wq, jnp.float32), w_bits=4, group_size=group, a_bits=4, pack=False)
        codes, sw = node.codes(), jnp.transpose(node.scale)
        row = {"shape": [m, k, n], "group": group}
        try:
            want = xla_gemm_epilogue(Operands(xs[0], sx, None, None, None, m, 0), node, bias, jnp.float32)
            exact = dict(MOSAIC_GROUPED, stages=3)                  # float32 epilogue tiles fit at 3 stages
            got = jax.jit(lambda x, c, s, w, b: mosaic_int8_gemm_ws(x, c, s, w, b, out_dtype=jnp.float32, **exact))(
                xs[0], codes, sx, sw, bias)
            row["rel_err_f32"] = rel_err(got, want)
            row["mosaic_ms"] = per_call_ms(lambda x, c, s, w, b: mosaic_int8_gemm_ws(x, c, s, w, b, **MOSAIC_GROUPED),
                                           xs, codes, sx, sw, bias)
        except Exception as e:  # noqa: BLE001
            row["mosaic_error"] = repr(e)[:300]
        xb = xs.astype(jnp.bfloat16)
        row["bf16_ms"] = per_call_ms(lambda x, w: x @ w, xb, jnp.asarray(wq, jnp.bfloat16).T)
        try:
            row["triton_ms"] = per_call_ms(lambda x, s, nd, b, m=m: pallas_gemm_epilogue(
                Operands(x, s, None, None, None, m, 0), nd, b, jnp.bfloat16, GROUPED_CONFIG), xs, sx, node, bias)
        except Exception as e:  # noqa: BLE001
            row["triton_error"] = repr(e)[:300]
        rows.append(row)
        print("grouped", {kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in row.items()}, flush=True)
    return rows


MOSAIC_GROUPED = dict(tile_m=64, tile_n=128, wg_dim="n", stages=4)


def lower_all():
    """Every TILES x GRIDS configuration lowers for CUDA at every shape (no GPU needed); returns the failures."""
    from qdit4sr_jax.quant.kernels.mosaic_gemm import ws_tiles_ok
    S = jax.ShapeDtypeStruct
    bad = []
    for (m, k, n), c in itertools.product(SHAPES, itertools.product(TILES, GRIDS)):
        if not ws_tiles_ok(m, n, k, c[0][0], c[0][1], c[0][2]):
            continue
        args = (S((m, k), jnp.int8), S((n, k), jnp.int8), S((m,), jnp.float32), S((n,), jnp.float32),
                S((n,), jnp.float32))
        try:
            jax.jit(ws_fn(c)).trace(*args).lower(lowering_platforms=("cuda",))
        except Exception as e:  # noqa: BLE001
            bad.append((m, k, n, config_name(c), repr(e)[:200]))
    return bad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="the first N shapes")
    ap.add_argument("--reps", type=int, default=12, help="GEMMs per timed jit (R)")
    ap.add_argument("--keep", type=int, default=3, help="configs of the sweep timed on every shape")
    ap.add_argument("--deadline", type=float, default=None, help="seconds; what is left after it is skipped")
    ap.add_argument("--configs", nargs="+", default=None,
                    help="skip the check and the sweep; time these configs (names as printed, e.g. 64x128n_s4_f1_gN8)")
    ap.add_argument("--grouped", type=int, default=0, help="also time group-wise weights at the first N shapes")
    ap.add_argument("--lower", action="store_true", help="only lower every config for CUDA (any machine)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.lower:
        bad = lower_all()
        print(f"{len(bad)} failures", *bad, sep="\n")
        return 1 if bad else 0
    from qdit4sr_jax.quant.kernels.fused import DEFAULT_CONFIG, Operands
    from qdit4sr_jax.quant.kernels.mosaic_gemm import reference, ws_tiles_ok
    from qdit4sr_jax.quant.kernels.pallas_gpu import pallas_gemm_epilogue
    from qdit4sr_jax.quant.qweight import make_qweight
    t0 = time.perf_counter()
    late = lambda: a.deadline and time.perf_counter() - t0 > a.deadline  # noqa: E731
    res = {"env": environment(), "check": [], "sweep": [], "rows": []}
    print(res["env"].get("devices"), "jax", jax.__version__, flush=True)
    configs = list(itertools.product(TILES, GRIDS[:1])) + [(TILES[0], g) for g in GRIDS[1:]]

    # exactness: float32 outputs (stages 3) and bf16 outputs of each tile config on two shapes
    for (m, k, n) in ([] if a.configs else [SHAPES[0], SHAPES[2]]):
        xs, wq, sx, sw, bias = operands(m, k, n, 1)
        want32 = jax.jit(lambda *t: reference(*t, out_dtype=jnp.float32))(xs[0], wq, sx, sw, bias)
        want16 = jax.jit(lambda *t: reference(*t))(xs[0], wq, sx, sw, bias)
        for c in [(t, GRIDS[0]) for t in TILES]:
            if not ws_tiles_ok(m, n, k, c[0][0], c[0][1], c[0][2]):
                continue
            r = {"shape": [m, k, n], "config": config_name(c)}
            try:
                got = jax.jit(ws_fn(c, jnp.float32, stages=3))(xs[0], wq, sx, sw, bias)
                r["rel_err_f32"] = rel_err(got, want32)
                r["max_abs_err_f32"] = float(jnp.max(jnp.abs(got - want32)))
                g16 = jax.jit(ws_fn(c))(xs[0], wq, sx, sw, bias)
                r["bf16_mismatch"] = int(jnp.sum(g16 != want16))
            except Exception as e:  # noqa: BLE001
                r["error"] = repr(e)[:400]
            res["check"].append(r)
            print("check", r, flush=True)

    def baselines(m, k, n, xs, wq, sx, sw, bias):
        row = {"shape": [m, k, n]}
        xb = xs.astype(jnp.bfloat16)
        wb = jnp.asarray(wq, jnp.bfloat16).T
        row["bf16_ms"] = per_call_ms(lambda x, w: x @ w, xb, wb)
        row["xla_int8_ms"] = per_call_ms(lambda *t: reference(*t), xs, wq, sx, sw, bias)
        node = make_qweight(jnp.asarray(wq, jnp.float32), w_bits=8, a_bits=8, dtype="bfloat16")
        try:
            row["triton_ms"] = per_call_ms(lambda x, s, nd, b, m=m: pallas_gemm_epilogue(
                Operands(x, s, None, None, None, m, 0), nd, b, jnp.bfloat16, DEFAULT_CONFIG), xs, sx, node, bias)
        except Exception as e:  # noqa: BLE001
            row["triton_error"] = repr(e)[:300]
        return row

    def timed(c, xs, wq, sx, sw, bias):
        try:
            return per_call_ms(ws_fn(c), xs, wq, sx, sw, bias)
        except Exception as e:  # noqa: BLE001
            return repr(e)[:300]

    # the sweep on the first shape
    m, k, n = SHAPES[0]
    if not a.configs:
        ops = operands(m, k, n, a.reps)
        base = baselines(m, k, n, *ops)
        print("baselines", base, flush=True)
    for c in ([] if a.configs else configs):
        if late():
            break
        if not ws_tiles_ok(m, n, k, c[0][0], c[0][1], c[0][2]):
            continue
        ms = timed(c, *ops)
        r = {"config": config_name(c), "ms": ms} if isinstance(ms, float) else {"config": config_name(c), "error": ms}
        if "ms" in r:
            r["x_bf16"] = base["bf16_ms"] / ms
        res["sweep"].append(r)
        print("sweep", r, flush=True)
    ranked = sorted((r for r in res["sweep"] if "ms" in r), key=lambda r: r["ms"])
    names = a.configs or [r["config"] for r in ranked[: a.keep]]
    best = [c for name in names for c in itertools.product(TILES, GRIDS) if config_name(c) == name]

    # the best configs on every shape
    for (m, k, n) in SHAPES[: a.shapes]:
        if late():
            print(f"deadline: skipping {(m, k, n)} and after")
            break
        ops = operands(m, k, n, a.reps if m <= 4096 else max(2, a.reps // 4))
        row = baselines(m, k, n, *ops)
        for c in best:
            if ws_tiles_ok(m, n, k, c[0][0], c[0][1], c[0][2]):
                ms = timed(c, *ops)
                row[config_name(c)] = ms
        row["best_ws_ms"] = min((v for kk, v in row.items() if kk not in ("bf16_ms", "xla_int8_ms", "triton_ms")
                                 and isinstance(v, float)), default=None)
        res["rows"].append(row)
        print("row", {kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in row.items()}, flush=True)
    if a.grouped and not late():
        res["grouped"] = grouped_rows(SHAPES[: a.grouped], a.reps)
    write_json(a.out, res)
    print("| M x K x N | bf16 ms | XLA int8 (x bf16) | Triton fused (x bf16) | WS Mosaic best (x bf16) |")
    print("|---|---|---|---|---|")
    for r in res["rows"]:
        f = lambda key: (f"{r[key] * 1e3:.1f} us ({r['bf16_ms'] / r[key]:.2f}x)"  # noqa: E731
                         if isinstance(r.get(key), float) else "-")
        print(f"| {' x '.join(map(str, r['shape']))} | {r['bf16_ms'] * 1e3:.1f} us | {f('xla_int8_ms')} | "
              f"{f('triton_ms')} | {f('best_ws_ms')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
