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


def random_params(shapes, seed: int = 0):
    """Random weights of the given shapes (a params tree of ShapeDtypeStructs, e.g. `param_shapes(cfg)`), drawn in
    numpy (no init compile): N(0, 1) / sqrt(fan-in) for kernels, / sqrt(10) for vectors; control layers non-zero too."""
    r = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda l: jnp.asarray(r.standard_normal(l.shape) / np.sqrt(np.prod(l.shape[:-1]) if l.ndim > 1 else 10),
                              l.dtype), shapes)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def prepared_paper_layer(k, n, **prepare_kw):
    """Abstract (eval_shape) prepared W4A4 paper layer [k -> n] (rotation over all of k with signs, int group scales,
    rank-26 low-rank + 256 x 256 H-SVD blocks with int8 factors, a 40-step VaTMP schedule), prepared with
    `prepare_kw` (`kernels.prepare_weight`'s arguments)."""
    from qdit4sr_jax.quant.kernels import prepare_weight
    from qdit4sr_jax.quant.qweight import make_qweight
    nbo, nbi = -(-n // 256), -(-k // 256)
    sched = np.tile(np.array([4, 5, 3, 4], np.int32), 10)

    def build(w):
        return prepare_weight(make_qweight(
            w, w_bits=4, group_size=64, group_scale="int", a_bits=4, execution="fused", rotate=k, signs=True,
            lr_a=jnp.zeros((k, 26)), lr_b=jnp.zeros((26, n)), block_u=jnp.zeros((nbo, nbi, 256)),
            block_v=jnp.zeros((nbo, nbi, 256)), block=(256, 256), lowrank_bits=8, a_schedule=sched), **prepare_kw)

    return jax.eval_shape(build, jax.ShapeDtypeStruct((n, k), jnp.float32))
