"""Embeddings of the SD3 MM-DiT (diffusers `PatchEmbed`, `CombinedTimestepTextProjEmbeddings`), NHWC.

The SD3 positional table (diffusers registers a [1, max^2, D] buffer) is recomputed here, not stored:
`sincos_pos_embed_2d` builds only the centre crop a given token grid needs.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from qdit4sr_jax.model.layers import Linear


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[M] positions -> [M, dim] = [sin(pos * omega), cos(pos * omega)], omega = 10000^(-2i/dim), float64."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000.0 ** omega
    out = np.outer(pos.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _pos_axes(dim: int, h: int, w: int, max_size: int, base_size: int, interpolation_scale: float = 1.0):
    """The two 1D halves of the cropped SD3 table: columns [w, dim/2] and rows [h, dim/2], float64."""
    if dim % 4:
        raise ValueError(f"positional embedding dim {dim} must be divisible by 4")
    if h > max_size or w > max_size:
        raise ValueError(f"token grid {h}x{w} exceeds pos_embed_max_size {max_size}; use a smaller "
                         f"latent (tile it) or a config with a larger pos_embed_max_size")
    top, left = (max_size - h) // 2, (max_size - w) // 2
    # positions as diffusers computes them: float32 arange / (max/base) / interpolation_scale
    step = np.float32(max_size / base_size)
    grid = np.arange(max_size, dtype=np.float32) / step / np.float32(interpolation_scale)
    return _sincos_1d(dim // 2, grid[left:left + w]), _sincos_1d(dim // 2, grid[top:top + h])


def sincos_pos_embed_2d(dim: int, h: int, w: int, max_size: int, base_size: int,
                        interpolation_scale: float = 1.0) -> np.ndarray:
    """SD3 2D sin-cos positional embedding of an h x w token grid, cropped from the centre of the
    max_size x max_size table exactly as diffusers' `PatchEmbed.cropped_pos_embed`.

    Returns float32 [h * w, dim] (row-major tokens). Channels [:dim/2] encode the column, [dim/2:] the row.
    """
    emb_c, emb_r = _pos_axes(dim, h, w, max_size, base_size, interpolation_scale)
    emb = np.concatenate([np.broadcast_to(emb_c[None], (h, w, dim // 2)),
                          np.broadcast_to(emb_r[:, None], (h, w, dim // 2))], axis=-1)
    return emb.reshape(h * w, dim).astype(np.float32)


def timestep_embedding(t, dim: int = 256, max_period: float = 10000.0):
    """diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`: t [B] -> float32 [B, dim]
    laid out [cos, sin]."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class PatchEmbed(nn.Module):
    """diffusers `PatchEmbed` with SD3 cropping: x [B, H, W, C] -> tokens [B, (H/p)(W/p), D] + pos table.

    params: proj/kernel [p, p, C, D] (HWIO), proj/bias [D]. The positional table is a constant.
    """
    embed_dim: int
    patch_size: int
    pos_embed_max_size: int
    base_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        B, H, W, _ = x.shape
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} must be divisible by patch_size {p}")
        y = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=self.param_dtype, name="proj")(x)            # [B, h, w, D]
        h, w = H // p, W // p
        # the table is built in-graph from its two small 1D halves (no [h*w, D] constant in the HLO)
        emb_c, emb_r = _pos_axes(self.embed_dim, h, w, self.pos_embed_max_size, self.base_size)
        half = self.embed_dim // 2
        emb_c = jnp.asarray(emb_c, jnp.float32)
        emb_r = jnp.asarray(emb_r, jnp.float32)
        pos = jnp.concatenate([jnp.broadcast_to(emb_c[None], (h, w, half)),
                               jnp.broadcast_to(emb_r[:, None], (h, w, half))], axis=-1)
        return (y + pos.astype(self.dtype)[None]).reshape(B, h * w, self.embed_dim)


class MLPEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers `TimestepEmbedding` / `PixArtAlphaTextProjection(act_fn='silu')`)."""
    features: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, step=None):
        x = Linear(self.features, param_dtype=self.param_dtype, name="linear_1")(x, step=step)
        x = nn.silu(x)
        return Linear(self.features, param_dtype=self.param_dtype, name="linear_2")(x, step=step)


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """temb = timestep_embedder(sincos_256(t)) + text_embedder(pooled): t [B], pooled [B, P] -> [B, D]."""
    embed_dim: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, timestep, pooled, step=None):
        t = timestep_embedding(timestep, 256).astype(pooled.dtype)
        t = MLPEmbedding(self.embed_dim, self.param_dtype, name="timestep_embedder")(t, step=step)
        c = MLPEmbedding(self.embed_dim, self.param_dtype, name="text_embedder")(pooled, step=step)
        return t + c
