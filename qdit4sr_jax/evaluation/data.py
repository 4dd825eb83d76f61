"""Evaluation data: image pairs, the seeded degradation, calibration inputs, the model bundle.

Images are np.uint8 [H, W, 3] RGB throughout. A pair is an `Item(name, lr, hr)` where `hr` is None for
LR-only sets (no-reference metrics only).

- `eval_images(folder, crop)`: the fidelity study's protocol: HR images centre-cropped to a multiple of 16
  (and to `crop`), LR = `degrade(hr, val_seed(file name))` (x4, the project's seeded degradation).
- `load_items(hr_dir, lr_dir, crop, ...)`: `qdit4sr-jax evaluate`'s inputs, strictly checked (every problem is
  a ValueError / FileNotFoundError naming the file) before anything is computed or written:
  HR only -> as `eval_images`; LR + HR -> matched by file name, HR exactly `scale` x LR; LR only -> LR as is.
- `calibration_lrs(source, n, size)`: LR images for calibration from the training photos, the bundled samples
  or a folder, excluding named evaluation images.
- `load_bundle(spec)`: (ModelConfig, params bundle) from "demo", a model file or a training-state folder.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from qdit4sr_jax import pipeline
from qdit4sr_jax.demo import SAMPLES_DIR  # noqa: F401  (re-exported: data.SAMPLES_DIR)

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DEFAULT_DATA = os.path.join(ROOT, "data")
GRID = 16            # HR crops are multiples of this (x4 LR on whole latent patches of the demo / DiT4SR models)


class Item(NamedTuple):
    """One evaluation image: name (file stem), lr uint8 [h, w, 3], hr uint8 [h*s, w*s, 3] or None, and the seed
    of the degradation that made lr from hr (None when lr was given)."""
    name: str
    lr: np.ndarray
    hr: Optional[np.ndarray]
    lr_seed: Optional[int] = None


def crop16(a: np.ndarray, crop: Optional[int]) -> np.ndarray:
    """Centre crop of uint8 [H, W, 3] to min(crop, H) x min(crop, W) (whole image when crop is None), floored to
    multiples of 16. ValueError when fewer than 16 x 16 pixels remain."""
    h, w = a.shape[:2]
    ch, cw = (min(crop, h), min(crop, w)) if crop else (h, w)
    ch, cw = ch // GRID * GRID, cw // GRID * GRID
    if ch < GRID or cw < GRID:
        raise ValueError(f"image {w}x{h} is too small: evaluation needs at least {GRID}x{GRID} HR pixels")
    y, x = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(a[y:y + ch, x:x + cw])


def list_images(folder: str, what: str = "image") -> List[str]:
    """Sorted image file names (pipeline.IMAGE_EXTS) of a folder; FileNotFoundError if missing or empty."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} folder {folder!r} does not exist" if not os.path.exists(folder)
                                else f"{what} folder {folder!r} is not a folder")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(pipeline.IMAGE_EXTS)
                   and not f.startswith("."))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(pipeline.IMAGE_EXTS)}) in {what} folder {folder!r}")
    return files


def read_rgb(path: str, notes: Optional[list] = None) -> np.ndarray:
    """Read an image file -> uint8 [H, W, 3]. Grayscale, alpha, palette and 16-bit files are converted (as
    `pipeline.to_rgb_uint8` does) and the conversion is appended to `notes` as one line naming the file;
    an unreadable file is a ValueError naming it."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with Image.open(path) as im:
                a = pipeline.to_rgb_uint8(im)
    except (OSError, SyntaxError) as e:                # PIL: UnidentifiedImageError, truncated data
        raise ValueError(f"cannot read image {path!r} ({type(e).__name__}: {e}): the file is corrupt or not an "
                         f"image; re-save it as PNG/JPEG or remove it from the folder") from None
    if notes is not None:
        notes += [f"{os.path.basename(path)}: {w.message}" for w in caught]
    return a


def eval_images(folder: Optional[str] = None, crop: Optional[int] = None, limit: Optional[int] = None,
                scale: int = 4) -> List[Tuple[str, np.ndarray, np.ndarray]]:
    """[(name, hr uint8 [H, W, 3], lr uint8 [H/s, W/s, 3])] from a folder of HR images (sorted by name,
    default: the bundled samples), centre-cropped to a multiple of 16 (and to `crop`),
    LR = degrade(hr, val_seed(file name))."""
    from qdit4sr_jax.data.datasets import val_seed
    from qdit4sr_jax.data.degradation import degrade
    folder = folder or SAMPLES_DIR
    files = list_images(folder, "evaluation")
    out = []
    for f in files[:limit]:
        hr = crop16(read_rgb(os.path.join(folder, f)), crop)
        out.append((os.path.splitext(f)[0], hr, degrade(hr, val_seed(f), scale)))
    return out


# ----------------------------------------------------------------------------- evaluate's inputs

_SUFFIX = re.compile(r"[_\-.](hr|lr|lq|gt|x\d+|lr\d+|lrx\d+)$", re.IGNORECASE)


def match_key(file_name: str) -> str:
    """The key LR and HR files are matched by: the stem, lower-cased, without one trailing _HR / _LR / _LR4 /
    _LQ / _GT / _x4 tag (RealSR's `Canon_001_HR.png` pairs with `Canon_001_LR4.png`)."""
    stem = os.path.splitext(file_name)[0]
    return _SUFFIX.sub("", stem).lower() or stem.lower()


def check_crop(crop: Optional[int], scale: int) -> None:
    """ValueError unless crop is None or a positive multiple of 16 (HR pixels; LR crop = crop / scale)."""
    if crop is None:
        return
    if crop < GRID or crop % GRID or crop % scale:
        raise ValueError(f"--crop {crop} is infeasible: use a positive multiple of {GRID} (HR pixels; the LR crop "
                         f"is crop / {scale})")


def _centre(a: np.ndarray, ch: int, cw: int) -> Tuple[int, int]:
    return (a.shape[0] - ch) // 2, (a.shape[1] - cw) // 2


def _too_small(path: str, a: np.ndarray, need: int, what: str) -> ValueError:
    return ValueError(f"image {path!r} is {a.shape[1]}x{a.shape[0]}: too small, {what} needs at least {need} px "
                      f"per side")


def load_items(hr_dir: Optional[str], lr_dir: Optional[str], *, scale: int, min_lr: int,
               crop: Optional[int] = None, limit: Optional[int] = None, notes: Optional[list] = None) \
        -> Tuple[List[Item], str]:
    """evaluate's images -> ([Item], a one-line description of where LR came from).

    hr_dir only: HR centre-cropped as `eval_images` (multiple of 16, and `crop`), LR = degrade(hr,
      val_seed(file name)). lr_dir and hr_dir: files matched by `match_key` (ValueError listing the unmatched
      names), HR must be exactly scale x LR; `crop` takes the centre crop/scale LR pixels and the HR pixels
      under them. lr_dir only: LR as is (centre crop/scale with `crop`), hr None. Every LR must have sides of
      at least `min_lr` px and every crop must fit every image (ValueError naming the file otherwise).
    """
    from qdit4sr_jax.data.datasets import val_seed
    from qdit4sr_jax.data.degradation import degrade
    check_crop(crop, scale)
    if not hr_dir and not lr_dir:
        raise ValueError("give --hr DIR (LR made by the seeded degradation), --lr DIR (no-reference metrics) or both")
    items: List[Item] = []
    lc = crop // scale if crop else None
    if hr_dir and not lr_dir:
        files = list_images(hr_dir, "HR")
        stems = [os.path.splitext(f)[0] for f in files]
        dup = sorted({s for s in stems if stems.count(s) > 1})
        if dup:
            raise ValueError(f"{hr_dir!r}: several files share the name {dup[:5]} (e.g. a.png and a.jpg): results are "
                             f"stored by name, keep one of each")
        for f in files[:limit]:
            path = os.path.join(hr_dir, f)
            hr = read_rgb(path, notes)
            if crop and min(hr.shape[:2]) < crop:
                raise ValueError(f"--crop {crop} is infeasible for {path!r} ({hr.shape[1]}x{hr.shape[0]}): use a crop "
                                 f"of at most the smallest image side")
            if min(hr.shape[:2]) < max(GRID, min_lr * scale):
                raise _too_small(path, hr, max(GRID, min_lr * scale), "an HR image")
            hr = crop16(hr, crop)
            items.append(Item(os.path.splitext(f)[0], degrade(hr, val_seed(f), scale), hr, val_seed(f)))
        return items, (f"LR = degrade(HR, seed=val_seed(file name): crc32 of the name, listed in results.json) "
                       f"(x{scale}, the project's seeded degradation)")
    lr_files = list_images(lr_dir, "LR")
    hr_files = list_images(hr_dir, "HR") if hr_dir else []
    for files, d in ((lr_files, lr_dir), (hr_files, hr_dir)):
        keys = [match_key(f) for f in files]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"{d!r}: several files match the same name {dup[:5]} (LR / HR are paired by file name "
                             f"without _HR / _LR4 / _x4 tags): keep one of each")
    hr_by_key = {match_key(f): f for f in hr_files}
    if hr_dir:
        lr_keys = {match_key(f) for f in lr_files}
        un_lr = [f for f in lr_files if match_key(f) not in hr_by_key]
        un_hr = [f for f in hr_files if match_key(f) not in lr_keys]
        if un_lr or un_hr:
            raise ValueError(f"LR and HR files do not pair up by name: {len(un_lr)} LR without HR "
                             f"{un_lr[:10]}{' ...' if len(un_lr) > 10 else ''}, {len(un_hr)} HR without LR "
                             f"{un_hr[:10]}{' ...' if len(un_hr) > 10 else ''}")
    for f in lr_files[:limit]:
        path = os.path.join(lr_dir, f)
        lr = read_rgb(path, notes)
        if min(lr.shape[:2]) < min_lr:
            raise _too_small(path, lr, min_lr, "the model's input")
        if lc and min(lr.shape[:2]) < lc:
            raise ValueError(f"--crop {crop} is infeasible for {path!r} ({lr.shape[1]}x{lr.shape[0]} LR, i.e. "
                             f"{lr.shape[1] * scale}x{lr.shape[0] * scale} HR): use a crop of at most "
                             f"{min(lr.shape[:2]) * scale // GRID * GRID}")
        hr = None
        if hr_dir:
            hpath = os.path.join(hr_dir, hr_by_key[match_key(f)])
            hr = read_rgb(hpath, notes)
            if hr.shape[:2] != (lr.shape[0] * scale, lr.shape[1] * scale):
                raise ValueError(f"HR {hpath!r} is {hr.shape[1]}x{hr.shape[0]} but its LR {path!r} is "
                                 f"{lr.shape[1]}x{lr.shape[0]}: HR must be exactly {scale}x the LR "
                                 f"({lr.shape[1] * scale}x{lr.shape[0] * scale})")
        if lc:
            y, x = _centre(lr, lc, lc)
            lr = np.ascontiguousarray(lr[y:y + lc, x:x + lc])
            if hr is not None:
                hr = np.ascontiguousarray(hr[y * scale:(y + lc) * scale, x * scale:(x + lc) * scale])
        items.append(Item(os.path.splitext(f)[0], lr, hr))
    return items, ("LR and HR from the given folders, paired by file name" if hr_dir else
                   "LR only (no HR: no-reference metrics and agreement with the FP output only)")


# ----------------------------------------------------------------------------- calibration

def calibration_lrs(source: str, n: int, size: int, scale: int = 4, exclude: Sequence[str] = ()) \
        -> Tuple[List[np.ndarray], str]:
    """(LR images for calibration, a description). source: "train" (seeded random crops of the training
    photos: `make_pair` seeds 10_000.., disjoint photos from data/val), "samples", or a folder of HR images
    (centre-cropped to `size` as `crop16`, degraded with val_seed; files whose stem is in `exclude` are
    skipped, so a folder can be shared with the evaluation set)."""
    from qdit4sr_jax.data.datasets import load_photos, make_pair, val_seed
    from qdit4sr_jax.data.degradation import degrade
    if source == "train":
        photos = [p for _, p in load_photos(DEFAULT_DATA, "train")]
        lrs = [make_pair(photos, 10_000 + i, size, scale)[1] for i in range(n)]
        return lrs, f"{n} seeded {size}x{size} crops of the {len(photos)} training photos (data/train)"
    folder = SAMPLES_DIR if source == "samples" else source
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"calibration source {source!r}: use 'train', 'samples' or a folder")
    files = [f for f in sorted(os.listdir(folder)) if f.lower().endswith(pipeline.IMAGE_EXTS)
             and os.path.splitext(f)[0] not in set(exclude)][:n]
    if not files:
        raise FileNotFoundError(f"no calibration images left in {folder!r}")
    lrs = []
    for f in files:
        hr = crop16(read_rgb(os.path.join(folder, f)), size)
        lrs.append(degrade(hr, val_seed(f), scale))
    where = os.path.relpath(folder, ROOT) if folder.startswith(ROOT) else folder
    return lrs, f"{len(files)} image{'' if len(files) == 1 else 's'} of {where} ({', '.join(files)})"


def lr_folder(folder: str, *, min_lr: int, crop_lr: Optional[int] = None, exclude: Sequence[str] = (),
              limit: Optional[int] = None) -> Tuple[List[np.ndarray], str]:
    """(LR images of a folder, centre-cropped to crop_lr when given, a description); files whose match_key
    is in `exclude` are skipped (calibration never sees the scored images unless asked to)."""
    ex = {e.lower() for e in exclude}
    files = [f for f in list_images(folder, "calibration") if match_key(f) not in ex][:limit]
    if not files:
        raise ValueError(f"calibration folder {folder!r} holds only images that are evaluated: calibration never "
                         f"uses the scored images (pass --calib-on-eval to allow it)")
    lrs = []
    for f in files:
        path = os.path.join(folder, f)
        a = read_rgb(path)
        if min(a.shape[:2]) < max(min_lr, crop_lr or 0):
            raise _too_small(path, a, max(min_lr, crop_lr or 0), "a calibration input")
        if crop_lr:
            y, x = _centre(a, crop_lr, crop_lr)
            a = np.ascontiguousarray(a[y:y + crop_lr, x:x + crop_lr])
        lrs.append(a)
    return lrs, f"{len(files)} LR images of {folder}"


# ----------------------------------------------------------------------------- model

def load_bundle(spec: str):
    """-> (ModelConfig, params bundle) from "demo", a model file, or a training-state folder (runs/...)."""
    if os.path.isdir(spec) and os.path.exists(os.path.join(spec, "state.json")):
        from qdit4sr_jax.train import config_from_dict, load_state
        params, meta = load_state(spec)
        return config_from_dict(meta["config"]).replace(dtype="float32"), {"transformer": params, "vae": {}}
    from qdit4sr_jax.io.modelfile import load_pretrained
    return load_pretrained(spec)
