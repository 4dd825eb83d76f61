"""quantize() on the tiny DiT4SR transformer: tree paths, jit, monotone error W4A4 -> W8A8, int mode,
calibration through the whole sampler (per-step stats) feeding a smoothing baseline and a step schedule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params, rel_err
import qdit4sr_jax
from qdit4sr_jax.config import ModelConfig
from qdit4sr_jax.model.dit4sr import DiT4SRTransformer, param_shapes
from qdit4sr_jax.quant.api import quantized_layers
from qdit4sr_jax.quant.qweight import QuantizedWeight

CFG = ModelConfig.preset("tiny")
T = 3


@pytest.fixture(scope="module")
def tiny():
    shapes = param_shapes(CFG)
    params = random_params(shapes)
    lat = lambda s, shape: jnp.asarray(np.random.default_rng(s).normal(size=shape), jnp.float32)
    inputs = dict(lr=lat(1, (2, 16, 16, 4)), noise=lat(2, (2, 16, 16, 4)), ctx=lat(3, (2, 7, 24)),
                  pool=lat(4, (2, 20)))
    return params, inputs


_MODEL = DiT4SRTransformer(CFG)
FWD = jax.jit(lambda p, x, lr, ctx, pool, step: _MODEL.apply({"params": p}, x, lr, jnp.full((x.shape[0],), 700.0),
                                                              ctx, pool, step=step))


@pytest.mark.slow
def test_quantize_tiny_model_paths_jit_and_monotone_error(tiny):
    """W4A4 -> W4A6 -> W4A8 -> W8A8. The W4 points come from one W4 tree whose layers all carry the
    activation schedule [4, 6, 8] (one compile; step t selects the bits), W8A8 from its preset."""
    params, d = tiny
    args = (d["noise"], d["lr"], d["ctx"], d["pool"])
    ref = FWD(params, *args, 0)
    names = [p for p in quantized_layers(qdit4sr_jax.quantize(params, "w8a8"))]
    q4 = qdit4sr_jax.quantize(params, "w4a4", a_schedules={n: np.array([4, 6, 8], np.int32) for n in names})
    kp = lambda t: [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        t, is_leaf=lambda x: isinstance(x, QuantizedWeight))[0]]
    assert kp(q4) == kp(params)                                            # tree paths unchanged
    layers = quantized_layers(q4)
    assert "transformer_blocks_0/attn/to_q_control" in layers and "transformer_blocks_2/ff/net_2" in layers
    assert "transformer_blocks_0/norm1/linear" in layers and "transformer_blocks_0/attn2/to_q" in layers
    assert all(p.startswith("transformer_blocks_") for p in layers)       # embedders, norm_out, proj_out: float
    assert not isinstance(q4["proj_out"]["kernel"], QuantizedWeight)
    errs = [rel_err(FWD(q4, *args, t), ref) for t in range(3)]
    errs.append(rel_err(FWD(qdit4sr_jax.quantize(params, "w8a8"), *args, 0), ref))
    assert all(np.isfinite(errs))
    assert errs[0] > errs[1] > errs[2] > errs[3] > 0, errs


@pytest.mark.slow
def test_sampler_calibration_smoothing_and_schedule(tiny):
    params, d = tiny
    calib = qdit4sr_jax.calibrate(CFG, params, d["lr"], d["noise"], context=d["ctx"], pooled=d["pool"],
                                  num_steps=T, guidance_scale=1.0, tile_latent=0)
    st = calib["transformer_blocks_1/attn/to_k"]
    assert st["ch_absmax"].shape == (T, CFG.hidden_size) and st["var"].shape == (T,)
    assert not np.allclose(np.asarray(st["var"][0]), np.asarray(st["var"][-1]))      # steps differ
    name = "transformer_blocks_0/ff/net_2"
    q = qdit4sr_jax.quantize(params, "smoothquant-w8a8", calib, a_schedules={name: np.array([8, 2, 8], np.int32)})
    assert quantized_layers(q)[name].smooth is not None
    # the schedule's 2-bit step makes that step (and only it) much worse (same inputs at every step here)
    e = lambda s: rel_err(FWD(q, d["noise"], d["lr"], d["ctx"], d["pool"], s),
                          FWD(params, d["noise"], d["lr"], d["ctx"], d["pool"], s))
    assert e(1) > 3 * e(0) and e(2) == pytest.approx(e(0), rel=1e-6)
