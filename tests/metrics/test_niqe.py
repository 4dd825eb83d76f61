"""NIQE (qdit4sr_jax.metrics.niqe) checked against its definition (Mittal et al. 2013):
distortions of a photo score worse, the AGGD estimator recovers known parameters, the MVG distance,
the 2x bicubic downscale, the shipped pristine models, and clear errors on bad inputs."""
import glob
import importlib
import io
import os

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from qdit4sr_jax.metrics import fit_pristine, load_pristine, niqe
from qdit4sr_jax.metrics.niqe import (DEFAULT_PATCH, N_FEATURES, PATCH_SIZES, aggd_fit, downscale2, features,
                                      mvg_distance)

niqe_mod = importlib.import_module("qdit4sr_jax.metrics.niqe")   # the package attribute `niqe` is the function

SAMPLES = os.path.join(os.path.dirname(niqe_mod.__file__), "..", "assets", "samples")


def _sample(name):
    return np.asarray(Image.open(os.path.join(SAMPLES, f"{name}.png")).convert("RGB"))


def _blur(a, sigma=2.0):
    return np.clip(gaussian_filter(a.astype(np.float64), (sigma, sigma, 0)), 0, 255).round().astype(np.uint8)


def _noise(a, sigma=15.0, seed=0):
    return np.clip(a + np.random.default_rng(seed).normal(0, sigma, a.shape), 0, 255).round().astype(np.uint8)


def _jpeg(a, quality=10):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def test_bundled_samples_are_there():
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(SAMPLES, "*.png"))) == \
        ["chelsea.png", "ladybird.png", "rocket.png"]


@pytest.mark.parametrize("name,distortions", [
    ("chelsea", ("blur", "noise", "jpeg")),
    ("ladybird", ("blur", "noise", "jpeg")),
    # rocket.png is a crop of a native-resolution camera photo (640 x 427, never downscaled) with its own
    # sensor noise: a Gaussian blur of sigma 2 removes that noise and NIQE scores the blurred copy better
    # (8.36 -> 7.67 at patch 48, docs/METRICS.md), as the definition says it should for a noisy photo.
    ("rocket", ("noise", "jpeg")),
])
def test_pristine_scores_better_than_distorted(name, distortions):
    img = _sample(name)
    base = niqe(img)
    make = {"blur": _blur, "noise": _noise, "jpeg": _jpeg}
    for d in distortions:
        assert niqe(make[d](img)) > base, (name, d)


def test_quality_degrades_with_noise_level():
    img = _sample("chelsea")
    s = [niqe(_noise(img, sigma)) for sigma in (0.0, 10.0, 25.0)]
    assert s[0] < s[1] < s[2]


def _aggd_samples(alpha, bl, br, n, rng):
    """AGGD draws: |x| = beta * G^(1/alpha), G ~ Gamma(1/alpha); side negative with prob bl / (bl + br)."""
    g = rng.gamma(1.0 / alpha, 1.0, n) ** (1.0 / alpha)
    neg = rng.random(n) < bl / (bl + br)
    return np.where(neg, -bl * g, br * g)


@pytest.mark.parametrize("alpha,bl,br", [(2.0, 1.0, 1.0), (0.8, 0.5, 1.5), (1.5, 2.0, 0.7), (0.5, 0.3, 0.3)])
def test_aggd_recovers_known_parameters(alpha, bl, br):
    rng = np.random.default_rng(int(alpha * 100))
    a, l, r = aggd_fit(_aggd_samples(alpha, bl, br, 400_000, rng))
    assert a == pytest.approx(alpha, rel=0.03)
    assert l == pytest.approx(bl, rel=0.05)          # second moments of heavy tails (alpha 0.5): noisier
    assert r == pytest.approx(br, rel=0.05)


def test_aggd_rows_and_undefined():
    rng = np.random.default_rng(0)
    x = np.stack([_aggd_samples(1.0, 1.0, 1.0, 50_000, rng), np.zeros(50_000), np.abs(rng.normal(size=50_000))])
    a, l, r = aggd_fit(x)
    assert a[0] == pytest.approx(1.0, rel=0.05)
    assert np.isnan(a[1]) and np.isnan(a[2])       # flat row, one-sided row: undefined (dropped as MATLAB nanmean)


def test_mvg_distance_definition():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(200, N_FEATURES))
    mu, cov = f.mean(0), np.cov(f, rowvar=False)
    assert mvg_distance(mu, cov, mu, cov) == 0.0
    d = rng.normal(size=N_FEATURES)
    cov2 = np.cov(rng.normal(size=(200, N_FEATURES)), rowvar=False)
    ref = np.sqrt(d @ np.linalg.inv((cov + cov2) / 2) @ d)
    assert mvg_distance(mu + d, cov, mu, cov2) == pytest.approx(ref, rel=1e-8)
    singular = np.zeros((N_FEATURES, N_FEATURES))           # pseudo-inverse: a zero covariance gives 0, no error
    assert mvg_distance(mu + d, singular, mu, singular) == 0.0


def test_downscale_is_antialiased_bicubic():
    """Interior pixels equal Pillow's antialiased bicubic (the same Keys a = -0.5 kernel, stretched 2x)."""
    y = np.random.default_rng(2).random((40, 56)) * 255
    ours = downscale2(y)
    pil = np.asarray(Image.fromarray(y.astype(np.float32), "F").resize((28, 20), Image.BICUBIC), np.float64)
    assert ours.shape == (20, 28)
    np.testing.assert_allclose(ours[3:-3, 3:-3], pil[3:-3, 3:-3], atol=1e-3)
    np.testing.assert_allclose(downscale2(np.full((8, 8), 7.0)), 7.0)


def test_features_shape_and_fit_roundtrip():
    imgs = [_sample(n) for n in ("chelsea", "ladybird", "rocket")]
    f, sharp = features(imgs[1], 32)
    assert f.shape == (64, N_FEATURES) and sharp.shape == (64,) and np.all(np.isfinite(f))
    every = fit_pristine(imgs, 32, threshold=0.0)                 # threshold 0: every patch kept
    allf = np.concatenate([features(im, 32)[0] for im in imgs])
    assert every["n_patches"] == 3 * 64 and every["patch"] == 32
    np.testing.assert_allclose(every["mu"], allf.mean(0))
    np.testing.assert_allclose(every["cov"], np.cov(allf, rowvar=False))
    # the test image's own statistics give NIQE 0 against a model fitted on exactly its patches
    assert niqe(imgs[0], model=dict(mu=features(imgs[0], 32)[0].mean(0),
                                    cov=np.cov(features(imgs[0], 32)[0], rowvar=False), patch=32)) == 0.0
    sharp_only = fit_pristine(imgs, 32, threshold=0.4)             # sharpness rule (0.75 in the shipped fit)
    kept = sum(int(np.sum(s > 0.4 * s.max())) for s in (features(im, 32)[1] for im in imgs))
    assert sharp_only["n_patches"] == kept < 3 * 64
    assert niqe(imgs[0], model=every) < niqe(_noise(imgs[0]), model=every)


def test_fit_needs_enough_sharp_patches():
    with pytest.raises(ValueError, match="sharp patches"):
        fit_pristine([_sample("chelsea")], 96)


def test_shipped_models():
    for p in PATCH_SIZES:
        m = load_pristine(p)
        assert m["patch"] == p and m["mu"].shape == (N_FEATURES,) and m["cov"].shape == (N_FEATURES, N_FEATURES)
        assert np.all(np.isfinite(m["cov"])) and m["n_patches"] > N_FEATURES
        np.testing.assert_allclose(m["cov"], m["cov"].T)
    assert load_pristine()["patch"] == DEFAULT_PATCH
    with pytest.raises(ValueError, match="shipped patch sizes"):
        load_pristine(40)
    assert os.path.getsize(niqe_mod.ASSET) < 50_000


def test_gray_float_and_rgb_agree():
    img = _sample("chelsea")
    gray = img.astype(np.float64) @ niqe_mod.RGB2GRAY
    assert niqe(gray) == pytest.approx(niqe(img), rel=1e-12)
    assert niqe(gray[..., None]) == pytest.approx(niqe(img), rel=1e-12)


def test_errors():
    img = _sample("chelsea")
    with pytest.raises(ValueError, match="fewer than 2 whole 48 x 48 patches; needs at least 48 x 96"):
        niqe(img[:60, :60])
    with pytest.raises(ValueError, match="shape"):
        niqe(img[..., :2])
    with pytest.raises(ValueError, match="shape"):
        niqe(np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        niqe(img.astype(np.int32))
    bad = img.astype(np.float32)
    bad[5, 5, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        niqe(bad)
    with pytest.raises(ValueError, match="0..1 scale"):
        niqe(img / 255.0)
    with pytest.raises(ValueError, match="flat image"):
        niqe(np.full((128, 128, 3), 90, np.uint8))
    with pytest.raises(ValueError, match="fitted at patch=48"):
        niqe(img, patch=32, model=load_pristine(48))


def test_cli_refuses_evaluation_photos_and_scores(tmp_path, capsys):
    """`fit` fits on training photos only; `score` prints NIQE per file."""
    import json
    folder = tmp_path / "val"
    folder.mkdir()
    Image.fromarray(_sample("chelsea")).save(folder / "c.png")
    (tmp_path / "manifest.json").write_text(json.dumps({"files": [{"file": "val/c.png", "split": "val"}]}))
    with pytest.raises(ValueError, match="evaluation photos"):
        niqe_mod.main(["fit", "--data", str(folder), "--out", str(tmp_path / "m.npz")])
    assert not (tmp_path / "m.npz").exists()
    assert niqe_mod.main(["score", str(folder / "c.png")]) == 0
    assert f"{niqe(_sample('chelsea')):.4f}" in capsys.readouterr().out


def test_fit_scales():
    photo = np.zeros((600, 1500, 3), np.uint8)
    sizes = [im.shape[:2] for im in niqe_mod.fit_scales(photo)]
    assert sizes == [(410, 1024), (290, 724), (205, 512)]
    assert [im.shape[:2] for im in niqe_mod.fit_scales(photo[:300, :400])] == [(300, 400)]   # never upscaled
