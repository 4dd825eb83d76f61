"""The Flax DiT4SR transformer: shapes, options, full-size parameter count (eval_shape only)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit4sr_jax.config import ModelConfig
from qdit4sr_jax.model.dit4sr import DiT4SRTransformer, init_params, param_shapes

TINY = ModelConfig.preset("tiny")


def _paths(tree, prefix=""):
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            yield from _paths(v, p)
        else:
            yield p, v


def _inputs(cfg, B=2, H=8, W=6, L=7, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    return (jax.random.normal(k[0], (B, H, W, cfg.in_channels)), jax.random.normal(k[1], (B, H, W, cfg.in_channels)),
            jax.random.uniform(k[2], (B,), maxval=1000.0), jax.random.normal(k[3], (B, L, cfg.joint_attention_dim)),
            jax.random.normal(k[4], (B, cfg.pooled_projection_dim)))


def _randomize(params, seed=1):
    """Non-zero values everywhere (the zero-initialised control layers too); leaves may be abstract."""
    r = np.random.default_rng(seed)
    scale = lambda x: 1 / np.sqrt(x.shape[0] if x.ndim == 2 else (9 if x.ndim == 4 else 25))
    return jax.tree_util.tree_map(lambda x: jnp.asarray(r.standard_normal(x.shape) * scale(x), x.dtype), params)


@functools.lru_cache(maxsize=None)
def _jitted(cfg, calib=False):
    """One compiled forward per config: f(params, x, lr, t, ctx, pooled, step)."""
    return jax.jit(lambda p, x, lr, t, ctx, pooled, step: DiT4SRTransformer(cfg).apply(
        {"params": p}, x, lr, t, ctx, pooled, step=step, mutable=["calib"] if calib else False))


def _apply(cfg, params, x, lr, t, ctx=None, pooled=None, step=0, calib=False, jit=False):
    """jit=False runs eagerly: op kernels are shared across configs, cheaper on CPU than a jit per config."""
    if jit:
        return _jitted(cfg, calib)(params, x, lr, t, ctx, pooled, jnp.int32(step))
    return DiT4SRTransformer(cfg).apply({"params": params}, x, lr, t, ctx, pooled, step=step,
                                        mutable=["calib"] if calib else False)


@pytest.fixture(scope="module")
def tiny_params():
    return _randomize(param_shapes(TINY))


def test_forward_shapes_nonsquare_and_jit_with_traced_step(tiny_params):
    x, lr, t, ctx, pooled = _inputs(TINY)
    out = _apply(TINY, tiny_params, x, lr, t, ctx, pooled, step=3, jit=True)
    assert out.shape == (2, 8, 6, TINY.out_channels) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out, _apply(TINY, tiny_params, x, lr, t, ctx, pooled, step=0, jit=True), rtol=0, atol=0)
    # the LR latent matters, and only through the LR stream
    out2 = _apply(TINY, tiny_params, x, lr * 0.5, t, ctx, pooled, jit=True)
    np.testing.assert_allclose(_apply(TINY, tiny_params, x, lr, t, ctx, pooled), out, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(out2 - out))) > 1e-4


def test_init_zeroes_control_layers_like_dit4sr():
    p = init_params(TINY, jax.random.PRNGKey(0))
    b = p["transformer_blocks_0"]
    for n in ("to_q_control", "to_k_control", "to_v_control"):
        for a in ("attn", "attn2"):
            assert not np.any(b[a][n]["kernel"]) and not np.any(b[a][n]["bias"])
    assert not np.any(b["ff"]["control_conv"]["kernel"])
    assert np.any(b["attn"]["to_out_control"]["kernel"])


def test_bfloat16_compute_close_to_float32(tiny_params):
    x, lr, t, ctx, pooled = _inputs(TINY)
    ref = _apply(TINY, tiny_params, x, lr, t, ctx, pooled)
    out = _apply(TINY.replace(dtype="bfloat16"), tiny_params, x, lr, t, ctx, pooled, jit=True)
    assert out.dtype == jnp.float32
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 5e-2


def test_learned_context_mode_and_input_errors():
    cfg = TINY.replace(context_mode="learned")
    p = _randomize(param_shapes(cfg))
    assert p["learned_context"].shape == (cfg.context_len, cfg.joint_attention_dim)
    assert p["learned_pooled"].shape == (cfg.pooled_projection_dim,)
    x, lr, t, ctx, pooled = _inputs(cfg)
    m = DiT4SRTransformer(cfg)
    out = _apply(cfg, p, x, lr, t)
    explicit = _apply(cfg, p, x, lr, t, jnp.broadcast_to(p["learned_context"], (2,) + p["learned_context"].shape),
                       jnp.broadcast_to(p["learned_pooled"], (2, cfg.pooled_projection_dim)))
    np.testing.assert_allclose(out, explicit, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="required unless"):
        DiT4SRTransformer(TINY).apply({"params": p}, x, lr, t)
    with pytest.raises(ValueError, match="lr_latent"):
        m.apply({"params": p}, x, None, t)
    with pytest.raises(ValueError, match="NHWC"):
        m.apply({"params": p}, x[..., :3], lr, t)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        big = jnp.zeros((1, 2 * TINY.pos_embed_max_size + 2, 4, TINY.in_channels))
        m.apply({"params": p}, big, big, t[:1])


def test_calibration_sow_paths_match_linear_params(tiny_params):
    x, lr, t, ctx, pooled = _inputs(TINY)
    _, state = _apply(TINY, tiny_params, x, lr, t, ctx, pooled, calib=True)
    sown = {p.rsplit("/act", 1)[0] for p, _ in _paths(jax.tree_util.tree_map(lambda a: 0, state["calib"],
                                                                               is_leaf=lambda v: isinstance(v, tuple)))}
    linears = {p[: -len("/kernel")] for p, v in _paths(tiny_params) if p.endswith("/kernel") and v.ndim == 2}
    assert sown == linears


def test_full_size_parameter_count():
    """dit4sr preset via eval_shape. PyTorch DiT4SR: 2,716,814,144 parameters (+ the 226,492,416-value
    pos_embed buffer we recompute); we drop the 13 dual-attention attn2 context projections its forward never
    uses (13 x 9,443,456 = 122,764,928) -> 2,594,049,216."""
    s = param_shapes(ModelConfig.preset("dit4sr"))
    leaves = list(_paths(jax.tree_util.tree_map(lambda a: a, s)))
    n = sum(int(np.prod(v.shape)) for _, v in leaves)
    assert n == 2_716_814_144 - 13 * 9_443_456 == 2_594_049_216
    kernels = [v for p, v in leaves if p.endswith("/kernel")]
    assert sum(v.ndim == 2 for v in kernels) == 540          # 592 nn.Linear - 52 unused (attn2 context)
    assert sum(v.ndim == 4 for v in kernels) == 25           # patch embedding + 24 depthwise control convs
    assert all(v.dtype == jnp.float32 for _, v in leaves)


def test_full_size_forward_shapes_eval_shape():
    """The dit4sr preset traces end to end at full size on a non-square latent (nothing computed)."""
    cfg = ModelConfig.preset("dit4sr")
    p = param_shapes(cfg)
    S = jax.ShapeDtypeStruct
    x = S((1, 128, 96, 16), jnp.float32)
    out = jax.eval_shape(lambda p, x, lr, t, c, pl: DiT4SRTransformer(cfg.replace(dtype="bfloat16")).apply(
        {"params": p}, x, lr, t, c, pl, step=0), p, x, x, S((1,), jnp.float32), S((1, 333, 4096), jnp.float32),
        S((1, 2048), jnp.float32))
    assert out.shape == (1, 128, 96, 16) and out.dtype == jnp.float32
