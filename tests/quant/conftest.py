"""Shared fixtures for the quantization tests: a toy Flax model made of `layers.Linear` with DiT4SR-like
module paths (transformer_blocks_{i}/attn/to_q, .../ff/net_2, plus an embedder and proj_out)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit4sr_jax.model.layers import Linear


class _Attn(nn.Module):
    d: int

    @nn.compact
    def __call__(self, x, step=None):
        q = Linear(self.d, name="to_q")(x, step=step)
        v = Linear(self.d, name="to_v")(x, step=step)
        return Linear(self.d, name="to_out_0")(jax.nn.gelu(q) + v, step=step)


class _FF(nn.Module):
    d: int

    @nn.compact
    def __call__(self, x, step=None):
        h = jax.nn.gelu(Linear(4 * self.d, name="net_0_proj")(x, step=step))
        return Linear(self.d, name="net_2")(h, step=step)


class _Block(nn.Module):
    d: int

    @nn.compact
    def __call__(self, x, step=None):
        x = x + _Attn(self.d, name="attn")(x, step=step)
        return x + _FF(self.d, name="ff")(x, step=step)


class ToyDiT(nn.Module):
    """x [B, T, d_in] -> [B, T, d_in]; `n_blocks` residual blocks of width d."""
    d_in: int = 24
    d: int = 64
    n_blocks: int = 2

    @nn.compact
    def __call__(self, x, step=None):
        h = Linear(self.d, name="context_embedder")(x, step=step)
        for i in range(self.n_blocks):
            h = _Block(self.d, name=f"transformer_blocks_{i}")(h, step=step)
        return Linear(self.d_in, name="proj_out")(h, step=step)


@pytest.fixture(scope="session")
def toy():
    """(module, params, x [2, 16, 24]) with a few planted outlier input channels."""
    model = ToyDiT()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 16, 24)).astype(np.float32)
    x[..., 3] *= 8.0
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(x))["params"]
    return model, params, jnp.asarray(x)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
