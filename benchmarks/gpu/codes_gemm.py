"""The Mosaic int8 GEMM that makes the activation codes itself (`mosaic_int8_gemm_ws` given x' in bf16: each compute
warpgroup quantizes its x' tile in registers and feeds the int8 wgmma from them) vs today's quantized GEMM (XLA's
row max and codes pass over x', then the int8 kernel on the codes) and cuBLAS bf16, at the step's linear shapes.

It removes the codes pass (x' read, int8 codes written and read again): the W8A8 ceiling needs exactly that to reach
1.25x (`roofline.py`, `w8a8_ceiling`), and W4A4 gets its "one-pass" prologue with x' from the Hadamard kernel.

1. check: at level 127 (W8A8) and 7 (W4A4), the kernel's output vs the same kernel on XLA's codes (bit-equal bf16
   expected with exact_codes: the same codes, the same epilogue), per tile config; with the row maxima as run maxima
   [M, g] (the Hadamard kernel's); group-wise weights ("gnk", the plain paper preset).
2. sweep: the tile configs x exact / reciprocal codes at the first shape.
3. rows: the best configs at every shape, with the row max in XLA included (it would fuse into x's producer in a
   step) and without.

  python benchmarks/gpu/codes_gemm.py --out $OUT/codes_gemm.json      # GPU (Hopper)
  python benchmarks/gpu/codes_gemm.py --lower                          # any machine: every config lowers for CUDA
"""
from __future__ import annotations

import argparse
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

# (M, K, N): the 512-px step's linears (4096 rows: image + LR tokens x CFG; 2048: the LR-only layers), then 1024 px
SHAPES = [(4096, 1536, 1536), (4096, 1536, 6144), (4096, 6144, 1536), (2048, 1536, 1536),
          (16384, 1536, 1536), (16384, 1536, 6144), (16384, 6144, 1536)]
# per-warpgroup tiles (the CTA holds two along wg_dim): the fused path's, along M (each warpgroup quantizes its own
# rows: no duplicated codes work), and wider N per warpgroup (fewer codes per MMA)
CONFIGS = {"64x128n": dict(tile_m=64, tile_n=128, wg_dim="n", stages=4, in_flight=1),
           "64x128m": dict(tile_m=64, tile_n=128, wg_dim="m", stages=4, in_flight=1),
           "128x128m": dict(tile_m=128, tile_n=128, wg_dim="m", stages=2, in_flight=1),
           "64x256m": dict(tile_m=64, tile_n=256, wg_dim="m", stages=2, in_flight=1, epi_n=32, out_slots=1)}
LEVELS = {"w8": 127.0, "w4": 7.0}
RUNS = {1536: 24, 6144: 48}                      # the Hadamard kernel's run maxima per row (runs of 64 / 128)


def operands(m, k, n, reps, seed=0):
    """x bf16 [R, M, K] (rows of spread magnitudes, a few outlier channels), int8 weights [N, K], sw f32 [N],
    bias f32 [N]."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(reps, m, k)).astype(np.float32) * rng.lognormal(0, 1, size=(reps, m, 1)).astype(np.float32)
    x[..., rng.integers(0, k, 8)] *= 20
    wq = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
    sw = rng.uniform(0.5, 2.0, size=(n,)).astype(np.float32) / (127 * np.sqrt(k))
    bias = rng.normal(size=(n,)).astype(np.float32)
    return jnp.asarray(x, jnp.bfloat16), jnp.asarray(wq), jnp.asarray(sw), jnp.asarray(bias)


def table(level):
    """(inv_levels f32 [2], step int32 [1], level f32): a two-step level table, step 1 taking `level`."""
    return jnp.asarray([1 / 127.0, 1 / level], jnp.float32), jnp.ones((1,), jnp.int32), jnp.float32(level)


def row_max(x, runs=0):
    """max|x| per row, f32 [M] (runs: as run maxima [M, runs], the Hadamard kernel's)."""
    a = jnp.abs(x.astype(jnp.float32))
    return jnp.max(a.reshape(x.shape[0], runs, -1), axis=2) if runs else jnp.max(a, axis=1)


def today(x, wq, sw, b, inv, st, lev, tiles=None):
    """Today's path: XLA's row max and codes (`operands.codes_from_scale`), then the int8 kernel on the codes."""
    from qdit4sr_jax.quant.kernels.mosaic_gemm import FUSED_TILES, mosaic_int8_gemm_ws
    from qdit4sr_jax.quant.kernels.operands import codes_from_scale, scale_from_max
    amax = row_max(x)
    q = codes_from_scale(x.astype(jnp.float32), scale_from_max(amax, inv, st)[:, None], lev)
    return mosaic_int8_gemm_ws(q, wq, amax, sw, b, inv_levels=inv, step=st, **(tiles or FUSED_TILES))


def codes_here(x, wq, sw, b, inv, st, amax=None, tiles=None, exact=True, runs=0):
    """The kernel making the codes from x' bf16 (the row max in XLA unless given)."""
    from qdit4sr_jax.quant.kernels.mosaic_gemm import FUSED_TILES, mosaic_int8_gemm_ws
    amax = row_max(x, runs) if amax is None else amax
    return mosaic_int8_gemm_ws(x, wq, amax, sw, b, inv_levels=inv, step=st, exact_codes=exact,
                               **(tiles or FUSED_TILES))


def fits(m, k, n, tiles):
    from qdit4sr_jax.quant.kernels.mosaic_gemm import ws_tiles_ok
    return ws_tiles_ok(m, n, k, tiles["tile_m"], tiles["tile_n"], tiles["wg_dim"], tiles.get("epi", 64),
                       tiles.get("epi_n"))


def per_call_ms(fn, xs, *rest):
    """Median ms of one call of fn(x, *rest), from one jit over the R activations in xs [R, M, K]."""
    from linear_latency import time_call
    many = jax.jit(lambda xs, *r: [fn(xs[i], *r) for i in range(xs.shape[0])])
    ms, _ = time_call(many, xs, *rest, inner=3, reps=5)
    return ms / xs.shape[0]


def compare(got, want):
    """(bf16 elements that differ, max |got - want| / max |want|)."""
    g, w = got.astype(jnp.float32), want.astype(jnp.float32)
    return int(jnp.sum(got != want)), float(jnp.max(jnp.abs(g - w)) / jnp.maximum(jnp.max(jnp.abs(w)), 1e-30))


def check_rows(shapes):
    """Exactness at both levels, every config, run maxima, group-wise weights."""
    from qdit4sr_jax.quant.kernels.mosaic_gemm import mosaic_int8_gemm_ws
    rows = []
    for (m, k, n) in shapes:
        x, wq, sw, b = operands(m, k, n, 1)
        x = x[0]
        for name_l, level in LEVELS.items():
            inv, st, lev = table(level)
            want = jax.jit(today)(x, wq, sw, b, inv, st, lev)
            # every config at W8A8's level; the fused path's at W4A4's (the codes' level is one scalar either way)
            for cname, tiles in (CONFIGS.items() if name_l == "w8" else [("64x128n", CONFIGS["64x128n"])]):
                if not fits(m, k, n, tiles):
                    continue
                for exact in ((True, False) if cname == "64x128n" else (True,)):
                    r = {"shape": [m, k, n], "level": name_l, "config": cname, "exact": exact}
                    try:
                        got = jax.jit(lambda *t, tl=tiles, e=exact: codes_here(*t, tiles=tl, exact=e))(
                            x, wq, sw, b, inv, st)
                        r["mismatch"], r["rel_err"] = compare(got, want)
                    except Exception as e:  # noqa: BLE001
                        r["error"] = repr(e)[:400]
                    rows.append(r)
                    print("check", r, flush=True)
            r = {"shape": [m, k, n], "level": name_l, "config": "64x128n", "runs": RUNS.get(k)}
            try:
                got = jax.jit(lambda *t: codes_here(*t, runs=RUNS[k]))(x, wq, sw, b, inv, st)
                r["mismatch"], r["rel_err"] = compare(got, want)
            except Exception as e:  # noqa: BLE001
                r["error"] = repr(e)[:400]
            rows.append(r)
            print("check", r, flush=True)
        # group-wise weights (groups of 64, float scales per group): today's grouped path vs codes made here
        inv, st, lev = table(7.0)
        g = 64
        wg = jnp.transpose(wq.reshape(n, k // g, g), (1, 0, 2))            # [G, N, g]
        swg = jnp.broadcast_to(sw, (k // g, n)) * jnp.linspace(0.5, 1.5, k // g)[:, None]
        r = {"shape": [m, k, n], "level": "w4", "config": "64x128n", "grouped": g}
        try:
            want = jax.jit(lambda *t: today(*t, tiles=dict(tile_m=64, tile_n=128, wg_dim="n")))(
                x, wg, swg, b, inv, st, lev)
            got = jax.jit(lambda *t: mosaic_int8_gemm_ws(t[0], t[1], row_max(t[0]), *t[2:4], inv_levels=t[4],
                                                         step=t[5], tile_m=64, tile_n=128, wg_dim="n"))(
                x, wg, swg, b, inv, st)
            r["mismatch"], r["rel_err"] = compare(got, want)
        except Exception as e:  # noqa: BLE001
            r["error"] = repr(e)[:400]
        rows.append(r)
        print("check", r, flush=True)
    return rows


def lower_all():
    """Every config (both code modes, run maxima) lowers for CUDA at every shape it tiles; returns the failures."""
    S = jax.ShapeDtypeStruct
    bad = []
    for (m, k, n) in SHAPES:
        for cname, tiles in CONFIGS.items():
            if not fits(m, k, n, tiles):
                continue
            for exact, runs in ((True, 0), (False, 0), (True, RUNS[k])):
                args = (S((m, k), jnp.bfloat16), S((n, k), jnp.int8), S((n,), jnp.float32), S((n,), jnp.float32),
                        S((2,), jnp.float32), S((1,), jnp.int32))
                try:
                    jax.jit(lambda *t, tl=tiles, e=exact, r=runs: codes_here(*t, tiles=tl, exact=e, runs=r)).trace(
                        *args).lower(lowering_platforms=("cuda",))
                except Exception as e:  # noqa: BLE001
                    bad.append((m, k, n, cname, exact, runs, repr(e)[:200]))
    return bad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="the first N shapes")
    ap.add_argument("--check-shapes", type=int, default=2, help="shapes of the check (0: none)")
    ap.add_argument("--reps", type=int, default=8, help="GEMMs per timed jit (R)")
    ap.add_argument("--keep", type=int, default=2, help="configs of the sweep timed on every shape")
    ap.add_argument("--deadline", type=float, default=None, help="seconds; what is left after it is skipped")
    ap.add_argument("--lower", action="store_true", help="only lower every config for CUDA (any machine)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.lower:
        bad = lower_all()
        print(f"{len(bad)} failures", *bad, sep="\n")
        return 1 if bad else 0
    t0 = time.perf_counter()
    late = lambda: a.deadline and time.perf_counter() - t0 > a.deadline  # noqa: E731
    res = {"env": environment(), "check": check_rows([SHAPES[0], SHAPES[2]][: a.check_shapes]), "sweep": [],
           "rows": []}
    res["ok"] = bool(res["check"]) and all(r.get("mismatch") == 0 for r in res["check"] if r.get("exact", True))
    print("ok", res["ok"], flush=True)
    inv, st, lev = table(127.0)                  # timing: W8A8's level (the codes' cost does not depend on it)

    def timings(m, k, n, variants):
        xs, wq, sw, b = operands(m, k, n, a.reps if m <= 4096 else max(2, a.reps // 4), seed=1)
        row = {"shape": [m, k, n],
               "bf16_ms": per_call_ms(lambda x, w: x @ w, xs, jnp.asarray(wq, jnp.bfloat16).T),
               "rowmax_ms": per_call_ms(row_max, xs)}
        try:
            row["today_ms"] = per_call_ms(lambda x, *t: today(x, *t), xs, wq, sw, b, inv, st, lev)
        except Exception as e:  # noqa: BLE001
            row["today_error"] = repr(e)[:300]
        amaxs = jax.jit(jax.vmap(row_max))(xs)
        for cname, exact in variants:
            tiles = CONFIGS[cname]
            if not fits(m, k, n, tiles):
                continue
            key = f"{cname}_{'div' if exact else 'rcp'}"
            try:
                row[key + "_ms"] = per_call_ms(lambda x, *t, tl=tiles, e=exact: codes_here(x, *t, tiles=tl, exact=e),
                                               xs, wq, sw, b, inv, st)
                # the kernel alone (the row max given: in a step it fuses into x's producer)
                many = jax.jit(lambda xs, am, *t, tl=tiles, e=exact: [
                    codes_here(xs[i], *t, amax=am[i], tiles=tl, exact=e) for i in range(xs.shape[0])])
                from linear_latency import time_call
                row[key + "_kernel_ms"] = time_call(many, xs, amaxs, wq, sw, b, inv, st, inner=3, reps=5)[0] / xs.shape[0]
            except Exception as e:  # noqa: BLE001
                row[key + "_error"] = repr(e)[:300]
        return row

    m, k, n = SHAPES[0]
    sweep = timings(m, k, n, [(c, e) for c in CONFIGS for e in (True, False)])
    res["sweep"].append(sweep)
    print("sweep", {kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in sweep.items()}, flush=True)
    ranked = sorted((kk[:-3] for kk in sweep if kk.endswith("_div_ms") or kk.endswith("_rcp_ms")),
                    key=lambda kk: sweep[kk + "_ms"])
    best = [(kk[:-4], kk.endswith("_div")) for kk in ranked[: a.keep]]
    for (m, k, n) in SHAPES[1: a.shapes]:
        if late():
            print(f"deadline: skipping {(m, k, n)} and after", flush=True)
            break
        row = timings(m, k, n, best)
        res["rows"].append(row)
        print("row", {kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in row.items()}, flush=True)
    write_json(a.out, res)
    print("| M x K x N | bf16 us | today (XLA codes + int8 GEMM) | codes in the GEMM, best (x bf16) | kernel alone |")
    print("|---|---|---|---|---|")
    for r in [sweep] + res["rows"]:
        cands = {kk: v for kk, v in r.items() if kk.endswith("_div_ms") or kk.endswith("_rcp_ms")}
        if not cands:
            continue
        bk = min(cands, key=cands.get)
        x = lambda v: f"{v * 1e3:.1f} us ({r['bf16_ms'] / v:.2f}x)" if isinstance(v, float) else "-"  # noqa: E731
        print(f"| {' x '.join(map(str, r['shape']))} | {r['bf16_ms'] * 1e3:.1f} | {x(r.get('today_ms'))} | "
              f"{bk[:-3]}: {x(cands[bk])} | {x(r.get(bk[:-3] + '_kernel_ms'))} |")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
