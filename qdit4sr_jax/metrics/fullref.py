"""Full-reference image metrics on uint8 RGB images [H, W, 3] (numpy + scipy.ndimage; no learned weights).

- `psnr(a, b)`: dB over all pixels and channels, peak 255.
- `ssim(a, b)`: Wang et al. 2004 with the conventions of scikit-image's `structural_similarity` defaults
  (so figures match that package): a 7 x 7 uniform window, K1 = 0.01, K2 = 0.03, data range 255, sample
  covariances (N / (N - 1)), the SSIM map averaged over pixels at least 3 px from the border, then over
  the three channels. Computed in float64 per channel.
- `high_band(img, sigma)`: the level-0 Laplacian-pyramid band x - G_sigma(x) (Gaussian per channel, reflect).
- `hf_psnr(a, ref)`: PSNR of a's high band against ref's (local-texture error).
"""
from __future__ import annotations

import numpy as np

SSIM_WIN = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _same_shape(name: str, a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name}: shapes differ {a.shape} vs {b.shape}")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8 images [H, W, 3] over all pixels, peak 255 (inf when identical)."""
    _same_shape("psnr", a, b)
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def _ssim_channel(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    from scipy.ndimage import uniform_filter
    n = SSIM_WIN * SSIM_WIN
    cov_norm = n / (n - 1.0)
    f = lambda z: uniform_filter(z, size=SSIM_WIN, mode="reflect")
    ux, uy = f(x), f(y)
    vx = cov_norm * (f(x * x) - ux * ux)
    vy = cov_norm * (f(y * y) - uy * uy)
    vxy = cov_norm * (f(x * y) - ux * uy)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    pad = (SSIM_WIN - 1) // 2
    return float(s[pad:-pad, pad:-pad].mean())


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """SSIM of two uint8 RGB images [H, W, 3] (or gray [H, W]), channel-averaged; 1.0 when identical."""
    _same_shape("ssim", a, b)
    if a.ndim not in (2, 3) or min(a.shape[:2]) < SSIM_WIN:
        raise ValueError(f"ssim: needs [H, W] or [H, W, C] images of at least {SSIM_WIN} x {SSIM_WIN} px, "
                         f"got {a.shape}")
    x, y = a.astype(np.float64), b.astype(np.float64)
    if x.ndim == 2:
        return _ssim_channel(x, y, data_range)
    return float(np.mean([_ssim_channel(x[..., c], y[..., c], data_range) for c in range(x.shape[-1])]))


def high_band(img: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Level-0 Laplacian-pyramid band x - G_sigma(x) of a uint8 [H, W, 3] image -> float64 [H, W, 3]."""
    from scipy.ndimage import gaussian_filter
    x = img.astype(np.float64)
    return x - gaussian_filter(x, sigma=(sigma, sigma, 0), mode="reflect")


def hf_psnr(a: np.ndarray, ref: np.ndarray, sigma: float = 1.0) -> float:
    """PSNR (dB, peak 255) of the high band of `a` vs that of `ref` (both uint8 [H, W, 3])."""
    _same_shape("hf_psnr", a, ref)
    mse = np.mean((high_band(a, sigma) - high_band(ref, sigma)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))
