"""Key table: diffusers-layout SD3 `AutoencoderKL` state dict -> `qdit4sr_jax.model.vae.SD3VAE` params.

diffusers keys `encoder.down_blocks.0.resnets.1.conv1.weight` -> `encoder/down_blocks_0/resnets_1/conv1/kernel`.
GroupNorm weight -> scale; conv weights [O,I,kh,kw] -> [kh,kw,I,O]; mid-block attention linears
[out,in] -> [in,out]. The deprecated attention names (`query`/`key`/`value`/`proj_attn`) of old
checkpoints are accepted. `quant_conv` / `post_quant_conv` are not part of SD3's VAE: a checkpoint that
has them is reported as unexpected (it is an SD1/SDXL-style VAE, not SD3's).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

import jax

from converters.keytable import CONV_HWIO, LINEAR, Rule, convert, convert_state_dict, plan

_P = r"(encoder|decoder)\."
_CONVS = r"(conv1|conv2|conv_shortcut)"


VAE_TABLE = [
    Rule(_P + r"(conv_in|conv_out)\.weight", r"\1/\2/kernel", CONV_HWIO),
    Rule(_P + r"(conv_in|conv_out)\.bias", r"\1/\2/bias"),
    Rule(_P + r"conv_norm_out\.weight", r"\1/conv_norm_out/scale"),
    Rule(_P + r"conv_norm_out\.bias", r"\1/conv_norm_out/bias"),
    # resnets in down/up blocks and the mid block
    Rule(_P + r"(down_blocks|up_blocks)\.(\d+)\.resnets\.(\d+)\." + _CONVS + r"\.weight",
         r"\1/\2_\3/resnets_\4/\5/kernel", CONV_HWIO),
    Rule(_P + r"(down_blocks|up_blocks)\.(\d+)\.resnets\.(\d+)\." + _CONVS + r"\.bias",
         r"\1/\2_\3/resnets_\4/\5/bias"),
    Rule(_P + r"(down_blocks|up_blocks)\.(\d+)\.resnets\.(\d+)\.(norm1|norm2)\.weight",
         r"\1/\2_\3/resnets_\4/\5/scale"),
    Rule(_P + r"(down_blocks|up_blocks)\.(\d+)\.resnets\.(\d+)\.(norm1|norm2)\.bias",
         r"\1/\2_\3/resnets_\4/\5/bias"),
    Rule(_P + r"(down_blocks|up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.conv\.weight",
         r"\1/\2_\3/\4_0/conv/kernel", CONV_HWIO),
    Rule(_P + r"(down_blocks|up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.conv\.bias",
         r"\1/\2_\3/\4_0/conv/bias"),
    Rule(_P + r"mid_block\.resnets\.(\d+)\." + _CONVS + r"\.weight", r"\1/mid_block/resnets_\2/\3/kernel", CONV_HWIO),
    Rule(_P + r"mid_block\.resnets\.(\d+)\." + _CONVS + r"\.bias", r"\1/mid_block/resnets_\2/\3/bias"),
    Rule(_P + r"mid_block\.resnets\.(\d+)\.(norm1|norm2)\.weight", r"\1/mid_block/resnets_\2/\3/scale"),
    Rule(_P + r"mid_block\.resnets\.(\d+)\.(norm1|norm2)\.bias", r"\1/mid_block/resnets_\2/\3/bias"),
    # mid-block attention (current and deprecated names)
    Rule(_P + r"mid_block\.attentions\.(\d+)\.group_norm\.weight", r"\1/mid_block/attentions_\2/group_norm/scale"),
    Rule(_P + r"mid_block\.attentions\.(\d+)\.group_norm\.bias", r"\1/mid_block/attentions_\2/group_norm/bias"),
    Rule(_P + r"mid_block\.attentions\.(\d+)\.(to_q|to_k|to_v)\.weight", r"\1/mid_block/attentions_\2/\3/kernel", LINEAR),
    Rule(_P + r"mid_block\.attentions\.(\d+)\.(to_q|to_k|to_v)\.bias", r"\1/mid_block/attentions_\2/\3/bias"),
    Rule(_P + r"mid_block\.attentions\.(\d+)\.to_out\.0\.weight", r"\1/mid_block/attentions_\2/to_out_0/kernel", LINEAR),
    Rule(_P + r"mid_block\.attentions\.(\d+)\.to_out\.0\.bias", r"\1/mid_block/attentions_\2/to_out_0/bias"),
    Rule(_P + r"mid_block\.attentions\.(\d+)\.query\.weight", r"\1/mid_block/attentions_\2/to_q/kernel", LINEAR),
    Rule(_P + r"mid_block\.attentions\.(\d+)\.query\.bias", r"\1/mid_block/attentions_\2/to_q/bias"),
    Rule(_P + r"mid_block\.attentions\.(\d+)\.key\.weight", r"\1/mid_block/attentions_\2/to_k/kernel", LINEAR),
    Rule(_P + r"mid_block\.attentions\.(\d+)\.key\.bias", r"\1/mid_block/attentions_\2/to_k/bias"),
    Rule(_P + r"mid_block\.attentions\.(\d+)\.value\.weight", r"\1/mid_block/attentions_\2/to_v/kernel", LINEAR),
    Rule(_P + r"mid_block\.attentions\.(\d+)\.value\.bias", r"\1/mid_block/attentions_\2/to_v/bias"),
    Rule(_P + r"mid_block\.attentions\.(\d+)\.proj_attn\.weight", r"\1/mid_block/attentions_\2/to_out_0/kernel", LINEAR),
    Rule(_P + r"mid_block\.attentions\.(\d+)\.proj_attn\.bias", r"\1/mid_block/attentions_\2/to_out_0/bias"),
]


def abstract_params(vae_cfg) -> Dict[str, Any]:
    """Abstract params tree of `SD3VAE(vae_cfg)` (jax.ShapeDtypeStruct leaves; nothing allocated)."""
    from qdit4sr_jax.model import vae
    if vae_cfg.kind != "sd3":
        raise ValueError(f"only kind='sd3' VAEs have weights to convert; this config is {vae_cfg.kind!r}")
    return jax.eval_shape(lambda: vae.init(vae_cfg, jax.random.PRNGKey(0), image_size=2 * vae_cfg.downsample))


def plan_vae(src_shapes: Mapping[str, tuple], vae_cfg):
    """Check a VAE checkpoint's key -> shape mapping against `vae_cfg` (no data read)."""
    return plan(src_shapes, VAE_TABLE, abstract_params(vae_cfg), "VAE checkpoint")


def convert_vae(state_dict: Mapping[str, Any], vae_cfg) -> Dict[str, Any]:
    """In-memory {torch key: tensor/ndarray} -> nested Flax params (numpy float32)."""
    return convert_state_dict(state_dict, VAE_TABLE, abstract_params(vae_cfg), "VAE checkpoint")


def convert_vae_lazy(src_shapes: Mapping[str, tuple], get, vae_cfg) -> Dict[str, Any]:
    """Streamed variant: `get(key) -> np.ndarray` is called once per key, after the full plan passed."""
    return convert(src_shapes, get, VAE_TABLE, abstract_params(vae_cfg), "VAE checkpoint")


def vae_config_from_diffusers(config: Mapping[str, Any]):
    """`VAEConfig` from a diffusers `AutoencoderKL` config dict (vae/config.json); rejects non-SD3 VAEs."""
    from qdit4sr_jax.config import VAEConfig
    if config.get("use_quant_conv", True) or config.get("use_post_quant_conv", True):
        raise ValueError("this AutoencoderKL uses quant_conv/post_quant_conv: it is not SD3's VAE "
                         "(expected use_quant_conv=false, use_post_quant_conv=false)")
    for k in ("down_block_types", "up_block_types"):
        bad = [t for t in config.get(k, []) if t not in ("DownEncoderBlock2D", "UpDecoderBlock2D")]
        if bad:
            raise ValueError(f"unsupported {k} {bad}: only DownEncoderBlock2D / UpDecoderBlock2D")
    if int(config.get("out_channels", 3)) != int(config.get("in_channels", 3)):
        raise ValueError("out_channels != in_channels is not supported (the decoder outputs in_channels)")
    if config.get("mid_block_add_attention", True) is False:
        raise ValueError("mid_block_add_attention=false is not supported (SD3's VAE has the attention)")
    if config.get("act_fn", "silu") != "silu":
        raise ValueError(f"act_fn {config.get('act_fn')!r} is not supported (SD3 uses 'silu')")
    return VAEConfig(
        kind="sd3", in_channels=int(config.get("in_channels", 3)),
        latent_channels=int(config["latent_channels"]),
        block_out_channels=tuple(int(c) for c in config["block_out_channels"]),
        layers_per_block=int(config["layers_per_block"]), norm_num_groups=int(config["norm_num_groups"]),
        scaling_factor=float(config["scaling_factor"]), shift_factor=float(config.get("shift_factor") or 0.0))


def _cli(args) -> None:
    import json
    import os

    from converters.__main__ import model_config
    from converters.sources import open_checkpoint
    from qdit4sr_jax.io.modelfile import load_model, save_model
    if bool(args.into) == bool(args.out):
        raise ValueError("give exactly one of --into model.safetensors (add the VAE to a model file) or --out")
    if args.into:
        cfg, params = load_model(args.into)
    else:
        cfg, params = model_config(args.config, args.set), {}
    conf = os.path.join(args.src, "config.json") if os.path.isdir(args.src) else None
    vae_cfg = cfg.vae if cfg.vae.kind == "sd3" else cfg.vae.__class__()
    if conf and os.path.exists(conf):
        with open(conf) as f:
            vae_cfg = vae_config_from_diffusers(json.load(f))
    if vae_cfg.latent_channels != cfg.in_channels:
        raise ValueError(f"the VAE has {vae_cfg.latent_channels} latent channels but the model config expects "
                         f"in_channels={cfg.in_channels}")
    shapes, get = open_checkpoint(args.src)
    vp = convert_vae_lazy(shapes, get, vae_cfg)          # raises before anything is written
    cfg = cfg.replace(vae=vae_cfg)
    params["vae"] = vp
    out = args.into or args.out
    save_model(out, cfg, params)
    print(f"wrote {out}: SD3 VAE {vae_cfg.block_out_channels}, {vae_cfg.latent_channels} latent channels")


def add_cli(sub) -> None:
    p = sub.add_parser("vae", help="SD3 AutoencoderKL (diffusers layout)")
    p.add_argument("--src", required=True, help="diffusers vae folder (config.json + weights), .safetensors or .bin")
    p.add_argument("--into", help="existing float model file to add the VAE to (rewritten atomically)")
    p.add_argument("--out", help="new model file holding only the VAE")
    p.add_argument("--config", default="dit4sr", help="with --out: ModelConfig preset name or JSON file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="ModelConfig override")
    p.set_defaults(func=_cli)
