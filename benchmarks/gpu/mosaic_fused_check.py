"""GPU check of the fused linear on the warp-specialized Mosaic GEMM (`prepare(..., gemm="mosaic")`, and with the
rotation prologue on Mosaic kernels too: prologue="mosaic" | "mosaic-gemm") against the same prepared layers on the Triton GEMM,
and of each against fake-quant; then the time per call of each.

Layers as `prologue_check._layer` builds them (W4A4, rotation, rank-32 low-rank + 256 x 256 H-SVD blocks,
int group scales folded on preparing) with a VaTMP schedule (the scale made in the kernel from the level
table), prepared as the sampler's "fast" mode; a to_q / to_k / to_v group shares one down-projection (the
members read their columns of the shared features in place). Expected: Mosaic equals Triton up to float32
rounding in the epilogue (a few bf16 ulps on some elements), both equally far from fake-quant; with the rotation
prologue, x' comes from sums in another order (a code may move by one: rel. err. vs Triton ~1e-3 at most).

  python benchmarks/gpu/mosaic_fused_check.py --out $OUT/mosaic_fused_check.json      # GPU (Hopper)
"""
from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))      # the repository root
sys.path.insert(0, os.path.dirname(_HERE))                       # benchmarks/ (common)
sys.path.insert(0, _HERE)                                        # benchmarks/gpu/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import add_prologue_args, apply_prologue_args, environment, write_json  # noqa: E402
from linear_latency import rel_err  # noqa: E402
from prologue_check import _input, _layer  # noqa: E402
from ws_gemm import per_call_ms  # noqa: E402

SCHEDULE = [4, 3, 5, 4]
# prepare() arguments beside the sampler's "fast" mode: the Triton GEMM (the reference here), the Mosaic GEMM, and
# the Mosaic GEMM after the rotation prologue on the Mosaic Hadamard kernel (mosaic_had) or on one Mosaic GEMM with
# the features (mosaic_rot, 1536-input layers) (prologue_mosaic.py)
VARIANTS = {"triton": dict(gemm="triton"), "mosaic": dict(gemm="mosaic"),
            "mosaic_had": dict(gemm="mosaic", prologue="mosaic"),
            "mosaic_rot": dict(gemm="mosaic", prologue="mosaic-gemm"),
            # mosaic_had with a to_q / to_k / to_v group as one layer (the sampler's "fast-mosaic", merged before
            # preparing: `kernels/merged.py`): one GEMM of N = 3 x 1536 reading each member's 32 low-rank features
            # for its 1536 columns (`Branch.block_out`) and the stacked H-SVD block rows
            "mosaic_had_merged": dict(gemm="mosaic", prologue="mosaic", merge=True)}
# (M, K, N, group, float_groups): the 512-px step's shapes with CFG; group: a to_q / to_k / to_v group sharing its
# down GEMM; float_groups: float group scales (the plain paper preset's "gnk" layout: the grouped kernel path)
CASES = [(4096, 1536, 1536, True, False), (4096, 1536, 6144, False, False), (4096, 6144, 1536, False, True),
         (2048, 1536, 1536, False, False), (4096, 1536, 1536, False, True)]


def run_case(m, k, n, group, float_groups=False, step=2, time_it=True, tilings=("",), variants=tuple(VARIANTS)):
    from qdit4sr_jax.quant.kernels import fused_linear, prepare
    from qdit4sr_jax.quant.kernels.merged import merge_tree
    from qdit4sr_jax.quant.kernels.prepared import SAMPLER_MODES
    from qdit4sr_jax.quant.kernels.mosaic_gemm import mosaic_call_sites
    from qdit4sr_jax.quant.linear import linear
    names = ("to_q", "to_k", "to_v") if group else ("layer",)
    gs = "float" if float_groups else "int"
    tree = {nm: {"kernel": _layer(k, n, False, seed=i, group_scale=gs).replace(
        a_schedule=jnp.asarray(SCHEDULE, jnp.int32))}
            for i, nm in enumerate(names)}
    x = _input(m, k)
    t = jnp.int32(step)
    preps = {name: jax.jit(lambda tr, kw=kw: prepare(tr, **SAMPLER_MODES["fast"], **kw))(
        merge_tree(tree) if kw.get("merge") else tree) for name, kw in VARIANTS.items() if name in variants}

    def group_fn(tr, v, s):
        if "qkv" in tr:                                  # the group merged: one layer, its output split
            return jnp.split(fused_linear(v, tr["qkv"]["kernel"], None, step=s), len(names), axis=-1)
        return [fused_linear(v, tr[nm]["kernel"], None, step=s, shared=tr.get("qkv_down")) for nm in names]

    run = jax.jit(group_fn)
    ys = {g: run(p, x, t) for g, p in preps.items()}
    texts = {v: run.lower(preps[v], x, t).as_text() for v in preps if v != "triton"}
    rows = []
    for i, nm in enumerate(names):
        ref = np.asarray(linear(x, tree[nm]["kernel"], None, step=t, execution="fake"), np.float32)
        b = np.asarray(ys["triton"][i], np.float32)
        row = dict(shape=[m, k, n], member=nm, layout=tree[nm]["kernel"].layout,
                   max_abs_y=float(np.abs(b).max()), rel_triton_vs_fake=rel_err(b, ref))
        for v in preps:
            if v == "triton":
                continue
            a = np.asarray(ys[v][i], np.float32)
            text = texts[v]
            row[v] = dict(rel_vs_triton=rel_err(a, b), max_abs_diff=float(np.abs(a - b).max()),
                          differing=int((a != b).sum()), rel_vs_fake=rel_err(a, ref), finite=bool(np.isfinite(a).all()),
                          mosaic_kernels=mosaic_call_sites(text), mosaic_distinct=text.count("custom_call @mosaic_gpu"),
                          triton_kernels=text.count("__gpu$xla.gpu.triton"))
            # ok: finite and no farther from fake-quant than the Triton path (+10 %): the paths may round x'
            # differently (the Hadamard kernel's inner stage is float32, "fast"'s bf16), not be wrong
            row[v]["ok"] = row[v]["finite"] and row[v]["rel_vs_fake"] <= 1.1 * row["rel_triton_vs_fake"]
        rows.append(row)
        print(rows[-1], flush=True)
    if time_it:
        from qdit4sr_jax.quant.kernels.mosaic_gemm import parse_tiles, set_fused_tiles
        xs = jnp.stack([_input(m, k)] * 4)
        tm = {"triton_us": per_call_ms(lambda v, p, s: group_fn(p, v, s), xs, preps["triton"], t) * 1e3}
        for v in preps:
            for tiles in (tilings if v != "triton" else ()):   # each tiling traced afresh (read when tracing)
                prev = set_fused_tiles(**parse_tiles(tiles))
                try:
                    tm[f"{v}_us[{tiles or 'default'}]"] = per_call_ms(
                        lambda v_, p, s: group_fn(p, v_, s), xs, preps[v], t) * 1e3
                except Exception as e:  # noqa: BLE001 - e.g. shared memory exceeded: recorded
                    tm[f"{v}_us[{tiles or 'default'}]"] = repr(e)[:200]
                finally:
                    set_fused_tiles(**prev)
        rows.append(dict(shape=[m, k, n], member="+".join(names) + " per call", **tm))
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=len(CASES), help="the first N cases")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--tiles", nargs="+", default=["", "tile_m=128,wg_dim=m,epi_n=32,out_slots=1"],
                    help="Mosaic tilings to time (mosaic_gemm.parse_tiles; '' = FUSED_TILES)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                    help="what to compare with the Triton GEMM (always run)")
    add_prologue_args(ap)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    apply_prologue_args(a)
    variants = ("triton",) + tuple(v for v in a.variants if v != "triton")
    res = {"env": environment(), "rows": [], "run_tile": a.run_tile, "codes_in_kernel": a.codes_in_kernel,
           "hadamard_run": a.hadamard_run}
    for (m, k, n, group, fg) in CASES[: a.cases]:
        try:
            res["rows"] += run_case(m, k, n, group, fg, time_it=not a.no_time, tilings=a.tiles, variants=variants)
        except Exception as e:  # noqa: BLE001 - recorded; the next case still runs
            res["rows"].append(dict(shape=[m, k, n], error=repr(e)[:800]))
            print(res["rows"][-1], flush=True)
    write_json(a.out, res)


if __name__ == "__main__":
    main()
