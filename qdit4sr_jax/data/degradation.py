"""Real-world style LR synthesis (numpy + Pillow), seeded; used for training pairs and evaluation LR images.

    lr = degrade(hr_uint8 [H, W, 3], seed, scale=4)  ->  uint8 [H/scale, W/scale, 3]

One stage of the Real-ESRGAN recipe, at moderate strength:
  1. blur (p=0.9): a random Gaussian kernel, isotropic (p=0.5) or anisotropic (two sigmas, rotated),
     size 7..21 (odd), sigma in [0.2, 3.0]; reflect-padded FFT convolution;
  2. downsample by `scale` with a random Pillow filter: bicubic, bilinear or area (box);
  3. noise: Gaussian (p=0.45; sigma 1..12 / 255, grey with p=0.3) or Poisson (p=0.35; photon peak
     log-uniform in [100, 2000], i.e. shot noise sd ~ sqrt(I / peak)), else none;
  4. JPEG (p=0.8; quality 40..95) through Pillow.
The same `seed` always gives the same LR image (numpy `default_rng(seed)` drives every choice).
`sample_params(seed)` returns the choices; `apply_degradation(hr, params, scale)` applies them.
"""
from __future__ import annotations

import io
from typing import Any, Dict

import numpy as np
from PIL import Image

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "area": Image.BOX}


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """Normalised 2-D Gaussian [size, size] float64 with axis sigmas (sigma_x, sigma_y) rotated by theta."""
    if size % 2 != 1 or size < 1:
        raise ValueError(f"kernel size must be a positive odd integer, got {size}")
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"kernel sigmas must be > 0, got {sigma_x}, {sigma_y}")
    r = size // 2
    y, x = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float64)
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * x + s * y, -s * x + c * y
    k = np.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return k / k.sum()


def _fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (a fast FFT length)."""
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            q = p35
            while q < n:
                q *= 2
            best = min(best, q)
            p35 *= 3
        p5 *= 5
    return best


def blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve float [H, W, C] with [k, k] (reflect padding, FFT); returns float32 [H, W, C]."""
    k = kernel.shape[0]
    r = k // 2
    H, W = img.shape[:2]
    pad = np.pad(img.astype(np.float32), ((r, r), (r, r), (0, 0)), mode="reflect")
    Hp, Wp = _fast_len(pad.shape[0]), _fast_len(pad.shape[1])
    kf = np.fft.rfft2(kernel.astype(np.float32), s=(Hp, Wp))
    out = np.fft.irfft2(np.fft.rfft2(pad, s=(Hp, Wp), axes=(0, 1)) * kf[..., None], s=(Hp, Wp), axes=(0, 1))
    # circular convolution with the kernel anchored at (0, 0): output pixel (i, j) of the valid part
    # sits at (i + 2r, j + 2r)
    return out[2 * r:2 * r + H, 2 * r:2 * r + W].astype(np.float32)


def sample_params(seed: int) -> Dict[str, Any]:
    """Draw the degradation choices for `seed` (plain python values)."""
    rng = np.random.default_rng(seed)
    p: Dict[str, Any] = {}
    if rng.random() < 0.9:
        size = int(rng.integers(3, 11)) * 2 + 1          # 7..21
        if rng.random() < 0.5:
            s = float(rng.uniform(0.2, 3.0))
            p["blur"] = dict(size=size, sigma_x=s, sigma_y=s, theta=0.0)
        else:
            p["blur"] = dict(size=size, sigma_x=float(rng.uniform(0.2, 3.0)), sigma_y=float(rng.uniform(0.2, 3.0)),
                             theta=float(rng.uniform(0, np.pi)))
    else:
        p["blur"] = None
    p["resize"] = str(rng.choice(list(RESAMPLE)))
    u = rng.random()
    if u < 0.45:
        p["noise"] = dict(kind="gaussian", sigma=float(rng.uniform(1, 12)), grey=bool(rng.random() < 0.3))
    elif u < 0.80:
        p["noise"] = dict(kind="poisson", peak=float(np.exp(rng.uniform(np.log(100), np.log(2000)))))
    else:
        p["noise"] = None
    p["jpeg"] = int(rng.integers(40, 96)) if rng.random() < 0.8 else None
    p["noise_seed"] = int(rng.integers(0, 2**31 - 1))
    return p


def apply_degradation(hr: np.ndarray, params: Dict[str, Any], scale: int = 4) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [H/scale, W/scale, 3] with the given `sample_params` choices."""
    hr = np.asarray(hr)
    if hr.dtype != np.uint8 or hr.ndim != 3 or hr.shape[-1] != 3:
        raise ValueError(f"hr must be a uint8 [H, W, 3] image, got {hr.dtype} {hr.shape}")
    H, W = hr.shape[:2]
    if scale < 1 or H % scale or W % scale:
        raise ValueError(f"image size {H}x{W} must be divisible by the scale {scale}")
    x = hr.astype(np.float32)
    b = params.get("blur")
    if b is not None:
        k = gaussian_kernel(b["size"], b["sigma_x"], b["sigma_y"], b["theta"])
        if min(H, W) <= b["size"] // 2:
            raise ValueError(f"image {H}x{W} too small for a {b['size']}x{b['size']} blur kernel")
        x = blur(x, k)
    img = Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))
    if scale > 1:
        img = img.resize((W // scale, H // scale), RESAMPLE[params["resize"]])
    x = np.asarray(img).astype(np.float32) / 255.0
    nrng = np.random.default_rng(params.get("noise_seed", 0))
    n = params.get("noise")
    if n is not None and n["kind"] == "gaussian":
        shape = x.shape[:2] + (1,) if n["grey"] else x.shape
        x = x + nrng.normal(0.0, n["sigma"] / 255.0, size=shape).astype(np.float32)
    elif n is not None and n["kind"] == "poisson":
        peak = n["peak"]
        x = nrng.poisson(np.clip(x, 0, 1) * peak).astype(np.float32) / peak
    elif n is not None:
        raise ValueError(f"unknown noise kind {n['kind']!r}")
    out = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    q = params.get("jpeg")
    if q is not None:
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(q))
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return np.ascontiguousarray(out)


def degrade(hr_uint8: np.ndarray, seed: int, scale: int = 4) -> np.ndarray:
    """Seeded real-world degradation: uint8 [H, W, 3] (H, W divisible by scale) -> uint8 [H/scale, W/scale, 3]."""
    return apply_degradation(hr_uint8, sample_params(int(seed)), scale)


def bicubic_upsample(lr_uint8: np.ndarray, scale: int = 4) -> np.ndarray:
    """The bicubic baseline: uint8 [h, w, 3] -> uint8 [h*scale, w*scale, 3] (Pillow bicubic)."""
    lr = np.asarray(lr_uint8)
    h, w = lr.shape[:2]
    return np.asarray(Image.fromarray(lr).resize((w * scale, h * scale), Image.BICUBIC))
