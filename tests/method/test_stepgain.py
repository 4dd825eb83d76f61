"""Step sensitivities of the sampler (quant/stepgain.py) and VaTMP weighted by them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit4sr_jax import sampling
from qdit4sr_jax.config import ModelConfig, QuantConfig
from qdit4sr_jax.model.dit4sr import DiT4SRTransformer, param_shapes
from qdit4sr_jax.quant.qdit4sr import activation_schedules
from qdit4sr_jax.quant.stepgain import check_step_weights, step_sensitivity
from qdit4sr_jax.quant.vatmp import schedule_activation_bits

CFG = ModelConfig.preset("tiny")


def _lat(seed, shape=(1, 8, 8, 4)):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def test_output_offsets_enter_each_step():
    """A constant model: an offset at the last step moves the result by exactly dsigma * offset; zero
    offsets change nothing; a wrong shape is refused."""
    def model_fn(params, x, lr, t, ctx, pooled, step, collect):
        return 0.3 * x + step.astype(jnp.float32), {}

    noise, T = _lat(0), 3
    kw = dict(num_steps=T, guidance_scale=1.0, start="noise", tile_latent=0, model_fn=model_fn)
    base = sampling.sample(CFG, {}, noise, noise, **kw)
    zero = sampling.sample(CFG, {}, noise, noise, output_offsets=jnp.zeros((T,) + noise.shape), **kw)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(zero))
    off = jnp.zeros((T,) + noise.shape).at[-1].set(_lat(1))
    moved = sampling.sample(CFG, {}, noise, noise, output_offsets=off, **kw)
    sig, _ = sampling.flow_schedule(T, CFG.shift)
    np.testing.assert_allclose(np.asarray(moved - base), (sig[-1] - sig[-2]) * np.asarray(_lat(1)),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="output_offsets"):
        sampling.sample(CFG, {}, noise, noise, output_offsets=jnp.zeros((T + 1,) + noise.shape), **kw)


def test_step_sensitivity_of_linear_samplers():
    """v = a x: J_t = dsigma_t prod_{s>t} (1 + a dsigma_s) I, so g_t = J_t^2 exactly (probes normalised by
    |r|^2); for the last step g = dsigma^2. "lr_residual" with a zero model: x0_hat = z_lr, J_t of the offset F
    is -c dsigma_t / sigma_t prod_{s>t} (1 + dsigma_s / sigma_s) and the product is 0 before the last step:
    only the last step reaches the output."""
    a, T = 0.7, 4

    def model_fn(params, x, lr, t, ctx, pooled, step, collect):
        return a * x, {}

    noise = _lat(2)
    g = step_sensitivity(CFG, {}, noise, noise, num_steps=T, guidance_scale=1.0, start="noise", tile_latent=0,
                         model_fn=model_fn, probes=2)
    sig, _ = sampling.flow_schedule(T, CFG.shift)
    ds = np.diff(sig.astype(np.float64))
    want = np.array([ds[t] * np.prod(1 + a * ds[t + 1:]) for t in range(T)]) ** 2
    np.testing.assert_allclose(g, want, rtol=1e-4)

    res = CFG.replace(prediction="lr_residual", residual_scale=0.1)

    def zero_fn(params, x, lr, t, ctx, pooled, step, collect):
        return jnp.zeros_like(x), {}

    g2 = step_sensitivity(res, {}, noise, noise, num_steps=T, guidance_scale=1.0, start="lr", start_sigma=0.5,
                          tile_latent=0, model_fn=zero_fn)
    np.testing.assert_allclose(g2[:-1], 0.0, atol=1e-10)
    np.testing.assert_allclose(g2[-1], 0.1 ** 2, rtol=1e-5)     # c dsigma / sigma = -c at the last step


def test_step_sensitivity_of_the_tiny_transformer_is_positive():
    shapes = param_shapes(CFG)
    rng = np.random.default_rng(3)
    params = jax.tree_util.tree_map(lambda s: (rng.normal(size=s.shape) * 0.05).astype(np.float32), shapes)
    noise = _lat(4)
    ctx, pooled = _lat(5, (1, CFG.context_len, CFG.joint_attention_dim)), _lat(6, (1, CFG.pooled_projection_dim))
    g = step_sensitivity(CFG, params, noise, noise, context=ctx, pooled=pooled, num_steps=3, guidance_scale=1.0,
                         tile_latent=0, probes=1)
    assert g.shape == (3,) and np.all(g > 0) and np.all(np.isfinite(g))
    with pytest.raises(ValueError, match="probes"):
        step_sensitivity(CFG, params, noise, noise, probes=0)


def test_weighted_vatmp_gives_the_sensitive_step_more_bits():
    var = np.array([[1.0, 1.0], [16.0, 1.0]])
    plain = schedule_activation_bits(var, 4, (3, 4, 5, 6, 8))
    assert plain[0].tolist() == [4, 4] and plain[1].tolist() == [5, 3]        # the paper: by variance
    stats = {"a": {"var": var[0]}, "b": {"var": var[1]}}
    w = activation_schedules(stats, ["a", "b"], 4, (3, 4, 5, 6, 8), step_weights=[1.0, 16.0])
    assert w["a"].tolist() == [3, 5] and w["b"].tolist() == [4, 4]
    np.testing.assert_array_equal(activation_schedules(stats, ["a", "b"], 4, (3, 4, 5, 6, 8))["b"], plain[1])
    # QuantConfig.vatmp_step_weights="sensitivity": the weights come from each layer's stats' "step_gain"
    gained = {n: dict(v, step_gain=np.array([1.0, 16.0])) for n, v in stats.items()}
    np.testing.assert_array_equal(activation_schedules(gained, ["a", "b"], 4, (3, 4, 5, 6, 8), use_step_gain=True)["a"],
                                  w["a"])
    with pytest.raises(ValueError, match="step_gains=True"):
        activation_schedules(stats, ["a", "b"], 4, (3, 4, 5, 6, 8), use_step_gain=True)
    with pytest.raises(ValueError, match="vatmp_step_weights"):
        QuantConfig(vatmp_step_weights="bogus").validate()
    for bad, msg in (([1.0], "shape"), ([1.0, np.nan], "finite"), ([1.0, -1.0], ">= 0"), ([0.0, 0.0], "zero")):
        with pytest.raises(ValueError, match=msg):
            check_step_weights(bad, 2)


def test_sens_presets():
    q = QuantConfig.preset("qdit4sr-w4a4-small-sens")
    assert q.vatmp_step_weights == "sensitivity" and q.lowrank_bits == 8 and q.needs_step_gains
    assert QuantConfig.preset("qdit4sr-w4a6-sens").a_bits == 6
    assert not QuantConfig.preset("qdit4sr-w4a4").needs_step_gains
    assert QuantConfig.from_dict(q.to_dict()) == q
    for bad in ("svdquant-w4a4-sens", "qdit4sr-w4a16-sens", "qdit4sr-w4a4-sens-fast"):
        with pytest.raises(ValueError):
            QuantConfig.preset(bad)
