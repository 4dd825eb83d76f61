"""Fidelity study: every PTQ method side by side on the demo model, plus the Q-DiT4SR ablation.

    python benchmarks/fidelity.py                       # main table: 6 methods x W8A8 / W4A6 / W4A4
    python benchmarks/fidelity.py --mode ablation       # Q-DiT4SR W4A4 ablation (components, blocks, SVD-only)
    python benchmarks/fidelity.py --mode layers         # per-layer / per-step output error at W4A4
    python benchmarks/fidelity.py --mode all            # main + ablation in one run (shares FP outputs, calib)

Protocol. Evaluation images: a folder of HR images (default: the held-out validation crops in
data/val, else the bundled samples in qdit4sr_jax/assets/samples), centre-cropped to a multiple of 16
(or to --crop). LR input: `degrade(hr, val_seed(name))` (x4, the project's seeded degradation).
Every method runs `pipeline.upscale` with the same sampling seed (--seed) and steps, so "PSNR vs FP" is
the quantization error alone. Calibration (activation statistics over every sampling step, used by
SmoothQuant / SVDQuant smoothing and by VaTMP): --calib "train" (default: seeded random crops of the
*training* photos, disjoint from the evaluation photos), "samples" (the bundled samples), or a folder.

Metrics per image, then averaged (`qdit4sr_jax.metrics`): PSNR (dB, RGB, peak 255) and SSIM (RGB, scikit-image's
conventions) vs HR; PSNR vs the
FP output; HF-PSNR vs FP: PSNR of the high band x - G_1(x) (Gaussian sigma 1 per channel, level 0 of a
Laplacian pyramid) of the output vs that of the FP output (the local-texture error the paper is about);
NIQE and the texture ratios vs HR / FP (`qdit4sr_jax.metrics.niqe`, `texture_ratio`). The per-image figures
come from `qdit4sr_jax.evaluation.scores.Scorer` (RGB, no border crop), the scorer of `qdit4sr-jax evaluate`.
Also per config: the size-weighted average weight bits, the MAC-weighted average activation bits
(under mixed precision), and size (M) / ops (G) by the paper's convention (`report.size_ops`).

Caches within one run: FP outputs, calibration statistics, and every quantized model's outputs.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# LAPACK (the SVDs of quantize) with OpenMP threads spin-waits on a busy 2-core machine: 192x192 SVDs
# ran ~20x slower than single-threaded. Set before numpy / jax load their libraries.
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

from qdit4sr_jax import pipeline  # noqa: E402
from qdit4sr_jax.demo import SAMPLES_DIR  # noqa: E402
from qdit4sr_jax.metrics import high_band, hf_psnr, psnr, ssim  # noqa: E402,F401  (one implementation)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
METHODS = ("rtn", "smoothquant", "svdquant", "rotation", "qdit4sr-smooth", "qdit4sr-paper", "qdit4sr", "qdit4sr-sens")
BITS = ("w8a8", "w4a6", "w4a4")


from qdit4sr_jax.evaluation.data import DEFAULT_DATA, calibration_lrs, crop16 as _crop16  # noqa: E402,F401
from qdit4sr_jax.evaluation.data import eval_images as _eval_images  # noqa: E402
from qdit4sr_jax.evaluation.data import load_bundle as _load_bundle  # noqa: E402
from qdit4sr_jax.evaluation.output import fmt as _f, format_table, grid_image, write_png  # noqa: E402,F401
from qdit4sr_jax.evaluation.run import Result, effective_bits  # noqa: E402,F401
from qdit4sr_jax.evaluation.scores import Scorer, image_metrics  # noqa: E402,F401


# ----------------------------------------------------------------------------- data

def default_eval_dir() -> str:
    d = os.path.join(DEFAULT_DATA, "val")
    return d if os.path.isdir(d) and any(f.endswith(".png") for f in os.listdir(d)) else SAMPLES_DIR


def eval_images(folder: Optional[str] = None, crop: Optional[int] = None, limit: Optional[int] = None,
                scale: int = 4) -> List[Tuple[str, np.ndarray, np.ndarray]]:
    """`qdit4sr_jax.evaluation.data.eval_images` with the study's default folder (data/val, else the samples)."""
    return _eval_images(folder or default_eval_dir(), crop, limit, scale)


def load_bundle(spec: str):
    """-> (ModelConfig, params bundle) from "demo", a model file, a training-state folder (runs/...), or
    "random-demo" (development only: random weights of the demo config)."""
    if spec == "random-demo":
        from benchmarks.common import random_params
        from qdit4sr_jax.config import ModelConfig
        cfg = ModelConfig.preset("demo")
        return cfg, {"transformer": random_params(cfg), "vae": {}}
    return _load_bundle(spec)


# ----------------------------------------------------------------------------- configs

def method_config(method: str, bits: str, **overrides):
    """QuantConfig of `method` at `bits` ("w4a4"): the project's preset, with optional field overrides.
    A method ending in "-sens" ("qdit4sr-sens") is the preset with step-weighted VaTMP ("qdit4sr-w4a4-sens")."""
    from qdit4sr_jax.quant.config import QuantConfig
    base, sens = (method[:-5], "-sens") if method.endswith("-sens") else (method, "")
    q = QuantConfig.preset(f"{base}-{bits}{sens}")
    return q.replace(**overrides).validate() if overrides else q


def ablation_configs(bits: str = "w4a4") -> List[Tuple[str, object]]:
    """[(label, QuantConfig)] of the Q-DiT4SR ablation at `bits`: the components added one by one on top
    of RTN, the block size / rank split of H-SVD, and plain SVD at the same branch budget."""
    full = method_config("qdit4sr", bits)
    off = dict(rotate=False, hsvd=False, vasmp=False, vatmp=False)
    rows = [
        ("RTN", method_config("rtn", bits)),
        ("+ smoothing (alpha 0.5)", method_config("rtn", bits).replace(smooth=True, smooth_alpha=full.smooth_alpha)),
        ("+ smoothing + signed Hadamard", method_config("rtn", bits).replace(
            smooth=True, smooth_alpha=full.smooth_alpha, rotate=True, rotate_block=full.rotate_block,
            rotate_signs=full.rotate_signs)),
        ("+ smoothing + signed Hadamard + H-SVD", full.replace(**dict(off, rotate=True, hsvd=True))),
        ("+ smoothing + signed Hadamard + H-SVD + VaSMP", full.replace(**dict(off, rotate=True, hsvd=True, vasmp=True))),
        ("+ smoothing + signed Hadamard + H-SVD + VaSMP + VaTMP (Q-DiT4SR)", full),
        ("Q-DiT4SR, VaTMP weighted by step sensitivity", full.replace(vatmp_step_weights="sensitivity")),
        ("Q-DiT4SR without the rotation (qdit4sr-smooth)", method_config("qdit4sr-smooth", bits)),
        ("Q-DiT4SR as the paper draws it (qdit4sr-paper)", method_config("qdit4sr-paper", bits)),
        ("SVD-only (same budget) + VaSMP + VaTMP", full.replace(hsvd=False)),
        ("SVD-only (same budget), fixed bits", full.replace(**dict(off, rotate=True))),
    ]
    for blk in ((32, 32), (64, 64), (96, 96), (64, 192)):
        if tuple(blk) != tuple(full.hsvd_block):
            rows.append((f"Q-DiT4SR, blocks {blk[0]}x{blk[1]}", full.replace(hsvd_block=blk)))
    rows.append(("Q-DiT4SR, blocks re-fitted (2 alternating rounds)", full.replace(hsvd_refine_iters=2)))
    return rows


# ----------------------------------------------------------------------------- the study

class Study:
    """FP outputs, calibration statistics and every evaluated config cached for one run."""

    def __init__(self, model: str = "demo", images: Optional[str] = None, crop: Optional[int] = None,
                 limit: Optional[int] = None, calib: str = "train", n_calib: int = 4,
                 num_steps: Optional[int] = None, seed: int = 0, log=print, step_gains: bool = True):
        """step_gains: also measure the sampler's step sensitivities during calibration (probes; a few
        seconds per calibration image), needed by configs with `vatmp_step_weights="sensitivity"`."""
        self.log = log
        self.step_gains = bool(step_gains)
        self.cfg, self.params = load_bundle(model)
        self.model = model
        self.steps = int(num_steps or self.cfg.num_steps)
        self.seed = seed
        self.images = eval_images(images, crop, limit, self.cfg.scale)
        self.hw = self.images[0][1].shape[:2]
        self.calib_source, self.n_calib = calib, n_calib
        self._calib = None
        self.calib_desc = ""
        self.results: Dict[str, Result] = {}
        # per-image figures: evaluate's scorer (RGB, no border: image_metrics' four figures, plus NIQE and the
        # texture ratios vs HR / FP), one implementation of each metric
        self.scorer = Scorer(learned=False)
        t0 = time.perf_counter()
        self.fp = self._upscale(self.params)
        self.fp_s = time.perf_counter() - t0
        self.bicubic = [pipeline.bicubic(lr, self.cfg.scale) for _, _, lr in self.images]
        log(f"FP outputs for {len(self.images)} images x {self.steps} steps in {self.fp_s:.1f} s")

    def _upscale(self, params) -> List[np.ndarray]:
        return [pipeline.upscale(self.cfg, params, lr, seed=self.seed, num_steps=self.steps)
                for _, _, lr in self.images]

    @property
    def calib(self):
        if self._calib is None:
            t0 = time.perf_counter()
            lrs, self.calib_desc = calibration_lrs(self.calib_source, self.n_calib, max(self.hw),
                                                   self.cfg.scale, exclude=[n for n, _, _ in self.images])
            self._calib = pipeline.calibrate_images(self.cfg, self.params, lrs, seed=self.seed,
                                                    num_steps=self.steps, step_gains=self.step_gains)
            self.log(f"calibrated on {self.calib_desc} x {self.steps} steps in {time.perf_counter() - t0:.1f} s")
        return self._calib

    def quantize(self, qcfg):
        from qdit4sr_jax.quant.api import quantize
        needs = qcfg.smooth or qcfg.vatmp
        if qcfg.needs_step_gains and not self.step_gains:
            raise ValueError("this Study calibrates without step gains (step_gains=False); a config with "
                             "vatmp_step_weights='sensitivity' needs them")
        return quantize(self.params["transformer"], qcfg, calib=self.calib if needs else None)

    def run(self, label: str, qcfg, method: str = "", bits: str = "") -> Result:
        if label in self.results:
            return self.results[label]
        t0 = time.perf_counter()
        qt = self.quantize(qcfg)
        tq = time.perf_counter() - t0
        p = dict(self.params, transformer=qt)
        t0 = time.perf_counter()
        outs = self._upscale(p)
        tu = time.perf_counter() - t0
        wb, ab, size, ops = effective_bits(self.cfg, qt, self.hw, self.steps)
        per = [self.scorer.score(o, hr, f) for o, (_, hr, _), f in zip(outs, self.images, self.fp)]
        r = Result(label, method, bits, per, wb, ab, size, ops, tq, tu, outs)
        self.results[label] = r
        self.log(f"{label:44s} PSNR-FP {r.mean('psnr_fp'):6.2f}  HF {r.mean('hf_fp'):6.2f}  "
                 f"PSNR-HR {r.mean('psnr_hr'):6.2f}  W{wb:.2f}A{ab:.2f}  quant {tq:.1f}s up {tu:.1f}s")
        return r

    def fp_result(self) -> Result:
        from qdit4sr_jax import report
        r = report.size_ops(self.cfg, height=self.hw[0], width=self.hw[1], steps=self.steps, count_unused=False)
        per = [self.scorer.score(o, hr, None, is_fp=True) for o, (_, hr, _) in zip(self.fp, self.images)]
        return Result("FP", "fp", "w32a32", per, 32.0, 32.0, r["size_M"], r["ops_G"], 0.0, self.fp_s, self.fp)

    def bicubic_result(self) -> Result:
        per = [self.scorer.score(b, hr, f) for b, (_, hr, _), f in zip(self.bicubic, self.images, self.fp)]
        return Result("bicubic", "bicubic", "-", per, float("nan"), float("nan"), float("nan"), float("nan"),
                      0.0, 0.0, self.bicubic)


# ----------------------------------------------------------------------------- per-layer analysis

LAYER_GROUPS = (
    ("adaLN modulation (norm*/linear)", r"/norm1(_context)?/linear$"),
    ("attn q/k/v (shared)", r"/attn2?/to_[qkv]$"),
    ("attn q/k/v control (LR)", r"/attn2?/to_[qkv]_control$"),
    ("attn out (to_out_0)", r"/attn2?/to_out_0$"),
    ("attn out control (LR)", r"/attn2?/to_out_control$"),
    ("context stream (add_*, to_add_out, ff_context)", r"/(add_[qkv]_proj|to_add_out|ff_context/.*)$"),
    ("ff net_0 (up)", r"/ff/net_0/proj$"),
    ("ff net_2 (down)", r"/ff/net_2$"),
)


def _layer_error_model_fn(model_cfg, qnodes):
    """A sampler model_fn that runs the FP model and, for every Linear with a quantized counterpart in
    `qnodes` ({path: QuantizedWeight}), also applies the quantized linear to the same (FP) input and sows
    (sum of squared output error, sum of squared FP output) into the `lerr` collection."""
    import flax.linen as nn
    import jax.numpy as jnp
    from qdit4sr_jax.model.dit4sr import DiT4SRTransformer
    from qdit4sr_jax.model.layers import Linear
    from qdit4sr_jax.quant.linear import linear
    module = DiT4SRTransformer(model_cfg)

    def model_fn(params, x, lr, t, context, pooled, step, collect):
        fp, q = params

        def icpt(next_fun, args, kwargs, ctx):
            y = next_fun(*args, **kwargs)
            if isinstance(ctx.module, Linear) and ctx.method_name == "__call__":
                path = "/".join(ctx.module.scope.path)
                node = q.get(path)
                if node is not None:
                    bias = ctx.module.get_variable("params", "bias")
                    st = kwargs.get("step", args[1] if len(args) > 1 else None)
                    yq = linear(args[0], node, bias, step=st)
                    e = jnp.sum(jnp.square(yq.astype(jnp.float32) - y.astype(jnp.float32)))
                    ctx.module.sow("lerr", "e", jnp.stack([e, jnp.sum(jnp.square(y.astype(jnp.float32)))]))
            return y

        with nn.intercept_methods(icpt):
            out, var = module.apply({"params": fp}, x, lr, t, context, pooled, step=step, mutable=["lerr"])
        return out.astype(jnp.float32), var.get("lerr", {})

    return model_fn


def layer_errors(study: "Study", qtree, n_images: int = 2) -> Dict[str, np.ndarray]:
    """Per-layer, per-step relative output error ||x W_q - x W||^2 / ||x W||^2 of the quantized tree on the
    FP model's own activations along the FP sampling trajectory, summed over `n_images` images
    -> {path: float [T]}."""
    import jax
    from qdit4sr_jax import sampling
    from qdit4sr_jax.quant.api import quantized_layers
    qn = quantized_layers(qtree)
    fn = _layer_error_model_fn(study.cfg, qn)
    acc: Dict[str, np.ndarray] = {}
    for _, _, lr in study.images[:n_images]:
        d = pipeline._prepare(study.cfg, study.params, lr, study.seed, None, 0, None)
        _, st = sampling.sample(study.cfg, (study.params["transformer"], qn), d["lr_lat"], d["noise"],
                                context=d["ctx"], pooled=d["pool"], num_steps=study.steps, guidance_scale=d["g"],
                                collect_stats=True, model_fn=fn)
        flat = jax.tree_util.tree_flatten_with_path(st)[0]
        for kp, leaf in flat:
            keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in kp]
            path = "/".join(k for k in keys if k not in ("e",) and not k.isdigit())
            a = np.asarray(leaf, np.float64).reshape(study.steps, -1, 2).sum(1)   # [T, 2]
            acc[path] = acc.get(path, 0) + a
    return {p: a[:, 0] / np.maximum(a[:, 1], 1e-30) for p, a in acc.items()}


def partial_tree(fp_tree, qtree, pattern: str):
    """qtree with every quantized node whose path does not match `pattern` put back to the FP kernel."""
    import re
    from qdit4sr_jax.quant import rules
    keep = re.compile(pattern)
    new = {}
    for path in rules.find_quantized(qtree):
        if not keep.search(rules.path_str(path)):
            node = fp_tree
            for k in path:
                node = node[k]
            new[path] = node["kernel"]
    return rules.replace_kernels(qtree, new) if new else qtree


def layer_report(study: "Study", methods: Sequence[str], bits: str = "w4a4", n_images: int = 2,
                 groups: bool = False) -> str:
    """Markdown: per layer group and per step, the relative output error (dB, 10 log10) of each method,
    the worst layers, and the end-to-end PSNR vs FP when only one group (or one step) is quantized."""
    import jax.numpy as jnp
    from qdit4sr_jax import sampling
    trees = {m: study.quantize(method_config(m, bits)) for m in methods}
    errs = {m: layer_errors(study, t, n_images) for m, t in trees.items()}
    import re
    T = study.steps
    out = [f"Relative output error of each linear on the FP model's own inputs, 10 log10(||xW_q - xW||^2 / "
           f"||xW||^2) dB (lower is better), summed over the first {n_images} images, at {bits.upper()}:", "",
           "| layer group | " + " | ".join(f"{m} (all steps)" for m in methods) + " | " +
           " | ".join(f"{methods[-1]} step {t}" for t in range(T)) + " |",
           "|" + "---|" * (1 + len(methods) + T)]
    db = lambda v: 10 * np.log10(max(float(v), 1e-30))  # noqa: E731
    for gname, pat in LAYER_GROUPS:
        rx = re.compile(pat)
        cells = []
        for m in methods:
            v = [e for p, e in errs[m].items() if rx.search(p)]
            cells.append(_f(db(np.mean([x.mean() for x in v]))) if v else "-")
        last = [e for p, e in errs[methods[-1]].items() if rx.search(p)]
        steps = [_f(db(np.mean([x[t] for x in last]))) if last else "-" for t in range(T)]
        out.append(f"| {gname} | " + " | ".join(cells) + " | " + " | ".join(steps) + " |")
    for m in methods:
        worst = sorted(errs[m].items(), key=lambda kv: -kv[1].mean())[:6]
        out.append("")
        out.append(f"Worst layers, {m}: " + "; ".join(f"`{p}` {db(e.mean()):.1f} dB" for p, e in worst))
    fp_t = study.params["transformer"]
    sub = study.images[:n_images]
    fps = study.fp[:n_images]
    if groups:      # end to end: one group quantized at a time (one sampler compile per group and method)
        out += ["", f"End-to-end PSNR vs FP (dB, mean of {n_images} images) with only one layer group quantized:",
                "", "| layer group | " + " | ".join(methods) + " |", "|" + "---|" * (1 + len(methods))]

        def e2e(tree):
            p = dict(study.params, transformer=tree)
            return float(np.mean([psnr(pipeline.upscale(study.cfg, p, lr, seed=study.seed, num_steps=study.steps), f)
                                  for (_, _, lr), f in zip(sub, fps)]))
        for gname, pat in LAYER_GROUPS:
            out.append(f"| {gname} | " + " | ".join(_f(e2e(partial_tree(fp_t, trees[m], pat))) for m in methods) + " |")
    # end to end: the quantized model at one sampling step only (the step is traced: one compile per method)
    out += ["", "End-to-end PSNR vs FP (dB) with the quantized model used at one sampling step only "
            "(FP at the others):", "", "| step | " + " | ".join(methods) + " |", "|" + "---|" * (1 + len(methods))]
    base_fn = sampling.transformer_fn(study.cfg)

    def fn(params, x, lr, tt, context, pooled, step, collect):
        a, _ = base_fn(params[0], x, lr, tt, context, pooled, step, False)
        b, _ = base_fn(params[1], x, lr, tt, context, pooled, step, False)
        return jnp.where(step == params[2], b, a), {}
    rows = {t: [] for t in range(T)}
    for m in methods:
        for t in range(T):
            vals = []
            for (_, _, lr), f in zip(sub, fps):
                d = pipeline._prepare(study.cfg, study.params, lr, study.seed, None, 0, None)
                lat = sampling.sample(study.cfg, (fp_t, trees[m], jnp.int32(t)), d["lr_lat"], d["noise"],
                                      context=d["ctx"], pooled=d["pool"], num_steps=T, guidance_scale=d["g"],
                                      model_fn=fn)
                vals.append(psnr(_decode(study, lat, d), f))
            rows[t].append(_f(float(np.mean(vals))))
    for t in range(T):
        out.append(f"| {t} | " + " | ".join(rows[t]) + " |")
    return "\n".join(out)


def _decode(study: "Study", lat, d) -> np.ndarray:
    """Latents -> uint8 image exactly as `pipeline.upscale` finishes (decode, colour fix, resize)."""
    from qdit4sr_jax.colorfix import resolve
    from qdit4sr_jax.model import vae as _vae
    img = _vae.decode_jit(study.cfg.vae, study.params.get("vae", {}), lat)[0]
    return pipeline.finish_image(img, d["up"], d["size"], resolve("model", study.cfg))


# ----------------------------------------------------------------------------- output

def format_per_image(study: Study, rows: Sequence[Result], key: str = "psnr_fp") -> str:
    names = [n for n, _, _ in study.images]
    lines = ["| config | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for r in rows:
        lines.append(f"| {r.label} | " + " | ".join(_f(m[key]) for m in r.per_image) + " |")
    return "\n".join(lines)


def write_grid(path: str, study: Study, labels: Sequence[str], crop: int = 64, max_images: int = 4) -> None:
    """PNG grid of crops (the centre `crop` pixels, shown 2x nearest): rows = images, columns = bicubic,
    FP, each label's output, HR; a header strip names the columns, each tile its PSNR vs HR. Written atomically
    (`qdit4sr_jax.evaluation.output.grid_image`, the grid of `qdit4sr-jax evaluate`)."""
    cols = [("bicubic", study.bicubic), ("FP", study.fp)] + [(lb, study.results[lb].outputs) for lb in labels]
    hrs = [hr for _, hr, _ in study.images]
    scores = {name: [psnr(o, h) for o, h in zip(outs[:max_images], hrs)] for name, outs in cols}
    write_png(path, grid_image(cols + [("HR", hrs)], scores=scores, crop=crop, max_images=max_images))


def append_results(text: str, path: str = RESULTS) -> None:
    """Append a section to RESULTS.md (created with a header when absent)."""
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write("# Benchmark results\n\nSections are appended by the benchmark scripts; each names the "
                    "command, machine and date that produced it.\n")
        f.write("\n" + text.rstrip() + "\n")


def machine() -> str:
    import jax
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"JAX {jax.__version__} ({jax.default_backend()})")


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="main", choices=("main", "ablation", "all", "layers"))
    ap.add_argument("--model", default="demo", help='"demo", a model file, or a training-state folder')
    ap.add_argument("--images", default=None, help="folder of HR images (default: data/val, else the bundled samples)")
    ap.add_argument("--crop", type=int, default=None, help="centre crop (HR pixels) of each evaluation image")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N evaluation images")
    ap.add_argument("--calib", default="train", help='"train" (default), "samples", or a folder of HR images')
    ap.add_argument("--n-calib", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--bits", default=",".join(BITS))
    ap.add_argument("--grid", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "fidelity_grid.png"))
    ap.add_argument("--results", default=RESULTS, help="Markdown file the tables are appended to")
    ap.add_argument("--no-append", action="store_true", help="print the tables only")
    ap.add_argument("--groups", action="store_true",
                    help="layers mode: also the end-to-end error with one layer group quantized at a time (slow)")
    ap.add_argument("--n-layer-images", type=int, default=2, help="layers mode: images used")
    return ap.parse_args(argv)


def qwix_note() -> str:
    try:
        import qwix  # noqa: F401
    except ImportError:
        return ("qwix PTQ: not run (the `qwix` package is not installed in this environment; the study "
                "installs nothing).")
    return "qwix PTQ: qwix is installed but not wired into this study yet."


def main(argv=None) -> int:
    args = parse_args(argv)
    cmd = "python benchmarks/fidelity.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()
    gains = args.mode in ("ablation", "all") or any(m.endswith("-sens") for m in args.methods.split(","))
    st = Study(args.model, args.images, args.crop, args.limit, args.calib, args.n_calib, args.steps, args.seed,
               step_gains=gains)
    sections = []
    desc = (f"Model `{args.model}` ({st.cfg.name}), {len(st.images)} evaluation images "
            f"{st.hw[1]}x{st.hw[0]} HR from `{os.path.relpath(default_eval_dir() if args.images is None else args.images, ROOT)}` "
            f"(x{st.cfg.scale}, LR = degrade(hr, val_seed(name))), {st.steps} sampling steps, seed {args.seed}.")
    if args.mode in ("main", "all"):
        rows = [st.bicubic_result(), st.fp_result()]
        for bits in args.bits.split(","):
            for m in args.methods.split(","):
                if m.endswith("-sens") and bits == "w8a8":
                    continue            # W8A8 keeps 8-bit activations at every step: no VaTMP to weight
                rows.append(st.run(f"{m}-{bits}", method_config(m, bits), m, bits))
        sections.append(("Fidelity: every method at W8A8 / W4A6 / W4A4", rows))
        grid_labels = [lb for lb in (f"{m}-w4a4" for m in ("rtn", "svdquant", "qdit4sr", "qdit4sr-sens")) if lb in st.results]
        if args.grid and grid_labels:
            write_grid(args.grid, st, grid_labels)
    if args.mode in ("ablation", "all"):
        rows = [st.run(lb, q, q.method, "w4a4") for lb, q in ablation_configs("w4a4")]
        sections.append(("Q-DiT4SR ablation at W4A4", rows))
    if args.mode == "layers":
        text = layer_report(st, args.methods.split(","), args.bits.split(",")[-1], args.n_layer_images, args.groups)
        print(text)
        if not args.no_append:
            append_results(f"## Per-layer output error ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
                           f"Command: `{cmd}`; machine: {machine()}.\n{desc}\n\n{text}", args.results)
        return 0
    total = time.perf_counter() - t_start
    out = [f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: fidelity study "
           f"({', '.join(t for t, _ in sections)})", "",
           f"Command: `{cmd}`  ", f"Machine: this CPU ({machine()}); whole run {total / 60:.1f} min.  ", desc + "  ",
           f"Calibration: {st.calib_desc or 'not needed'}.  ",
           "Metrics: PSNR / SSIM vs HR; PSNR vs the FP output (same seed); HF-PSNR = PSNR of the x - G_1(x) "
           "high band vs FP's; NIQE (no reference, lower is better, qdit4sr_jax.metrics.niqe's default patch); "
           "texture / HR, / FP = high-band (0.25-0.5 cycles/px) spectral energy over the reference's "
           "(qdit4sr_jax.metrics.texture_ratio). W/A bits: size-weighted weight / MAC-weighted activation averages over the "
           "quantized linears. " + qwix_note()]
    for title, rows in sections:
        out += ["", f"### {title}", "", format_table(rows), "", "PSNR vs FP per image:", "",
                format_per_image(st, [r for r in rows if r.method not in ("fp",)])]
    text = "\n".join(out)
    print(text)
    if not args.no_append:
        append_results(text, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
