"""NIQE, the Naturalness Image Quality Evaluator (Mittal, Soundararajan, Bovik, "Making a completely blind
image quality analyzer", IEEE Signal Processing Letters 20(3), 2013), in numpy/scipy from its published
definition (the paper and the authors' MATLAB release: `computefeature`, `estimateaggdparam`,
`estimatemodelparam`, `computequality`). No-reference: lower is better (closer to natural-scene statistics).

Pipeline, for an image given as uint8 (or float on the 0..255 scale) [H, W, 3] RGB or [H, W] gray:

1. luminance in float64: Y = 0.298936 R + 0.587043 G + 0.114020 B (MATLAB `rgb2gray` weights, not rounded);
   cropped to the largest multiple of the patch size P on each side (top-left kept).
2. per scale s = 1, 2 (scale 2 is the 2x downscale of scale 1 by MATLAB-style antialiased bicubic
   `imresize(., 0.5)`: Keys cubic a = -0.5, kernel stretched 2x, symmetric borders):
   MSCN coefficients (Y - mu) / (sigma + 1), mu and sigma the local mean and std under a 7 x 7 Gaussian
   window (sigma 7/6, normalised; replicate borders). The image is cut into non-overlapping patches,
   P x P at scale 1 and P/2 x P/2 at scale 2 (the same patches), and each patch gives 18 features:
   the AGGD fit of its MSCN coefficients (shape alpha, (beta_l + beta_r) / 2) and, for each of the four
   pairwise products with the neighbour at shifts (0, 1), (1, 0), (1, 1), (1, -1) (circular within the patch,
   as the MATLAB `circshift`), the AGGD fit (shape alpha, mean (beta_r - beta_l) G(2/a) / G(1/a),
   left scale beta_l, right scale beta_r). 2 scales x 18 = 36 features per patch. (The paper's text names
   the last two the left and right variances; the authors' release `computefeature.m` stores beta_l and
   beta_r, and so does every port that reproduces its figures: we follow the release.)
3. pristine model (`fit_pristine`): over a set of pristine photos, keep in each photo the patches whose
   sharpness (the mean of the scale-1 local std sigma over the patch) exceeds 0.75 x the largest in that
   photo, and fit a multivariate Gaussian (mu, Sigma) to their features (sample covariance, N - 1).
4. test image (`niqe`): every patch's features -> (mu2, Sigma2) (no sharpness selection), and
   NIQE = sqrt((mu - mu2)^T pinv((Sigma + Sigma2) / 2) (mu - mu2)).

The AGGD fit is the moment-matching estimator of the paper (Lasmar et al. 2009): the ratio
r = E|x|^2 / E[x^2], corrected by the left/right std ratio, is matched against
Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a)) on the grid a = 0.2, 0.201, ..., 10 (nearest grid point; the
function is increasing in a, so a binary search finds the same point as MATLAB's argmin).

Patch size: the paper uses P = 96 on large photos. The evaluation crops of this project are 256 x 256
(128 x 128 with a small `--crop`), where P = 96 leaves 2 x 2 (1 x 1) patches, too few for Sigma2. The
shipped model `qdit4sr_jax/assets/niqe_pristine.npz` therefore holds one pristine fit per patch size in
`PATCH_SIZES`, fitted on the project's 15 training photos (`data/train`, never the evaluation photos),
each at long sides 1024, 724 and 512 px (`fit_scales`: the validation crops are cut from photos
downscaled to <= 1024 px, and NIQE depends on the pixel scale), by
`python -m qdit4sr_jax.metrics.niqe fit --data data/train --out qdit4sr_jax/assets/niqe_pristine.npz`.
`niqe(img)` uses `DEFAULT_PATCH` = 48, chosen on the development crops (docs/METRICS.md). Scores are
comparable only at the same patch size. An image needs at least `MIN_PATCHES` whole patches (a clear
ValueError says the minimum size otherwise). `python -m qdit4sr_jax.metrics.niqe check` prints the
figures of docs/METRICS.md; `... score FILE...` scores image files.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, Iterable, Optional

import numpy as np

from qdit4sr_jax.metrics.luminance import RGB2GRAY, to_luminance  # noqa: F401  (re-exported)

PATCH_SIZES = (96, 48, 32)      # shipped pristine models (one per patch size)
DEFAULT_PATCH = 48              # niqe(img) with patch=None: 256 x 256 crops -> 25 patches, 128 x 128 -> 4
MIN_PATCHES = 2                 # a test image needs at least this many whole patches (for Sigma2)
SHARPNESS_THRESHOLD = 0.75      # pristine patches kept: sharpness > 0.75 x the photo's largest
FIT_SIDES = (1024, 724, 512)    # pristine photos are fitted at these long sides (Lanczos down, never up)
GAUSS_WIN, GAUSS_SIGMA, C = 7, 7.0 / 6.0, 1.0
N_FEATURES = 36
ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "niqe_pristine.npz")
SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))

_GAM = np.arange(0.2, 10.0 + 1e-9, 0.001)
_R_GAM = None


def _r_gam() -> np.ndarray:
    global _R_GAM
    if _R_GAM is None:
        from scipy.special import gammaln
        _R_GAM = np.exp(2 * gammaln(2 / _GAM) - gammaln(1 / _GAM) - gammaln(3 / _GAM))
    return _R_GAM


# --------------------------------------------------------------------------------------------- input

# ------------------------------------------------------------------------------------------ features

def _gauss_window() -> np.ndarray:
    r = np.arange(GAUSS_WIN) - (GAUSS_WIN - 1) / 2
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * GAUSS_SIGMA ** 2))
    return g / g.sum()


def mscn(y: np.ndarray):
    """float64 [H, W] -> (MSCN coefficients [H, W], local std sigma [H, W]); 7x7 Gaussian, replicate borders."""
    from scipy.ndimage import correlate
    w = _gauss_window()
    mu = correlate(y, w, mode="nearest")
    sigma = np.sqrt(np.abs(correlate(y * y, w, mode="nearest") - mu * mu))
    return (y - mu) / (sigma + C), sigma


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    return np.where(ax <= 1, 1.5 * ax ** 3 - 2.5 * ax ** 2 + 1,
                    np.where(ax <= 2, -0.5 * ax ** 3 + 2.5 * ax ** 2 - 4 * ax + 2, 0.0))


def downscale2(y: np.ndarray) -> np.ndarray:
    """MATLAB `imresize(y, 0.5)` (bicubic, antialiased) of float64 [H, W] with even H, W -> [H/2, W/2].

    Output pixel o is centred on input 2o + 0.5 (0-based); taps 2o-3 .. 2o+4 weighted by cubic(d / 2) / 2,
    d = 3.5 .. -3.5, normalised; borders mirrored with the edge repeated (MATLAB 'symmetric')."""
    w = _cubic((3.5 - np.arange(8)) / 2.0)
    w = w / w.sum()
    for axis in (0, 1):
        n = y.shape[axis]
        p = np.pad(y, [(4, 4) if a == axis else (0, 0) for a in range(2)], mode="symmetric")
        out = 0.0
        for k in range(8):
            sl = [slice(None)] * 2
            sl[axis] = slice(1 + k, 1 + k + n - 1, 2)           # xp[2o + 1 + k], o = 0 .. n/2 - 1
            out = out + w[k] * p[tuple(sl)]
        y = out
    return y


def aggd_fit(x: np.ndarray):
    """Moment-matching AGGD fit of each row of x [N, M] (or one vector [M]) -> (alpha, beta_l, beta_r) [N].

    Density ~ exp(-(-x / beta_l)^alpha) for x < 0 and exp(-(x / beta_r)^alpha) for x >= 0. Rows with no
    negative or no positive value (e.g. a flat patch) give NaN."""
    from scipy.special import gammaln
    x = np.asarray(x, dtype=np.float64)
    one = x.ndim == 1
    x = np.atleast_2d(x)
    neg, pos = x < 0, x > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        lstd = np.sqrt(np.sum(np.where(neg, x * x, 0), 1) / neg.sum(1))
        rstd = np.sqrt(np.sum(np.where(pos, x * x, 0), 1) / pos.sum(1))
        ghat = lstd / rstd
        rhat = np.mean(np.abs(x), 1) ** 2 / np.mean(x * x, 1)
        rnorm = rhat * (ghat ** 3 + 1) * (ghat + 1) / (ghat ** 2 + 1) ** 2
    r = _r_gam()
    ok = np.isfinite(rnorm) & (lstd > 0) & (rstd > 0)
    i = np.clip(np.searchsorted(r, np.where(ok, rnorm, 0.0)), 1, len(r) - 1)
    i = np.where(np.abs(r[i - 1] - rnorm) <= np.abs(r[i] - rnorm), i - 1, i)    # nearest; ties -> lower (argmin)
    alpha = _GAM[i]
    k = np.exp(0.5 * (gammaln(1 / alpha) - gammaln(3 / alpha)))
    alpha, bl, br = (np.where(ok, v, np.nan) for v in (alpha, lstd * k, rstd * k))
    return (alpha[0], bl[0], br[0]) if one else (alpha, bl, br)


def _patches(a: np.ndarray, p: int) -> np.ndarray:
    """[H, W] with H, W multiples of p -> [N, p, p] non-overlapping patches, row-major."""
    h, w = a.shape
    return a.reshape(h // p, p, w // p, p).transpose(0, 2, 1, 3).reshape(-1, p, p)


def _patch_features(m: np.ndarray) -> np.ndarray:
    """MSCN patches [N, p, p] -> 18 features [N, 18] (see the module docstring)."""
    from scipy.special import gammaln
    n = m.shape[0]
    a, bl, br = aggd_fit(m.reshape(n, -1))
    feats = [a, (bl + br) / 2]
    for sh in SHIFTS:
        prod = (m * np.roll(m, sh, axis=(1, 2))).reshape(n, -1)
        a, bl, br = aggd_fit(prod)
        mean = (br - bl) * np.exp(gammaln(2 / a) - gammaln(1 / a))
        feats += [a, mean, bl, br]
    return np.stack(feats, 1)


def _check_size(shape, patch: int, name: str) -> None:
    h, w = shape
    if patch < 4 or patch % 2:
        raise ValueError(f"{name}: patch must be an even size >= 4, got {patch}")
    if (h // patch) * (w // patch) < MIN_PATCHES:
        smaller = [p for p in PATCH_SIZES if p < patch]
        raise ValueError(f"{name}: image {h} x {w} holds fewer than {MIN_PATCHES} whole {patch} x {patch} patches; "
                         f"needs at least {patch} x {MIN_PATCHES * patch} (or {MIN_PATCHES * patch} x {patch}) px "
                         f"at patch={patch}" + (f"; smaller patch sizes shipped: {smaller}" if smaller else ""))


def features(img, patch: int = DEFAULT_PATCH):
    """Image -> (features float64 [N, 36] of its N whole patch x patch patches, sharpness [N]).

    Sharpness of a patch = mean local std (scale 1) over it, used by the pristine fit."""
    y = to_luminance(img, "niqe")
    _check_size(y.shape, patch, "niqe")
    h, w = y.shape
    y = y[: h // patch * patch, : w // patch * patch]
    out, sharp = [], None
    for s in range(2):
        m, sigma = mscn(y)
        p = patch // (2 ** s)
        out.append(_patch_features(_patches(m, p)))
        if s == 0:
            sharp = _patches(sigma, p).mean((1, 2))
            y = downscale2(y)
    return np.concatenate(out, 1), sharp


# ------------------------------------------------------------------------------------ model, distance

def mvg_distance(mu1, cov1, mu2, cov2) -> float:
    """sqrt((mu1 - mu2)^T pinv((cov1 + cov2) / 2) (mu1 - mu2)); 0 for identical means."""
    d = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    inv = np.linalg.pinv((np.asarray(cov1, np.float64) + np.asarray(cov2, np.float64)) / 2)
    return float(np.sqrt(max(float(d @ inv @ d), 0.0)))


def fit_pristine(images: Iterable, patch: int, threshold: float = SHARPNESS_THRESHOLD) -> Dict:
    """Pristine MVG over images (each uint8 [H, W, 3] or [H, W]): per image, the patches with sharpness
    > threshold x that image's largest; patches with undefined (NaN) features dropped.
    -> dict(mu float64 [36], cov float64 [36, 36], patch int, n_patches int, n_images int)."""
    kept = []
    for img in images:
        f, s = features(img, patch)
        f = f[s > threshold * s.max()]
        kept.append(f[np.all(np.isfinite(f), 1)])
    if not kept:
        raise ValueError("fit_pristine: no images given")
    f = np.concatenate(kept, 0)
    if len(f) < N_FEATURES + 1:
        raise ValueError(f"fit_pristine: only {len(f)} sharp patches at patch={patch}; need > {N_FEATURES}")
    return dict(mu=f.mean(0), cov=np.cov(f, rowvar=False), patch=int(patch), n_patches=int(len(f)),
                n_images=len(kept))


_CACHE: Dict[tuple, Dict] = {}


def load_pristine(patch: Optional[int] = None, path: Optional[str] = None) -> Dict:
    """The shipped pristine model for one patch size (default DEFAULT_PATCH) -> dict(mu, cov, patch, n_patches)."""
    patch = DEFAULT_PATCH if patch is None else int(patch)
    key = (patch, path)
    if key not in _CACHE:
        p = path or ASSET
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} not found: run `python -m qdit4sr_jax.metrics.niqe fit --data data/train "
                                    f"--out {p}`")
        with np.load(p, allow_pickle=False) as z:
            sizes = [int(v) for v in z["patch_sizes"]]
            if patch not in sizes:
                raise ValueError(f"niqe: no pristine model for patch={patch} in {p}; shipped patch sizes: {sizes}")
            mu, cov = z[f"mu_{patch}"], z[f"cov_{patch}"]
            mu.setflags(write=False)
            cov.setflags(write=False)                  # cached: shared by every caller
            _CACHE[key] = dict(mu=mu, cov=cov, patch=patch, n_patches=int(z[f"n_patches_{patch}"]))
    return dict(_CACHE[key])


def niqe(img, patch: Optional[int] = None, model: Optional[Dict] = None) -> float:
    """NIQE of one image (uint8 or float 0..255, [H, W, 3] RGB or [H, W] gray) -> float, lower is better.

    patch: patch size (None -> DEFAULT_PATCH); the pristine model is the shipped one for that size unless
    `model` (a `fit_pristine` dict) is given. Raises ValueError for a bad dtype / shape / NaN, an image with
    fewer than MIN_PATCHES whole patches, or fewer than MIN_PATCHES patches with defined statistics
    (e.g. a flat image)."""
    if model is None:
        model = load_pristine(patch)
    elif patch is not None and int(patch) != int(model["patch"]):
        raise ValueError(f"niqe: patch={patch} but the given model was fitted at patch={model['patch']}")
    f, _ = features(img, int(model["patch"]))
    f = f[np.all(np.isfinite(f), 1)]
    if len(f) < MIN_PATCHES:
        raise ValueError(f"niqe: fewer than {MIN_PATCHES} patches with defined statistics (flat image?)")
    return mvg_distance(model["mu"], model["cov"], f.mean(0), np.cov(f, rowvar=False))


def fit_scales(photo: np.ndarray, sides=FIT_SIDES):
    """A pristine photo uint8 [H, W, 3] at each long side in `sides` (Lanczos, never upscaled; repeats of
    the same size dropped) -> list of uint8 images. The validation crops are cut from photos downscaled
    to <= 1024 px, and NIQE depends on the pixel scale, so the pristine model sees photos at that scale
    and two smaller steps (1024 / sqrt 2, 512), which also keeps more sharp patches (401 vs 207 at P = 48
    than the photos at their native size; docs/METRICS.md)."""
    from PIL import Image
    out, seen = [], set()
    h, w = photo.shape[:2]
    for side in sides:
        f = min(1.0, side / max(h, w))
        size = (max(1, round(w * f)), max(1, round(h * f)))
        if size in seen:
            continue
        seen.add(size)
        out.append(photo if f == 1.0 else np.asarray(Image.fromarray(photo).resize(size, Image.LANCZOS)))
    return out


# ------------------------------------------------------------------------------------------------ CLI

def _read_folder(folder: str):
    """[(name, uint8 [H, W, 3])] of the photos in a folder; refuses evaluation photos (data/val, data/dev)."""
    import json
    from PIL import Image
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a folder")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith((".png", ".jpg", ".jpeg")))
    if not names:
        raise ValueError(f"no .png/.jpg photos in {folder}")
    man = os.path.join(os.path.dirname(os.path.abspath(folder)), "manifest.json")
    if os.path.exists(man):
        split = {os.path.basename(f["file"]): f["split"] for f in json.load(open(man))["files"]}
        bad = [n for n in names if split.get(n, "train") != "train"]
        if bad:
            raise ValueError(f"{folder} holds evaluation photos {bad} (split != train in {man}); "
                             f"the pristine model is fitted on training photos only")
    return [(n, np.asarray(Image.open(os.path.join(folder, n)).convert("RGB"))) for n in names]


def _distortions(a: np.ndarray) -> Dict[str, np.ndarray]:
    """Gaussian blur sigma 2, Gaussian noise sigma 15 (seed 0), JPEG quality 10 of a uint8 [H, W, 3] image."""
    import io
    from PIL import Image
    from scipy.ndimage import gaussian_filter
    x = a.astype(np.float64)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=10)
    return {"blur2": np.clip(gaussian_filter(x, (2, 2, 0)), 0, 255).round().astype(np.uint8),
            "noise15": np.clip(x + np.random.default_rng(0).normal(0, 15, a.shape), 0, 255).round().astype(np.uint8),
            "jpeg10": np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))}


def _check(data: str, patches, split: str = "val", crop: int = 0, timing: bool = True,
           model_path: Optional[str] = None) -> int:
    from qdit4sr_jax.data.datasets import development_set, validation_set
    from qdit4sr_jax.data.degradation import bicubic_upsample
    from qdit4sr_jax.metrics.spectral import texture_ratio
    val = validation_set(data) if split == "val" else [v for v in development_set(data) if "~" not in v[0]]
    if crop:
        def cc(a, c):
            y, x = (a.shape[0] - c) // 2, (a.shape[1] - c) // 2
            return a[y:y + c, x:x + c]
        val = [(n, cc(hr, crop), cc(lr, crop // 4)) for n, hr, lr in val]
    print(f"{split} crops: {len(val)}" + (f", centre {crop} x {crop}" if crop else ""))
    for p in patches:
        model = load_pristine(p, model_path)
        print(f"\npatch {p}: NIQE (lower is better); texture = texture_ratio(bicubic, HR)")
        print("| crop | HR | bicubic x4 of LR | HR blur2 | HR noise15 | HR jpeg10 | texture |")
        print("|---|---|---|---|---|---|---|")
        rows, wins = [], 0
        for name, hr, lr in val:
            bic = bicubic_upsample(lr)
            d = _distortions(hr)
            r = [niqe(x, model=model) for x in (hr, bic, d["blur2"], d["noise15"], d["jpeg10"])]
            t = texture_ratio(bic, hr)
            wins += sum(v > r[0] for v in r[2:])
            rows.append(r + [t])
            print(f"| {os.path.basename(name)} | " + " | ".join(f"{v:.2f}" for v in r) + f" | {t:.3f} |")
        m = np.mean(rows, 0)
        print("| **mean** | " + " | ".join(f"**{v:.2f}**" for v in m[:5]) + f" | **{m[5]:.3f}** |")
        print(f"distorted copy scored worse than HR in {wins} of {3 * len(val)} cases; bicubic worse than HR in "
              f"{sum(r[1] > r[0] for r in rows)} of {len(val)}")
    rng = np.random.default_rng(0)
    for side in (256, 1024) if timing else ():
        img = bicubic_upsample(rng.integers(0, 256, (side // 4, side // 4, 3), dtype=np.uint8), 4)   # any content
        niqe(img)
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            niqe(img)
            ts.append(time.perf_counter() - t)
        print(f"niqe() at {side} x {side} (patch {DEFAULT_PATCH}): median {1e3 * np.median(ts):.1f} ms of 5 "
              f"(min {1e3 * min(ts):.1f}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qdit4sr_jax.metrics.niqe", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit the pristine models (one per patch size) and write the .npz")
    f.add_argument("--data", default="data/train", help="folder of pristine (training) photos")
    f.add_argument("--out", default=ASSET)
    f.add_argument("--patches", type=int, nargs="+", default=list(PATCH_SIZES))
    f.add_argument("--sides", type=int, nargs="+", default=list(FIT_SIDES),
                   help="long sides (px) each photo is fitted at (Lanczos down, never up)")
    s = sub.add_parser("score", help="print NIQE of image files")
    s.add_argument("images", nargs="+")
    s.add_argument("--patch", type=int, default=None)
    c = sub.add_parser("check", help="NIQE of the validation crops (HR, bicubic x4 of their LR, blurred / noised / "
                                     "JPEG copies), texture_ratio of the bicubic upscales, niqe() wall time")
    c.add_argument("--data", default="data", help="the gathered data folder (data/val, manifest.json)")
    c.add_argument("--patches", type=int, nargs="+", default=[DEFAULT_PATCH])
    c.add_argument("--split", choices=("val", "dev"), default="val",
                   help="val: the 9 validation crops; dev: the 10 data/dev crops (for choosing settings)")
    c.add_argument("--crop", type=int, default=0, help="score the centre crop of this size instead (0: whole)")
    c.add_argument("--no-timing", action="store_true")
    c.add_argument("--model", default=None, help="a pristine .npz other than the shipped one")
    args = ap.parse_args(argv)
    if args.cmd == "check":
        return _check(args.data, args.patches, args.split, args.crop, not args.no_timing, args.model)
    if args.cmd == "score":
        from PIL import Image
        for p in args.images:
            print(f"{niqe(np.asarray(Image.open(p).convert('RGB')), args.patch):.4f}  {p}")
        return 0
    t0 = time.time()
    photos = _read_folder(args.data)
    images = [im for _, ph in photos for im in fit_scales(ph, args.sides)]
    out = dict(patch_sizes=np.array(args.patches, np.int64), photos=np.array([n for n, _ in photos]),
               sides=np.array(args.sides, np.int64), threshold=np.float64(SHARPNESS_THRESHOLD))
    for p in args.patches:
        t = time.time()
        m = fit_pristine(images, p)
        out[f"mu_{p}"], out[f"cov_{p}"], out[f"n_patches_{p}"] = m["mu"], m["cov"], np.int64(m["n_patches"])
        total = sum((im.shape[0] // p) * (im.shape[1] // p) for im in images)
        print(f"patch {p}: kept {m['n_patches']} of {total} patches from {len(photos)} photos at long sides "
              f"{args.sides} ({m['n_images']} images) ({time.time() - t:.1f} s)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes) from {len(photos)} photos in "
          f"{time.time() - t0:.1f} s")
    _CACHE.clear()
    return 0


if __name__ == "__main__":
    sys.exit(main())
