import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from qdit4sr_jax.config import ModelConfig, VAEConfig
from qdit4sr_jax import train as T


@pytest.fixture(autouse=True, scope="module")
def _cheap_compiles():
    """Every test here is bound by XLA's CPU compile time (train steps, losses: runs take milliseconds); they
    test the training logic, not XLA's optimisations, so the module compiles at XLA's lowest optimisation
    level (about a third less compile time; same results), and restores the setting for the next module."""
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def _tiny_cfg():
    """Two blocks (block 0 dual attention, block 1 the last, context_pre_only) over space-to-depth: every test
    here compiles a loss or a train step of it, and a block less is a quarter less to compile."""
    return ModelConfig.preset("tiny").replace(
        num_layers=2, in_channels=12, out_channels=12, context_mode="learned", lr_key_mode="r1",
        vae=VAEConfig(kind="space_to_depth", s2d_factor=2))


def _perturbed_params(seed=5):
    """init_train_params(seed) plus N(0, 0.05^2) noise on every leaf (the zero-initialised head would make the
    loss independent of s); numpy noise: jax.random.normal would compile once per leaf shape."""
    params = T.init_train_params(_tiny_cfg(), seed=seed)
    rng = np.random.default_rng(9)
    return jax.tree_util.tree_map(lambda a: a + jnp.asarray(0.05 * rng.standard_normal(a.shape), a.dtype), params)


def _batch(n=2, size=16, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    hr = np.stack([np.stack([127 + 100 * np.sin(x / (2 + i) + c) * np.cos(y / (3 + i)) for c in range(3)], -1)
                   for i in range(n)])
    hr = np.clip(hr + rng.normal(0, 5, hr.shape), 0, 255).astype(np.uint8)
    lr = np.stack([np.asarray(Image.fromarray(h).resize((size // 4, size // 4), Image.BICUBIC)) for h in hr])
    return hr, lr


def test_latents_and_condition_shapes():
    cfg = _tiny_cfg()
    hr, lr = _batch()
    x0 = T.hr_latent(cfg, hr)
    z = T.lr_condition(cfg, lr)
    assert x0.shape == z.shape == (2, 8, 8, 12)
    assert float(jnp.abs(x0).max()) <= 1.0
    # the LR condition is the bicubic upsampling: it tracks the HR latent closely on smooth content
    assert float(jnp.mean((x0 - z) ** 2)) < float(jnp.mean(x0 ** 2))


def test_zero_init_output_and_sigma_sampler():
    cfg = _tiny_cfg()
    p = T.init_train_params(cfg)
    assert not np.any(np.asarray(p["proj_out"]["kernel"]))
    assert not np.any(np.asarray(p["transformer_blocks_0"]["norm1"]["linear"]["kernel"]))
    s = np.asarray(T.sample_sigmas(jax.random.PRNGKey(0), 4000))
    assert s.min() > 0 and s.max() < 1 and 0.45 < s.mean() < 0.55


def test_optimisation_steps_reduce_loss():
    """25 steps reduce the loss; lr_mult scales the whole update (0: params unchanged, AdamW's decay included);
    with ema the step returns d * ema + (1 - d) * new params (the step without ema: the end-to-end test)."""
    cfg = _tiny_cfg()
    params = T.init_train_params(cfg, seed=1)
    opt, _ = T.make_optimizer(3e-3, total_steps=40, warmup=2, start_step=0, rewarm=0, weight_decay=0.1)
    state = opt.init(params)
    step = T.make_train_step(cfg, opt, ema=0.5)
    hr, lr = _batch(4)
    key = jax.random.PRNGKey(0)
    sig = jnp.array([0.2, 0.4, 0.6, 0.8])
    copy = lambda t: jax.tree_util.tree_map(jnp.array, t)        # noqa: E731  (the step donates its inputs)
    leaves = jax.tree_util.tree_leaves
    before = float(T.flow_loss(params, cfg, hr, lr, key, sig))
    p0, _, _, _, e0 = step(copy(params), opt.init(params), hr, lr, key, jnp.float32(0.0), copy(params),
                           jnp.float32(0.5))
    for a, b, e in zip(leaves(params), leaves(p0), leaves(e0)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
    ema = jax.tree_util.tree_map(jnp.zeros_like, params)
    for i in range(25):
        params, state, loss, gnorm, ema = step(params, state, hr, lr, jax.random.fold_in(key, i), jnp.float32(1.0),
                                               ema, jnp.float32(0.5))
        assert np.isfinite(float(loss)) and np.isfinite(float(gnorm))
        if i == 0:
            for a, e in zip(leaves(params), leaves(ema)):
                np.testing.assert_allclose(np.asarray(e), 0.5 * np.asarray(a), rtol=1e-6, atol=1e-7)
    after = float(T.flow_loss(params, cfg, hr, lr, key, sig))
    assert after < 0.8 * before, (before, after)


def test_charbonnier_loss_option():
    """`pointwise_loss` values; flow_loss with loss="charbonnier" is the smooth L1 of the same error (below the
    MSE for errors > 1, above it for small ones); a Charbonnier train step reduces the (MSE) loss too."""
    err = jnp.array([0.0, 3.0, -4.0])
    assert float(T.pointwise_loss(err)) == pytest.approx(25.0 / 3)
    assert float(T.pointwise_loss(err, "charbonnier")) == pytest.approx((1e-3 + np.hypot(3, 1e-3) + np.hypot(4, 1e-3)) / 3)
    with pytest.raises(ValueError, match="loss must be one of"):
        T.pointwise_loss(err, "l3")
    with pytest.raises(ValueError, match="loss must be one of"):
        T.make_train_step(_tiny_cfg(), T.make_optimizer(1e-3, 10, 1, 0, 0)[0], loss="huber")
    cfg = _tiny_cfg()
    params = T.init_train_params(cfg, seed=4)
    hr, lr = _batch(4)
    key, sig = jax.random.PRNGKey(1), jnp.array([0.2, 0.4, 0.6, 0.8])
    mse = float(T.flow_loss(params, cfg, hr, lr, key, sig))
    cb = float(T.flow_loss(params, cfg, hr, lr, key, sig, loss="charbonnier"))
    assert np.isfinite(cb) and cb != mse
    opt, _ = T.make_optimizer(3e-3, total_steps=40, warmup=2, start_step=0, rewarm=0)
    step = T.make_train_step(cfg, opt, loss="charbonnier")
    state = opt.init(params)
    p = jax.tree_util.tree_map(jnp.array, params)
    for i in range(20):
        p, state, value, gnorm = step(p, state, hr, lr, jax.random.fold_in(key, i))
        assert np.isfinite(float(value)) and np.isfinite(float(gnorm))
    assert float(T.flow_loss(p, cfg, hr, lr, key, sig)) < 0.9 * mse


def test_bridge_exact_share():
    """bridge_exact=1 puts every LR-start sample at the start sigma: the loss of fixed sigmas = start sigmas;
    0 puts none there; out-of-range shares are refused."""
    cfg = _tiny_cfg()
    params = _perturbed_params()                       # zero-initialised head: perturb so that s matters
    hr, lr = _batch(4)
    key, s0 = jax.random.PRNGKey(3), 0.1
    loss = jax.jit(T.flow_loss, static_argnames=("cfg", "bridge_frac", "bridge_sigma"))   # bridge_exact traced
    fixed = float(loss(params, cfg, hr, lr, key, jnp.full((4,), s0), jnp.full((4,), s0)))
    exact = float(loss(params, cfg, hr, lr, key, bridge_frac=1.0, bridge_sigma=s0, bridge_exact=1.0))
    assert exact == pytest.approx(fixed, rel=1e-5)
    spread = float(loss(params, cfg, hr, lr, key, bridge_frac=1.0, bridge_sigma=s0, bridge_exact=0.0))
    assert np.isfinite(spread) and spread != pytest.approx(fixed, rel=1e-4)
    with pytest.raises(ValueError, match="bridge-exact"):
        T.make_train_step(cfg, T.make_optimizer(1e-3, 10, 1, 0, 0)[0], bridge_exact=1.5)


def test_start_noise_of_the_lr_start_paths():
    """start_noise 0: the LR-start loss no longer depends on the drawn noise (the deterministic start the demo's
    sampler uses); 1 does; pure-noise starts (s0 = 1) keep their noise; the validation's start PSNR follows the
    model config's start noise; out-of-range values are refused."""
    cfg = _tiny_cfg()
    params = _perturbed_params()
    hr, lr = _batch(4)
    s, s0 = jnp.full((4,), 0.05), jnp.full((4,), 0.1)
    f = lambda key, noise, start=s0: float(T.flow_loss(params, cfg, hr, lr, jax.random.PRNGKey(key), s, start,  # noqa
                                                       start_noise=noise))
    assert f(0, 0.0) == pytest.approx(f(1, 0.0), rel=1e-6)
    assert f(0, 1.0) != pytest.approx(f(1, 1.0), rel=1e-4)
    ones = jnp.ones((4,))
    assert f(0, 0.0, ones) == pytest.approx(f(0, 1.0, ones), rel=1e-6)     # plain flow matching unchanged
    assert f(0, 0.0, ones) != pytest.approx(f(1, 0.0, ones), rel=1e-4)
    v0 = T.val_loss(params, cfg.replace(start_noise=0.0), hr, lr, sigmas=(), bridge_sigma=0.1)
    v1 = T.val_loss(params, cfg, hr, lr, sigmas=(), bridge_sigma=0.1)
    assert v0["b0.1@0.05"] == pytest.approx(f(1234, 0.0), rel=1e-5) and v1["b0.1@0.05"] == pytest.approx(f(1234, 1.0), rel=1e-5)
    with pytest.raises(ValueError, match="start-noise"):
        T.make_train_step(cfg, T.make_optimizer(1e-3, 10, 1, 0, 0)[0], start_noise=2.0)


def test_time_cosine():
    assert T.time_cosine(0.0) == pytest.approx(1.0)
    assert T.time_cosine(0.5) == pytest.approx(0.525)
    assert T.time_cosine(1.0) == pytest.approx(0.05) == T.time_cosine(3.0)
    assert T.time_cosine(-1.0) == pytest.approx(1.0)


def test_lr_schedule_and_rewarm():
    sched = T.lr_schedule(1e-3, total_steps=100, warmup=10)
    assert float(sched(0)) == pytest.approx(1e-4)
    assert float(sched(9)) == pytest.approx(1e-3)
    assert float(sched(100)) == pytest.approx(5e-5)
    assert float(sched(30)) > float(sched(60)) > float(sched(90))


def test_state_roundtrip_and_errors(tmp_path):
    cfg = _tiny_cfg()
    params = T.init_train_params(cfg, seed=2)
    T.SHARD_BYTES, old = 4096, T.SHARD_BYTES        # force several shards
    try:
        T.save_state(str(tmp_path), params, dict(config=T.config_to_dict(cfg), step=7))
    finally:
        T.SHARD_BYTES = old
    meta = json.load(open(tmp_path / "state.json"))
    assert len(meta["shards"]) > 1
    p2, meta2 = T.load_state(str(tmp_path))
    assert T.config_from_dict(meta2["config"]) == cfg and meta2["step"] == 7
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), b)
    os.remove(tmp_path / meta["shards"][1])
    with pytest.raises(FileNotFoundError, match="incomplete"):
        T.load_state(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="state.json"):
        T.load_state(str(tmp_path / "nowhere"))


def test_import_model_inverts_export(tmp_path):
    """A model file -> training state (fine-tuning the shipped model): bf16 values kept exactly as float32,
    the config and the new schedule in the meta; an existing state is not overwritten."""
    import ml_dtypes
    cfg = _tiny_cfg()
    params = T.init_train_params(cfg, seed=3)
    T.save_state(str(tmp_path / "a"), params, dict(config=T.config_to_dict(cfg), step=5))
    T.export_model(str(tmp_path / "a"), str(tmp_path / "m.safetensors"), num_steps=2)
    cfg2, meta = T.import_model(str(tmp_path / "m.safetensors"), str(tmp_path / "b"), step=11, peak_lr=1e-4)
    p2, meta2 = T.load_state(str(tmp_path / "b"))
    assert cfg2.num_steps == 2 and T.config_from_dict(meta2["config"]) == cfg2
    assert meta2["step"] == 11 and meta2["peak_lr"] == 1e-4 and meta2["train_seconds"] == 0.0
    assert meta2["schedule"] == "time" and meta2["runs"] == [] and meta2["imported_from"] == "m.safetensors"
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(p2)):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32), b)
    with pytest.raises(FileExistsError, match="already holds"):
        T.import_model(str(tmp_path / "m.safetensors"), str(tmp_path / "b"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="not a safetensors file"):
        T.import_model(str(tmp_path / "bad.safetensors"), str(tmp_path / "c"))
    assert not (tmp_path / "c" / "state.json").exists()


def test_export_cli_takes_the_sampler_of_a_preset(tmp_path, capsys):
    """`export --sampler-from demo` writes the demo preset's sampler defaults into the model file; single
    options override them."""
    from qdit4sr_jax.io.modelfile import load_model
    cfg = _tiny_cfg()
    T.save_state(str(tmp_path / "a"), T.init_train_params(cfg, seed=3), dict(config=T.config_to_dict(cfg), step=5))
    out = str(tmp_path / "m.safetensors")
    T.main(["export", "--state", str(tmp_path / "a"), "--out", out, "--sampler-from", "demo", "--num-steps", "5"])
    got, _ = load_model(out)
    demo = ModelConfig.preset("demo")
    assert got.num_steps == 5 and got.name == cfg.name and got.num_layers == cfg.num_layers
    assert {k: getattr(got, k) for k in T.SAMPLER_FIELDS if k != "num_steps"} == \
        {k: getattr(demo, k) for k in T.SAMPLER_FIELDS if k != "num_steps"}
    assert (got.start_noise, got.color_fix) == (0.0, "wavelet") and "noise 0.0" in capsys.readouterr().out


def _fake_data(d):
    rng = np.random.default_rng(0)
    os.makedirs(d / "train")
    os.makedirs(d / "val")
    files = []
    for i in range(2):
        img = np.clip(rng.normal(128, 60, (80, 96, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"train/p{i}.png")
        files.append(dict(file=f"train/p{i}.png", split="train"))
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / "val/v0.png")
    files.append(dict(file="val/v0.png", split="val"))
    json.dump(dict(files=files), open(d / "manifest.json", "w"))


def _args(data, out, steps, prediction=None):
    return argparse.Namespace(prediction=prediction, residual_scale=0.1, preset="tiny", data=str(data), out=str(out), total_steps=10, steps=steps,
                              max_minutes=5.0, save_margin=0.0, save_every_minutes=0.0, batch=2, crop=32, lr=1e-3, warmup=2, rewarm=2,
                              weight_decay=0.0, dtype="float32", attention="auto", bridge_frac=0.5, bridge_sigma=0.25, bank=8, workers=1, log_every=1, val_every=2,
                              val_count=0, seed=0)


@pytest.mark.slow
def test_train_runs_end_to_end_and_resumes(tmp_path):
    """A fresh run, then one resumed run that changes everything a resume may change: the config comes from
    the state (cfg=None), the output parametrisation switches (head restarted at zero), and it trains with
    colour augmentation, the wall-clock cosine, EMA params in OUT/ema, a Charbonnier loss, and keeps the best
    validation state (--keep-best) in OUT/best."""
    _fake_data(tmp_path / "data")
    out = tmp_path / "run"
    cfg = _tiny_cfg()
    T.train(_args(tmp_path / "data", out, 3), cfg)
    meta = json.load(open(out / "state.json"))
    assert meta["step"] == 3 and len(meta["runs"]) == 1 and len(meta["log"]) == 3
    assert all(np.isfinite(e["loss"]) for e in meta["log"])
    assert meta["config"]["prediction"] == "velocity" and T.config_from_dict(meta["config"]) == cfg
    a = _args(tmp_path / "data", out, 2, prediction="lr_residual")
    a.bridge_frac, a.bridge_sigma, a.keep_best, a.val_every, a.color_aug, a.invert_prob = 1.0, 0.1, True, 1, True, 0.5
    a.schedule, a.ema = "time", 0.9        # wall-clock cosine; EMA params in OUT/ema (validated, kept as best)
    a.loss = "charbonnier"
    T.train(a, None)                       # resumes: the config comes from the state, not from a.preset
    meta = json.load(open(out / "state.json"))
    assert meta["step"] == 5 and [r["end"] for r in meta["runs"]] == [3, 5]
    assert meta["config"]["prediction"] == "lr_residual"
    assert T.config_from_dict(meta["config"]) == cfg.replace(prediction="lr_residual", residual_scale=0.1)
    assert meta["schedule"] == "time" and meta["train_seconds"] > 0
    assert [r["loss"] for r in meta["runs"]] == ["mse", "charbonnier"]
    assert [e["step"] for e in meta["log"]] == [1, 2, 3, 4, 5]
    assert all(0 < e["lr"] <= 1.0001e-3 for e in meta["log"] if e["step"] > 3)
    ema, ema_meta = T.load_state(str(out / "ema"))
    assert ema_meta["step"] == 5 and ema_meta["ema"] == 0.9
    raw = T.load_state(str(out))[0]
    assert any(float(np.abs(x - y).max()) > 0 for x, y in zip(jax.tree_util.tree_leaves(raw),
                                                               jax.tree_util.tree_leaves(ema)))
    best = json.load(open(out / "best" / "state.json"))
    psnrs = {e["step"]: e["val_psnr"] for e in meta["log"] if "val_psnr" in e and e["step"] > 3}
    assert sorted(psnrs) == [4, 5]
    assert meta["best"]["step"] == best["step"] == best["best"]["step"] and psnrs[best["step"]] == max(psnrs.values())
    assert meta["best"]["psnr"] == pytest.approx(max(psnrs.values()), abs=1e-3)
    assert "proj_out" in T.load_state(str(out / "best"))[0]


def test_lr_start_path_matches_the_sampler():
    """On the LR-start path the velocity target is (x_s - x0) / s, and at s = s0 the input is exactly the
    sampler's start latent (1 - s0) z_lr + s0 eps; s0 = 1 is plain flow matching."""
    from qdit4sr_jax import sampling
    cfg = _tiny_cfg()
    hr, lr = _batch(4)                  # batch 4 as the other eager losses here: their op kernels are reused
    params = T.init_train_params(cfg, seed=3)
    key = jax.random.PRNGKey(5)
    seen = {}

    class Spy(T.DiT4SRTransformer):
        def apply(self, variables, xt, zlr, t, *a, **k):
            seen["xt"], seen["t"] = xt, t
            return jnp.zeros_like(xt)

    orig = T.DiT4SRTransformer
    T.DiT4SRTransformer = Spy
    try:
        s0 = jnp.array([0.3, 1.0, 0.6, 0.1])
        loss = T.flow_loss(params, cfg, hr, lr, key, sigmas=s0, start_sigmas=s0)
    finally:
        T.DiT4SRTransformer = orig
    x0, z = T.hr_latent(cfg, hr), T.lr_condition(cfg, lr)
    eps = jax.random.normal(jax.random.split(key, 5)[0], x0.shape)
    start = sampling.initial_latents(eps, z, s0[:, None, None, None], "lr")
    np.testing.assert_allclose(seen["xt"], start, atol=1e-6)
    np.testing.assert_allclose(seen["t"], 1000 * s0)
    target = (start - x0) / s0[:, None, None, None]
    np.testing.assert_allclose(float(loss), float(jnp.mean(target ** 2)), rtol=1e-5)
    np.testing.assert_allclose(target[1], eps[1] - x0[1], atol=1e-5)     # s0 = 1: v = eps - x0
    # a bridge share in the random draw runs and stays finite
    assert np.isfinite(float(T.flow_loss(params, cfg, hr, lr, key, bridge_frac=0.5, bridge_sigma=0.3)))


def test_lr_residual_loss_target_and_head_reset():
    """prediction "lr_residual": the loss is the MSE of F against (z_lr - x0) / c, and switching a trained
    model to it (`reinit_head`) zeroes proj_out so that the model starts as the bicubic upsampler."""
    cfg = _tiny_cfg().replace(prediction="lr_residual", residual_scale=0.1)
    hr, lr = _batch(4)
    params = T.init_train_params(_tiny_cfg(), seed=1)
    flat = T._flatten(params)
    flat = {k: (v + 0.5 if k.startswith("proj_out/") else v) for k, v in flat.items()}   # a non-zero head
    params = T.reinit_head(T._unflatten(flat))
    assert all(float(jnp.abs(v).max()) == 0.0 for k, v in T._flatten(params).items() if k.startswith("proj_out/"))
    assert any(float(jnp.abs(v).max()) > 0 for k, v in T._flatten(params).items() if not k.startswith("proj_out/"))
    x0, z = T.hr_latent(cfg, hr), T.lr_condition(cfg, lr)
    loss = T.flow_loss(params, cfg, hr, lr, jax.random.PRNGKey(0), bridge_frac=1.0, bridge_sigma=0.1)
    np.testing.assert_allclose(float(loss), float(jnp.mean(((z - x0) / 0.1) ** 2)), rtol=1e-5)


def test_color_augment_applies_one_transform_per_pair():
    """Each pair gets the same channel permutation (and negative) on HR and LR; across a batch all 6
    permutations occur and about invert_prob of the pairs are negatives."""
    rng = np.random.default_rng(0)
    n = 256
    base = rng.integers(0, 256, (n, 1, 1, 3), dtype=np.uint8)
    hr = np.broadcast_to(base, (n, 4, 4, 3)).copy()
    lr = np.broadcast_to(base, (n, 1, 1, 3)).copy()
    ha, la = (np.asarray(a) for a in T.color_augment(hr, lr, jax.random.PRNGKey(3), invert_prob=0.25))
    assert ha.dtype == la.dtype == np.uint8 and ha.shape == hr.shape and la.shape == lr.shape
    np.testing.assert_array_equal(ha[:, :1, :1], la)                 # same transform on both images
    seen, inverted = set(), 0
    for b, a in zip(base[:, 0, 0].astype(int), ha[:, 0, 0].astype(int)):
        match = [(tuple(p), inv) for p in T._PERMS for inv in (False, True)
                 if list(((255 - b) if inv else b)[p]) == list(a)]
        assert match, (b, a)
        seen.add(match[0][0])
        inverted += match[0][1]
    assert len(seen) == 6 and 0.12 * n < inverted < 0.4 * n
    plain = np.asarray(T.color_augment(hr, lr, jax.random.PRNGKey(3), invert_prob=0.0)[0])
    np.testing.assert_array_equal(np.sort(plain, -1), np.sort(hr, -1))     # permutations only


def test_start_psnr_from_validation_loss():
    cfg = _tiny_cfg().replace(prediction="lr_residual", residual_scale=0.1)
    # x0 MSE 4e-3 in [-1, 1] units -> 10 log10(4 / 4e-3) = 30 dB; the loss is that over c^2
    assert T.start_psnr({"b0.1@0.1": 4e-3 / 0.01}, cfg, 0.1) == pytest.approx(30.0)
    assert T.start_psnr({"b0.1@0.1": 4e-3 / 0.04}, _tiny_cfg(), 0.2) is None
    assert T.start_psnr({"b0.2@0.2": 4e-3 / 0.04}, _tiny_cfg(), 0.2) == pytest.approx(30.0)


def test_pair_bank_closes_while_refreshing_and_when_the_pool_stalls(tmp_path, monkeypatch):
    """PairBank.close returns with the refresh thread mid-batch (the case that once deadlocked
    multiprocessing.Pool.terminate in CI), and kills the workers if the pool's own shutdown stalls."""
    import threading
    import time
    from qdit4sr_jax.data.datasets import PairBank
    _fake_data(tmp_path / "data")
    bank = PairBank(str(tmp_path / "data"), capacity=8, size=32, scale=4, workers=1)
    hr, lr = bank.batch(3, np.random.default_rng(0))
    assert hr.shape == (3, 32, 32, 3) and lr.shape == (3, 8, 8, 3)
    t0 = time.perf_counter()
    bank.close()                                   # the refresh thread is making pairs right now
    assert not bank._thread.is_alive() and time.perf_counter() - t0 < 60
    assert not any(p.is_alive() for p in bank._pool._pool)

    stalled = PairBank(str(tmp_path / "data"), capacity=8, size=32, scale=4, workers=1, seed=100)
    workers = list(stalled._pool._pool)
    monkeypatch.setattr(stalled._pool, "terminate", lambda: threading.Event().wait())    # never returns
    t0 = time.perf_counter()
    stalled.close(timeout=2.0)
    assert time.perf_counter() - t0 < 10
    time.sleep(0.5)
    assert not any(p.is_alive() for p in workers)
    assert stalled._pool._worker_handler._state != 0           # no respawns (pool state RUN is 0)
