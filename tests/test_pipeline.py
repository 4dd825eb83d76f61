"""upscale() end to end on the tiny model (CPU): determinism, tiling, colour fix, prompts, input validation."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from qdit4sr_jax import pipeline
from qdit4sr_jax.colorfix import adain_color_fix, wavelet_color_fix, wavelet_decomposition
from qdit4sr_jax.config import ModelConfig
from qdit4sr_jax.model import vae
from qdit4sr_jax.model.dit4sr import DiT4SRTransformer

CFG = ModelConfig.preset("tiny")   # scale 4, VAE /2, patch 2, tile_latent 8, overlap 4, 4 steps


def _prompt(seed=0, L=7):
    r = np.random.default_rng(seed)
    return {"prompt_embeds": r.standard_normal((1, L, 24)).astype(np.float32),
            "pooled_prompt_embeds": r.standard_normal((1, 20)).astype(np.float32),
            "negative_prompt_embeds": r.standard_normal((1, L, 24)).astype(np.float32),
            "negative_pooled_prompt_embeds": r.standard_normal((1, 20)).astype(np.float32)}


def random_params(init_fn, seed):
    """Random weights of the real model's shapes, drawn in numpy from `jax.eval_shape(init_fn)` (no XLA
    compile of the initialisers; fan-in scaled kernels, norm scales near 1, small biases)."""
    r = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if len(leaf.shape) >= 2:
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(r.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)
        base = 1.0 if "scale" in name else 0.0
        return jnp.asarray(base + 0.1 * r.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(init_fn))


def transformer_params(cfg, seed=0):
    z = jnp.zeros((1, 8, 8, cfg.in_channels))
    ctx, pool = jnp.zeros((1, 7, cfg.joint_attention_dim)), jnp.zeros((1, cfg.pooled_projection_dim))
    return random_params(lambda: DiT4SRTransformer(cfg).init(jax.random.PRNGKey(0), z, z, jnp.ones(1), ctx, pool)
                         ["params"], seed)


@pytest.fixture(scope="module")
def bundle():
    vp = random_params(lambda: vae.init(CFG.vae, jax.random.PRNGKey(1), 16), 1)
    return {"transformer": transformer_params(CFG), "vae": vp, "prompt": _prompt()}


def _lr(h, w, seed=0):
    r = np.random.default_rng(seed)
    base = np.linspace(0, 1, h * w * 3).reshape(h, w, 3)
    return np.clip((base * 180 + r.integers(0, 60, (h, w, 3))), 0, 255).astype(np.uint8)


def test_end_to_end_deterministic(bundle):
    img = Image.fromarray(_lr(4, 4))
    a = pipeline.upscale(CFG, bundle, img, seed=0)
    b = pipeline.upscale(CFG, bundle, img, seed=0)
    c = pipeline.upscale(CFG, bundle, img, seed=1)
    assert isinstance(a, Image.Image) and a.size == (16, 16) and a.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    n = pipeline.upscale(CFG, bundle, _lr(4, 4), seed=0)            # numpy in -> numpy out, same result
    assert isinstance(n, np.ndarray) and n.dtype == np.uint8 and n.shape == (16, 16, 3)
    np.testing.assert_array_equal(n, np.asarray(a))
    # DiT4SR's process_size: a 2x2 input is processed as 4x4 (the same 8x8 latent), output still 8x8
    p = pipeline.upscale(CFG, bundle, _lr(2, 2), seed=0, process_size=16)
    assert p.shape == (8, 8, 3)


def test_tile_covering_the_latent_equals_untiled(bundle):
    """A forced single tile of the whole 8x8 latent runs the tiling/blending path; it must equal untiled."""
    img = _lr(4, 4, seed=3)
    un, lat_un = pipeline.upscale(CFG, bundle, img, seed=2, tile_latent=0, return_latents=True)
    ti, lat_ti = pipeline.upscale(CFG, bundle, img, seed=2, tile_latent=8, force_tiling=True, return_latents=True)
    np.testing.assert_allclose(np.asarray(lat_ti), np.asarray(lat_un), rtol=1e-5, atol=1e-5)
    assert np.abs(un.astype(int) - ti.astype(int)).max() <= 1


def test_multi_tile_run_blends(bundle):
    """LR 6x5 -> latent 12x10 > 8x8 tile: 4 overlapping tiles, Gaussian-blended, with guidance."""
    img = _lr(6, 5, seed=4)
    a, lat = pipeline.upscale(CFG, bundle, img, seed=0, guidance_scale=3.0, return_latents=True)
    b = pipeline.upscale(CFG, bundle, img, seed=0, guidance_scale=3.0)
    assert a.shape == (24, 20, 3) and lat.shape == (1, 12, 10, 4)
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(np.asarray(lat)).all()
    # (that tiles are really blended, and equal the untiled result for a local model, is tested on
    # sampling.tiled_apply in test_sampling.py)


def test_color_fix_known_inputs():
    r = np.random.default_rng(0)
    src = r.uniform(0.2, 0.8, (1, 16, 12, 3)).astype(np.float32)
    tgt = src * np.array([0.5, 1.2, 0.8], np.float32) + np.array([0.1, -0.1, 0.05], np.float32)
    np.testing.assert_allclose(np.asarray(adain_color_fix(tgt, src)), src, atol=2e-4)
    out = np.asarray(adain_color_fix(r.uniform(0, 1, src.shape).astype(np.float32), src))
    np.testing.assert_allclose(out.mean(axis=(1, 2)), src.mean(axis=(1, 2)), atol=2e-3)
    # wavelet: decomposition is exact; a colour cast (low frequency) is removed, texture kept
    hi, lo = wavelet_decomposition(jnp.asarray(src))
    np.testing.assert_allclose(np.asarray(hi + lo), src, atol=1e-6)
    np.testing.assert_allclose(np.asarray(wavelet_color_fix(src + 0.1, src)), src, atol=1e-5)
    tex = src + 0.05 * np.sign(r.standard_normal(src.shape)).astype(np.float32)
    w = np.asarray(wavelet_color_fix(tex, src))
    np.testing.assert_allclose(w - src, np.asarray(wavelet_decomposition(jnp.asarray(tex - src))[0]), atol=1e-5)
    with pytest.raises(ValueError, match="equal"):
        adain_color_fix(src, src[:, :8])


def test_color_fix_in_pipeline(bundle):
    img = _lr(4, 4, seed=5)
    up = np.asarray(Image.fromarray(img).resize((16, 16), Image.BICUBIC), np.float32)
    raw = pipeline.upscale(CFG, bundle, img, seed=0, color_fix=None).astype(np.float32)
    ada = pipeline.upscale(CFG, bundle, img, seed=0, color_fix="adain").astype(np.float32)
    wav = pipeline.upscale(CFG, bundle, img, seed=0, color_fix="wavelet")
    assert wav.shape == (16, 16, 3)
    err_raw = np.abs(raw.mean((0, 1)) - up.mean((0, 1))).max()
    err_ada = np.abs(ada.mean((0, 1)) - up.mean((0, 1))).max()
    assert err_ada <= 1.0 < err_raw
    with pytest.raises(ValueError, match="color_fix"):
        pipeline.upscale(CFG, bundle, img, color_fix="hist")
    # the default ("model") is the config's colour fix
    np.testing.assert_array_equal(pipeline.upscale(CFG.replace(color_fix="wavelet"), bundle, img, seed=0), wav)
    np.testing.assert_array_equal(pipeline.upscale(CFG.replace(color_fix="none"), bundle, img, seed=0), raw)
    assert CFG.color_fix == "adain"
    np.testing.assert_array_equal(pipeline.upscale(CFG, bundle, img, seed=0), ada)
    with pytest.raises(ValueError, match="color_fix"):
        CFG.replace(color_fix="hist")


def test_input_validation():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert pipeline.to_rgb_uint8(Image.new("L", (5, 4), 7)).shape == (4, 5, 3)
        assert pipeline.to_rgb_uint8(Image.new("RGBA", (5, 4), (1, 2, 3, 4)))[0, 0].tolist() == [1, 2, 3]
        assert pipeline.to_rgb_uint8(Image.new("LA", (5, 4), (9, 0))).shape == (4, 5, 3)
        assert pipeline.to_rgb_uint8(Image.new("P", (5, 4))).shape == (4, 5, 3)
        i16 = Image.fromarray(np.full((4, 5), 65535, np.uint16))
        assert i16.mode.startswith("I;16")
        assert pipeline.to_rgb_uint8(i16)[0, 0].tolist() == [255, 255, 255]
        f = Image.fromarray(np.full((4, 5), 0.5, np.float32))
        assert f.mode == "F" and pipeline.to_rgb_uint8(f)[0, 0].tolist() == [128, 128, 128]
    msgs = " ".join(str(x.message) for x in w)
    assert "alpha channel is dropped" in msgs and "I;16" in msgs and "converted L" in msgs
    assert pipeline.to_rgb_uint8(np.full((3, 3), 0.5)).tolist()[0][0] == [128, 128, 128]
    bad = np.zeros((8, 8, 3), np.float32)
    bad[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pipeline.to_rgb_uint8(bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pipeline.to_rgb_uint8(np.full((8, 8, 3), 3.0))
    with pytest.raises(ValueError, match="shape"):
        pipeline.to_rgb_uint8(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        pipeline.to_rgb_uint8(np.zeros((8, 8, 3), np.int64))


def test_upscale_rejects_bad_calls(bundle):
    cfg1 = CFG.replace(scale=1)                      # needs a 4-pixel side (VAE /2 x patch 2)
    assert pipeline.min_input_size(cfg1) == 4 and pipeline.min_input_size(ModelConfig()) == 4
    with pytest.raises(ValueError, match="minimum side is 4 pixels"):
        pipeline.upscale(cfg1, bundle, _lr(3, 8))
    with pytest.raises(ValueError, match="'vae'"):
        pipeline.upscale(CFG, {"transformer": bundle["transformer"]}, _lr(4, 4))
    with pytest.raises(ValueError, match="no prompt embeddings"):
        pipeline.upscale(CFG, {"transformer": bundle["transformer"], "vae": bundle["vae"]}, _lr(4, 4))
    with pytest.raises(ValueError, match="negative"):
        p = {k: v for k, v in bundle["prompt"].items() if "negative" not in k}
        pipeline.upscale(CFG, bundle, _lr(4, 4), prompt=p, guidance_scale=2.0)
    with pytest.raises(ValueError, match="text captions"):
        pipeline.upscale(CFG, bundle, _lr(4, 4), prompt="a photo of a cat")


def test_space_to_depth_model_with_learned_context():
    """The demo-model shape: parameter-free autoencoder, learned context (no prompt), no guidance."""
    cfg = CFG.replace(in_channels=12, out_channels=12, context_mode="learned", guidance_scale=1.0,
                      vae=CFG.vae.__class__(kind="space_to_depth", s2d_factor=2))
    bundle = {"transformer": transformer_params(cfg), "vae": {}}
    out = pipeline.upscale(cfg, bundle, _lr(4, 4), num_steps=2, start="lr", start_sigma=0.5)
    again = pipeline.upscale(cfg, bundle, _lr(4, 4), num_steps=2, start="lr", start_sigma=0.5)
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, again)
    with pytest.raises(ValueError, match="guidance"):
        pipeline.upscale(cfg, bundle, _lr(4, 4), guidance_scale=2.0)


def test_calibrate_images(bundle):
    imgs = [_lr(4, 4, seed=7), Image.fromarray(_lr(4, 4, seed=8))]
    stats = pipeline.calibrate_images(CFG, bundle, imgs, num_steps=3)
    s = stats["transformer_blocks_0/attn/to_q"]
    assert s["var"].shape == (3,) and s["ch_absmax"].shape == (3, 32)
    one = pipeline.calibrate_images(CFG, bundle, imgs[:1], num_steps=3)["transformer_blocks_0/attn/to_q"]
    assert (np.asarray(s["absmax"]) >= np.asarray(one["absmax"]) - 1e-6).all()   # max over both images
    with pytest.raises(ValueError, match="at least one image"):
        pipeline.calibrate_images(CFG, bundle, [])
    # step_gains: every layer's stats carry the sampler's step sensitivities (one vector per run, merged by mean)
    g = pipeline.calibrate_images(CFG, bundle, imgs, num_steps=3, step_gains=True, probes=1)
    gains = {tuple(np.asarray(v["step_gain"]).round(7)) for v in g.values()}
    assert len(gains) == 1 and len(next(iter(gains))) == 3 and min(next(iter(gains))) > 0
    np.testing.assert_allclose(np.asarray(g["transformer_blocks_0/attn/to_q"]["var"]), np.asarray(s["var"]), rtol=1e-5)


def test_image_files_and_bicubic(tmp_path):
    a = _lr(5, 7)
    pipeline.save_image(a, str(tmp_path / "a.png"))
    pipeline.save_image(Image.fromarray(a).convert("L"), str(tmp_path / "b.png"))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="converted L image to RGB"):
        imgs = pipeline.read_images(str(tmp_path))
    assert len(imgs) == 2 and imgs[1].shape == (5, 7, 3)
    np.testing.assert_array_equal(imgs[0], a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "notes.txt"]   # no temp files
    b = pipeline.bicubic(a, 4)
    assert b.shape == (20, 28, 3) and b.dtype == np.uint8
    assert pipeline.bicubic(Image.fromarray(a), 2).size == (14, 10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        pipeline.read_images(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no image or folder"):
        pipeline.read_images(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="extension"):
        pipeline.save_image(a, str(tmp_path / "x.xyz"))
