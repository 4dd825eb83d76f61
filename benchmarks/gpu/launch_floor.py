"""What one call of our Mosaic kernels costs at the W4A4 step's row counts: device time vs rows, and the floor.

The 512-px W4A4 step runs ~1,240 Mosaic calls at 19.8 us each on average (H100 profile, benchmarks/RESULTS.md
2026-12-07 10:05) and ~12 ms of gaps; per call, the Hadamard kernel took 27.2 us at 2048 x 1536 and 35.8 us at
4096 x 1536 (16:05), i.e. ~18 us that do not scale with the rows. This separates that fixed part: for each row
count M (the step's: 128, 768, 2048, 4096, and 8192) it times, R calls per jit,

  hadamard      `mosaic_hadamard_rowmax` [M, 1536] (x' and run maxima)
  codes1/3      `mosaic_hadamard_codes` [M, 1536], one member / three (a q / k / v group)
                (these three at each of --hadamard-runs: the run length c, 64 = 2 rows of x per tile, 128 = 4)
  int8_gemm     `mosaic_int8_gemm_ws` [M, 1536] x [1536, 1536] (the fused path's tiles, `FUSED_TILES`)
  bf16_gemm     XLA's (cuBLAS) bf16 dot of the same shape (a weight per call: one shared weight let XLA's
                DotMerger join the R dots, H200 2026-12-07 23:17)
  floor         a Mosaic kernel that reads and writes one 64 x 128 bf16 tile (launch + TMA round trip)
  xla_floor     an XLA elementwise op on the same tile

and reports per call: wall us (host clock over the jit of R calls, as `ws_gemm.per_call_ms`) and device us (the
profiler's kernel durations, `step_profile.breakdown`). wall - device is not a launch gap of the step: it was 25-37
us per call for every kind, an XLA add included (H200 2026-12-07 23:17), i.e. the harness's own cost per call (the
jit's dispatch and its R outputs); so `per_call_ms` figures of these scripts carry it too, and kernels compare by
device us. Values are not
checked here (rotation_gemm.py and mosaic_fused_check.py do that); this only times.

  python benchmarks/gpu/launch_floor.py --out $OUT/launch_floor.json          # GPU (Hopper), ~1-2 min
"""
from __future__ import annotations

import argparse
import os
import statistics
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

ROWS = (128, 768, 2048, 4096, 8192)
K = 1536
KINDS = ("floor", "xla_floor", "hadamard", "codes1", "codes3", "int8_gemm", "bf16_gemm")


def floor_kernel(x):
    """x bf16 [64, 128] -> x + 1 through shared memory by TMA (one CTA, one warpgroup): the cost of a Mosaic launch
    that moves one tile."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def body(x_g, o_g):
        def scope(s, bar):
            plgpu.copy_gmem_to_smem(x_g, s, bar.at[0])
            plgpu.barrier_wait(bar.at[0])
            s[...] = s[...] + jnp.asarray(1, s.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(s, o_g)
            plgpu.wait_smem_to_gmem(0)
        pl.run_scoped(scope, plgpu.SMEM(x.shape, x.dtype), plgpu.Barrier(num_barriers=1))

    body.__name__ = "mosaic_floor"
    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(1,), grid_names=("x",))(x)


HADAMARD_KINDS = ("hadamard", "codes1", "codes3")


def label(kind: str, run=None) -> str:
    """The row's name: the kind, with the Hadamard kernel's run length where one was given (codes3@c128)."""
    return kind if run is None else f"{kind}@c{run}"


def make(kind: str, m: int, reps: int, rng, run=None):
    """kind, rows (and the Hadamard kernel's run length, None: its default) -> (fn of one call's operands, its
    per-call operands stacked [reps, ...] (an array or a tuple of them), operands shared by the calls, kernel-name
    pattern)."""
    from qdit4sr_jax.quant.kernels.mosaic_gemm import FUSED_TILES, mosaic_int8_gemm_ws
    from qdit4sr_jax.quant.kernels.mosaic_hadamard import mosaic_hadamard_codes, mosaic_hadamard_rowmax
    bf = lambda *s: jnp.asarray(rng.standard_t(5, size=s).astype(np.float32), jnp.bfloat16)
    if kind in ("floor", "xla_floor"):
        xs = bf(reps, 64, 128)
        return (floor_kernel if kind == "floor" else (lambda x: x + 1)), xs, (), kind
    if kind == "hadamard":
        return (lambda x: mosaic_hadamard_rowmax(x, run=run)), bf(reps, m, K), (), "hadamard"
    if kind in ("codes1", "codes3"):
        lv = jnp.asarray([[7.0], [15.0], [3.0]][: int(kind[-1])], jnp.float32)
        return ((lambda x, lv: mosaic_hadamard_codes(x, lv, 1.0 / lv, jnp.int32(0), run=run)), bf(reps, m, K), (lv,),
                "hadamard")
    if kind == "int8_gemm":
        xs = jnp.asarray(rng.integers(-7, 8, size=(reps, m, K), dtype=np.int8))
        wq = jnp.asarray(rng.integers(-7, 8, size=(K, K), dtype=np.int8))
        sx = jnp.asarray(rng.uniform(0.5, 2, size=(m,)).astype(np.float32))
        sw = jnp.asarray(rng.uniform(0.5, 2, size=(K,)).astype(np.float32) / K)
        return (lambda x, w, a, b: mosaic_int8_gemm_ws(x, w, a, b, **FUSED_TILES)), xs, (wq, sx, sw), "int8_gemm"
    if kind == "bf16_gemm":        # a weight per call: with one weight XLA's DotMerger joins the R dots into one
        return (lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.bfloat16)), (bf(reps, m, K), bf(reps, K, K)), (), ""
    raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")


def measure(kind: str, m: int, reps: int, iters: int, run=None) -> dict:
    """Wall and device us per call of `kind` at m rows (R = reps calls per jit; run: `make`'s)."""
    from step_profile import profile_step
    fn, xs, rest, _ = make(kind, m, reps, np.random.default_rng(m), run)
    xs = xs if isinstance(xs, tuple) else (xs,)             # per-call operands, each stacked [R, ...]
    many = jax.jit(lambda xs, *r: [fn(*(a[i] for a in xs), *r) for i in range(reps)])
    t0 = time.perf_counter()
    jax.block_until_ready(many(xs, *rest))
    compile_s = time.perf_counter() - t0
    walls = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(many(xs, *rest))
        walls.append((time.perf_counter() - t0) * 1e6 / reps)
    prof = profile_step(many, (xs, *rest), iters=3, warmup=1)
    dev = prof["kernel_us_per_step"] / reps
    return {"kind": label(kind, run), "rows": m, "wall_us": statistics.median(walls), "device_us": dev,
            "kernels_per_call": prof["kernels_per_step"] / reps, "compile_s": compile_s,
            "top": [(t["name"][:60], round(t["us"] / reps, 2)) for t in prof["top"][:3]]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--reps", type=int, default=8, help="calls per jit")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--hadamard-runs", type=int, nargs="+", default=None, choices=(64, 128),
                    help="time the Hadamard kinds at each of these run lengths (default: the plan's, 64 at K = 1536)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds; stop starting new rows after it")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    res = {"env": environment(), "rows": []}
    print(f"{'kind':<10} {'rows':>6} {'wall us':>9} {'device us':>10} {'gap us':>8} {'kernels':>8}")
    jobs = [(kind, m, run) for kind in a.kinds
            for run in ((a.hadamard_runs or [None]) if kind in HADAMARD_KINDS else [None])
            for m in (a.rows if kind not in ("floor", "xla_floor") else a.rows[:1])]
    for kind, m, run in jobs:
        name = label(kind, run)
        if a.deadline and time.perf_counter() - t_start > a.deadline:
            print(f"deadline: {name} {m} not run")
            continue
        try:
            r = measure(kind, m, a.reps, a.iters, run)
        except Exception as e:  # noqa: BLE001 - recorded, the others still run
            r = {"kind": name, "rows": m, "error": repr(e)[:300]}
            print(f"{name:<10} {m:>6} error {r['error'][:160]}")
        else:
            print(f"{name:<10} {m:>6} {r['wall_us']:>9.2f} {r['device_us']:>10.2f} "
                  f"{r['wall_us'] - r['device_us']:>8.2f} {r['kernels_per_call']:>8.2f}  {r['top']}")
        res["rows"].append(r)
        if a.out:
            write_json(a.out, res)
    return res


if __name__ == "__main__":
    main()
