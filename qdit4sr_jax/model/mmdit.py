"""SD3 / SD3.5 MM-DiT joint block (diffusers `JointTransformerBlock`) with the optional DiT4SR LR stream.

Token layout inside a block: x [B, N_x, D] where N_x = N (plain SD3) or 2N ([noisy N; LR N], DiT4SR);
context c [B, L, D]. The LR stream shares norm1/norm2 modulation, to_q/to_k/to_v and ff.net weights with
the noisy stream; its own parameters are attn{,2}/to_{q,k,v,out}_control and ff/control_conv.
Names mirror diffusers module paths ('.' -> '/', ModuleList index i -> '_i').
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from qdit4sr_jax.model.attention import attention
from qdit4sr_jax.model.layers import Linear
from qdit4sr_jax.quant.linear import linear_group

LR_KEY_MODES = ("released", "r1")


def layer_norm(x, eps: float = 1e-6):
    """LayerNorm without affine over the last axis, computed in float32, returned in x.dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
    """diffusers `RMSNorm(dim, eps, elementwise_affine=True)` over the last axis. params: scale [dim]."""
    eps: float = 1e-6
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


def modulate(x, shift, scale):
    """x [B, N, D] * (1 + scale[:, None]) + shift[:, None]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLNLinear(nn.Module):
    """SiLU(temb) -> linear -> n chunks of [B, D] (diffusers AdaLayerNormZero / SD35AdaLayerNormZeroX /
    AdaLayerNormContinuous `linear`). temb [B, D] -> tuple of n arrays [B, D]."""
    dim: int
    n: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, temb, step=None):
        e = Linear(self.n * self.dim, param_dtype=self.param_dtype, name="linear")(nn.silu(temb), step=step)
        return tuple(jnp.split(e, self.n, axis=-1))


class JointAttention(nn.Module):
    """diffusers `Attention` + `JointAttnProcessor2_0`, and the DiT4SR control processor when `lr_stream`.

    x [B, N_x, D] (N_x = 2N with the LR stream), context [B, L, D] or None.
    Returns (out [B, N_x, D], context_out [B, L, D] or None).
    With the LR stream: one softmax over [noisy N; LR N; context L]; LR queries/keys/values are
    `to_*_control(to_*(x_lr))`; LR keys follow `lr_key_mode` ("released": norm_k(norm_k(k_noisy)),
    "r1": norm_k(k_lr)); the LR output gets x_lr added back before `to_out_control`.
    """
    dim: int
    heads: int
    head_dim: int
    qk_norm: Optional[str] = None
    added_kv: bool = True           # has add_{q,k,v}_proj for the context (attn); False for attn2
    context_pre_only: bool = False  # last block: no to_add_out
    lr_stream: bool = False
    lr_key_mode: str = "released"
    param_dtype: Any = jnp.float32
    attention_impl: Optional[str] = None   # model.attention.attention impl: None/"xla", "cudnn", "fp8", "fp8-ref"

    def _heads(self, t):
        return t.reshape(t.shape[:-1] + (self.heads, self.head_dim))

    @staticmethod
    def _group(x, merged, names, lin, step, shared):
        """The layers `names` reading x: one GEMM when a prepared tree merged them (`merged`, the params under
        `quant.kernels.merged.MERGED_INPUTS`' key), else each its own `Linear` (with the group's shared
        down-projection, if any)."""
        if merged is not None:
            return linear_group(x, merged, len(names), step=step)
        return [lin(n)(x, step=step, shared=shared) for n in names]

    @nn.compact
    def __call__(self, x, context=None, step=None):
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm {self.qk_norm!r} not supported (None or 'rms_norm')")
        if self.lr_key_mode not in LR_KEY_MODES:
            raise ValueError(f"lr_key_mode {self.lr_key_mode!r} not in {LR_KEY_MODES}")
        inner = self.heads * self.head_dim
        lin = lambda n, **kw: Linear(inner if n != "to_out_0" else self.dim, param_dtype=self.param_dtype,
                                     name=n, **kw)
        zero = dict(kernel_init=nn.initializers.zeros)
        B, n_x, _ = x.shape
        # a prepared tree's one down-projection of the layers that read x / context (quant.kernels.prepared)
        shared = lambda key: self.get_variable("params", key) if self.has_variable("params", key) else None
        sx = shared("qkv_down")
        q, k, v = map(self._heads, self._group(x, shared("qkv"), ("to_q", "to_k", "to_v"), lin, step, sx))
        norm_q = RMSNorm(param_dtype=self.param_dtype, name="norm_q") if self.qk_norm else (lambda t: t)
        norm_k = RMSNorm(param_dtype=self.param_dtype, name="norm_k") if self.qk_norm else (lambda t: t)
        if self.lr_stream:
            n = n_x // 2
            x_lr = x[:, n:]
            q, q_lr = q[:, :n], q[:, n:]
            k, k_lr = k[:, :n], k[:, n:]
            v, v_lr = v[:, :n], v[:, n:]
            flat = lambda t: t.reshape(B, n, inner)
            q_lr = self._heads(lin("to_q_control", **zero)(flat(q_lr), step=step))
            k_lr = self._heads(lin("to_k_control", **zero)(flat(k_lr), step=step))
            v_lr = self._heads(lin("to_v_control", **zero)(flat(v_lr), step=step))
            q, q_lr = norm_q(q), norm_q(q_lr)
            k = norm_k(k)
            if self.qk_norm and self.lr_key_mode == "released":
                k_lr = norm_k(k)        # the released f/q checkpoints: to_k_control's output is unused
            else:
                k_lr = norm_k(k_lr)
            q, k, v = (jnp.concatenate(p, axis=1) for p in ((q, q_lr), (k, k_lr), (v, v_lr)))
        else:
            q, k = norm_q(q), norm_k(k)
        if context is not None:
            if not self.added_kv:
                raise ValueError("this attention has no context projections (attn2)")
            names = ("add_q_proj", "add_k_proj", "add_v_proj")
            cq, ck, cv = map(self._heads, self._group(context, shared("add_qkv"), names, lin, step,
                                                      shared("add_qkv_down")))
            if self.qk_norm:
                cq = RMSNorm(param_dtype=self.param_dtype, name="norm_added_q")(cq)
                ck = RMSNorm(param_dtype=self.param_dtype, name="norm_added_k")(ck)
            q, k, v = (jnp.concatenate(p, axis=1) for p in ((q, cq), (k, ck), (v, cv)))
        o = attention(q, k, v, self.attention_impl).reshape(B, -1, inner)
        o, c_out = o[:, :n_x], (o[:, n_x:] if context is not None else None)
        if c_out is not None and not self.context_pre_only:
            c_out = Linear(self.dim, param_dtype=self.param_dtype, name="to_add_out")(c_out, step=step)
        if self.lr_stream:
            n = n_x // 2
            o_x = lin("to_out_0")(o[:, :n], step=step)
            o_lr = Linear(self.dim, param_dtype=self.param_dtype, name="to_out_control")(o[:, n:] + x_lr, step=step)
            o = jnp.concatenate([o_x, o_lr], axis=1)
        else:
            o = lin("to_out_0")(o, step=step)
        return o, c_out


class FeedForward(nn.Module):
    """diffusers `FeedForward(activation_fn='gelu-approximate')`: net_0/proj -> GELU(tanh) -> net_2.

    With `lr_stream` (DiT4SR `FeedForwardControl`): after net_0 the LR half [B, N, 4D] goes through the
    depthwise 3x3 `control_conv` on its (h, w) token grid and is added, times `control_scale`, to the
    noisy half; the LR half itself continues unchanged; net_2 is applied to both halves.
    x [B, N_x, D] -> [B, N_x, D].
    """
    dim: int
    mult: int = 4
    lr_stream: bool = False
    control_scale: float = 1.2
    grid: Optional[Tuple[int, int]] = None     # (h, w) token grid of one stream, needed with lr_stream
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, step=None):
        inner = self.dim * self.mult
        h = _NamedLinear(inner, self.param_dtype, name="net_0")(x, step=step)
        h = nn.gelu(h, approximate=True)
        if self.lr_stream:
            gh, gw = self.grid
            B, n_x, _ = h.shape
            n = n_x // 2
            if gh * gw != n:
                raise ValueError(f"token grid {gh}x{gw} does not match {n} tokens per stream")
            h_x, h_lr = h[:, :n], h[:, n:]
            conv = nn.Conv(inner, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=inner,
                           kernel_init=nn.initializers.zeros, dtype=h.dtype, param_dtype=self.param_dtype,
                           name="control_conv")(h_lr.reshape(B, gh, gw, inner)).reshape(B, n, inner)
            # the noisy half updated in place (not a concatenation with h_lr: XLA fuses no consumer into a
            # concatenation, so net_2's input transform became a pass of its own; benchmarks/gpu_notes.md)
            h = jax.lax.dynamic_update_slice_in_dim(h, h_x + self.control_scale * conv, 0, axis=1)
        return Linear(self.dim, param_dtype=self.param_dtype, name="net_2")(h, step=step)


class _NamedLinear(nn.Module):
    """A module holding one `proj` Linear (diffusers `GELU.proj`, path net_0/proj)."""
    features: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, step=None):
        return Linear(self.features, param_dtype=self.param_dtype, name="proj")(x, step=step)


class JointTransformerBlock(nn.Module):
    """diffusers `JointTransformerBlock` (+ DiT4SR LR stream).

    x [B, N_x, D], context [B, L, D], temb [B, D] -> (context' [B, L, D] or None if context_pre_only,
    x' [B, N_x, D]). Dual attention (SD3.5): norm1 gives 9 chunks and attn2 (no context) runs on
    the second modulation of the same normalised x.
    """
    dim: int
    heads: int
    head_dim: int
    context_pre_only: bool = False
    qk_norm: Optional[str] = None
    dual_attention: bool = False
    lr_stream: bool = False
    lr_key_mode: str = "released"
    ff_control_scale: float = 1.2
    grid: Optional[Tuple[int, int]] = None
    param_dtype: Any = jnp.float32
    attention_impl: Optional[str] = None   # passed to JointAttention

    @nn.compact
    def __call__(self, x, context, temb, step=None):
        pd = self.param_dtype
        attn_kw = dict(dim=self.dim, heads=self.heads, head_dim=self.head_dim, qk_norm=self.qk_norm,
                       lr_stream=self.lr_stream, lr_key_mode=self.lr_key_mode, param_dtype=pd,
                       attention_impl=self.attention_impl)
        nx = layer_norm(x)
        if self.dual_attention:
            (sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp, sh_msa2, sc_msa2, g_msa2) = AdaLNLinear(
                self.dim, 9, pd, name="norm1")(temb, step=step)
            nx2 = modulate(nx, sh_msa2, sc_msa2)
        else:
            sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp = AdaLNLinear(self.dim, 6, pd, name="norm1")(temb, step=step)
        nx = modulate(nx, sh_msa, sc_msa)
        nc = layer_norm(context)
        if self.context_pre_only:
            # AdaLayerNormContinuous: chunks are (scale, shift)
            c_sc, c_sh = AdaLNLinear(self.dim, 2, pd, name="norm1_context")(temb, step=step)
            nc = modulate(nc, c_sh, c_sc)
        else:
            c_sh_msa, c_sc_msa, c_g_msa, c_sh_mlp, c_sc_mlp, c_g_mlp = AdaLNLinear(
                self.dim, 6, pd, name="norm1_context")(temb, step=step)
            nc = modulate(nc, c_sh_msa, c_sc_msa)

        a, ca = JointAttention(added_kv=True, context_pre_only=self.context_pre_only, name="attn",
                               **attn_kw)(nx, nc, step=step)
        x = x + g_msa[:, None] * a
        if self.dual_attention:
            a2, _ = JointAttention(added_kv=False, name="attn2", **attn_kw)(nx2, None, step=step)
            x = x + g_msa2[:, None] * a2
        nx = modulate(layer_norm(x), sh_mlp, sc_mlp)
        f = FeedForward(self.dim, lr_stream=self.lr_stream, control_scale=self.ff_control_scale,
                        grid=self.grid, param_dtype=pd, name="ff")(nx, step=step)
        x = x + g_mlp[:, None] * f

        if self.context_pre_only:
            return None, x
        context = context + c_g_msa[:, None] * ca
        nc = modulate(layer_norm(context), c_sh_mlp, c_sc_mlp)
        cf = FeedForward(self.dim, param_dtype=pd, name="ff_context")(nc, step=step)
        return context + c_g_mlp[:, None] * cf, x
