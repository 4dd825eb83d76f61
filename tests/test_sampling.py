"""Sampler: schedule properties, step index, guidance, LR start, tiling/blending, calibration stats."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit4sr_jax import sampling
from qdit4sr_jax.config import ModelConfig
from qdit4sr_jax.model.layers import Linear
from qdit4sr_jax.quant.stats import activation_stats

CFG = ModelConfig.preset("tiny")


def _lat(seed, shape=(1, 8, 8, 4)):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def test_schedule_properties_and_start_sigma():
    sig, ts = sampling.flow_schedule(10, 3.0)
    assert sig[0] == 1.0 and sig[-1] == 0.0 and np.all(np.diff(sig) < 0)
    np.testing.assert_allclose(ts, sig[:-1] * 1000, rtol=1e-6)
    sig2, _ = sampling.flow_schedule(4, 3.0, start_sigma=0.6)
    np.testing.assert_allclose(sig2[0], 0.6, rtol=1e-6)
    np.testing.assert_allclose(sig2[-2], sig[-2], rtol=1e-6)   # same final sigma_min
    with pytest.raises(ValueError, match="num_steps"):
        sampling.flow_schedule(0)
    with pytest.raises(ValueError, match="start_sigma"):
        sampling.flow_schedule(4, start_sigma=1.5)


def test_step_index_reaches_the_model():
    """v = step: x_T = x_0 + sum_i (sigma_{i+1} - sigma_i) * i."""
    def model_fn(params, x, lr, t, ctx, pooled, step, collect):
        assert step.dtype == jnp.int32 and step.shape == ()
        return jnp.zeros_like(x) + step.astype(jnp.float32), {}

    noise = _lat(0)
    out = sampling.sample(CFG, {}, noise, noise, num_steps=5, guidance_scale=1.0, start="noise",
                          tile_latent=0, model_fn=model_fn)
    sig, _ = sampling.flow_schedule(5, CFG.shift)
    want = noise + sum((sig[i + 1] - sig[i]) * i for i in range(5))
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_guidance_combination_and_batch_doubling():
    seen = []

    def model_fn(params, x, lr, t, ctx, pooled, step, collect):
        seen.append(x.shape[0])            # recorded at trace time
        return jnp.zeros_like(x) + ctx.mean(axis=(1, 2))[:, None, None, None] + pooled[:, :1, None, None], {}

    noise = _lat(0)
    ctx, neg = jnp.full((1, 7, 24), 2.0), jnp.full((1, 7, 24), -1.0)
    pool, npool = jnp.full((1, 20), 0.5), jnp.zeros((1, 20))
    g = 4.0
    out = sampling.sample(CFG, {}, noise, noise, context=ctx, pooled=pool, neg_context=neg, neg_pooled=npool,
                          num_steps=3, guidance_scale=g, start="noise", tile_latent=0, model_fn=model_fn)
    assert seen == [2]
    vu, vc = -1.0, 2.5
    v = vu + g * (vc - vu)                 # constant velocity; sigmas go 1 -> 0
    np.testing.assert_allclose(np.asarray(out), np.asarray(noise - v), rtol=1e-5, atol=1e-5)
    seen.clear()
    out1 = sampling.sample(CFG, {}, noise, noise, context=ctx, pooled=pool, num_steps=3, guidance_scale=1.0,
                           start="noise", tile_latent=0, model_fn=model_fn)
    assert seen == [1]
    np.testing.assert_allclose(np.asarray(out1), np.asarray(noise - 2.5), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="negative embeddings"):
        sampling.sample(CFG, {}, noise, noise, context=ctx, pooled=pool, guidance_scale=2.0, model_fn=model_fn)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        sampling.sample(CFG, {}, noise, noise, context=ctx, pooled=pool, tile_latent=7, tile_overlap=2,
                        model_fn=model_fn)
    with pytest.raises(ValueError, match="tile_overlap 8"):
        sampling.sample(CFG, {}, noise, noise, context=ctx, pooled=pool, tile_latent=8, tile_overlap=8,
                        model_fn=model_fn)


def test_lr_start():
    def model_fn(params, x, lr, t, ctx, pooled, step, collect):
        return jnp.zeros_like(x), {}
    noise, lr = _lat(0), _lat(1)
    out = sampling.sample(CFG, {}, lr, noise, num_steps=2, guidance_scale=1.0, start="lr", start_sigma=0.25,
                          tile_latent=0, model_fn=model_fn)
    np.testing.assert_allclose(np.asarray(out), np.asarray(0.75 * lr + 0.25 * noise), rtol=1e-5, atol=1e-6)
    # start_sigma 1 (DiT4SR's default schedule) makes the LR start pure noise
    out = sampling.sample(CFG, {}, lr, noise, num_steps=2, guidance_scale=1.0, start="lr", start_sigma=1.0,
                          tile_latent=0, model_fn=model_fn)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(noise))


def test_lr_start_noise_scale():
    """start_noise scales the noise of the LR start: 0 starts from (1 - sigma0) lr whatever the noise (the seed
    no longer matters), 1 is DiT4SR's start; the model config's value is the default; out of [0, 1] is refused."""
    def model_fn(params, x, lr, t, ctx, pooled, step, collect):
        return jnp.zeros_like(x), {}
    lr = _lat(1)
    kw = dict(num_steps=2, guidance_scale=1.0, start="lr", start_sigma=0.25, tile_latent=0, model_fn=model_fn)
    outs = [np.asarray(sampling.sample(CFG, {}, lr, _lat(s), start_noise=0.0, **kw)) for s in (0, 7)]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_allclose(outs[0], np.asarray(0.75 * lr), rtol=1e-6)
    half = sampling.sample(CFG, {}, lr, _lat(0), start_noise=0.5, **kw)
    np.testing.assert_allclose(np.asarray(half), np.asarray(0.75 * lr + 0.125 * _lat(0)), rtol=1e-5, atol=1e-6)
    by_cfg = sampling.sample(CFG.replace(start_noise=0.5), {}, lr, _lat(0), **kw)
    np.testing.assert_array_equal(np.asarray(by_cfg), np.asarray(half))
    with pytest.raises(ValueError, match="start_noise"):
        sampling.sample(CFG, {}, lr, _lat(0), start_noise=1.5, **kw)
    with pytest.raises(ValueError, match="start_noise"):
        CFG.replace(start_noise=-0.1)


def test_lr_residual_prediction():
    """prediction "lr_residual": the output F gives x0_hat = lr - c F and the Euler steps land on x0_hat:
    a zero output returns the LR latent itself, a constant output the LR latent shifted by -c F,
    for any start, step count and tiling."""
    cfg = CFG.replace(prediction="lr_residual", residual_scale=0.1)
    noise, lr = _lat(0, (1, 16, 16, 4)), _lat(1, (1, 16, 16, 4))

    def zero_fn(params, x, lr_, t, ctx, pooled, step, collect):
        return jnp.zeros_like(x), {}

    def const_fn(params, x, lr_, t, ctx, pooled, step, collect):
        return jnp.full_like(x, 2.0), {}

    for start, s0, steps, tile in (("lr", 0.1, 1, 0), ("lr", 0.1, 4, 0), ("noise", 1.0, 3, 8)):
        out = sampling.sample(cfg, {}, lr, noise, num_steps=steps, guidance_scale=1.0, start=start,
                              start_sigma=s0, tile_latent=tile, tile_overlap=4 if tile else None,
                              model_fn=zero_fn)
        np.testing.assert_allclose(np.asarray(out), np.asarray(lr), rtol=1e-5, atol=1e-5)
    out = sampling.sample(cfg, {}, lr, noise, num_steps=2, guidance_scale=1.0, start="lr", start_sigma=0.1,
                          tile_latent=0, model_fn=const_fn)
    np.testing.assert_allclose(np.asarray(out), np.asarray(lr - 0.2), rtol=1e-5, atol=1e-5)
    # the velocity itself: (x - x0_hat) / sigma
    v = sampling.velocity(jnp.ones((1, 2, 2, 1)), jnp.full((1, 2, 2, 1), 3.0), jnp.zeros((1, 2, 2, 1)), 0.5,
                          "lr_residual", 0.1)
    np.testing.assert_allclose(np.asarray(v), (3.0 + 0.1) / 0.5, rtol=1e-6)
    with pytest.raises(ValueError, match="prediction"):
        CFG.replace(prediction="eps")
    with pytest.raises(ValueError, match="residual_scale"):
        CFG.replace(residual_scale=0.0)


def test_tile_offsets_and_weights():
    assert sampling.tile_offsets(10, 16, 4) == [0]
    assert sampling.tile_offsets(128, 64, 24) == [0, 40, 64]
    assert sampling.tile_offsets(100, 64, 24) == [0, 36]
    w = sampling.gaussian_weights(8)
    assert w.shape == (8, 8) and (w > 0).all()
    np.testing.assert_allclose(w[:, 0], w[:, -1], rtol=1e-6)       # columns symmetric about (t-1)/2
    with pytest.raises(ValueError, match="overlap"):
        sampling.tile_offsets(20, 8, 8)


def test_tiled_apply_blending():
    x, lr = _lat(0, (2, 12, 20, 4)), _lat(1, (2, 12, 20, 4))

    def pointwise(a, b):   # no spatial mixing: blending any tiling must give back the untiled result
        return jnp.sin(a) * 2 + b, {}

    ref, _ = pointwise(x, lr)
    tiled, _ = sampling.tiled_apply(pointwise, x, lr, 8, 4)
    np.testing.assert_allclose(np.asarray(tiled), np.asarray(ref), rtol=1e-5, atol=1e-6)
    chunked, _ = sampling.tiled_apply(pointwise, x, lr, 8, 4, tile_batch=3)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(ref), rtol=1e-5, atol=1e-6)
    # one tile covering the whole latent: the weights cancel
    whole, _ = sampling.tiled_apply(lambda a, b: (a * b, {}), x[:, :12, :12], lr[:, :12, :12], 16, 4, force=True)
    np.testing.assert_allclose(np.asarray(whole), np.asarray(x[:, :12, :12] * lr[:, :12, :12]), rtol=1e-6)

    # a thin latent (min side 4 <= overlap 6): overlap falls back to t // 2 instead of failing
    thin, _ = sampling.tiled_apply(pointwise, x[:, :4], lr[:, :4], 8, 6)
    np.testing.assert_allclose(np.asarray(thin), np.asarray(ref[:, :4]), rtol=1e-5, atol=1e-6)

    def spatial(a, b):     # a mixing model: tiles see different context, so the result differs
        return a - a.mean(axis=(1, 2), keepdims=True), {}
    t2, _ = sampling.tiled_apply(spatial, x, lr, 8, 4)
    assert not np.allclose(np.asarray(t2), np.asarray(spatial(x, lr)[0]), atol=1e-3)


class _LinModel(nn.Module):
    @nn.compact
    def __call__(self, x, step=None):
        return Linear(x.shape[-1], name="proj")(x, step=step)


def test_collect_stats_per_step():
    m = _LinModel()
    params = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))["params"]

    def model_fn(p, x, lr, t, ctx, pooled, step, collect):
        if collect:
            out, var = m.apply({"params": p}, x, step=step, mutable=["calib"])
            return out * 0.1, var["calib"]
        return m.apply({"params": p}, x, step=step) * 0.1, {}

    noise = _lat(3)
    out, stats = sampling.sample(CFG, params, noise, noise, num_steps=4, guidance_scale=1.0, start="noise",
                                 tile_latent=0, model_fn=model_fn, collect_stats=True)
    act = stats["proj"]["act"][0]
    assert act["var"].shape == (4,) and act["ch_absmax"].shape == (4, 4)
    np.testing.assert_allclose(float(act["var"][0]), float(activation_stats(noise)["var"]), rtol=1e-5)
    out2 = sampling.sample(CFG, params, noise, noise, num_steps=4, guidance_scale=1.0, start="noise",
                           tile_latent=0, model_fn=model_fn)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))
    # stats of step 1 are those of the latents after one Euler step
    sig, _ = sampling.flow_schedule(4, CFG.shift)
    x1 = noise + (sig[1] - sig[0]) * m.apply({"params": params}, noise) * 0.1
    np.testing.assert_allclose(float(act["absmax"][1]), float(jnp.abs(x1).max()), rtol=1e-5)


def test_tiny_transformer_sampling_deterministic_with_stats():
    from qdit4sr_jax.model.dit4sr import DiT4SRTransformer
    z = jnp.zeros((1, 8, 8, 4))
    ctx, pool = _lat(5, (1, 7, 24)), _lat(6, (1, 20))
    shapes = jax.eval_shape(lambda: DiT4SRTransformer(CFG).init(jax.random.PRNGKey(0), z, z, jnp.ones(1), ctx, pool))
    r = np.random.default_rng(0)   # random weights of the real shapes, drawn in numpy (no init compile)
    params = jax.tree_util.tree_map(
        lambda l: jnp.asarray(r.standard_normal(l.shape) / np.sqrt(np.prod(l.shape[:-1]) if l.ndim > 1 else 10),
                              l.dtype), shapes["params"])
    lr, noise = _lat(1, (1, 8, 8, 4)), _lat(2, (1, 8, 8, 4))
    # (same static settings as test_pipeline's runs, so a shared pytest process reuses the compilations)
    a = sampling.sample(CFG, params, lr, noise, context=ctx, pooled=pool, num_steps=4, guidance_scale=1.0)
    b = sampling.sample(CFG, params, lr, noise, context=ctx, pooled=pool, num_steps=4, guidance_scale=1.0)
    assert a.shape == lr.shape and np.isfinite(np.asarray(a)).all()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, stats = sampling.sample(CFG, params, lr, noise, context=ctx, pooled=pool, num_steps=3, guidance_scale=1.0,
                               collect_stats=True)
    leaves = jax.tree_util.tree_leaves(stats)
    assert leaves and all(l.shape[0] == 3 for l in leaves)
    assert "transformer_blocks_0" in stats


def test_full_size_sampler_shapes():
    """The real dit4sr preset through the whole jitted loop (CFG, 40 steps) at a 512x512 output
    (64x64 latent), traced with jax.eval_shape: nothing is allocated or compiled."""
    from qdit4sr_jax.model.dit4sr import param_shapes
    cfg = ModelConfig.preset("dit4sr")
    S = jax.ShapeDtypeStruct
    z, ctx, pool = S((1, 64, 64, 16), jnp.float32), S((1, 333, 4096), jnp.float32), S((1, 2048), jnp.float32)
    out = jax.eval_shape(
        lambda p, lr, n, c, po: sampling.sample(cfg, p, lr, n, context=c, pooled=po, neg_context=c, neg_pooled=po),
        param_shapes(cfg), z, z, ctx, pool)
    assert out.shape == (1, 64, 64, 16) and out.dtype == jnp.float32
