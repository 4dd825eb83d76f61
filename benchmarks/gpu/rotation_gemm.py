"""The prologue's rotation on Mosaic kernels against what the step runs today (XLA): x' = x (D H) in bf16, the
branch features x jd, and each row's max|x'|.

First the Hadamard kernel (`mosaic_hadamard.mosaic_hadamard_rowmax`: per row G^T (X o D) S_c on the tensor cores,
run maxima from its epilogue; 3 and 2 bf16 terms of Z) vs today's x' and row max (`transforms.hadamard_transform`,
"auto"), at K = 1536 and 6144: differing elements, us per call; then the codes of three members (4, 5, 3 bits)
made in the kernel (`mosaic_hadamard_codes`) vs its XLA form and vs today's XLA codes, us per call; the branch
features' GEMM on the Mosaic bf16 GEMM vs XLA's dot. Then the rotation GEMM (`mosaic_gemm.mosaic_bf16_gemm_rowmax`)
per shape (M, K, F):

Per shape (M, K, F): x bf16 [M, K] (Student-t rows), D H the signed +-1 Hadamard of K (exact in bf16), jd a random
bf16 down-projection [K, F] (F branch columns, padded so the kernel's column tiles divide K + F).
  today: three XLA ops (x @ DH, x @ jd, max |x'| over rows): XLA's GEMM(s) and a reduce kernel
  mosaic: one kernel, b = [(DH)^T | jd^T], writing [x' | features] and per-tile row maxima, then the max over
          the K / tile_n rotation tiles (a [K / tile_n, M] reduce)
  mosaic_kn: the same as the rotation prologue runs it (`prologue_mosaic.py`): D H and jd as two [K, N] operands,
          64 x 128 warpgroup tiles along M
Check: x' and the features equal XLA's up to float32 summation order (bf16 outputs: count and max of the
differing elements), row maxima equal to the maxima of the kernel's own x' (exactly). Then the ms per call
(R calls per jit, `ws_gemm.per_call_ms`).

  python benchmarks/gpu/rotation_gemm.py --out $OUT/rotation_gemm.json          # GPU (Hopper)
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

from common import environment, write_json  # noqa: E402
from ws_gemm import per_call_ms  # noqa: E402

# (M, K, F): the 512-px step's q/k/v input (4096 rows, 3 x 128 shared feature columns), the 2048-row LR layers
# (128 feature columns), the 1024-px q/k/v input
SHAPES = [(4096, 1536, 384), (2048, 1536, 128), (16384, 1536, 384)]


def activations(rng, m, k, reps):
    """reps inputs x bf16 [reps, M, K] with Student-t rows (heavy tails, as a layer's activations)."""
    return jnp.asarray(rng.standard_t(5, size=(reps, m, k)).astype(np.float32), jnp.bfloat16)


def operands(m, k, f, reps, cta_n=256, seed=0):
    from qdit4sr_jax.quant.transforms import hadamard_matrix, rotation_signs
    rng = np.random.default_rng(seed)
    xs = activations(rng, m, k, reps)
    dh = (rotation_signs(k)[:, None] * np.sign(hadamard_matrix(k))).astype(np.float32)    # D H, +-1 entries
    fp = -(-(k + f) // cta_n) * cta_n - k                                                  # padded feature columns
    jd = np.zeros((k, fp), np.float32)
    jd[:, :f] = rng.normal(size=(k, f)) / np.sqrt(k)
    return xs, jnp.asarray(dh, jnp.bfloat16), jnp.asarray(jd, jnp.bfloat16)


def today(x, dh, jd):
    """The XLA ops of today's prologue: x' (bf16), features, row max |x'| (float32 [M])."""
    xp = jnp.dot(x, dh, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    feats = jnp.dot(x, jd, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    return xp, feats, jnp.max(jnp.abs(xp.astype(jnp.float32)), axis=1)


def fused(x, b, k, tile_n=128, **tiles):
    from qdit4sr_jax.quant.kernels.mosaic_gemm import mosaic_bf16_gemm_rowmax
    y, amax = mosaic_bf16_gemm_rowmax(x, b, tile_n=tile_n, **tiles)
    return y, jnp.max(amax[: k // tile_n], axis=0)


def two_operands(x, dh, jd, k, tile_n=128):
    """The form `prologue_mosaic` runs: D H and jd as two [K, N] operands (no concatenation), layout "kn"."""
    from qdit4sr_jax.quant.kernels.mosaic_gemm import mosaic_bf16_gemm_rowmax
    from qdit4sr_jax.quant.kernels.prologue_mosaic import ROTATION_TILES
    y, amax = mosaic_bf16_gemm_rowmax(x, dh, jd, layout="kn", **ROTATION_TILES)
    return y, jnp.max(amax, axis=0)


# (M, K) of the Hadamard kernel: the 512-px step's 1536- and 6144-input layers, the 2048-row LR layers, 1024 px
HAD_SHAPES = [(4096, 1536), (4096, 6144), (2048, 1536), (16384, 1536), (16384, 6144)]


def hadamard_today(x):
    """What the step runs today for a rotated layer's x' (XLA: `transforms.hadamard_transform`, "auto": one +-1
    GEMM at 1536, the two-stage "dense" form at 6144) in bf16 and its row maxima."""
    from qdit4sr_jax.quant.transforms import hadamard_transform, rotation_signs
    k = x.shape[1]
    xp = hadamard_transform(x * jnp.asarray(rotation_signs(k), x.dtype), k, inner="bfloat16").astype(jnp.bfloat16)
    return xp, jnp.max(jnp.abs(xp.astype(jnp.float32)), axis=1)


def hadamard_kernel(x, parts=3):
    from qdit4sr_jax.quant.kernels.mosaic_hadamard import mosaic_hadamard_rowmax
    y, run_max = mosaic_hadamard_rowmax(x, parts=parts)
    return y, jnp.max(run_max, axis=1)


def parse_config(text: str) -> dict:
    """"w3p2o2" -> dict(wgs=3, prefetch=2, out_slots=2), "w2p1o1c128" -> also run=128 (`mosaic_hadamard_rowmax`'s
    tuning: warpgroups, prefetch, output slots, run length)."""
    import re
    mt = re.fullmatch(r"w(\d)p(\d)o(\d)(?:c(64|128))?", text)
    if not mt:
        raise ValueError(f"Hadamard config {text!r} is not wNpNoN[cRUN] (warpgroups, prefetch, out slots, run 64 or "
                         f"128)")
    kw = dict(wgs=int(mt.group(1)), prefetch=int(mt.group(2)), out_slots=int(mt.group(3)))
    return kw | ({"run": int(mt.group(4))} if mt.group(4) else {})


def hadamard_configs(m, k, reps, configs):
    """us per call of each tuning of the Hadamard kernel, whether its x' equals the default's, and (a run length
    of its own) how many elements of x' differ from its own XLA form (`hadamard_reference(run=...)`: float32 sums
    in another order than the default plan's, so a few bf16 ulps may differ from the default's x')."""
    from qdit4sr_jax.quant.kernels.mosaic_hadamard import hadamard_reference, mosaic_hadamard_rowmax
    xs = activations(np.random.default_rng(m + k), m, k, reps)
    base = jax.jit(mosaic_hadamard_rowmax)(xs[0])[0]
    row = {"hadamard_configs": [m, k]}
    for cfg in configs:
        kw = parse_config(cfg)
        try:
            y = jax.jit(lambda v, kw=kw: mosaic_hadamard_rowmax(v, **kw))(xs[0])[0]
            row[cfg] = dict(same=bool(jnp.array_equal(y, base)),
                            us=per_call_ms(lambda v, kw=kw: mosaic_hadamard_rowmax(v, **kw), xs) * 1e3)
            if "run" in kw:
                ref = jax.jit(lambda v, r=kw["run"]: hadamard_reference(v, run=r))(xs[0])[0]
                row[cfg]["differing_vs_own_xla"] = int(jnp.sum(y != ref))
        except Exception as e:  # noqa: BLE001 - e.g. shared memory exceeded: recorded
            row[cfg] = repr(e)[:200]
    return row


# (M, K, W) of the branch features' GEMM x jd: a 2048-row LR layer (XLA: split-K + reduce), a 512-px q/k/v group
FEAT_SHAPES = [(2048, 1536, 128), (4096, 1536, 384)]


def features_row(m, k, w, reps):
    """The features GEMM of prologue="mosaic" (`prologue_mosaic._features`: the Mosaic bf16 GEMM) vs XLA's dot:
    differing elements, us per call."""
    from qdit4sr_jax.quant.kernels.branch_ops import down_features
    from qdit4sr_jax.quant.kernels.prologue_mosaic import _features
    rng = np.random.default_rng(m + w)
    xs = activations(rng, m, k, reps)
    jd = jnp.asarray(rng.normal(size=(k, w)) / np.sqrt(k), jnp.bfloat16)
    a = jax.jit(down_features)(xs[0], jd).astype(jnp.float32)
    b = jax.jit(_features)(xs[0], jd)[:, :w].astype(jnp.float32)
    return {"features": [m, k, w], "differing": int(jnp.sum(a != b)), "max_abs_diff": float(jnp.max(jnp.abs(a - b))),
            "xla_us": per_call_ms(down_features, xs, jd) * 1e3, "mosaic_us": per_call_ms(_features, xs, jd) * 1e3}


def hadamard_row(m, k, reps):
    """Exactness (vs today's XLA x', vs the kernel's own XLA form) and us per call of the Hadamard kernel."""
    from qdit4sr_jax.quant.kernels.mosaic_hadamard import hadamard_reference
    xs = activations(np.random.default_rng(m + k), m, k, reps)
    row = {"hadamard": [m, k]}
    xp, amax = jax.jit(hadamard_today)(xs[0])
    ref, ref_max = jax.jit(hadamard_reference)(xs[0])
    for parts in (3, 2):
        y, am = jax.jit(lambda v, p=parts: hadamard_kernel(v, p))(xs[0])
        yf = y.astype(jnp.float32)
        row[f"p{parts}"] = dict(
            differing_vs_today=int(jnp.sum(yf != xp.astype(jnp.float32))),
            max_abs_diff_vs_today=float(jnp.max(jnp.abs(yf - xp.astype(jnp.float32)))),
            differing_vs_own_xla=int(jnp.sum(yf != ref.astype(jnp.float32))),
            amax_rel_vs_today=float(jnp.max(jnp.abs(am - amax) / amax)),
            amax_vs_own=float(jnp.max(jnp.abs(am - jnp.max(jnp.abs(yf), axis=1)))), finite=bool(jnp.isfinite(yf).all()))
    from qdit4sr_jax.quant.kernels.mosaic_hadamard import codes_reference, hadamard_plan, mosaic_hadamard_codes
    lv = jnp.asarray([[7.0, 1 / 7.0], [15.0, 1 / 15.0], [3.0, 1 / 3.0]], jnp.float32)    # 4-, 5-, 3-bit members
    tabs = (lv[:, :1], lv[:, 1:], jnp.int32(0))             # as [n, T] level tables of one step, at step 0
    q_ref = jnp.stack(jax.jit(codes_reference)(xs[0], *tabs)[0])
    q_today = jax.jit(today_codes)(xs[0], lv)
    # the codes made in the kernel (wrong at run length 64 on an H100, 2026-12-07 10:22, before the row max stopped
    # sharing a reduction scratch between warpgroups): per shared-memory swizzle of the int8 output tiles, codes
    # differing from the kernel's own XLA form, and which rows (by row index mod 2: a 1536 tile holds two) hold them
    c = hadamard_plan(k)[1]
    for sw in sorted({c, 64, 32} - {s_ for s_ in (64, 128) if s_ > c}, reverse=True):
        try:
            q = jnp.stack(jax.jit(lambda v, *t, s_=sw: mosaic_hadamard_codes(v, *t, codes_swizzle=s_))(xs[0], *tabs)[0])
        except Exception as e:  # noqa: BLE001 - recorded
            row[f"codes_sw{sw}"] = {"error": repr(e)[:300]}
            continue
        diff = jnp.abs(q.astype(jnp.int32) - q_ref.astype(jnp.int32))
        bad_rows = jnp.any(diff > 0, axis=(0, 2))
        row[f"codes_sw{sw}"] = dict(differing_vs_own_xla=int(jnp.sum(diff > 0)), max_diff=int(jnp.max(diff)),
                                    differing_vs_today=int(jnp.sum(q != q_today)), rows_wrong=int(jnp.sum(bad_rows)),
                                    rows_wrong_even_odd=[int(jnp.sum(bad_rows[0::2])), int(jnp.sum(bad_rows[1::2]))])
    # the step's levels looked up in the kernel: tables of 4 steps, step 2
    lv4 = jnp.stack([lv[:, 0] * 0 + 3.0, lv[:, 0] * 0 + 7.0, lv[:, 0], lv[:, 0] * 0 + 31.0], axis=1)
    t4 = (lv4, 1.0 / lv4, jnp.int32(2))
    q4 = jnp.stack(jax.jit(mosaic_hadamard_codes)(xs[0], *t4)[0])
    row["codes_step2_differing_vs_own_xla"] = int(jnp.sum(q4 != jnp.stack(jax.jit(codes_reference)(xs[0], *t4)[0])))
    row["max_abs"] = float(jnp.max(jnp.abs(xp.astype(jnp.float32))))
    row["today_us"] = per_call_ms(hadamard_today, xs) * 1e3
    for parts in (3, 2):
        row[f"kernel_p{parts}_us"] = per_call_ms(lambda v, p=parts: hadamard_kernel(v, p), xs) * 1e3
    row["x_today"] = row["today_us"] / row["kernel_p3_us"]
    row["today_codes_us"] = per_call_ms(lambda v: today_codes(v, lv), xs) * 1e3
    row["kernel_codes_us"] = per_call_ms(lambda v: mosaic_hadamard_codes(v, *tabs), xs) * 1e3
    return row


def today_codes(x, lv):
    """Today's XLA prologue for three members reading x: x' (bf16), its row max, each member's codes."""
    from qdit4sr_jax.quant.kernels.operands import codes_from_scale, scale_from_level
    xp, amax = hadamard_today(x)
    xf = xp.astype(jnp.float32)
    return jnp.stack([codes_from_scale(xf, scale_from_level(amax[:, None], lv[i, 1]), lv[i, 0])
                      for i in range(lv.shape[0])])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", type=int, default=len(SHAPES))
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--out", default=None)
    ap.add_argument("--hadamard-shapes", type=int, default=len(HAD_SHAPES), help="the Hadamard kernel's first N")
    ap.add_argument("--features-shapes", type=int, default=len(FEAT_SHAPES), help="the features GEMM's first N")
    ap.add_argument("--hadamard-configs", nargs="*", default=[],
                    help="instead of the check: time these tunings (wNpNoN: warpgroups, prefetch, out slots) at the "
                         "first --hadamard-shapes shapes, e.g. w2p1o1 w3p2o2 w2p2o2 w1p3o2 w2p1o1c128")
    a = ap.parse_args(argv)
    res = {"env": environment(), "rows": []}
    if a.hadamard_configs:
        for cfg in a.hadamard_configs:
            parse_config(cfg)
        for (m, k) in HAD_SHAPES[: a.hadamard_shapes]:
            row = hadamard_configs(m, k, a.reps if m <= 4096 else 2, a.hadamard_configs)
            res["rows"].append(row)
            print(row, flush=True)
        write_json(a.out, res)
        return
    for (m, k) in HAD_SHAPES[: a.hadamard_shapes]:
        try:
            row = hadamard_row(m, k, a.reps if m <= 4096 else 2)
        except Exception as e:  # noqa: BLE001 - recorded; the next shape still runs
            row = {"hadamard": [m, k], "error": repr(e)[:600]}
        res["rows"].append(row)
        print(row, flush=True)
    for (m, k, w) in FEAT_SHAPES[: a.features_shapes]:
        try:
            row = features_row(m, k, w, a.reps)
        except Exception as e:  # noqa: BLE001 - recorded; the next shape still runs
            row = {"features": [m, k, w], "error": repr(e)[:600]}
        res["rows"].append(row)
        print(row, flush=True)
    for (m, k, f) in SHAPES[: a.shapes]:
        row = {"shape": [m, k, f]}
        try:
            xs, dh, jd = operands(m, k, f, a.reps if m <= 4096 else 2)
            b = jnp.concatenate([dh, jd], axis=1).T                    # [K + Fp, K], K-major
            xp, feats, amax = jax.jit(today)(xs[0], dh, jd)
            y, amax_k = jax.jit(lambda x, b: fused(x, b, k))(xs[0], b)
            want = jnp.concatenate([xp, feats], axis=1).astype(jnp.float32)
            diff = jnp.abs(y.astype(jnp.float32) - want)
            row.update(differing=int(jnp.sum(diff > 0)), max_abs_diff=float(jnp.max(diff)),
                       max_abs=float(jnp.max(jnp.abs(want))),
                       amax_vs_own=float(jnp.max(jnp.abs(amax_k - jnp.max(jnp.abs(y[:, :k].astype(jnp.float32)),
                                                                          axis=1)))),
                       amax_rel_vs_today=float(jnp.max(jnp.abs(amax_k - amax) / amax)))
            y2, amax2 = jax.jit(lambda x, dh, jd: two_operands(x, dh, jd, k))(xs[0], dh, jd)
            d2 = jnp.abs(y2.astype(jnp.float32) - want)
            row.update(kn_differing=int(jnp.sum(d2 > 0)), kn_max_abs_diff=float(jnp.max(d2)),
                       kn_amax_rel_vs_today=float(jnp.max(jnp.abs(amax2 - amax) / amax)))
            row["today_ms"] = per_call_ms(today, xs, dh, jd)
            row["mosaic_ms"] = per_call_ms(lambda x, b: fused(x, b, k), xs, b)
            row["x_today"] = row["today_ms"] / row["mosaic_ms"]
            row["mosaic_kn_ms"] = per_call_ms(lambda x, dh, jd: two_operands(x, dh, jd, k), xs, dh, jd)
        except Exception as e:  # noqa: BLE001 - recorded; the next shape still runs
            row["error"] = repr(e)[:600]
        res["rows"].append(row)
        print(row, flush=True)
    write_json(a.out, res)


if __name__ == "__main__":
    main()
