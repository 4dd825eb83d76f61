"""quantize(params, "qdit4sr-w4a4") on the tiny DiT4SR: H-SVD branches, VaSMP bits, VaTMP schedules."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit4sr_jax.config import ModelConfig, QuantConfig
from qdit4sr_jax.model.dit4sr import DiT4SRTransformer, init_params
from qdit4sr_jax.model.layers import Linear
from qdit4sr_jax.quant.api import quantize, quantized_layers
from qdit4sr_jax.quant.stats import normalize_calib
from qdit4sr_jax.quant.qdit4sr import quantize_qdit4sr

T = 4


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.preset("tiny")
    params = init_params(cfg, jax.random.PRNGKey(0))
    # random (not zero-initialised) control layers, so every layer has a non-trivial residual
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree_util.tree_unflatten(tree, [
        l if l.ndim != 2 else l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
    model = DiT4SRTransformer(cfg)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 8, 8, cfg.in_channels)), jnp.float32)
    lr = jnp.asarray(rng.normal(size=(1, 8, 8, cfg.in_channels)), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(1, cfg.context_len, cfg.joint_attention_dim)), jnp.float32)
    pooled = jnp.asarray(rng.normal(size=(1, cfg.pooled_projection_dim)), jnp.float32)
    # calibration over T "steps": one forward per timestep (inputs scaled differently per step), one compile
    run = jax.jit(lambda p, xs, t: model.apply({"params": p}, xs, lr, t, ctx, pooled, mutable=["calib"])[1])
    per_step = [normalize_calib(run(params, x * (0.5 + t), jnp.full((1,), 1000.0 * (1 - t / T))))
                for t in range(T)]
    calib = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=0), *per_step)
    return cfg, model, params, calib, (x, lr, ctx, pooled)


def _avg_w_bits(nodes):
    n = np.array([np.prod(q.shape) for q in nodes.values()], np.float64)
    b = np.array([q.w_bits for q in nodes.values()], np.float64)
    return float(np.sum(n * b) / np.sum(n))


def test_presets_meet_targets_and_run_under_jit(tiny):
    cfg, model, params, calib, (x, lr, ctx, pooled) = tiny
    for name, target_a in (("qdit4sr-w4a4", 4), ("qdit4sr-w4a6", 6)):
        qcfg = QuantConfig.preset(name)
        assert qcfg.hsvd and qcfg.vasmp and qcfg.vatmp and qcfg.lowrank_rank == 32
        qp = quantize(params, qcfg, calib)
        nodes = quantized_layers(qp)
        assert len(nodes) > 20 and all(q.block_u is not None and q.lr_a is not None for q in nodes.values())
        assert _avg_w_bits(nodes) == pytest.approx(4.0, abs=1e-12)       # VaSMP: size-weighted average
        for q in nodes.values():                                          # VaTMP: average over steps
            assert q.a_schedule.shape == (T,) and float(np.mean(np.asarray(q.a_schedule))) == target_a
    # the last quantized tree (W4A6) runs in the jitted model; the step index selects the bits
    fwd = jax.jit(lambda p, step: model.apply({"params": p}, x, lr, jnp.full((1,), 500.0), ctx, pooled, step=step))
    ref = fwd(params, 0)
    for step in (0, T - 1):
        y = fwd(qp, step)
        assert y.shape == ref.shape and bool(jnp.all(jnp.isfinite(y)))
        assert float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)) < 0.5


class _Toy(nn.Module):
    """Linear layers with DiT4SR-like paths and different weight scales per layer."""
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            for nm, d, s in (("attn_to_q", 64, 1.0), ("attn_to_v", 64, 0.2), ("ff_net_0", 256, 0.5),
                             ("ff_net_2", 64, 2.0)):
                x = Linear(d, name=f"transformer_blocks_{i}_{nm}",
                           kernel_init=nn.initializers.normal(s / np.sqrt(x.shape[-1])))(x)
        return x


def _sq_err(params, nodes):
    return sum(float(np.sum((np.asarray(q.dequantize()) - np.asarray(params[nm]["kernel"])) ** 2))
               for nm, q in nodes.items())


def test_vasmp_and_branches_reduce_weight_error():
    params = _Toy().init(jax.random.PRNGKey(0), jnp.zeros((1, 64)))["params"]
    base = QuantConfig.preset("qdit4sr-w4a4").replace(
        include=(r"^transformer_blocks",), lowrank_rank=8, hsvd_block=(32, 32), a_bits=None, vatmp=False)
    qp, info = quantize_qdit4sr(params, base, return_info=True)
    bits = np.array(list(info["w_bits"].values()))
    sizes = np.array(list(info["size"].values()))
    assert np.sum(bits * sizes) <= 4 * np.sum(sizes) and len(set(bits.tolist())) > 1
    nodes = quantized_layers(qp)
    assert len(nodes) == 8
    for nm, q in nodes.items():
        assert q.w_bits == info["w_bits"][nm] and q.block == (32, 32) and q.lr_a.shape[1] >= 1
    # VaSMP with measured distortion minimises exactly this total error, and all-4-bit is feasible
    assert sum(info["sq_err"][nm][b] for nm, b in info["w_bits"].items()) <= \
        sum(info["sq_err"][nm][4] for nm in info["w_bits"]) * (1 + 1e-9)
    model = quantize(params, base.replace(vasmp_distortion="model"))
    assert {q.w_bits for q in quantized_layers(model).values()} != {4}
    uniform = quantized_layers(quantize(params, base.replace(vasmp=False)))
    rtn = quantized_layers(quantize(params, QuantConfig.preset("rtn-w4a16").replace(include=(r"^transformer_blocks",))))
    e_mixed, e_uniform, e_rtn = _sq_err(params, nodes), _sq_err(params, uniform), _sq_err(params, rtn)
    assert e_mixed < e_uniform < e_rtn, (e_mixed, e_uniform, e_rtn)


def test_errors(tiny):
    cfg, model, params, calib, _ = tiny
    with pytest.raises(ValueError, match="calibration"):
        quantize(params, QuantConfig.preset("qdit4sr-w4a4"))
    with pytest.raises(ValueError, match="infeasible"):
        quantize(params, QuantConfig.preset("qdit4sr-w4a4").replace(w_bits=2, w_bit_candidates=(3, 4)), calib)
    with pytest.raises(ValueError, match="lowrank_rank"):
        quantize(params, QuantConfig.preset("qdit4sr-w4a4").replace(lowrank_rank=0), calib)
