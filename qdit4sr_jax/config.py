"""Frozen configuration dataclasses and named presets.

`ModelConfig` describes the DiT4SR transformer, its autoencoder and its sampler defaults.
`QuantConfig` (defined in `qdit4sr_jax.quant.config`, re-exported here) describes quantization.
Presets: `ModelConfig.preset("dit4sr" | "demo" | "tiny")`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax.numpy as jnp

# ModelConfig.attention_impl values (qdit4sr_jax.model.attention): None / "xla" (XLA), "cudnn" (cuDNN flash,
# GPU, bf16/fp16), "fp8" (cuDNN FP8 e4m3 flash attention, GPU inference; 'fp8-ref' on other backends),
# "fp8-ref" (the same FP8 arithmetic in plain jnp).
PREDICTIONS = ("velocity", "lr_residual")
ATTENTION_IMPLS = (None, "xla", "cudnn", "fp8", "fp8-ref")
COLOR_FIXES = ("adain", "wavelet", "none")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """SD3 `AutoencoderKL` sizes (diffusers names). `kind="space_to_depth"` replaces it with a
    parameter-free pixel-(un)shuffle autoencoder of factor `s2d_factor` (latent channels = 3 * f^2)."""
    kind: str = "sd3"                       # "sd3" | "space_to_depth"
    in_channels: int = 3
    latent_channels: int = 16
    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 1.5305          # SD3 vae config
    shift_factor: float = 0.0609            # SD3 vae config
    s2d_factor: int = 8

    @property
    def downsample(self) -> int:
        if self.kind == "space_to_depth":
            return self.s2d_factor
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def channels(self) -> int:
        if self.kind == "space_to_depth":
            return self.in_channels * self.s2d_factor ** 2
        return self.latent_channels


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DiT4SR = SD3 MM-DiT (diffusers `SD3Transformer2DModel` names) + the LR stream.

    Defaults are SD3.5-medium's transformer config as used by DiT4SR.
    """
    name: str = "dit4sr"
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 24
    attention_head_dim: int = 64
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1536
    pooled_projection_dim: int = 2048
    pos_embed_max_size: int = 384
    sample_size: int = 128                  # diffusers config; pos-embed base_size = sample_size // patch_size
    dual_attention_layers: Tuple[int, ...] = tuple(range(13))
    qk_norm: Optional[str] = "rms_norm"     # "rms_norm" | None
    # DiT4SR LR stream
    lr_stream: bool = True
    ff_control_scale: float = 1.2           # hard-coded in the public DiT4SR feed-forward
    # released f/q checkpoints: LR keys = norm_k(norm_k(key)), to_k_control output discarded ("released");
    # the r1 model applies norm_k to to_k_control(...) ("r1").
    lr_key_mode: str = "released"
    # text conditioning: "embeddings" (precomputed [B, L, joint_attention_dim] + pooled) or
    # "learned" (a learned constant context of `context_len` tokens, for the demo model)
    context_mode: str = "embeddings"
    context_len: int = 333
    # numerics
    dtype: str = "float32"                  # compute dtype ("float32" | "bfloat16")
    param_dtype: str = "float32"
    # attention kernel, one of ATTENTION_IMPLS: None / "xla" (XLA), "cudnn" (cuDNN flash attention; GPU,
    # bf16/fp16 compute only), "fp8" (cuDNN FP8 attention with per-call per-tensor scales; GPU inference,
    # falls back to "fp8-ref" elsewhere), "fp8-ref" (the same FP8 arithmetic in jnp); see model/attention.py
    attention_impl: Optional[str] = None
    # autoencoder and sampler defaults
    vae: VAEConfig = VAEConfig()
    scale: int = 4                          # SR factor
    num_steps: int = 40
    shift: float = 3.0
    guidance_scale: float = 8.0
    start: str = "noise"                    # "noise" | "lr" (start from the noised LR latent)
    start_sigma: float = 1.0                # with start="lr": sigma of the first step
    # with start="lr": scale of the noise in the start latent (1 - sigma0) z_lr + sigma0 * start_noise * eps;
    # 1.0 is DiT4SR's noised LR latent, 0.0 starts from its mean (deterministic: the seed no longer matters)
    start_noise: float = 1.0
    # colour correction of the decoded output towards the bicubic-upsampled input (`colorfix.py`), the
    # default of `pipeline.upscale`: "adain" (DiT4SR's test scripts), "wavelet" or "none"
    color_fix: str = "adain"
    # what the transformer's output means to the sampler (sampling.velocity):
    # "velocity": the flow-matching velocity v (DiT4SR, SD3);
    # "lr_residual": F with x0_hat = z_lr - residual_scale * F (a skip connection from the LR latent, EDM-style
    #   preconditioning: a zero output is the bicubic-upsampled input), v = (x_t - x0_hat) / sigma_t.
    prediction: str = "velocity"
    residual_scale: float = 0.1
    tile_latent: int = 64                   # latent tile size (pipeline tiling)
    tile_overlap: int = 24

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {self.attention_impl!r} not in {ATTENTION_IMPLS}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction {self.prediction!r} not in {PREDICTIONS}")
        if not self.residual_scale > 0:
            raise ValueError(f"residual_scale must be > 0, got {self.residual_scale}")
        if not 0.0 <= self.start_noise <= 1.0:
            raise ValueError(f"start_noise must be in [0, 1], got {self.start_noise}")
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(f"color_fix {self.color_fix!r} not in {COLOR_FIXES}")

    @property
    def hidden_size(self) -> int:
        return self.attention_head_dim * self.num_attention_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @staticmethod
    def preset(name: str) -> "ModelConfig":
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(MODEL_PRESETS)}")
        return MODEL_PRESETS[name]


MODEL_PRESETS = {
    # The real DiT4SR checkpoint (SD3.5-medium + LR stream); 2,716,814,144 parameters in PyTorch.
    "dit4sr": ModelConfig(),
    # Tests: two heads of 16, three blocks (block 0 dual-attention), qk norm, tiny VAE.
    "tiny": ModelConfig(
        name="tiny", num_layers=3, attention_head_dim=16, num_attention_heads=2,
        in_channels=4, out_channels=4, joint_attention_dim=24, caption_projection_dim=32,
        pooled_projection_dim=20, pos_embed_max_size=16, dual_attention_layers=(0,),
        context_len=7, num_steps=4, guidance_scale=1.0, tile_latent=8, tile_overlap=4,
        vae=VAEConfig(latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                      norm_num_groups=4),
    ),
    # The shipped demo model (qdit4sr_jax/assets/demo.safetensors, trained by qdit4sr_jax.train): the DiT4SR
    # architecture (LR stream, control conv, joint attention, adaLN, dual attention in block 0, qk RMSNorm)
    # at width 192 (3 heads x 64) and depth 5 over a 4x space-to-depth autoencoder (256x256 RGB <-> 64x64x48),
    # a learned constant context (8 tokens) instead of text, flow matching with an LR-residual output
    # (x0_hat = z_lr - 0.1 F), no guidance; sampling: 3 Euler steps from the LR latent at sigma 0.1 (start="lr",
    # the path the training run (MODEL_CARD.md) fitted) without its noise (start_noise=0) and a wavelet colour fix:
    # the sampler chosen on a development set apart from the validation crops (MODEL_CARD.md, "Sampler").
    "demo": ModelConfig(
        name="demo", patch_size=2, in_channels=48, out_channels=48, num_layers=5, attention_head_dim=64,
        num_attention_heads=3, joint_attention_dim=64, caption_projection_dim=192, pooled_projection_dim=64,
        pos_embed_max_size=64, sample_size=64, dual_attention_layers=(0,), qk_norm="rms_norm",
        lr_key_mode="r1", context_mode="learned", context_len=8,
        vae=VAEConfig(kind="space_to_depth", s2d_factor=4),
        scale=4, num_steps=3, shift=1.0, guidance_scale=1.0, start="lr", start_sigma=0.1, start_noise=0.0,
        color_fix="wavelet", prediction="lr_residual", residual_scale=0.1, tile_latent=64, tile_overlap=16,
    ),
}


from qdit4sr_jax.quant.config import QuantConfig  # noqa: E402,F401  (re-export)
