"""Spectral texture measure (qdit4sr_jax.metrics.spectral): band energy definition and texture_ratio."""
import os

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from qdit4sr_jax.metrics import band_energy, texture_ratio, texture_ratios

SAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "qdit4sr_jax", "assets", "samples")


def _sample(name):
    return np.asarray(Image.open(os.path.join(SAMPLES, f"{name}.png")).convert("RGB"))


def _blur(a, sigma):
    return np.clip(gaussian_filter(a.astype(np.float64), (sigma, sigma, 0)), 0, 255).round().astype(np.uint8)


def _noise(a, sigma, seed=0):
    return np.clip(a + np.random.default_rng(seed).normal(0, sigma, a.shape), 0, 255).round().astype(np.uint8)


@pytest.mark.parametrize("name", ["chelsea", "ladybird", "rocket"])
def test_identical_blurred_noised(name):
    img = _sample(name)
    assert texture_ratio(img, img) == 1.0
    b1, b2 = texture_ratio(_blur(img, 0.7), img), texture_ratio(_blur(img, 1.5), img)
    assert b2 < b1 < 1.0                                   # more smoothing, less high band
    assert texture_ratio(_noise(img, 8), img) > 1.0


def test_band_energy_definition():
    """A pure cosine sits in the band that holds its frequency and nowhere else (Hann leakage aside)."""
    n = 64
    yy, xx = np.mgrid[:n, :n]
    for f in (6 / 64, 20 / 64, 28 / 64):                   # cycles / pixel, along x, on the FFT grid
        img = 128 + 100 * np.cos(2 * np.pi * f * xx + 0 * yy)
        total = band_energy(img, (0.0, 1.0))
        inside = band_energy(img, (f - 0.04, f + 0.04))
        assert inside / total > 0.999
        other = (0.25, 0.5) if f < 0.25 else (0.0, 0.25)
        assert band_energy(img, other) / total < 1e-3
    # Parseval: the whole band holds sum |F|^2 = N * sum of the windowed, mean-removed signal squared
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (32, 48))
    win = np.outer(np.hanning(33)[:-1], np.hanning(49)[:-1])
    x = (img - img.mean()) * win
    assert band_energy(img, (0.0, 1.0)) == pytest.approx(x.size * np.sum(x * x), rel=1e-10)
    # the ratio is of energies: doubling the band's amplitude around a fixed mean reads 4
    assert texture_ratio(128 + 2 * (img / 4 - 32), 128 + (img / 4 - 32)) == pytest.approx(4.0, rel=1e-10)


def test_batches():
    a = np.stack([_sample("chelsea"), _sample("rocket")])
    b = np.stack([_blur(a[0], 1.0), _noise(a[1], 8)])
    r = texture_ratios(b, a)
    assert r.shape == (2,) and r[0] < 1.0 < r[1]
    assert r[0] == texture_ratio(b[0], a[0])


def test_errors():
    img = _sample("chelsea")
    with pytest.raises(ValueError, match="shapes differ"):
        texture_ratio(img, img[:128])
    with pytest.raises(ValueError, match="shapes differ"):
        texture_ratios(img[None], img[None, :128])
    with pytest.raises(ValueError, match="no energy"):
        texture_ratio(img, np.full_like(img, 7))
    with pytest.raises(ValueError, match="band"):
        texture_ratio(img, img, band=(0.5, 0.25))
    with pytest.raises(ValueError, match="at least 8 x 8"):
        band_energy(img[:4, :4])
    with pytest.raises(ValueError, match="dtype"):
        band_energy(img.astype(np.int64))
    bad = img.astype(np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        band_energy(bad)
