"""A small PyTorch DiT4SR reference for the parity tests, assembled from diffusers modules.

Structure and parameter names follow the public DiT4SR code (model_dit4sr/: an SD3.5 MM-DiT whose
blocks carry an LR stream): the LR latent is patch-embedded by the shared `pos_embed` and concatenated
after the noisy tokens; each attention adds `to_{q,k,v}_control` on top of the shared projections and an
`to_out_control` output; the feed-forward adds a zero-initialised depthwise 3x3 `control_conv` of the LR
half (times 1.2) to the noisy half. `lr_key_mode`: "released" (LR keys = norm_k applied to the already
normalised noisy keys) or "r1" (norm_k of the LR keys). Inputs NCHW, as diffusers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffusers.models.activations import GELU
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, SD35AdaLayerNormZeroX


class ControlAttention(Attention):
    """diffusers `Attention` + the LR-stream projections (zero-initialised q/k/v, to_out_control = to_out)."""

    def __init__(self, dim, heads, head_dim, context_pre_only, qk_norm, lr_key_mode):
        super().__init__(query_dim=dim, cross_attention_dim=None, added_kv_proj_dim=dim, dim_head=head_dim,
                         heads=heads, out_dim=dim, context_pre_only=context_pre_only, bias=True,
                         qk_norm=qk_norm, eps=1e-6)
        self.lr_key_mode = lr_key_mode
        inner = heads * head_dim
        self.to_q_control = nn.Linear(dim, inner)
        self.to_k_control = nn.Linear(dim, inner)
        self.to_v_control = nn.Linear(dim, inner)
        for m in (self.to_q_control, self.to_k_control, self.to_v_control):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        self.to_out_control = nn.Linear(inner, dim)
        self.to_out_control.load_state_dict(self.to_out[0].state_dict())

    def forward(self, hidden_states, encoder_hidden_states=None):
        B = hidden_states.shape[0]
        n_x = hidden_states.shape[1]
        x, x_lr = hidden_states.chunk(2, dim=1)
        hd = self.inner_dim // self.heads

        def heads(t):
            return t.view(B, -1, self.heads, hd).transpose(1, 2)

        q, k, v = heads(self.to_q(x)), heads(self.to_k(x)), heads(self.to_v(x))
        q_lr = heads(self.to_q_control(self.to_q(x_lr)))
        k_lr = heads(self.to_k_control(self.to_k(x_lr)))
        v_lr = heads(self.to_v_control(self.to_v(x_lr)))
        if self.norm_q is not None:
            q, q_lr = self.norm_q(q), self.norm_q(q_lr)
        if self.norm_k is not None:
            k = self.norm_k(k)
            k_lr = self.norm_k(k) if self.lr_key_mode == "released" else self.norm_k(k_lr)
        qs, ks, vs = [q, q_lr], [k, k_lr], [v, v_lr]
        if encoder_hidden_states is not None:
            cq = heads(self.add_q_proj(encoder_hidden_states))
            ck = heads(self.add_k_proj(encoder_hidden_states))
            cv = heads(self.add_v_proj(encoder_hidden_states))
            if self.norm_added_q is not None:
                cq, ck = self.norm_added_q(cq), self.norm_added_k(ck)
            qs.append(cq), ks.append(ck), vs.append(cv)
        o = F.scaled_dot_product_attention(torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2))
        o = o.transpose(1, 2).reshape(B, -1, self.heads * hd)
        o, c = o[:, :n_x], o[:, n_x:]
        o, o_lr = o.chunk(2, dim=1)
        o = torch.cat([self.to_out[0](o), self.to_out_control(o_lr + x_lr)], dim=1)
        if encoder_hidden_states is None:
            return o
        if not self.context_pre_only:
            c = self.to_add_out(c)
        return o, c


class FeedForwardControl(nn.Module):
    """net.0 = GELU(tanh) projection, net.1 = Dropout, net.2 = Linear; control_conv on the LR half."""

    def __init__(self, dim, mult=4, control_scale=1.2):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GELU(dim, inner, approximate="tanh"), nn.Dropout(0.0), nn.Linear(inner, dim)])
        self.control_conv = nn.Conv2d(inner, inner, 3, padding=1, groups=inner)
        nn.init.zeros_(self.control_conv.weight)
        nn.init.zeros_(self.control_conv.bias)
        self.control_scale = control_scale

    def forward(self, x, grid):
        h = self.net[1](self.net[0](x))
        hx, hl = h.chunk(2, dim=1)
        B, N, C = hl.shape
        gh, gw = grid
        conv = self.control_conv(hl.reshape(B, gh, gw, C).permute(0, 3, 1, 2))
        conv = conv.reshape(B, C, N).permute(0, 2, 1)
        return self.net[2](torch.cat([hx + self.control_scale * conv, hl], dim=1))


class FeedForwardPlain(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GELU(dim, inner, approximate="tanh"), nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x):
        for m in self.net:
            x = m(x)
        return x


class DiT4SRBlock(nn.Module):
    def __init__(self, dim, heads, head_dim, context_pre_only, qk_norm, dual, lr_key_mode, control_scale):
        super().__init__()
        self.context_pre_only, self.dual = context_pre_only, dual
        self.norm1 = SD35AdaLayerNormZeroX(dim) if dual else AdaLayerNormZero(dim)
        self.norm1_context = (AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6, bias=True)
                              if context_pre_only else AdaLayerNormZero(dim))
        self.attn = ControlAttention(dim, heads, head_dim, context_pre_only, qk_norm, lr_key_mode)
        # DiT4SR's attn2 is built like attn (so it owns add_* projections it never uses)
        self.attn2 = ControlAttention(dim, heads, head_dim, context_pre_only, qk_norm, lr_key_mode) if dual else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForwardControl(dim, control_scale=control_scale)
        if not context_pre_only:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForwardPlain(dim)

    def forward(self, x, c, temb, grid):
        if self.dual:
            nx, g_msa, sh_mlp, sc_mlp, g_mlp, nx2, g_msa2 = self.norm1(x, emb=temb)
        else:
            nx, g_msa, sh_mlp, sc_mlp, g_mlp = self.norm1(x, emb=temb)
        if self.context_pre_only:
            nc = self.norm1_context(c, temb)
        else:
            nc, c_g_msa, c_sh_mlp, c_sc_mlp, c_g_mlp = self.norm1_context(c, emb=temb)
        a, ca = self.attn(nx, nc)
        x = x + g_msa.unsqueeze(1) * a
        if self.dual:
            x = x + g_msa2.unsqueeze(1) * self.attn2(nx2)
        nx = self.norm2(x) * (1 + sc_mlp[:, None]) + sh_mlp[:, None]
        x = x + g_mlp.unsqueeze(1) * self.ff(nx, grid)
        if self.context_pre_only:
            return None, x
        c = c + c_g_msa.unsqueeze(1) * ca
        nc = self.norm2_context(c) * (1 + c_sc_mlp[:, None]) + c_sh_mlp[:, None]
        return c + c_g_mlp.unsqueeze(1) * self.ff_context(nc), x


class TorchDiT4SR(nn.Module):
    """forward(hidden_states [B,C,H,W], lr [B,C,H,W], encoder_hidden_states [B,L,J], pooled [B,P],
    timestep [B]) -> [B, out_channels, H, W]."""

    def __init__(self, sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                 num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                 pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                 dual_attention_layers=tuple(range(13)), qk_norm="rms_norm", lr_key_mode="released",
                 ff_control_scale=1.2):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.patch_size, self.out_channels = patch_size, out_channels
        self.pos_embed = PatchEmbed(height=sample_size, width=sample_size, patch_size=patch_size,
                                    in_channels=in_channels, embed_dim=dim, pos_embed_max_size=pos_embed_max_size)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, pooled_projection_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, caption_projection_dim)
        self.transformer_blocks = nn.ModuleList([
            DiT4SRBlock(dim, num_attention_heads, attention_head_dim, i == num_layers - 1, qk_norm,
                        i in dual_attention_layers, lr_key_mode, ff_control_scale)
            for i in range(num_layers)])
        self.norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, hidden_states, lr, encoder_hidden_states, pooled, timestep):
        H, W = hidden_states.shape[-2:]
        p = self.patch_size
        h, w = H // p, W // p
        x = torch.cat([self.pos_embed(hidden_states), self.pos_embed(lr)], dim=1)
        temb = self.time_text_embed(timestep, pooled)
        c = self.context_embedder(encoder_hidden_states)
        for blk in self.transformer_blocks:
            c, x = blk(x, c, temb, (h, w))
        x = x.chunk(2, dim=1)[0]
        x = self.proj_out(self.norm_out(x, temb))
        x = x.reshape(x.shape[0], h, w, p, p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], self.out_channels, H, W)
