"""Spectral texture measure: high-band energy of an output relative to a reference output.

`band_energy(img, band)`: the luminance Y (MATLAB `rgb2gray` weights, float64) of a uint8 [H, W, 3] RGB
or [H, W] gray image, minus its mean, times a 2-D Hann window (the outer product of two periodic Hann
windows, so the image borders do not leak into the high band), through the 2-D FFT; the energy is the sum
of |F|^2 over the frequencies whose radial frequency sqrt(fy^2 + fx^2) in cycles / pixel (numpy's
`fftfreq`: 0 .. 0.5 along each axis, up to 0.707 in the corners) lies in [lo, hi). The default band
(0.25, 0.5) is the top octave of the pixel grid: for a 4x super-resolution output, everything above
0.125 cycles / pixel is absent from the LR input (its Nyquist limit) and must be synthesised, and the
top half of that, 0.25 .. 0.5, is the fine texture (grass, fur, grain) that smoothing removes first.

`texture_ratio(out, ref, band)`: band_energy(out) / band_energy(ref) of one image pair of the same shape:
1.0 = the same texture energy as the reference (for the fidelity study: the FP model's output); < 1 the
output is smoother; > 1 it carries more high-frequency content (detail, noise or artefacts). The ratio is
of energies (squared amplitudes): a uniform 2x amplitude gain of the band reads 4.
`texture_ratios(outs, refs)`: the same per image of two batches [N, H, W, 3] -> float64 [N].
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from qdit4sr_jax.metrics.luminance import to_luminance

DEFAULT_BAND = (0.25, 0.5)
FLAT_ENERGY = 1e-6      # below this a reference counts as flat (one pixel one grey level off on 8 x 8 px gives 36)


def _check_band(band) -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in band)
    except (TypeError, ValueError):
        raise ValueError(f"band must be a pair (lo, hi) in cycles/pixel, got {band!r}") from None
    if not 0.0 <= lo < hi:
        raise ValueError(f"band must satisfy 0 <= lo < hi (cycles/pixel), got {band!r}")
    return lo, hi


def band_energy(img, band=DEFAULT_BAND) -> float:
    """Energy (sum |FFT|^2) of the mean-removed, Hann-windowed luminance of one image in the radial band
    [lo, hi) cycles/pixel. img: uint8 (or float 0..255) [H, W, 3] RGB or [H, W] gray, H, W >= 8."""
    lo, hi = _check_band(band)
    y = to_luminance(img, "band_energy")
    h, w = y.shape
    if min(h, w) < 8:
        raise ValueError(f"band_energy: image must be at least 8 x 8 px, got {h} x {w}")
    win = np.outer(np.hanning(h + 1)[:-1], np.hanning(w + 1)[:-1])        # periodic Hann
    f = np.fft.fft2((y - y.mean()) * win)
    r = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
    return float(np.sum(np.abs(f[(r >= lo) & (r < hi)]) ** 2))


def texture_ratio(out, ref, band=DEFAULT_BAND) -> float:
    """band_energy(out) / band_energy(ref) for one image pair of the same shape ([H, W, 3] or [H, W]).

    1.0 = same texture energy; < 1 smoother than ref; > 1 more high-frequency content. Raises ValueError on
    mismatched shapes, or when ref has no energy in the band (a flat reference)."""
    o, r = np.asarray(out), np.asarray(ref)
    if o.shape != r.shape:
        raise ValueError(f"texture_ratio: shapes differ {o.shape} vs {r.shape}")
    er = band_energy(r, band)
    if er < FLAT_ENERGY:
        raise ValueError(f"texture_ratio: the reference has no energy in band {band} (flat image?)")
    return band_energy(o, band) / er


def texture_ratios(outs, refs, band=DEFAULT_BAND) -> np.ndarray:
    """Per-image texture_ratio of two batches [N, H, W, 3] (or [N, H, W]) of the same shape -> float64 [N]."""
    o, r = np.asarray(outs), np.asarray(refs)
    if o.shape != r.shape:
        raise ValueError(f"texture_ratios: shapes differ {o.shape} vs {r.shape}")
    if o.ndim not in (3, 4):
        raise ValueError(f"texture_ratios: expected batches [N, H, W, 3] or [N, H, W], got {o.shape}")
    return np.array([texture_ratio(a, b, band) for a, b in zip(o, r)], dtype=np.float64)
