"""DiT4SR transformer: SD3.5 MM-DiT (diffusers `SD3Transformer2DModel`) + the LR stream, Flax linen, NHWC.

With `cfg.lr_stream=False` this is exactly diffusers' `SD3Transformer2DModel` (the parity tests use that).
With the LR stream (the public DiT4SR `model_dit4sr`): the LR latent is patch-embedded by the same
`pos_embed` (same positional table) and concatenated with the noisy tokens ([noisy N; LR N]); after
the last block the LR half is dropped.

Size of the `dit4sr` preset (jax.eval_shape): 2,594,049,216 parameters, 540 linear kernels, 25 conv
kernels. PyTorch DiT4SR has 2,716,814,144 parameters (`nn.Module.parameters()`; 1,383 state-dict tensors
including the 384^2 x 1536 = 226,492,416-value `pos_embed.pos_embed` buffer, which is recomputed here);
the difference, 122,764,928 = 13 x 9,443,456, is the context projections (`add_{q,k,v}_proj`,
`to_add_out`, `norm_added_{q,k}`) that DiT4SR's 13 dual-attention `attn2` modules own but never use
(592 nn.Linear, 540 used), which the converter drops.
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from qdit4sr_jax.config import ModelConfig
from qdit4sr_jax.model.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from qdit4sr_jax.model.layers import Linear
from qdit4sr_jax.model.mmdit import AdaLNLinear, JointTransformerBlock, layer_norm, modulate


def unpatchify(x, h: int, w: int, p: int, c: int):
    """tokens [B, h*w, p*p*c] (per token laid out (p, q, c)) -> [B, h*p, w*p, c]."""
    B = x.shape[0]
    x = x.reshape(B, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, h * p, w * p, c)


class DiT4SRTransformer(nn.Module):
    """apply({'params': p}, hidden_states [B,H,W,Cin], lr_latent [B,H,W,Cin] | None, timestep [B]
    (0..1000 as diffusers), encoder_hidden_states [B,L,joint_attention_dim] | None,
    pooled_projections [B,pooled_projection_dim] | None, step=None) -> [B,H,W,out_channels] float32.

    Computes in `cfg.compute_dtype`. With `cfg.context_mode == "learned"`, missing
    encoder_hidden_states / pooled_projections are replaced by the learned `learned_context`
    [context_len, joint_attention_dim] and `learned_pooled` [pooled_projection_dim] params.
    `step` (int or traced int32 scalar) is passed to every `Linear`.
    """
    cfg: ModelConfig

    @nn.compact
    def __call__(self, hidden_states, lr_latent=None, timestep=None, encoder_hidden_states=None,
                 pooled_projections=None, step=None):
        cfg = self.cfg
        dt, pd = cfg.compute_dtype, jnp.dtype(cfg.param_dtype)
        D, p = cfg.hidden_size, cfg.patch_size
        if cfg.caption_projection_dim != D:
            raise ValueError(f"caption_projection_dim {cfg.caption_projection_dim} must equal hidden size {D}")
        if hidden_states.ndim != 4 or hidden_states.shape[-1] != cfg.in_channels:
            raise ValueError(f"hidden_states must be [B, H, W, {cfg.in_channels}] (NHWC), got {hidden_states.shape}")
        if timestep is None:
            raise ValueError("timestep [B] is required")
        B, H, W, _ = hidden_states.shape
        h, w = H // p, W // p
        timestep = jnp.broadcast_to(jnp.asarray(timestep), (B,))

        if encoder_hidden_states is None or pooled_projections is None:
            if cfg.context_mode != "learned":
                raise ValueError("encoder_hidden_states and pooled_projections are required unless "
                                 "cfg.context_mode == 'learned'")
        if cfg.context_mode == "learned":
            ctx0 = self.param("learned_context", nn.initializers.normal(0.02),
                              (cfg.context_len, cfg.joint_attention_dim), pd)
            pool0 = self.param("learned_pooled", nn.initializers.normal(0.02), (cfg.pooled_projection_dim,), pd)
            if encoder_hidden_states is None:
                encoder_hidden_states = jnp.broadcast_to(ctx0[None], (B,) + ctx0.shape)
            if pooled_projections is None:
                pooled_projections = jnp.broadcast_to(pool0[None], (B,) + pool0.shape)

        pos_embed = PatchEmbed(D, p, cfg.pos_embed_max_size, cfg.sample_size // p, dtype=dt, param_dtype=pd,
                               name="pos_embed")
        x = pos_embed(hidden_states.astype(dt))
        temb = CombinedTimestepTextProjEmbeddings(D, pd, name="time_text_embed")(
            timestep, pooled_projections.astype(dt), step=step)
        c = Linear(cfg.caption_projection_dim, param_dtype=pd, name="context_embedder")(
            encoder_hidden_states.astype(dt), step=step)
        n = h * w
        if cfg.lr_stream:
            if lr_latent is None or lr_latent.shape != hidden_states.shape:
                raise ValueError(f"lr_latent must have the shape of hidden_states {hidden_states.shape}, "
                                 f"got {None if lr_latent is None else lr_latent.shape}")
            x = jnp.concatenate([x, pos_embed(lr_latent.astype(dt))], axis=1)

        for i in range(cfg.num_layers):
            c, x = JointTransformerBlock(
                dim=D, heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim,
                context_pre_only=(i == cfg.num_layers - 1), qk_norm=cfg.qk_norm,
                dual_attention=i in cfg.dual_attention_layers, lr_stream=cfg.lr_stream,
                lr_key_mode=cfg.lr_key_mode, ff_control_scale=cfg.ff_control_scale, grid=(h, w),
                param_dtype=pd, attention_impl=cfg.attention_impl, name=f"transformer_blocks_{i}")(x, c, temb, step=step)

        x = x[:, :n]
        scale, shift = AdaLNLinear(D, 2, pd, name="norm_out")(temb, step=step)
        x = modulate(layer_norm(x), shift, scale)
        x = Linear(p * p * cfg.out_channels, param_dtype=pd, name="proj_out")(x, step=step)
        return unpatchify(x, h, w, p, cfg.out_channels).astype(jnp.float32)


def init_params(cfg: ModelConfig, rng, latent_hw=(8, 8), batch: int = 1):
    """Random params for `cfg` (a small latent is enough: no parameter depends on the spatial size).
    Control projections and control_conv start at zero, as in DiT4SR."""
    H, W = latent_hw
    x = jnp.zeros((batch, H, W, cfg.in_channels), jnp.float32)
    ctx = jnp.zeros((batch, 1, cfg.joint_attention_dim), jnp.float32)
    pooled = jnp.zeros((batch, cfg.pooled_projection_dim), jnp.float32)
    model = DiT4SRTransformer(cfg)
    # eager on purpose: XLA compiles of the many RNG initialisers are slow on CPU (~10 s for the tiny
    # config), while eager op kernels are cached across configs; wrap in jax.jit yourself if you prefer.
    return model.init(rng, x, x if cfg.lr_stream else None, jnp.zeros((batch,)), ctx, pooled)["params"]


def param_shapes(cfg: ModelConfig, latent_hw=(8, 8)):
    """Abstract params tree (jax.ShapeDtypeStruct leaves) via jax.eval_shape; allocates nothing.
    Cached per config; each call returns a fresh copy of the (nested dict) tree."""
    import jax
    return jax.tree_util.tree_map(lambda a: a, _param_shapes(cfg, tuple(latent_hw)))


@functools.lru_cache(maxsize=16)
def _param_shapes(cfg: ModelConfig, latent_hw):
    import jax
    return jax.eval_shape(lambda k: init_params(cfg, k, latent_hw), jax.random.PRNGKey(0))
