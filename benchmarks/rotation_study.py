"""Why the Hadamard rotation lost to smoothing on DiT4SR-style activations (issue 22), with per-layer evidence.

    python benchmarks/rotation_study.py timing                 # cost of the online rotation per layer (CPU)
    python benchmarks/rotation_study.py layers                 # per-layer activation / weight statistics
    python benchmarks/rotation_study.py fidelity --images data/dev --variants "svdquant;qdit4sr-paper (full, signs)"
    python benchmarks/rotation_study.py per-layer --images data/dev   # smoothing or smoothing + rotation per layer

`layers`: every quantized linear of the model, its input activations captured over the whole sampler (every
step) on calibration LR crops (the training photos, disjoint from data/dev and data/val), a strided subsample
of tokens per call. For each input transform T (the table's columns):
  none        x as is
  block       x H_b, b the largest power of 2 dividing d_in (the old `rotate_block=None`)
  full        x H_d over the whole d_in (H_12 kron H_2^j), no signs
  full+signs  x diag(signs) H_d (QuaRot's randomised Hadamard)
  smooth      x / s, s = SmoothQuant alpha 0.5 from the calibration ch_absmax (the `qdit4sr-smooth-w4a4` preset)
  smooth+full (x / s) H_d
  smooth+full+signs (x / s) diag(signs) H_d
it reports, per layer: channel outliers (max over channels of the channel absmax / its median), mean per-token
kurtosis, the per-token 4-bit activation error ||Q4(x') - x'||^2 / ||x'||^2 (the quantizer of every preset:
symmetric absmax per token), the W4 group-64 weight error of the transformed weight W' (RTN), and the layer's
W4A4 output error ||Q4(x') Q4(W')^T - x W^T||^2 / ||x W^T||^2, plus the share of the per-token error that the
token mean (the "DC" direction a Hadamard concentrates into one coefficient) explains.

`fidelity`: W4A4 PSNR vs the FP output of quantization variants on a folder of HR crops (`benchmarks/fidelity.py`'s
Study: seeded degradation, same seed and steps as FP, calibration on training crops). Choose on data/dev,
report on data/val.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

TRANSFORMS = ("none", "block", "full", "full+signs", "smooth", "smooth+full", "smooth+full+signs")


# ----------------------------------------------------------------------------- timing

def time_rotation(shapes=((1024, 1536, 1536), (1024, 6144, 1536), (4762, 1536, 1536), (4762, 6144, 1536),
                          (512, 192, 192), (512, 768, 192)), reps: int = 10) -> List[dict]:
    """Per (M, K, N): median wall ms of the online Hadamard of x [M, K] float32 with the old block (largest power
    of 2) and the full block (m * 2^j), and of the float32 matmul x [M, K] @ W [K, N] it precedes (this CPU)."""
    import jax
    import jax.numpy as jnp
    from qdit4sr_jax.quant import transforms as T
    rows = []
    for m, k, n in shapes:
        x = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32)
        w = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32)
        fns = {"block": jax.jit(lambda a, b=T.rotation_block(k): T.hadamard_transform(a, b)),
               "full": jax.jit(lambda a, b=T.rotation_block(k, "full"): T.hadamard_transform(a, b)),
               "matmul": jax.jit(lambda a: a @ w)}
        row = dict(M=m, K=k, N=n, block=T.rotation_block(k), full=T.rotation_block(k, "full"))
        for name, f in fns.items():
            f(x).block_until_ready()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                f(x).block_until_ready()
                ts.append(time.perf_counter() - t0)
            row[name + "_ms"] = 1e3 * float(np.median(ts))
        rows.append(row)
    return rows


def format_timing(rows) -> str:
    out = ["| M, K, N | block | rotation (block) ms | rotation (full) ms | f32 matmul ms | full / matmul |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['M']}, {r['K']}, {r['N']} | {r['block']} -> {r['full']} | {r['block_ms']:.2f} | "
                   f"{r['full_ms']:.2f} | {r['matmul_ms']:.2f} | {r['full_ms'] / r['matmul_ms']:.2f} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- capture

def capture_inputs(cfg, params, lrs, tokens: int = 256, seed: int = 0, num_steps: Optional[int] = None):
    """Input activations of every transformer Linear over the whole sampler, per calibration LR image:
    {path: (x float32 [n, K] (a strided subsample of `tokens` rows per call, step and image), ch_absmax [K])}.
    Implemented by sowing a token subsample instead of the statistics (`model.layers.activation_stats` patched
    for the duration of the call)."""
    import jax
    import jax.numpy as jnp
    from qdit4sr_jax import pipeline, sampling
    from qdit4sr_jax.model import layers

    def sub(x):
        flat = x.astype(jnp.float32).reshape(-1, x.shape[-1])
        idx = np.linspace(0, flat.shape[0] - 1, min(tokens, flat.shape[0])).round().astype(np.int32)
        return {"x": flat[idx], "ch_absmax": jnp.max(jnp.abs(flat), axis=0)}

    real = layers.activation_stats
    layers.activation_stats = sub
    out: Dict[str, list] = {}
    try:
        for i, lr in enumerate(lrs):
            d = pipeline._prepare(cfg, params, lr, seed, None, 0, None)
            _, calib = sampling.sample(cfg, params["transformer"], d["lr_lat"], d["noise"], context=d["ctx"],
                                       pooled=d["pool"], neg_context=d["nctx"], neg_pooled=d["npool"],
                                       num_steps=num_steps, guidance_scale=d["g"], collect_stats=True)
            calib = jax.device_get(calib)

            def walk(node, path):
                if isinstance(node, dict):
                    for k, v in node.items():
                        if k == "act" and isinstance(v, (tuple, list)):
                            for c in v:
                                out.setdefault("/".join(path), []).append(c)
                        else:
                            walk(v, path + (str(k),))

            walk(calib.get("calib", calib), ())
    finally:
        layers.activation_stats = real
        jax.clear_caches()           # the sampler's jitted trace sowed the subsample: never reuse it
    res = {}
    for p, calls in out.items():
        x = np.concatenate([np.asarray(c["x"]).reshape(-1, np.asarray(c["x"]).shape[-1]) for c in calls])
        ch = np.max(np.stack([np.asarray(c["ch_absmax"]).reshape(-1, x.shape[-1]).max(0) for c in calls]), 0)
        res[p] = (x, ch)
    return res


# ----------------------------------------------------------------------------- statistics

def q4_tokens(x, bits: int = 4):
    """Per-token symmetric absmax fake quantization (the presets' activation quantizer), float64."""
    qmax = 2 ** (bits - 1) - 1
    s = np.max(np.abs(x), axis=-1, keepdims=True) / qmax
    s = np.where(s > 0, s, 1.0)
    return np.clip(np.round(x / s), -qmax - 1, qmax) * s


def q4_weight(w, bits: int = 4, group: int = 64):
    """RTN of W [N, K] with symmetric group-`group` scales along K (the presets' weight quantizer), float64."""
    n, k = w.shape
    g = group if k % group == 0 else k
    wg = w.reshape(n, k // g, g)
    qmax = 2 ** (bits - 1) - 1
    s = np.max(np.abs(wg), axis=-1, keepdims=True) / qmax
    s = np.where(s > 0, s, 1.0)
    return (np.clip(np.round(wg / s), -qmax - 1, qmax) * s).reshape(n, k)


def transform(name: str, x, w, ch, alpha: float = 0.5):
    """(x' [n, K], W' [N, K]) float64 for transform `name` (module docstring), x' W'^T = x W^T."""
    import jax.numpy as jnp
    from qdit4sr_jax.quant import transforms as T
    k = x.shape[1]
    if name == "none":
        return x, w
    if name.startswith("smooth"):
        s = np.asarray(T.smooth_scale(jnp.asarray(ch), jnp.asarray(w, jnp.float32), alpha), np.float64)
        x, w = x / s, w * s
        if name == "smooth":
            return x, w
    blk = T.rotation_block(k) if name == "block" else T.rotation_block(k, "full")
    if name.endswith("signs"):
        sg = T.rotation_signs(k).astype(np.float64)
        x, w = x * sg, w * sg
    hm = T.hadamard_matrix(blk)
    rot = lambda a: (a.reshape(a.shape[0], k // blk, blk) @ hm).reshape(a.shape)
    return rot(x), rot(w)


def layer_stats(x, w, ch) -> Dict[str, dict]:
    """{transform: {ch_outlier, kurtosis, act_err, w_err, out_err, dc_share}} for one layer (x [n, K], W [N, K])."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    ref = x @ w.T
    out = {}
    for name in TRANSFORMS:
        xt, wt = transform(name, x, w, ch)
        cab = np.max(np.abs(xt), axis=0)
        xc = xt - xt.mean(axis=1, keepdims=True)
        kurt = np.mean(np.mean(xc ** 4, axis=1) / np.maximum(np.mean(xc ** 2, axis=1) ** 2, 1e-30))
        xq, wq = q4_tokens(xt), q4_weight(wt)
        ex = xq - xt
        mean_dir = np.mean(xt, axis=0)                      # the tokens' common component
        mean_dir = mean_dir / max(np.linalg.norm(mean_dir), 1e-30)
        out[name] = dict(
            ch_outlier=float(cab.max() / max(np.median(cab), 1e-30)),
            kurtosis=float(kurt),
            act_err=float(np.sum(ex ** 2) / np.sum(xt ** 2)),
            w_err=float(np.sum((wq - wt) ** 2) / np.sum(wt ** 2)),
            out_err=float(np.sum((xq @ wq.T - ref) ** 2) / np.sum(ref ** 2)),
            common=float(np.sum((xt @ mean_dir) ** 2) / np.sum(xt ** 2)),
            tok_max=float(np.mean(np.max(np.abs(xt), axis=1) / np.sqrt(np.mean(xt ** 2, axis=1) + 1e-30))))
    return out


def study_layers(model: str = "demo", n_calib: int = 4, tokens: int = 256, steps: Optional[int] = None, log=print):
    """Per-layer statistics of every quantized linear -> ({path: layer_stats}, description)."""
    from qdit4sr_jax.evaluation.data import calibration_lrs, load_bundle
    from qdit4sr_jax.quant import rules
    from qdit4sr_jax.quant.config import DEFAULT_INCLUDE
    cfg, params = load_bundle(model)
    lrs, desc = calibration_lrs("train", n_calib, 128, cfg.scale)
    t0 = time.perf_counter()
    cap = capture_inputs(cfg, params, lrs, tokens=tokens, num_steps=steps)
    log(f"captured {len(cap)} layers on {desc} in {time.perf_counter() - t0:.1f} s")
    tr = params["transformer"]
    res = {}
    for path in rules.select_linears(tr, DEFAULT_INCLUDE, ()):
        name = rules.path_str(path)
        node = tr
        for p in path:
            node = node[p]
        x, ch = cap[name]
        res[name] = layer_stats(x, np.asarray(node["kernel"], np.float64).T, ch)
    return res, desc


def layer_kind(path: str) -> str:
    """A short role name of a DiT4SR linear from its path (e.g. 'attn/to_q', 'ff/net_2', 'norm1/linear')."""
    parts = path.split("/")
    return "/".join(parts[1:]) if parts[0].startswith("transformer_blocks_") else path


def format_layers(res: Dict[str, dict], by_kind: bool = True) -> str:
    """Markdown: per layer role (mean over blocks), each transform's statistics."""
    groups: Dict[str, list] = {}
    for p, st in res.items():
        groups.setdefault(layer_kind(p) if by_kind else p, []).append(st)
    keys = ("ch_outlier", "tok_max", "kurtosis", "act_err", "w_err", "out_err", "common")
    lines = ["| layer (n) | stat | " + " | ".join(TRANSFORMS) + " |", "|---|---|" + "---|" * len(TRANSFORMS)]
    for g in sorted(groups):
        sts = groups[g]
        for key in keys:
            vals = [np.mean([s[t][key] for s in sts]) for t in TRANSFORMS]
            fmt = (lambda v: f"{v:.1f}") if key in ("ch_outlier", "tok_max", "kurtosis") else (lambda v: f"{v:.4f}")
            lines.append(f"| {g} ({len(sts)}) | {key} | " + " | ".join(fmt(v) for v in vals) + " |")
    tot = {t: {k: float(np.mean([s[t][k] for s in res.values()])) for k in keys} for t in TRANSFORMS}
    for key in keys:
        lines.append(f"| **all ({len(res)})** | {key} | " + " | ".join(f"{tot[t][key]:.4g}" for t in TRANSFORMS) + " |")
    best = {t: int(sum(min(TRANSFORMS, key=lambda u: s[u]["out_err"]) == t for s in res.values())) for t in TRANSFORMS}
    lines.append("| **all** | layers where it has the lowest out_err | " + " | ".join(str(best[t]) for t in TRANSFORMS) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- fidelity

def variant_configs(bits: str = "w4a4"):
    """{label: QuantConfig}: the rotation variants at `bits` (QuantConfig fields named in each label)."""
    from qdit4sr_jax.quant.config import QuantConfig
    q = QuantConfig.preset(f"qdit4sr-smooth-{bits}")
    p = QuantConfig.preset(f"qdit4sr-paper-{bits}")
    sv = QuantConfig.preset(f"svdquant-{bits}")
    return {
        "rtn": QuantConfig.preset(f"rtn-{bits}"),
        "svdquant": sv,
        "qdit4sr (smoothing)": q,
        "qdit4sr + block rotation (issue 22's try)": q.replace(smooth=False, rotate=True),
        "qdit4sr-paper (full, signs)": p,
        "qdit4sr-paper, no signs": p.replace(rotate_signs=False),
        "qdit4sr-paper, block rotation": p.replace(rotate_block=None, rotate_signs=False),
        "qdit4sr-paper, exact DP + measured": p.replace(vasmp_solver="dp", vasmp_distortion="measured"),
        "qdit4sr, smoothing + full rotation": q.replace(rotate=True, rotate_block="full"),
        "qdit4sr, smoothing + full rotation + signs": q.replace(rotate=True, rotate_block="full", rotate_signs=True),
        "qdit4sr-paper + smoothing (alpha 0.5)": p.replace(smooth=True, smooth_alpha=0.5),
        "svdquant + full rotation": sv.replace(rotate=True, rotate_block="full"),
        "rotation (full, signs), RTN": QuantConfig.preset(f"rotation-{bits}").replace(rotate_block="full",
                                                                                        rotate_signs=True),
        "qdit4sr-sens (smoothing)": QuantConfig.preset(f"qdit4sr-smooth-{bits}-sens"),
        "qdit4sr-paper-sens (full, signs)": QuantConfig.preset(f"qdit4sr-paper-{bits}-sens"),
        "qdit4sr-sens, smoothing + full rotation + signs": QuantConfig.preset(f"qdit4sr-smooth-{bits}-sens").replace(
            rotate=True, rotate_block="full", rotate_signs=True),
    }


def run_fidelity(labels: Optional[List[str]], images: str, crop: int, limit: Optional[int], bits: str = "w4a4",
                 steps: Optional[int] = None, log=print):
    from benchmarks.fidelity import Study
    cfgs = variant_configs(bits)
    gains = any(cfgs[lb].needs_step_gains for lb in (labels or list(cfgs)))
    st = Study(images=images, crop=crop, limit=limit, num_steps=steps, log=log, step_gains=gains)
    rows = []
    for lb in labels or list(cfgs):
        r = st.run(lb, cfgs[lb], lb, bits)
        rows.append((lb, r.mean("psnr_fp"), r.mean("hf_fp"), r.mean("psnr_hr"), r.w_bits, r.a_bits))
    return rows, st


def per_layer_tree(st, layer_res: Dict[str, dict], cfg_a, cfg_b, t_a: str = "smooth", t_b: str = "smooth+full+signs"):
    """Quantize with cfg_a and cfg_b and keep, per layer, cfg_b's node where the calibration statistics
    (`study_layers` output, computed on calibration crops, never on the evaluation crops) give transform t_b a lower
    out_err than t_a. Returns (tree, number of layers taken from cfg_b)."""
    from qdit4sr_jax.quant import rules
    qa, qb = st.quantize(cfg_a), st.quantize(cfg_b)
    pick = {}
    for path in rules.find_quantized(qa):
        name = rules.path_str(path)
        if layer_res[name][t_b]["out_err"] < layer_res[name][t_a]["out_err"]:
            node = qb
            for p in path:
                node = node[p]
            pick[path] = node["kernel"]
    return rules.replace_kernels(qa, pick), len(pick)


def run_tree(st, label: str, qt, bits: str = "w4a4"):
    """`Study.run` for an already quantized transformer tree."""
    from qdit4sr_jax.evaluation.run import Result, effective_bits
    from qdit4sr_jax.evaluation.scores import image_metrics
    t0 = time.perf_counter()
    outs = st._upscale(dict(st.params, transformer=qt))
    tu = time.perf_counter() - t0
    wb, ab, size, ops = effective_bits(st.cfg, qt, st.hw)
    per = [image_metrics(o, hr, f) for o, (_, hr, _), f in zip(outs, st.images, st.fp)]
    r = Result(label, label, bits, per, wb, ab, size, ops, 0.0, tu, outs)
    st.results[label] = r
    return (label, r.mean("psnr_fp"), r.mean("hf_fp"), r.mean("psnr_hr"), wb, ab)


def format_fidelity(rows) -> str:
    out = ["| variant | PSNR vs FP (dB) | HF-PSNR vs FP | PSNR vs HR | W / A bits |", "|---|---|---|---|---|"]
    for lb, pf, hf, ph, wb, ab in rows:
        out.append(f"| {lb} | {pf:.2f} | {hf:.2f} | {ph:.2f} | {wb:.2f} / {ab:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=("timing", "layers", "fidelity", "per-layer"))
    ap.add_argument("--model", default="demo")
    ap.add_argument("--n-calib", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--per-layer", action="store_true", help="layers: one row group per layer, not per role")
    ap.add_argument("--images", default="data/dev")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--variants", default="", help="';'-separated labels of variant_configs (default: all)")
    ap.add_argument("--list", action="store_true", help="list the variant labels and exit")
    a = ap.parse_args(argv)
    if a.list:
        print("\n".join(variant_configs(a.bits)))
        return 0
    if a.mode == "timing":
        print(format_timing(time_rotation()))
    elif a.mode == "layers":
        res, desc = study_layers(a.model, a.n_calib, a.tokens, a.steps)
        print(f"calibration: {desc}")
        print(format_layers(res, by_kind=not a.per_layer))
    elif a.mode == "per-layer":                   # smoothing vs smoothing + signed rotation, chosen per layer
        from benchmarks.fidelity import Study
        from qdit4sr_jax.quant.config import QuantConfig
        res, desc = study_layers(a.model, a.n_calib, a.tokens, a.steps)
        st = Study(images=a.images, crop=a.crop, limit=a.limit, num_steps=a.steps, step_gains=False)
        ca, cb = QuantConfig.preset(f"qdit4sr-smooth-{a.bits}"), QuantConfig.preset(f"qdit4sr-{a.bits}")
        rows = [st.run(lb, c, lb, a.bits) for lb, c in ((f"qdit4sr-smooth-{a.bits}", ca), (f"qdit4sr-{a.bits}", cb))]
        rows = [(r.label, r.mean("psnr_fp"), r.mean("hf_fp"), r.mean("psnr_hr"), r.w_bits, r.a_bits) for r in rows]
        tree, n = per_layer_tree(st, res, ca, cb)
        rows.append(run_tree(st, f"per layer: rotation on {n} of {len(res)} layers (calibration out_err)", tree, a.bits))
        print(f"{len(st.images)} crops of {a.images} at {a.crop} px, {st.steps} steps, calibration {st.calib_desc}")
        print(format_fidelity(rows))
    else:
        labels = [s.strip() for s in a.variants.split(";") if s.strip()] if a.variants else None
        rows, st = run_fidelity(labels, a.images, a.crop, a.limit, a.bits, a.steps)
        print(f"{len(st.images)} crops of {a.images} at {a.crop} px, {st.steps} steps, calibration {st.calib_desc}")
        print(format_fidelity(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
