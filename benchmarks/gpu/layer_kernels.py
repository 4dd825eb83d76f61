"""How many device kernels one fused quantized linear launches, feature by feature.

A W4A4 Q-DiT4SR step on the H200 costs ~40 ms more than the W8A8 step at both 512 and 1024 px (RESULTS.md,
2026-12-04 20:22 UTC), i.e. per-layer work, not per-token work; with 533 linears per step, every extra small
kernel per layer costs ~533 launches. This script compiles `fused_linear` for one [M, K] x [K, N] layer with
the features of the W4A4 presets added one at a time (packed 4-bit codes, two-level integer group scales,
SmoothQuant smoothing, the low-rank branch, the H-SVD block branch, int8 branch factors, a VaTMP schedule
read at a traced step; last, the same layer `kernels.prepare`d, as the sampler can run it, with the XLA
prologue and with the prologue kernel, which only the Pallas backend (GPU) runs) and counts the kernels in the optimized HLO's entry computation (fusions, custom
calls such as cuBLAS GEMMs or the Pallas kernel, and unfused ops), on whatever backend runs it.

    python benchmarks/gpu/layer_kernels.py                      # 1536 x 1536, M = 2048 (512 px, one stream)
    python benchmarks/gpu/layer_kernels.py --k 256 --n 256 --m 64 --time   # small; --time adds times
--time adds two times per layer: the median host wall time of one call (on a GPU mostly dispatch of a
one-layer program: 0.35-0.70 ms for a ~15 us GEMM on the H200, 2026-12-05) and the device kernel time per call
from a profiler trace (`step_profile.profile_step`), the figure to compare.
    python benchmarks/gpu/layer_kernels.py --time --prologue-tiles 16x4 32x8 64x8   # GPU: prologue kernel tiles
    python benchmarks/gpu/layer_kernels.py --time --rotations --only W8A8 VaTMP prepared Hadamard   # issue 24 (c)
    python benchmarks/gpu/layer_kernels.py --time --rotations --hadamard-impls butterfly dense dense-sum full \
        --only "prepared"      # the prepared layer with each online Hadamard implementation (transforms.HADAMARD_IMPLS)
    python benchmarks/gpu/layer_kernels.py --m 8192 --time --rotations --only "prologue kernel" "no smoothing [auto]" \
        --prologue-tiles 16x4 16x8      # the rotation inside the prologue kernel vs the XLA rotation (2026-12-06)
Prepared rows use `kernels.prepare`'s default down="joint" (one GEMM for the branch down-projections); the row
"prepared, down=split" is the path before 2026-12-05.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))      # the repository root
sys.path.insert(0, os.path.dirname(_HERE))                       # benchmarks/ (common, step_latency)
sys.path.insert(0, _HERE)                                        # benchmarks/gpu/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

_KERNEL_OPS = ("fusion", "custom-call", "dot", "convolution", "copy", "transpose", "reduce", "concatenate", "pad",
               "dynamic-slice", "slice", "convert", "multiply", "add", "divide", "broadcast", "select", "clamp")


def entry_kernels(compiled_text: str) -> dict:
    """{op kind: count} of the ops in the ENTRY computation of an optimized HLO module's text that run as
    kernels (parameters, tuples, bitcasts and constants are not counted)."""
    entry = compiled_text[compiled_text.index("\nENTRY"):]
    entry = entry[: entry.index("\n}") if "\n}" in entry else len(entry)]
    ops = re.findall(r"= [^=]*? (" + "|".join(re.escape(o) for o in _KERNEL_OPS) + r")\(", entry)
    return {o: ops.count(o) for o in sorted(set(ops))}


def feature_cases(k: int, n: int, rank: int, block: int, seed: int = 0):
    """[(label, make_qweight kwargs, traced step?)]: W8A8, then the W4A4 features added one at a time."""
    rng = np.random.default_rng(seed)
    nbo, nbi = -(-n // block), -(-k // block)
    smooth = np.abs(rng.normal(size=k)) + 0.5
    lr = dict(lr_a=rng.normal(size=(k, rank)) / k ** 0.5, lr_b=rng.normal(size=(rank, n)))
    blocks = dict(block_u=rng.normal(size=(nbo, nbi, block)), block_v=rng.normal(size=(nbo, nbi, block)) / block,
                  block=(block, block))
    base = dict(w_bits=8, a_bits=8, execution="fused", group_size=None)
    w4 = dict(base, w_bits=4, group_size=64, group_scale="int")
    return [("W8A8 per-channel", base, False),
            ("W4 packed per-channel", dict(base, w_bits=4), False),
            ("W4 g64 int group scales", w4, False),
            ("+ smoothing", dict(w4, smooth=smooth), False),
            ("+ low-rank branch (bf16)", dict(w4, smooth=smooth, **lr), False),
            ("+ H-SVD blocks (bf16)", dict(w4, smooth=smooth, **lr, **blocks), False),
            ("+ int8 branch factors", dict(w4, smooth=smooth, **lr, **blocks, lowrank_bits=8), False),
            ("+ VaTMP schedule, traced step", dict(w4, smooth=smooth, **lr, **blocks, lowrank_bits=8,
                                                   a_schedule=np.array([4, 3, 5, 4], np.int32)), True)]


def rotation_blocks(k: int):
    """[(label, Hadamard block)] of the online rotation the paper preset adds (issue 24): the largest power-of-2
    block dividing K, and the full-dimension Kronecker block m * 2^j (1536 = 12 x 128, 6144 = 12 x 512) where
    `quant.transforms` provides it."""
    from qdit4sr_jax.quant import transforms as T
    out = [(f"+ Hadamard 2^k block {T.largest_pow2_divisor(k)}", T.largest_pow2_divisor(k))]
    if hasattr(T, "rotation_block"):
        full = T.rotation_block(k, "full")
        if full != out[0][1]:
            out.append((f"+ Hadamard full {full} (Kronecker)", full))
    return out


def measure(m: int, k: int, n: int, rank: int = 32, block: int = 256, timed: bool = False, iters: int = 20,
            prologue_tiles=(), rotations: bool = False, only=(), impls=(), ablation: bool = False):
    """-> rows {label, kernels, by_op, ms (with timed)} for the feature cases on the default backend.
    prologue_tiles: extra rows of the prepared layer with the prologue kernel at these (block_m, warps);
    rotations: extra rows of the whole W4A4 layer with the online Hadamard rotation (`rotation_blocks`), stored
    and prepared; only: keep the rows whose label contains one of these strings (all when empty); impls: the
    prepared rotation rows once per online Hadamard implementation (`transforms.set_hadamard_impl`); ablation:
    rows of the prologue kernel with one feature more each (smoothing, low-rank, blocks, int8 factors; rotation
    alone), to read its own time per feature with the per-kernel times."""
    from qdit4sr_jax.quant.transforms import set_hadamard_impl
    from qdit4sr_jax.quant.kernels import DEFAULT_CONFIG, fused_linear, prepare_weight
    from qdit4sr_jax.quant.qweight import make_qweight
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(n, k)) / k ** 0.5, jnp.float32)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32)
    rows = []
    cases = feature_cases(k, n, min(rank, k, n), min(block, k, n))
    _, whole, traced_step = cases[-1]             # the whole W4A4 layer, then with its weight-side work done beforehand
    cases.append(("prepared: weight-side operands once per run", dict(whole, prepared="xla"), traced_step))
    cases.append(("prepared, down=split (before 2026-12-05)", dict(whole, prepared="xla", down="split"), traced_step))
    cases.append(("prepared + prologue kernel (Pallas backend only)", dict(whole, prepared="pallas"), traced_step))
    if rotations:
        for lab, rot in rotation_blocks(k):
            cases.append((lab, dict(whole, rotate=rot), traced_step))
            cases.append((f"prepared {lab}", dict(whole, rotate=rot, prepared="xla"), traced_step))
            for impl in impls:
                cases.append((f"prepared {lab} [{impl}]", dict(whole, rotate=rot, prepared="xla", impl=impl), traced_step))
            paper = {kk: v for kk, v in whole.items() if kk != "smooth"}      # the paper preset: signs, no smoothing
            for impl in impls or ["auto"]:                                   # (a bf16 x stays bf16 into the rotation)
                cases.append((f"prepared {lab} signs, no smoothing [{impl}]",
                              dict(paper, rotate=rot, signs=True, prepared="xla", impl=impl), traced_step))
            cases.append((f"prepared {lab} signs, no smoothing [down=input]",         # the down GEMM reads x itself
                          dict(paper, rotate=rot, signs=True, prepared="xla", down="input"), traced_step))
            cases.append((f"prepared {lab} signs, no smoothing [down=input, x' bf16]",
                          dict(paper, rotate=rot, signs=True, prepared="xla", down="input", xprime="bfloat16"),
                          traced_step))
            cases.append((f"prepared {lab} [down=input]", dict(whole, rotate=rot, prepared="xla", down="input"),
                          traced_step))
            # the rotation inside the prologue kernel (2 kernels per layer; the XLA prologue where it does not fit)
            cases.append((f"prepared + prologue kernel {lab} signs, no smoothing",
                          dict(paper, rotate=rot, signs=True, prepared="pallas"), traced_step))
            cases.append((f"prepared + prologue kernel {lab}", dict(whole, rotate=rot, prepared="pallas"), traced_step))
            for bm, warps in prologue_tiles:
                cases.append((f"  prologue kernel {lab} signs, no smoothing at {bm} rows, {warps} warps",
                              dict(paper, rotate=rot, signs=True, prepared="pallas", tile=(bm, warps)), traced_step))
    if ablation:                                 # the prologue kernel's own time, feature by feature (--per-kernel)
        for label, kw, traced in feature_cases(k, n, min(rank, k, n), min(block, k, n))[3:7]:
            cases.append((f"prologue kernel ablation: {label}", dict(kw, prepared="pallas"), traced))
        from qdit4sr_jax.quant.transforms import rotation_block
        w4 = {kk: v for kk, v in whole.items() if kk in ("w_bits", "a_bits", "execution", "group_size", "group_scale")}
        cases.append(("prologue kernel ablation: rotation only (signs, full Hadamard, no branches)",
                      dict(w4, rotate=rotation_block(k, "full"), signs=True, prepared="pallas"), False))
    if only:
        cases = [c for c in cases if any(o in c[0] for o in only)]
    for bm, warps in prologue_tiles:
        cases.append((f"  prologue kernel at {bm} rows, {warps} warps",
                      dict(whole, prepared="pallas", tile=(bm, warps)), traced_step))
    for label, kw, traced in cases:
        kw = dict(kw)
        prepared = kw.pop("prepared", None)
        tile = kw.pop("tile", None)
        down = kw.pop("down", "joint")
        xprime = kw.pop("xprime", "float32")
        set_hadamard_impl(kw.pop("impl", "auto"))
        cfg = None if tile is None else dataclasses.replace(DEFAULT_CONFIG, prologue_block_m=tile[0],
                                                            prologue_warps=tile[1], prologue_rot_warps=tile[1])
        try:
            q = make_qweight(w, **kw)
            if prepared:
                q = jax.block_until_ready(prepare_weight(q, prologue=prepared, down=down, xprime=xprime))
            a_bits = q.node.a_bits if prepared else q.a_bits
            f = jax.jit(lambda x, q, t, traced=traced, cfg=cfg: fused_linear(
                x, q, step=t if traced else None, act_bits=None if traced else a_bits, config=cfg))
            compiled = f.lower(x, q, jnp.int32(1)).compile()
        except Exception as e:                   # keep the other rows (e.g. a kernel Triton cannot compile)
            rows.append(dict(label=label, kernels=0, by_op={}, error=repr(e)[:300], ms=float("nan")))
            print(f"{label}: failed: {rows[-1]['error']}", flush=True)
            continue
        by_op = entry_kernels(compiled.as_text())
        row = dict(label=label, kernels=sum(by_op.values()), by_op=by_op)
        if timed:
            jax.block_until_ready(compiled(x, q, jnp.int32(1)))
            ts = []
            for _ in range(iters):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(x, q, jnp.int32(1)))
                ts.append(time.perf_counter() - t0)
            row["ms"] = 1e3 * float(np.median(ts))
            from step_profile import profile_step
            prof = profile_step(compiled, (x, q, jnp.int32(1)), iters=iters, warmup=1)
            row["device_us"] = prof["kernel_us_per_step"]
            row["per_kernel"] = [dict(name=t["name"][:80], us=round(t["us"], 1)) for t in prof["top_kernels"][:6]]
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--k", type=int, default=1536)
    ap.add_argument("--n", type=int, default=1536)
    ap.add_argument("--rank", type=int, default=26, help="low-rank branch rank (H-SVD's global rank: 22-26)")
    ap.add_argument("--block", type=int, default=256, help="H-SVD block size")
    ap.add_argument("--time", action="store_true", help="also time each compiled layer (median of 20)")
    ap.add_argument("--rotations", action="store_true",
                    help="add the whole W4A4 layer with the online Hadamard rotation (2^k block and full Kronecker)")
    ap.add_argument("--only", nargs="*", default=[], help="keep only rows whose label contains one of these")
    ap.add_argument("--hadamard-impls", nargs="*", default=[], help="with --rotations: prepared rows per implementation")
    ap.add_argument("--out", default=None, help="JSON rows")
    ap.add_argument("--per-kernel", action="store_true", help="with --time: each row's six longest kernels")
    ap.add_argument("--prologue-ablation", action="store_true",
                    help="rows of the prologue kernel feature by feature (with --per-kernel: its own time)")
    ap.add_argument("--prologue-tiles", nargs="*", default=[], metavar="ROWSxWARPS",
                    help="extra rows: the prologue kernel at these tiles, e.g. 16x4 32x8 64x8 (GPU sweep)")
    a = ap.parse_args(argv)
    tiles = [tuple(int(v) for v in t.lower().split("x")) for t in a.prologue_tiles]
    rows = measure(a.m, a.k, a.n, a.rank, a.block, a.time, prologue_tiles=tiles, rotations=a.rotations, only=a.only,
                   impls=a.hadamard_impls, ablation=a.prologue_ablation)
    if a.out:
        from common import write_json
        write_json(a.out, {"m": a.m, "k": a.k, "n": a.n, "device": jax.devices()[0].device_kind, "rows": rows})
    print(f"{jax.devices()[0].device_kind}  jax {jax.__version__}  [{a.m} x {a.k}] x [{a.k} x {a.n}]")
    print("| features | kernels | by op |" + (" wall ms (host) | device us |" if a.time else "")
          + "\n|---|---|---|" + ("---|---|" if a.time else ""))
    for r in rows:
        ops = ", ".join(f"{o} {c}" for o, c in r["by_op"].items())
        print(f"| {r['label']} | {r['kernels']} | {ops} |"
              + (f" {r['ms']:.3f} | {r.get('device_us', float('nan')):.1f} |" if a.time else ""))
    if a.per_kernel:
        for r in rows:
            print(f"{r['label']}: " + "; ".join(f"{k['name']} {k['us']} us" for k in r.get("per_kernel", [])))
    return rows


if __name__ == "__main__":
    main()
