import numpy as np
import pytest
from PIL import Image

from qdit4sr_jax.data import degradation as D
from qdit4sr_jax.data.datasets import make_pair, random_crop, texture


def _photo(h=96, w=128, seed=0):
    """A smooth-plus-texture synthetic photo (uint8 [h, w, 3])."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 80 * np.sin(x / 9.0), 128 + 80 * np.cos(y / 7.0), 128 + 60 * np.sin((x + y) / 5.0)], -1)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


def _conv_reference(img, k):
    """Direct (loop) convolution with reflect padding, the definition `blur` must match."""
    r = k.shape[0] // 2
    pad = np.pad(img.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
    out = np.zeros(img.shape, np.float64)
    kf = k[::-1, ::-1]
    for i in range(k.shape[0]):
        for j in range(k.shape[1]):
            out += kf[i, j] * pad[i:i + img.shape[0], j:j + img.shape[1]]
    return out


def test_degrade_shape_dtype_and_determinism():
    hr = _photo()
    a = D.degrade(hr, 7)
    assert a.shape == (24, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, D.degrade(hr, 7))
    assert any(not np.array_equal(a, D.degrade(hr, s)) for s in range(8, 12))
    assert D.degrade(hr, 7, scale=2).shape == (48, 64, 3)


def test_degrade_rejects_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        D.degrade(_photo(97, 128), 0)
    with pytest.raises(ValueError, match="uint8"):
        D.degrade(_photo().astype(np.float32), 0)
    with pytest.raises(ValueError, match="odd"):
        D.gaussian_kernel(4, 1.0, 1.0, 0.0)


def test_gaussian_kernel_normalised_and_oriented():
    k = D.gaussian_kernel(15, 3.0, 0.5, 0.0)
    assert abs(k.sum() - 1) < 1e-12 and k.shape == (15, 15)
    # wide along x (columns), narrow along y (rows); rotating by 90 degrees swaps them
    assert k[7, 0] > 100 * k[0, 7]
    k90 = D.gaussian_kernel(15, 3.0, 0.5, np.pi / 2)
    np.testing.assert_allclose(k90, k.T, atol=1e-9)


@pytest.mark.parametrize("size,sx,sy,th", [(7, 1.0, 1.0, 0.0), (9, 2.5, 0.6, 0.7), (21, 3.0, 1.2, 2.0)])
def test_blur_matches_direct_convolution(size, sx, sy, th):
    img = _photo(40, 52).astype(np.float32)
    k = D.gaussian_kernel(size, sx, sy, th)
    np.testing.assert_allclose(D.blur(img, k), _conv_reference(img, k), atol=2e-3)


def test_clean_pipeline_is_plain_resize():
    hr = _photo()
    for mode, f in D.RESAMPLE.items():
        p = dict(blur=None, resize=mode, noise=None, jpeg=None)
        ref = np.asarray(Image.fromarray(hr).resize((32, 24), f))
        np.testing.assert_array_equal(D.apply_degradation(hr, p), ref)


def test_noise_statistics():
    flat = np.full((256, 256, 3), 128, np.uint8)
    clean = dict(blur=None, resize="area", jpeg=None, noise_seed=3)
    g = D.apply_degradation(flat, dict(clean, noise=dict(kind="gaussian", sigma=8.0, grey=False))).astype(float)
    assert abs(g.std() - 8.0) < 0.8 and abs(g.mean() - 128) < 0.5
    grey = D.apply_degradation(flat, dict(clean, noise=dict(kind="gaussian", sigma=8.0, grey=True)))
    np.testing.assert_array_equal(grey[..., 0], grey[..., 1])           # same noise in every channel
    peak = 200.0
    p = D.apply_degradation(flat, dict(clean, noise=dict(kind="poisson", peak=peak))).astype(float) / 255
    expected_sd = np.sqrt((128 / 255) / peak)                            # shot noise: var = I / peak
    assert abs(p.std() / expected_sd - 1) < 0.1


def test_stronger_degradation_loses_more():
    hr = _photo(128, 128)
    up = lambda lr: D.bicubic_upsample(lr).astype(float)
    def err(p):
        return np.mean((up(D.apply_degradation(hr, dict(dict(blur=None, resize="bicubic", noise=None, jpeg=None,
                                                             noise_seed=1), **p))) - hr) ** 2)
    assert err({"jpeg": 30}) > err({"jpeg": 95})
    strong = dict(size=15, sigma_x=3.0, sigma_y=3.0, theta=0.0)
    weak = dict(size=7, sigma_x=0.3, sigma_y=0.3, theta=0.0)
    assert err({"blur": strong}) > err({"blur": weak})


def test_sampled_params_cover_every_branch():
    ps = [D.sample_params(s) for s in range(400)]
    assert {p["resize"] for p in ps} == set(D.RESAMPLE)
    assert {None if p["noise"] is None else p["noise"]["kind"] for p in ps} == {None, "gaussian", "poisson"}
    assert any(p["jpeg"] is None for p in ps) and any(p["jpeg"] is not None for p in ps)
    iso = [p["blur"] for p in ps if p["blur"] and p["blur"]["sigma_x"] == p["blur"]["sigma_y"]]
    aniso = [p["blur"] for p in ps if p["blur"] and p["blur"]["sigma_x"] != p["blur"]["sigma_y"]]
    assert iso and aniso and all(7 <= b["size"] <= 21 and b["size"] % 2 for b in iso + aniso)


def test_random_crop_and_pairs():
    photo = _photo(300, 400)
    rng = np.random.default_rng(0)
    c = random_crop(photo, rng, 64)
    assert c.shape == (64, 64, 3) and c.dtype == np.uint8
    with pytest.raises(ValueError, match="smaller"):
        random_crop(photo[:50], rng, 64)
    hr, lr = make_pair([photo, _photo(200, 200, 1)], 5, size=64)
    hr2, lr2 = make_pair([photo, _photo(200, 200, 1)], 5, size=64)
    assert hr.shape == (64, 64, 3) and lr.shape == (16, 16, 3)
    np.testing.assert_array_equal(hr, hr2)
    np.testing.assert_array_equal(lr, lr2)
    assert texture(hr) > 0


def _data_dir(tmp_path, splits):
    import json
    files = []
    for split, names in splits.items():
        (tmp_path / split).mkdir()
        for i, n in enumerate(names):
            Image.fromarray(_photo(64, 64, seed=len(files))).save(tmp_path / split / n)
            files.append({"file": f"{split}/{n}", "split": split})
    (tmp_path / "manifest.json").write_text(json.dumps({"files": files}))
    return str(tmp_path)


def test_development_set_apart_from_validation(tmp_path):
    """dev crops at their own seeds, then the validation crops under other degradations (other LR, same HR);
    a data folder gathered before the dev split gets a message saying to re-gather."""
    from qdit4sr_jax.data.datasets import DEV_RESEEDS, development_set, validation_set
    d = _data_dir(tmp_path, {"val": ["a_0.png", "b_0.png"], "dev": ["a_3.png"]})
    val, dev = validation_set(d), development_set(d)
    assert [n for n, _, _ in dev] == ["dev/a_3.png"] + [f"val/{x}~{r}" for r in DEV_RESEEDS
                                                       for x in ("a_0.png", "b_0.png")]
    by_name = {n: (hr, lr) for n, hr, lr in val}
    for n, hr, lr in dev[1:]:
        base = n.split("~")[0]
        np.testing.assert_array_equal(hr, by_name[base][0])
        assert lr.shape == (16, 16, 3) and not np.array_equal(lr, by_name[base][1])
    (tmp_path / "old").mkdir()
    old = _data_dir(tmp_path / "old", {"val": ["a_0.png"]})
    with pytest.raises(ValueError, match="re-run"):
        development_set(old)


def test_val_crops_order_and_all():
    from qdit4sr_jax.data.gather import val_crops
    img = _photo(600, 900)
    every = val_crops(img, 256, k=None)
    assert len(every) == 2 * 3
    energy = [float(np.abs(np.diff(c.astype(np.float32).mean(-1), axis=1)).mean()
                    + np.abs(np.diff(c.astype(np.float32).mean(-1), axis=0)).mean()) for c in every]
    assert energy == sorted(energy, reverse=True)
    np.testing.assert_array_equal(np.stack(val_crops(img, 256, k=3)), np.stack(every[:3]))
