"""quantize(params, "qdit4sr-w4a4") on the tiny DiT4SR: H-SVD branches, VaSMP bits, VaTMP schedules;
the size/ops report and plots of the quantized tree."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit4sr_jax import report
from qdit4sr_jax.config import ModelConfig, QuantConfig
from qdit4sr_jax.model.dit4sr import DiT4SRTransformer, param_shapes
from qdit4sr_jax.model.layers import Linear
from qdit4sr_jax.quant.api import quantize, quantized_layers
from qdit4sr_jax.quant.stats import normalize_calib
from qdit4sr_jax.quant.qdit4sr import activation_schedules, quantize_qdit4sr

T = 4


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.preset("tiny")
    # random numpy params on the abstract tree (fast; every layer non-trivial, also the zero-init controls)
    shapes = param_shapes(cfg)
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: (np.ones(s.shape, np.float32) if str(path[-1].key) == "scale" else
                         (rng.normal(size=s.shape) / np.sqrt(s.shape[0] if len(s.shape) == 2 else 16)).astype(np.float32)),
        shapes)
    model = DiT4SRTransformer(cfg)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 8, 8, cfg.in_channels)), jnp.float32)
    lr = jnp.asarray(rng.normal(size=(1, 8, 8, cfg.in_channels)), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(1, cfg.context_len, cfg.joint_attention_dim)), jnp.float32)
    pooled = jnp.asarray(rng.normal(size=(1, cfg.pooled_projection_dim)), jnp.float32)
    # calibration over T "steps": one forward per timestep (inputs scaled differently per step), one compile
    run = jax.jit(lambda p, xs, t: model.apply({"params": p}, xs, lr, t, ctx, pooled, mutable=["calib"]))
    steps = [(x * (0.5 + t), jnp.full((1,), 1000.0 * (1 - t / T))) for t in range(T)]
    outs = [run(params, xs, ts) for xs, ts in steps]
    calib = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=0), *[normalize_calib(c) for _, c in outs])
    refs = [y for y, _ in outs]                                # float outputs of each calibration step
    return cfg, model, params, calib, (steps, refs, lr, ctx, pooled)


def _avg_w_bits(nodes):
    n = np.array([np.prod(q.shape) for q in nodes.values()], np.float64)
    b = np.array([q.w_bits for q in nodes.values()], np.float64)
    return float(np.sum(n * b) / np.sum(n))


def test_presets_meet_targets_and_run_under_jit(tiny, tmp_path):
    cfg, model, params, calib, (steps, refs, lr, ctx, pooled) = tiny
    for name in ("qdit4sr-w4a4", "qdit4sr-w4a6"):
        qcfg = QuantConfig.preset(name)
        assert qcfg.method == "qdit4sr" and qcfg.hsvd and qcfg.vasmp and qcfg.vatmp and qcfg.lowrank_rank == 32
    # W4A6's schedules (the quantize path is the same as W4A4's below): average exactly 6 over the steps
    names = sorted(calib)
    sched6 = activation_schedules(calib, [n for n in names if n.startswith("transformer_blocks")], 6,
                                  QuantConfig.preset("qdit4sr-w4a6").a_bit_candidates)
    assert all(float(np.mean(s)) == 6.0 for s in sched6.values())
    qcfg = QuantConfig.preset("qdit4sr-w4a4")
    step_w = np.array([1.0, 1.0, 2.0, 8.0])           # VaTMP step weights (quant/stepgain.py) reach the DP
    qp = quantize(params, qcfg, calib, step_weights=step_w)
    nodes = quantized_layers(qp)
    want = activation_schedules(calib, sorted(nodes), 4, qcfg.a_bit_candidates, step_weights=step_w)
    assert all(np.array_equal(np.asarray(q.a_schedule), want[n]) for n, q in nodes.items())
    assert len(nodes) > 20 and all(q.block_u is not None and q.lr_a is not None for q in nodes.values())
    assert _avg_w_bits(nodes) == pytest.approx(4.0, abs=1e-12)           # VaSMP: size-weighted average
    for q in nodes.values():                                              # VaTMP: average over steps
        assert q.a_schedule.shape == (T,) and float(np.mean(np.asarray(q.a_schedule))) == 4.0
    # report from the quantized tree: mixed bits average to the targets, so the size equals the config's
    inv = report.linear_inventory(cfg, (8, 8))
    r_q = report.size_ops(cfg, qcfg, qparams=qp, inventory=inv)
    r_c = report.size_ops(cfg, qcfg, inventory=inv)
    assert r_q["size_M"] == pytest.approx(r_c["size_M"], rel=1e-12) and r_q["ops_G"] > 0
    png = [report.plot_weight_bits(qp, str(tmp_path / "w.png")),
           report.plot_activation_schedule(qp, str(tmp_path / "a.png"))]
    assert all(os.path.getsize(f) > 1000 for f in png)
    # the quantized tree runs in the jitted model; the (traced) step index selects each layer's bits
    fwd = jax.jit(lambda p, xs, ts, step: model.apply({"params": p}, xs, lr, ts, ctx, pooled, step=step))
    for t in (0, T - 1):
        y = fwd(qp, *steps[t], t)
        assert y.shape == refs[t].shape and bool(jnp.all(jnp.isfinite(y)))
        assert float(jnp.linalg.norm(y - refs[t]) / jnp.linalg.norm(refs[t])) < 0.5


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


def test_vasmp_and_branches_reduce_weight_error(tmp_path):
    params = _Toy().init(jax.random.PRNGKey(0), jnp.zeros((1, 64)))["params"]
    base = QuantConfig.preset("qdit4sr-w4a4").replace(
        include=(r"^transformer_blocks",), lowrank_rank=8, hsvd_block=(32, 32), a_bits=None, vatmp=False,
        smooth=False)
    qp, info = quantize_qdit4sr(params, base, return_info=True)
    bits = np.array(list(info["w_bits"].values()))
    sizes = np.array(list(info["size"].values()))
    assert np.sum(bits * sizes) <= 4 * np.sum(sizes) and len(set(bits.tolist())) > 1
    nodes = quantized_layers(qp)
    assert len(nodes) == 8
    for nm, q in nodes.items():
        assert q.w_bits == info["w_bits"][nm] and q.block == (32, 32) and q.lr_a.shape[1] >= 1
    # VaSMP with measured distortion minimises exactly this total error, and all-4-bit is feasible:
    # the mixed tree's actual error (dequantized) is below the uniform 4-bit error of the same residuals
    e_mixed = _sq_err(params, nodes)
    e_uniform = sum(info["sq_err"][nm][4] for nm in info["w_bits"])
    assert e_mixed == pytest.approx(sum(info["sq_err"][nm][b] for nm, b in info["w_bits"].items()), rel=1e-3)
    rtn = quantized_layers(quantize(params, QuantConfig.preset("rtn-w4a16").replace(include=(r"^transformer_blocks",))))
    e_rtn = _sq_err(params, rtn)
    assert e_mixed < e_uniform < e_rtn, (e_mixed, e_uniform, e_rtn)
    # the "model" distortion (n sigma^2 2^-2b) also yields mixed bits within the budget
    from qdit4sr_jax.quant.vasmp import allocate_weight_bits
    mb = allocate_weight_bits(list(info["residual_var"].values()), sizes, 4, base.w_bit_candidates)
    assert np.sum(mb * sizes) <= 4 * np.sum(sizes) and len(set(mb.tolist())) > 1
    errs = report.hsvd_vs_svd_errors(params, base)
    assert set(errs) == set(nodes) and all(0 < h < 1 and 0 < v < 1 for v, h in errs.values())
    assert os.path.getsize(report.plot_hsvd_vs_svd(errs, str(tmp_path / "e.png"))) > 1000


def test_errors(tiny):
    cfg, model, params, calib, _ = tiny
    with pytest.raises(ValueError, match="calibration"):
        quantize(params, QuantConfig.preset("qdit4sr-w4a4"))
    with pytest.raises(ValueError, match="infeasible"):
        quantize(params, QuantConfig.preset("qdit4sr-w4a4").replace(w_bits=2, w_bit_candidates=(3, 4)), calib)
    with pytest.raises(ValueError, match="lowrank_rank"):
        quantize(params, QuantConfig.preset("qdit4sr-w4a4").replace(lowrank_rank=0), calib)
    with pytest.raises(ValueError, match="vatmp=True"):
        quantize(params, QuantConfig.preset("qdit4sr-w4a4").replace(vatmp=False), calib, step_weights=np.ones(T))
    with pytest.raises(ValueError, match="no VaTMP"):
        quantize(params, "w4a4", step_weights=np.ones(T))
    with pytest.raises(ValueError, match="step_gains=True"):      # VaTMP runs before any SVD: fails at once
        quantize(params, "qdit4sr-w4a4-sens", calib)
    with pytest.raises(ValueError, match="shape"):
        quantize(params, "qdit4sr-w4a4", calib, step_weights=np.ones(T + 1))
