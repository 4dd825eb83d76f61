"""Parity of the Flax transformer with PyTorch, fp32, relative error <= 1e-5 on fresh random inputs.

- plain SD3 / SD3.5 (`lr_stream=False`) vs diffusers `SD3Transformer2DModel`, with and without qk norm
  and dual attention;
- the DiT4SR additions vs `torch_dit4sr.TorchDiT4SR` (diffusers modules + the public architecture),
  both `lr_key_mode`s.
Every parameter (including the zero-initialised control ones) is set to non-zero random values first.
"""
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from converters.transformer import convert_transformer  # noqa: E402
from qdit4sr_jax.config import ModelConfig  # noqa: E402
from qdit4sr_jax.model.dit4sr import DiT4SRTransformer  # noqa: E402
from qdit4sr_jax.model.embeddings import sincos_pos_embed_2d  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from torch_dit4sr import TorchDiT4SR  # noqa: E402

TOL = 1e-5
TINY = ModelConfig.preset("tiny").replace(sample_size=32)


def randomize(module, seed):
    """Non-zero random values in every parameter: weights ~ N(0, 1/fan_in), biases ~ N(0, 0.2^2),
    norm scales ~ 1 + N(0, 0.2^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return module


def torch_kwargs(cfg):
    return dict(sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
                num_layers=cfg.num_layers, attention_head_dim=cfg.attention_head_dim,
                num_attention_heads=cfg.num_attention_heads, joint_attention_dim=cfg.joint_attention_dim,
                caption_projection_dim=cfg.caption_projection_dim, pooled_projection_dim=cfg.pooled_projection_dim,
                out_channels=cfg.out_channels, pos_embed_max_size=cfg.pos_embed_max_size,
                dual_attention_layers=tuple(cfg.dual_attention_layers), qk_norm=cfg.qk_norm)


def inputs(cfg, seed, B=2, H=8, W=6, L=7):
    r = np.random.default_rng(seed)
    f = lambda *s: r.standard_normal(s).astype(np.float32)
    return dict(x=f(B, cfg.in_channels, H, W), lr=f(B, cfg.in_channels, H, W),
                ctx=f(B, L, cfg.joint_attention_dim), pooled=f(B, cfg.pooled_projection_dim),
                t=r.uniform(0, 1000, B).astype(np.float32))


def run_jax(cfg, params, d):
    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
    with jax.default_matmul_precision("highest"):
        # eager: op kernels are shared between the configs (cheaper on CPU than one jit per config)
        out = DiT4SRTransformer(cfg).apply({"params": params}, nhwc(d["x"]),
                                           nhwc(d["lr"]) if cfg.lr_stream else None, jnp.asarray(d["t"]),
                                           jnp.asarray(d["ctx"]), jnp.asarray(d["pooled"]))
    return np.asarray(out).transpose(0, 3, 1, 2)


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def to_jax(params):
    return jax.tree_util.tree_map(jnp.asarray, params)


@pytest.mark.parametrize("qk_norm,dual", [("rms_norm", (0,)), (None, ()), ("rms_norm", ()), (None, (0, 2))])
def test_sd3_parity_with_diffusers(qk_norm, dual):
    from diffusers import SD3Transformer2DModel
    cfg = TINY.replace(lr_stream=False, qk_norm=qk_norm, dual_attention_layers=dual)
    tm = randomize(SD3Transformer2DModel(**torch_kwargs(cfg)).eval(), seed=1)
    params = to_jax(convert_transformer(tm.state_dict(), cfg))
    for seed in (10, 11):
        d = inputs(cfg, seed)
        with torch.no_grad():
            ref = tm(hidden_states=torch.from_numpy(d["x"]), encoder_hidden_states=torch.from_numpy(d["ctx"]),
                     pooled_projections=torch.from_numpy(d["pooled"]), timestep=torch.from_numpy(d["t"]),
                     return_dict=False)[0].numpy()
        out = run_jax(cfg, params, d)
        assert out.shape == ref.shape
        assert np.abs(ref).max() > 1e-2
        print(f"rel_err {rel_err(out, ref):.2e}")
        assert rel_err(out, ref) <= TOL, rel_err(out, ref)


@pytest.mark.parametrize("lr_key_mode,qk_norm,dual", [("released", "rms_norm", (0,)), ("r1", "rms_norm", (0,)),
                                                      ("released", None, (1,))])
def test_dit4sr_parity_with_torch_reference(lr_key_mode, qk_norm, dual):
    cfg = TINY.replace(lr_stream=True, lr_key_mode=lr_key_mode, qk_norm=qk_norm, dual_attention_layers=dual)
    tm = randomize(TorchDiT4SR(**torch_kwargs(cfg), lr_key_mode=lr_key_mode,
                               ff_control_scale=cfg.ff_control_scale).eval(), seed=2)
    params = to_jax(convert_transformer(tm.state_dict(), cfg))
    for seed in (20, 21):
        d = inputs(cfg, seed)
        with torch.no_grad():
            ref = tm(torch.from_numpy(d["x"]), torch.from_numpy(d["lr"]), torch.from_numpy(d["ctx"]),
                     torch.from_numpy(d["pooled"]), torch.from_numpy(d["t"])).numpy()
        out = run_jax(cfg, params, d)
        assert np.abs(ref).max() > 1e-2
        print(f"rel_err {rel_err(out, ref):.2e}")
        assert rel_err(out, ref) <= TOL, rel_err(out, ref)


def test_lr_key_modes_differ():
    """The two LR-key modes are different models once to_k_control is non-zero (the test above would
    also pass if the flag were ignored only when both agree)."""
    cfg = TINY.replace(lr_stream=True)
    tm = randomize(TorchDiT4SR(**torch_kwargs(cfg)).eval(), seed=3)
    params = to_jax(convert_transformer(tm.state_dict(), cfg))
    d = inputs(cfg, 30)
    a = run_jax(cfg.replace(lr_key_mode="released"), params, d)
    b = run_jax(cfg.replace(lr_key_mode="r1"), params, d)
    assert rel_err(a, b) > 1e-3


def test_pos_embed_matches_diffusers_table():
    """Our cropped sin-cos table equals the crop of diffusers' full SD3 buffer (dit4sr sizes, non-square)."""
    from diffusers.models.embeddings import PatchEmbed
    pe = PatchEmbed(height=128, width=128, patch_size=2, in_channels=4, embed_dim=64, pos_embed_max_size=384)
    ref = pe.cropped_pos_embed(2 * 40, 2 * 24)[0].numpy()
    ours = sincos_pos_embed_2d(64, 40, 24, 384, 64)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
