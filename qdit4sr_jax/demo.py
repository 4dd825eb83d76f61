"""The main job: quantize the embedded demo model and compare FP, RTN and Q-DiT4SR on the bundled samples.

`run_demo(out_dir)` loads the shipped demo model, degrades each bundled HR sample x4 with the project's
seeded degradation, calibrates on those LR images over every sampling step (with the sampler's step
sensitivities), quantizes with RTN-W4A4, the paper's Q-DiT4SR-W4A4 and Q-DiT4SR-W4A4 with step-weighted VaTMP
("-sens"), upscales every sample with each (same seed), and returns one row per method: PSNR vs HR, PSNR vs
the FP output, model size (M) and ops (G) by the paper's definitions, and seconds. `write_grid` saves a
side-by-side PNG (LR bicubic | FP | RTN | Q-DiT4SR | Q-DiT4SR-sens | HR per sample) with a header row naming
each column and each tile's PSNR vs HR under it.
"""
from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from qdit4sr_jax.metrics import psnr  # also re-exported: demo.psnr

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


HEADER_PX = 18   # height of the column-name strip at the top of the grid
CAPTION_PX = 16  # height of the PSNR strip under each row of tiles


def column_label(method: str) -> str:
    """Header text of a method's column: "FP" for the float model, else the preset name."""
    return "FP" if method == "fp" else method


def _font(size: int):
    """Pillow's built-in font at `size` px (scalable where Pillow >= 10.1 has FreeType, else its bitmap font)."""
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def _draw_centered(draw, text: str, x0: int, y0: int, width: int, height: int) -> None:
    """Write `text` centred in the box (x0, y0, width, height), shrinking the font and then cutting the text
    until it fits the box's width."""
    for size in (12, 11, 10, 9, 8, 7):
        font = _font(size)
        box = draw.textbbox((0, 0), text, font=font)
        if box[2] - box[0] <= width - 4:
            break
    while len(text) > 2 and box[2] - box[0] > width - 4:
        text = text[:-2] + "~"
        box = draw.textbbox((0, 0), text, font=font)
    tw, th = box[2] - box[0], box[3] - box[1]
    draw.text((x0 + (width - tw) // 2 - box[0], y0 + (height - th) // 2 - box[1]), text, fill=(0, 0, 0), font=font)


def grid_image(samples, bicubic: Sequence[np.ndarray], outputs: Dict[str, Sequence[np.ndarray]]) -> np.ndarray:
    """The demo grid as uint8 [H, W, 3]: a header strip naming each column (bicubic | FP / each method | HR),
    then one row of tiles per sample with a caption strip under it giving each tile's PSNR vs that sample's HR
    ("reference" under the HR tile). `samples`: [(name, hr uint8 [h, w, 3])]; `bicubic` and every `outputs[m]`: one
    uint8 [h, w, 3] per sample. Tiles of a row share its HR's height; columns are as wide as the widest tile."""
    from PIL import ImageDraw

    names = ["bicubic"] + [column_label(m) for m in outputs] + ["HR"]
    cols = [list(bicubic)] + [list(outputs[m]) for m in outputs] + [[hr for _, hr in samples]]
    for name, c in zip(names, cols):
        if len(c) != len(samples):
            raise ValueError(f"column {name!r} has {len(c)} images for {len(samples)} samples")
    tile_w = max(img.shape[1] for c in cols for img in c)
    heights = [max(c[i].shape[0] for c in cols) for i in range(len(samples))]
    H = HEADER_PX + sum(h + CAPTION_PX for h in heights)
    canvas = Image.new("RGB", (tile_w * len(cols), H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(names):
        _draw_centered(draw, name, j * tile_w, 0, tile_w, HEADER_PX)
    y = HEADER_PX
    for i, (_, hr) in enumerate(samples):
        for j, c in enumerate(cols):
            img = np.asarray(c[i], np.uint8)
            canvas.paste(Image.fromarray(img), (j * tile_w, y))
            last = j == len(cols) - 1
            caption = "reference" if last else (f"{psnr(img, hr):.2f} dB" if img.shape == hr.shape else "-")
            _draw_centered(draw, caption, j * tile_w, y + heights[i], tile_w, CAPTION_PX)
        y += heights[i] + CAPTION_PX
    return np.asarray(canvas)


def write_grid(path: str, samples, bicubic: Sequence[np.ndarray], outputs: Dict[str, Sequence[np.ndarray]]) -> None:
    """Save `grid_image(samples, bicubic, outputs)` (labelled columns, PSNR vs HR under every tile) as a PNG,
    atomically."""
    from qdit4sr_jax.pipeline import save_image
    save_image(grid_image(samples, bicubic, outputs), path)
