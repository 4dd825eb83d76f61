"""The main job: quantize the embedded demo model and compare FP, RTN and Q-DiT4SR on the bundled samples.

`run_demo(out_dir)` loads the shipped demo model, degrades each bundled HR sample x4 with the project's
seeded degradation, calibrates on those LR images over every sampling step (with the sampler's step
sensitivities), quantizes with RTN-W4A4, the paper's Q-DiT4SR-W4A4 and Q-DiT4SR-W4A4 with step-weighted VaTMP
("-sens"), upscales every sample with each (same seed), and returns one row per method: PSNR vs HR, PSNR vs
the FP output, model size (M) and ops (G) by the paper's definitions, and seconds. `write_grid` saves a
side-by-side PNG (LR bicubic | FP | RTN | Q-DiT4SR | Q-DiT4SR-sens | HR per sample).
"""
from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from qdit4sr_jax.metrics import psnr  # noqa: F401  (re-exported: demo.psnr)

SAMPLES_DIR = os.path.join(os.path.dirname(__file__), "assets", "samples")
DEFAULT_METHODS = ("fp", "rtn-w4a4", "qdit4sr-w4a4", "qdit4sr-w4a4-sens")


def bundled_samples(limit: Optional[int] = None, crop: Optional[int] = None) -> List[tuple]:
    """[(name, hr uint8 [H, W, 3])] of the bundled held-out samples, sorted by name; `crop` takes the
    centre crop of that size (a multiple of 16 keeps the x4 / patch grid exact)."""
    names = sorted(f for f in os.listdir(SAMPLES_DIR) if f.lower().endswith((".png", ".jpg", ".jpeg")))
    out = []
    for f in names[:limit]:
        hr = np.asarray(Image.open(os.path.join(SAMPLES_DIR, f)).convert("RGB"))
        if crop:
            y, x = (hr.shape[0] - crop) // 2, (hr.shape[1] - crop) // 2
            hr = hr[y:y + crop, x:x + crop]
        out.append((os.path.splitext(f)[0], hr))
    return out


def run_demo(out_dir: str = "qdit4sr-demo", *, model: str = "demo", methods: Sequence[str] = DEFAULT_METHODS,
             limit: Optional[int] = None, crop: Optional[int] = None, num_steps: Optional[int] = None,
             seed: int = 0, progress: bool = True, log=print) -> List[Dict]:
    """Run the comparison and write `<out_dir>/demo_grid.png`; returns one dict per method."""
    from qdit4sr_jax import pipeline, report
    from qdit4sr_jax.data.degradation import degrade
    from qdit4sr_jax.data.datasets import val_seed
    from qdit4sr_jax.io.modelfile import load_pretrained
    from qdit4sr_jax.quant.api import quantize
    from qdit4sr_jax.quant.config import QuantConfig

    cfg, params = load_pretrained(model)
    samples = bundled_samples(limit, crop)
    if not samples:
        raise FileNotFoundError(f"no sample images in {SAMPLES_DIR}")
    lrs = [degrade(hr, seed=val_seed(name), scale=cfg.scale) for name, hr in samples]
    calib = None
    if any(m != "fp" and QuantConfig.preset(m).needs_calibration for m in methods):
        t0 = time.perf_counter()
        gains = any(m != "fp" and QuantConfig.preset(m).needs_step_gains for m in methods)
        calib = pipeline.calibrate_images(cfg, params, lrs, seed=seed, num_steps=num_steps, progress=progress,
                                          step_gains=gains)
        log(f"calibrated on {len(lrs)} images x {num_steps or cfg.num_steps} steps in {time.perf_counter() - t0:.1f} s")

    rows, outputs = [], {}
    for m in methods:
        t0 = time.perf_counter()
        if m == "fp":
            p, qcfg = params, None
        else:
            qcfg = QuantConfig.preset(m)
            p = dict(params, transformer=quantize(params["transformer"], qcfg, calib=calib))
        t_quant = time.perf_counter() - t0
        t0 = time.perf_counter()
        outs = [pipeline.upscale(cfg, p, lr, seed=seed, num_steps=num_steps) for lr in lrs]
        t_up = time.perf_counter() - t0
        outputs[m] = outs
        h, w = samples[0][1].shape[:2]
        acct = report.size_ops(cfg, qcfg, qparams=None if qcfg is None else p["transformer"], height=h, width=w,
                               steps=num_steps, count_unused=False)
        size, ops = acct["size_M"], acct["ops_G"]
        rows.append(dict(method=m, psnr_hr=float(np.mean([psnr(o, hr) for o, (_, hr) in zip(outs, samples)])),
                         size_m=size, ops_g=ops, quantize_s=t_quant, upscale_s=t_up))
    for r in rows:
        r["psnr_fp"] = (float("inf") if r["method"] == "fp" or "fp" not in outputs else
                        float(np.mean([psnr(o, f) for o, f in zip(outputs[r["method"]], outputs["fp"])])))
    bic = [pipeline.bicubic(lr, cfg.scale) for lr in lrs]
    rows.insert(0, dict(method="bicubic", psnr_hr=float(np.mean([psnr(b, hr) for b, (_, hr) in zip(bic, samples)])),
                        psnr_fp=float("nan"), size_m=float("nan"), ops_g=float("nan"), quantize_s=0.0, upscale_s=0.0))
    os.makedirs(out_dir, exist_ok=True)
    write_grid(os.path.join(out_dir, "demo_grid.png"), samples, bic, outputs)
    return rows


def format_table(rows: List[Dict]) -> str:
    """Markdown table of `run_demo` rows."""
    head = "| method | PSNR vs HR (dB) | PSNR vs FP (dB) | size (M) | ops (G) | quantize (s) | upscale (s) |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        f = lambda v, d=2: "-" if v != v else ("inf" if v == float("inf") else f"{v:.{d}f}")  # noqa: E731
        lines.append(f"| {r['method']} | {f(r['psnr_hr'])} | {f(r['psnr_fp'])} | {f(r['size_m'], 3)} | "
                     f"{f(r['ops_g'], 3)} | {r['quantize_s']:.1f} | {r['upscale_s']:.1f} |")
    return "\n".join(lines)


def write_grid(path: str, samples, bicubic: Sequence[np.ndarray], outputs: Dict[str, Sequence[np.ndarray]]) -> None:
    """PNG grid, one row per sample: bicubic | each method's output | HR. Written atomically."""
    cols = [bicubic] + [outputs[m] for m in outputs] + [[hr for _, hr in samples]]
    rows = [np.concatenate([c[i] for c in cols], axis=1) for i in range(len(samples))]
    h = max(r.shape[0] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, h - r.shape[0]), (0, 0), (0, 0))) for r in rows], axis=0)
    from qdit4sr_jax.pipeline import save_image
    save_image(grid, path)
