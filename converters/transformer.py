"""Key table: diffusers-layout DiT4SR / SD3 transformer state dict -> `DiT4SRTransformer` params.

Covers diffusers `SD3Transformer2DModel` (SD3 and SD3.5: qk RMSNorm, dual attention) and the public
DiT4SR additions (`attn{,2}.to_{q,k,v,out}_control`, `ff.control_conv`). Dropped on purpose:
`pos_embed.pos_embed` (the fixed sin-cos buffer; recomputed by the model) and the context projections
DiT4SR's `attn2` carries but never uses (`add_{q,k,v}_proj`, `to_add_out`, `norm_added_{q,k}`).
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Mapping

import numpy as np

from converters.keytable import CONV_HWIO, IDENTITY, LINEAR, Rule, convert, convert_state_dict, plan
from qdit4sr_jax.model.embeddings import sincos_pos_embed_2d

B = r"transformer_blocks\.(\d+)\."
T = r"transformer_blocks_\1/"
_ATTN_LINEARS = r"(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_add_out|" \
                r"to_q_control|to_k_control|to_v_control|to_out_control)"
_NORMS = r"(norm_q|norm_k|norm_added_q|norm_added_k)"


def _linear(src: str, dst: str):
    """Two rules for an nn.Linear at torch prefix `src` -> Linear at `dst`."""
    return [Rule(src + r"\.weight", dst + "/kernel", LINEAR), Rule(src + r"\.bias", dst + "/bias", IDENTITY)]


TRANSFORMER_TABLE = [
    # buffer: the fixed 2D sin-cos table, recomputed by PatchEmbed
    Rule(r"pos_embed\.pos_embed", None),
    Rule(r"pos_embed\.proj\.weight", "pos_embed/proj/kernel", CONV_HWIO),
    Rule(r"pos_embed\.proj\.bias", "pos_embed/proj/bias"),
    *_linear(r"time_text_embed\.(timestep_embedder|text_embedder)\.(linear_[12])", r"time_text_embed/\1/\2"),
    *_linear(r"context_embedder", "context_embedder"),
    *_linear(B + r"(norm1|norm1_context)\.linear", T + r"\2/linear"),
    # DiT4SR attn2 (dual attention) carries context projections its forward never uses: drop them
    Rule(B + r"attn2\.(add_q_proj|add_k_proj|add_v_proj|to_add_out|norm_added_q|norm_added_k)\.(weight|bias)", None),
    *_linear(B + r"(attn2?)\." + _ATTN_LINEARS, T + r"\2/\3"),
    *_linear(B + r"(attn2?)\.to_out\.0", T + r"\2/to_out_0"),
    Rule(B + r"(attn2?)\." + _NORMS + r"\.weight", T + r"\2/\3/scale"),
    *_linear(B + r"(ff|ff_context)\.net\.0\.proj", T + r"\2/net_0/proj"),
    *_linear(B + r"(ff|ff_context)\.net\.2", T + r"\2/net_2"),
    Rule(B + r"ff\.control_conv\.weight", T + "ff/control_conv/kernel", CONV_HWIO),
    Rule(B + r"ff\.control_conv\.bias", T + "ff/control_conv/bias"),
    *_linear(r"norm_out\.linear", "norm_out/linear"),
    *_linear(r"proj_out", "proj_out"),
]


def check_pos_embed(cfg):
    """Check for the dropped `pos_embed.pos_embed` buffer: shape [1, max^2, D] and its centre 16x16 crop
    equal to the table the model recomputes (catches a wrong sample_size / pos_embed_max_size)."""
    def check(key, arr):
        m, D = cfg.pos_embed_max_size, cfg.hidden_size
        if tuple(arr.shape) != (1, m * m, D):
            return (f"buffer {key!r} has shape {tuple(arr.shape)} but the config implies (1, {m * m}, {D}) "
                    f"(pos_embed_max_size={m}, hidden size {D})")
        c = min(16, m)
        top = (m - c) // 2
        got = np.asarray(arr).reshape(m, m, D)[top:top + c, top:top + c].astype(np.float32).reshape(c * c, D)
        want = sincos_pos_embed_2d(D, c, c, m, cfg.sample_size // cfg.patch_size)
        err = float(np.max(np.abs(got - want)))
        if err > 1e-2:   # bf16 storage rounds to ~4e-3; a wrong base size differs by O(1)
            return (f"buffer {key!r} differs from the recomputed SD3 sin-cos table by {err:.3g} (max abs): "
                    f"check sample_size={cfg.sample_size} / patch_size={cfg.patch_size} against the checkpoint")
        return None
    return check


def transformer_table(cfg):
    """TRANSFORMER_TABLE with the positional-buffer check bound to `cfg`."""
    return [Rule(r.pattern, None, check=check_pos_embed(cfg)) if r.pattern == r"pos_embed\.pos_embed" else r
            for r in TRANSFORMER_TABLE]


@functools.lru_cache(maxsize=8)
def abstract_params(cfg) -> Dict[str, Any]:
    """Abstract params tree of `DiT4SRTransformer(cfg)` (jax.ShapeDtypeStruct leaves; nothing allocated)."""
    from qdit4sr_jax.model.dit4sr import param_shapes
    return param_shapes(cfg)


def _no_learned(cfg):
    # converted checkpoints carry real text embeddings, never the demo's learned context
    return cfg.replace(context_mode="embeddings") if cfg.context_mode == "learned" else cfg


def plan_transformer(src_shapes: Mapping[str, tuple], cfg):
    """Check a transformer checkpoint's key -> shape mapping against `cfg` (no data read)."""
    return plan(src_shapes, TRANSFORMER_TABLE, abstract_params(_no_learned(cfg)), "transformer checkpoint")


def convert_transformer(state_dict: Mapping[str, Any], cfg) -> Dict[str, Any]:
    """In-memory {torch key: tensor/ndarray} -> nested Flax params (numpy, cfg.param_dtype)."""
    return convert_state_dict(state_dict, transformer_table(cfg), abstract_params(_no_learned(cfg)),
                              "transformer checkpoint")


def convert_transformer_lazy(src_shapes: Mapping[str, tuple], get, cfg, lazy: bool = True) -> Dict[str, Any]:
    """From a checkpoint reader (`get(key) -> np.ndarray`): the whole plan and the checks pass first;
    with lazy=True the leaves are `LazyTensor`s read and transformed while `save_model` writes them."""
    return convert(src_shapes, get, transformer_table(cfg), abstract_params(_no_learned(cfg)),
                   "transformer checkpoint", lazy=lazy)
