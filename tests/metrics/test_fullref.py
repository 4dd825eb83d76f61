"""Full-reference metrics (qdit4sr_jax.metrics.fullref): definitions, and SSIM against scikit-image when present."""
import numpy as np
import pytest

from qdit4sr_jax.metrics import psnr, ssim


def _img(seed, h=40, w=48):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_psnr_definition():
    a = _img(0)
    b = a.astype(np.int16).copy()
    b[0, 0, 0] += 10 if b[0, 0, 0] < 200 else -10
    mse = 100.0 / a.size
    assert psnr(a, b.astype(np.uint8)) == pytest.approx(10 * np.log10(255.0 ** 2 / mse))
    assert psnr(a, a) == float("inf")


def test_ssim_bounds_and_errors():
    a = _img(1)
    assert ssim(a, a) == pytest.approx(1.0)
    assert -1.0 <= ssim(a, _img(2)) < 0.2                  # independent noise images: near 0
    assert ssim(a, 255 - a) < 0                            # anti-correlated
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(a, _img(1, 16, 16))
    with pytest.raises(ValueError, match="at least 7 x 7"):
        ssim(a[:5, :5], a[:5, :5])


def test_ssim_matches_scikit_image():
    sk = pytest.importorskip("skimage.metrics", reason="scikit-image (the 'data' extra) not installed")
    rng = np.random.default_rng(3)
    for _ in range(3):
        a = _img(int(rng.integers(1 << 30)), 33, 50)
        b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
        ref = sk.structural_similarity(a, b, channel_axis=-1, data_range=255)
        assert ssim(a, b) == pytest.approx(ref, abs=1e-10)
