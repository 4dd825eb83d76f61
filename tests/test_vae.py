"""Autoencoders: space-to-depth exactness, SD3 VAE shapes/sampling, input validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit4sr_jax.config import ModelConfig, VAEConfig
from qdit4sr_jax.model import vae

S2D = VAEConfig(kind="space_to_depth", s2d_factor=4)
TINY = ModelConfig.preset("tiny").vae


def test_space_to_depth_round_trip_and_channel_order():
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 12, 3), minval=-1, maxval=1)
    z = vae.encode(S2D, {}, x)
    assert z.shape == (2, 2, 3, 48) and S2D.channels == 48 and S2D.downsample == 4
    xn, zn = np.asarray(x), np.asarray(z)
    # torch pixel_unshuffle order: channel c*f*f + di*f + dj
    for (b, i, j, c, di, dj) in [(0, 0, 0, 0, 0, 0), (1, 1, 2, 2, 3, 1), (0, 1, 0, 1, 2, 3)]:
        assert zn[b, i, j, c * 16 + di * 4 + dj] == xn[b, i * 4 + di, j * 4 + dj, c]
    np.testing.assert_array_equal(np.asarray(vae.decode(S2D, {}, z)), xn)
    assert vae.init(S2D, jax.random.PRNGKey(0)) == {}


def test_sd3_tiny_shapes_and_sampling():
    params = vae.init(TINY, jax.random.PRNGKey(0), 16)
    x = jax.random.uniform(jax.random.PRNGKey(1), (1, 16, 24, 3), minval=-1, maxval=1)
    zm = vae.encode_jit(TINY, params, x, sample=False)
    assert zm.shape == (1, 8, 12, 4) and zm.dtype == jnp.float32
    za = vae.encode_jit(TINY, params, x, jax.random.PRNGKey(5))
    zb = vae.encode_jit(TINY, params, x, jax.random.PRNGKey(5))
    zc = vae.encode_jit(TINY, params, x, jax.random.PRNGKey(6))
    np.testing.assert_array_equal(np.asarray(za), np.asarray(zb))
    assert not np.allclose(za, zc) and not np.allclose(za, zm)
    # the sample is mean + std * eps, then shifted and scaled
    mean, logvar = vae.encode_moments(TINY, params, x)
    eps = jax.random.normal(jax.random.PRNGKey(5), mean.shape)
    want = (mean + jnp.exp(0.5 * logvar) * eps - TINY.shift_factor) * TINY.scaling_factor
    np.testing.assert_allclose(np.asarray(za), np.asarray(want), rtol=1e-5, atol=1e-6)
    img = vae.decode_jit(TINY, params, za)
    assert img.shape == (1, 16, 24, 3) and np.isfinite(np.asarray(img)).all()


def test_full_size_param_count():
    shapes = jax.eval_shape(lambda: vae.init(VAEConfig(), jax.random.PRNGKey(0)))
    assert sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(shapes)) == 83_819_683
    assert shapes["encoder"]["conv_out"]["kernel"].shape == (3, 3, 512, 32)


def test_bad_inputs():
    params = vae.init(TINY, jax.random.PRNGKey(0), 16)
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode(TINY, params, jnp.zeros((1, 15, 16, 3)), sample=False)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        vae.encode(TINY, params, jnp.zeros((1, 16, 16)), sample=False)
    with pytest.raises(ValueError, match="needs an rng"):
        vae.encode(TINY, params, jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match=r"\[B, h, w, 4\]"):
        vae.decode(TINY, params, jnp.zeros((1, 4, 4, 16)))
    with pytest.raises(ValueError, match="unknown VAE kind"):
        vae.encode(VAEConfig(kind="vq"), {}, jnp.zeros((1, 16, 16, 3)))


def test_chunked_attention_equals_full():
    r = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(ri, (2, 37, 1, 8)) for ri in r)
    full = jax.nn.dot_product_attention(q, k, v)
    np.testing.assert_allclose(np.asarray(vae.chunked_attention(q, k, v, 8)), np.asarray(full), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vae.chunked_attention(q, k, v, 64)), np.asarray(full), rtol=1e-6)
