"""Evaluation output: atomic file writes, the Markdown tables, results.csv / results.json, the comparison grid.

Every writer writes a temporary file in the destination folder and renames it into place when complete, so
an interrupted run never leaves a half-written file.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

LABELS = {
    "psnr_hr": "PSNR vs HR (dB)", "ssim_hr": "SSIM vs HR", "psnr_fp": "PSNR vs FP (dB)",
    "hf_fp": "HF-PSNR vs FP (dB)", "niqe": "NIQE (lower better)", "texture_hr": "texture / HR",
    "texture_fp": "texture / FP", "lpips": "LPIPS vs HR",
}
DIGITS = {"ssim_hr": 4, "texture_hr": 3, "texture_fp": 3, "lpips": 4}


def fmt(v: float, d: int = 2) -> str:
    """A figure for a table: '-' for NaN / None, 'inf', else d decimals."""
    if v is None or v != v:
        return "-"
    return "inf" if v == float("inf") else f"{v:.{d}f}"


# ----------------------------------------------------------------------------- atomic writes

def write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same folder, then rename)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def write_png(path: str, img: np.ndarray) -> None:
    """uint8 [H, W, 3] -> PNG (lossless: reading it back gives the same array), atomically."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(img, np.uint8), "RGB").save(buf, format="PNG")
    write_bytes(path, buf.getvalue())


def read_png(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.uint8).copy()


def strict_json(v):
    """A figure for results.json: NaN -> null, inf -> "inf" (strict JSON has neither)."""
    if isinstance(v, dict):
        return {k: strict_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [strict_json(x) for x in v]
    if isinstance(v, float):
        return None if v != v else ("inf" if v == float("inf") else ("-inf" if v == -float("inf") else v))
    return v


# ----------------------------------------------------------------------------- tables

def format_table(rows: Sequence, bits_col: bool = True) -> str:
    """The fidelity study's table of `Result` rows (label, w_bits, a_bits, mean(key), size_m, ops_g,
    quantize_s, upscale_s); NIQE / texture columns when every row has those figures."""
    extra = [k for k in ("niqe", "texture_hr", "texture_fp") if rows and all(r.per_image and k in r.per_image[0]
                                                                             for r in rows)]
    head = ["config", "W/A bits (eff.)", "PSNR vs HR", "SSIM vs HR", "PSNR vs FP", "HF-PSNR vs FP"] + \
        [LABELS[k] for k in extra] + ["size (M)", "ops (G)", "quantize (s)", "upscale (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = "".join(f"{fmt(r.mean(k), DIGITS.get(k, 2))} | " for k in extra)
        lines.append(f"| {r.label} | {bits_cell(r.w_bits, r.a_bits)} | {fmt(r.mean('psnr_hr'))} | "
                     f"{fmt(r.mean('ssim_hr'), 4)} | {fmt(r.mean('psnr_fp'))} | {fmt(r.mean('hf_fp'))} | {cells}"
                     f"{fmt(r.size_m, 3)} | {fmt(r.ops_g, 2)} | {r.quantize_s:.1f} | {r.upscale_s:.1f} |")
    return "\n".join(lines)


def bits_cell(w: float, a: float) -> str:
    if w is None or w != w:
        return "-"
    return "32/32" if w >= 32 else f"{w:.2f}/{a:.2f}"


def method_table(methods: Sequence[dict], keys: Sequence[str]) -> str:
    """Markdown table of evaluate's method records ({method, w_bits, a_bits, size_m, ops_g, quantize_s,
    mean: {key: float}, s_per_image}); `keys` are the figure columns."""
    head = ["method", "W/A bits (eff.)"] + [LABELS.get(k, k) for k in keys] + \
        ["size (M)", "ops (G)", "quantize (s)", "s / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        cells = [m["method"], bits_cell(m["w_bits"], m["a_bits"])] + \
            [fmt(m["mean"].get(k), DIGITS.get(k, 2)) for k in keys] + \
            [fmt(m["size_m"], 3), fmt(m["ops_g"], 3), fmt(m["quantize_s"], 1), fmt(m["s_per_image"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_csv(methods: Sequence[dict], keys: Sequence[str]) -> str:
    """CSV text: one row per (method, image) with every figure and the seconds, then one 'mean' row per method."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "image"] + list(keys) + ["seconds", "w_bits", "a_bits", "size_m", "ops_g"])
    c = lambda v: "" if v is None or v != v else ("inf" if v == float("inf") else repr(float(v)))  # noqa: E731
    for m in methods:
        tail = [c(m["w_bits"]), c(m["a_bits"]), c(m["size_m"]), c(m["ops_g"])]
        for r in m["per_image"]:
            w.writerow([m["method"], r["image"]] + [c(r.get(k)) for k in keys] + [c(r.get("seconds"))] + tail)
        w.writerow([m["method"], "mean"] + [c(m["mean"].get(k)) for k in keys] + [c(m["s_per_image"])] + tail)
    return buf.getvalue()


# ----------------------------------------------------------------------------- grid

def grid_image(columns: Sequence[Tuple[str, Sequence[np.ndarray]]], *,
               scores: Optional[Dict[str, Sequence[float]]] = None,
               crop: int = 64, max_images: int = 4, score_label: str = "dB") -> np.ndarray:
    """A labelled comparison grid -> uint8 [H, W, 3]: rows = images (at most `max_images`), columns = (label,
    [uint8 [H, W, 3] per image]) in order (e.g. bicubic, FP, each method, HR), each tile the centre
    `crop` x `crop` pixels (shown 2x nearest when crop <= 64); a header row names each column and, with
    `scores` ({label: [figure per image]}), each tile carries its figure (e.g. PSNR vs HR) below it."""
    from PIL import ImageDraw
    H, W = columns[0][1][0].shape[:2]
    c = min(crop, H, W)
    if c < 8:
        raise ValueError(f"grid crop {crop} is too small (images are {W}x{H})")
    z = 2 if c <= 64 else 1
    cell, pad, head = c * z, 2, 14
    foot = 12 if scores else 0
    n_img = min(max_images, len(columns[0][1]))
    grid = np.full((head + n_img * (cell + foot + pad), len(columns) * (cell + pad), 3), 255, np.uint8)
    for j, (_, outs) in enumerate(columns):
        for i in range(n_img):
            a = outs[i]
            y, x = (a.shape[0] - c) // 2, (a.shape[1] - c) // 2
            tile = a[y:y + c, x:x + c].repeat(z, 0).repeat(z, 1)
            top = head + i * (cell + foot + pad)
            grid[top:top + tile.shape[0], j * (cell + pad): j * (cell + pad) + tile.shape[1]] = tile
    im = Image.fromarray(grid)
    d = ImageDraw.Draw(im)
    chars = max(4, cell // 6)
    for j, (name, _) in enumerate(columns):
        d.text((j * (cell + pad) + 2, 1), name[:chars], fill=(0, 0, 0))
        for i, v in enumerate((scores or {}).get(name, [])[:n_img]):
            if v is not None and v == v:
                d.text((j * (cell + pad) + 2, head + i * (cell + foot + pad) + cell),
                       f"{fmt(v)} {score_label}"[:chars], fill=(0, 0, 0))
    return np.asarray(im)


def write_grid_png(path: str, columns, **kw) -> None:
    """`grid_image` written atomically as PNG."""
    write_png(path, grid_image(columns, **kw))
