"""Autoencoders: SD3's `AutoencoderKL` (Flax linen, NHWC) and a parameter-free space-to-depth AE.

Module and parameter names mirror diffusers' `AutoencoderKL` (`encoder.down_blocks.0.resnets.1.conv1.weight`
-> `encoder/down_blocks_0/resnets_1/conv1/kernel`). SD3 variant: no quant_conv / post_quant_conv,
`latent_channels` (16) latent channels, scaling and shift factors from `VAEConfig`.

Functional interface shared by both kinds (``vae_cfg`` is a `VAEConfig`, static under jit):
  init(vae_cfg, rng, image_size=64)                 -> params ({} for space_to_depth)
  encode(vae_cfg, params, x, rng=None, sample=True) -> z  [B, H/f, W/f, vae_cfg.channels] float32,
                                                       z = (latent - shift_factor) * scaling_factor
  decode(vae_cfg, params, z)                        -> x  [B, H, W, 3] float32, nominally in [-1, 1]
  encode_moments(vae_cfg, params, x)                -> (mean, logvar), unscaled
Images are [B, H, W, 3] in [-1, 1]; H and W must be multiples of ``vae_cfg.downsample``.
The space-to-depth AE is exact pixel (un)shuffle (torch `pixel_unshuffle` channel order c*f*f + i*f + j)
with no shift or scale: its latents are the pixels themselves.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qdit4sr_jax.config import VAEConfig
from qdit4sr_jax.model.layers import Linear

_EPS = 1e-6  # diffusers' resnet / group-norm epsilon in the VAE


def _conv(features, name, kernel=3, stride=1, padding=1):
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((padding, padding), (padding, padding)) if padding else "VALID", name=name)


def _group_norm(groups, name):
    return nn.GroupNorm(num_groups=groups, epsilon=_EPS, use_fast_variance=False, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D without time embedding: x [B,H,W,Cin] -> [B,H,W,out_channels]."""
    out_channels: int
    groups: int

    @nn.compact
    def __call__(self, x):
        h = nn.silu(_group_norm(self.groups, "norm1")(x))
        h = _conv(self.out_channels, "conv1")(h)
        h = nn.silu(_group_norm(self.groups, "norm2")(h))
        h = _conv(self.out_channels, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, "conv_shortcut", kernel=1, padding=0)(x)
        return x + h


def chunked_attention(q, k, v, chunk: int):
    """Softmax attention, queries in chunks of `chunk` (bounds the [T_q, T_k] logits memory):
    q, k, v [B, T, 1, C] float32 -> [B, T, 1, C]."""
    T = q.shape[1]
    if T <= chunk:
        return jax.nn.dot_product_attention(q, k, v)
    n = -(-T // chunk)
    qp = jnp.pad(q, ((0, 0), (0, n * chunk - T), (0, 0), (0, 0)))
    qc = jnp.moveaxis(qp.reshape(q.shape[0], n, chunk, *q.shape[2:]), 1, 0)      # [n, B, chunk, 1, C]
    o = jax.lax.map(lambda qq: jax.nn.dot_product_attention(qq, k, v), qc)
    return jnp.moveaxis(o, 0, 1).reshape(q.shape[0], n * chunk, *q.shape[2:])[:, :T]


class VAEAttention(nn.Module):
    """Single-head spatial self-attention of the VAE mid block (group norm, residual): [B,H,W,C] -> same.
    Queries are processed `chunk` at a time beyond that many tokens (a 2048^2 image has 65,536)."""
    groups: int
    chunk: int = 4096

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = _group_norm(self.groups, "group_norm")(x).reshape(b, hh * ww, 1, c)
        q = Linear(c, name="to_q")(h)
        k = Linear(c, name="to_k")(h)
        v = Linear(c, name="to_v")(h)
        o = chunked_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), self.chunk)
        o = Linear(c, name="to_out_0")(o.astype(x.dtype).reshape(b, hh * ww, c))
        return x + o.reshape(b, hh, ww, c)


class MidBlock(nn.Module):
    """UNetMidBlock2D: resnets_0, attentions_0, resnets_1."""
    channels: int
    groups: int

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock2D(self.channels, self.groups, name="resnets_0")(x)
        x = VAEAttention(self.groups, name="attentions_0")(x)
        return ResnetBlock2D(self.channels, self.groups, name="resnets_1")(x)


class Downsample2D(nn.Module):
    """Pad (0,1,0,1) with zeros, 3x3 conv stride 2 (diffusers Downsample2D, padding=0)."""
    channels: int

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, "conv", stride=2, padding=0)(x)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling then 3x3 conv."""
    channels: int

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, "conv")(x)


class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets (resnets_j), then an optional stride-2 downsampler (downsamplers_0)."""
    channels: int
    groups: int
    num_layers: int
    add_downsample: bool

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.channels, self.groups, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.channels, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets (resnets_j), then an optional nearest-2x upsampler (upsamplers_0)."""
    channels: int
    groups: int
    num_layers: int
    add_upsample: bool

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.channels, self.groups, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.channels, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """x [B,H,W,in_channels] -> moments [B,H/f,W/f,2*latent_channels] (mean, logvar)."""
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x):
        cfg, g = self.cfg, self.cfg.norm_num_groups
        x = _conv(cfg.block_out_channels[0], "conv_in")(x)
        n = len(cfg.block_out_channels)
        for i, ch in enumerate(cfg.block_out_channels):
            x = DownEncoderBlock2D(ch, g, cfg.layers_per_block, i < n - 1, name=f"down_blocks_{i}")(x)
        x = MidBlock(cfg.block_out_channels[-1], g, name="mid_block")(x)
        x = nn.silu(_group_norm(g, "conv_norm_out")(x))
        return _conv(2 * cfg.latent_channels, "conv_out")(x)


class Decoder(nn.Module):
    """z [B,h,w,latent_channels] (unscaled) -> image [B,h*f,w*f,in_channels]."""
    cfg: VAEConfig

    @nn.compact
    def __call__(self, z):
        cfg, g = self.cfg, self.cfg.norm_num_groups
        rev = tuple(reversed(cfg.block_out_channels))
        x = _conv(rev[0], "conv_in")(z)
        x = MidBlock(rev[0], g, name="mid_block")(x)
        for i, ch in enumerate(rev):
            x = UpDecoderBlock2D(ch, g, cfg.layers_per_block + 1, i < len(rev) - 1, name=f"up_blocks_{i}")(x)
        x = nn.silu(_group_norm(g, "conv_norm_out")(x))
        return _conv(cfg.in_channels, "conv_out")(x)


class SD3VAE(nn.Module):
    """AutoencoderKL (SD3: no quant convs). Params {'encoder': ..., 'decoder': ...}.

    `encode_moments(x)` -> (mean, logvar) [B,h,w,latent_channels]; `decode(z)` unscaled latents -> image.
    """
    cfg: VAEConfig

    def setup(self):
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)

    def encode_moments(self, x):
        m = self.encoder(x)
        mean, logvar = jnp.split(m, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        return self.decoder(z)

    def __call__(self, x):
        mean, _ = self.encode_moments(x)
        return self.decode(mean)


class SpaceToDepthAE:
    """Parameter-free autoencoder: pixel unshuffle/shuffle of factor f (latent channels 3*f*f)."""

    def __init__(self, cfg: VAEConfig):
        self.cfg = cfg

    def encode(self, x):
        f = self.cfg.s2d_factor
        b, h, w, c = x.shape
        x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 5, 2, 4)
        return x.reshape(b, h // f, w // f, c * f * f)

    def decode(self, z):
        f = self.cfg.s2d_factor
        b, h, w, cff = z.shape
        c = cff // (f * f)
        z = z.reshape(b, h, w, c, f, f).transpose(0, 1, 4, 2, 5, 3)
        return z.reshape(b, h * f, w * f, c)


# ----------------------------------------------------------------------------- functional interface

def _check_images(cfg: VAEConfig, x):
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
        raise ValueError(f"VAE input must be [B, H, W, {cfg.in_channels}], got shape {tuple(x.shape)}")
    f = cfg.downsample
    if x.shape[1] % f or x.shape[2] % f:
        raise ValueError(f"VAE input height/width {x.shape[1]}x{x.shape[2]} must be multiples of {f} "
                         f"(the {cfg.kind} downsampling factor); resize or crop the image")


def _check_latents(cfg: VAEConfig, z):
    if z.ndim != 4 or z.shape[-1] != cfg.channels:
        raise ValueError(f"latents must be [B, h, w, {cfg.channels}] for VAE kind {cfg.kind!r}, "
                         f"got shape {tuple(z.shape)}")


def init(cfg: VAEConfig, rng, image_size: int = 64):
    """Random parameters ({'encoder', 'decoder'}) for kind 'sd3'; {} for 'space_to_depth'."""
    if cfg.kind == "space_to_depth":
        return {}
    _require_sd3(cfg)
    x = jnp.zeros((1, image_size, image_size, cfg.in_channels), jnp.float32)
    return jax.jit(lambda r: SD3VAE(cfg).init(r, x)["params"])(rng)


def _require_sd3(cfg):
    if cfg.kind not in ("sd3", "space_to_depth"):
        raise ValueError(f"unknown VAE kind {cfg.kind!r}; expected 'sd3' or 'space_to_depth'")


def encode_moments(cfg: VAEConfig, params, x):
    """x [B,H,W,3] in [-1,1] -> (mean, logvar) unscaled [B,H/f,W/f,C] float32 (logvar 0-free: s2d has none)."""
    _require_sd3(cfg)
    _check_images(cfg, x)
    x = jnp.asarray(x, jnp.float32)
    if cfg.kind == "space_to_depth":
        z = SpaceToDepthAE(cfg).encode(x)
        return z, jnp.full_like(z, -jnp.inf)
    return SD3VAE(cfg).apply({"params": params}, x, method=SD3VAE.encode_moments)


def encode(cfg: VAEConfig, params, x, rng=None, sample: bool = True, noise=None):
    """x [B,H,W,3] in [-1,1] -> latents (z - shift_factor) * scaling_factor, [B,H/f,W/f,C] float32.

    kind 'sd3': with ``sample`` draws mean + std * eps, eps ~ N(0,1) from ``rng`` (or the given ``noise``,
    same shape as the latents); ``sample=False`` returns the mean. kind 'space_to_depth': exact, unscaled.
    """
    _require_sd3(cfg)
    if cfg.kind == "space_to_depth":
        _check_images(cfg, x)
        return SpaceToDepthAE(cfg).encode(jnp.asarray(x, jnp.float32))
    mean, logvar = encode_moments(cfg, params, x)
    z = mean
    if sample:
        if noise is None:
            if rng is None:
                raise ValueError("encode(sample=True) needs an rng key (or noise=...); pass sample=False for the mean")
            noise = jax.random.normal(rng, mean.shape, mean.dtype)
        elif tuple(noise.shape) != tuple(mean.shape):
            raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(mean.shape)}")
        z = mean + jnp.exp(0.5 * logvar) * noise
    return (z - cfg.shift_factor) * cfg.scaling_factor


def decode(cfg: VAEConfig, params, z):
    """latents [B,h,w,C] (shifted/scaled as `encode` returns) -> images [B,h*f,w*f,3] float32 (~[-1,1])."""
    _require_sd3(cfg)
    _check_latents(cfg, z)
    z = jnp.asarray(z, jnp.float32)
    if cfg.kind == "space_to_depth":
        return SpaceToDepthAE(cfg).decode(z)
    z = z / cfg.scaling_factor + cfg.shift_factor
    return SD3VAE(cfg).apply({"params": params}, z, method=SD3VAE.decode)


encode_jit = jax.jit(encode, static_argnums=(0,), static_argnames=("sample",))
decode_jit = jax.jit(decode, static_argnums=(0,))
