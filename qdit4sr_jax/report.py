"""Model size and ops with the paper's definitions, for any quantization preset on any `ModelConfig`,
plus PNG plots of a quantized model (per-layer weight bits, [layer x step] activation bits, H-SVD vs SVD).

Definitions (Q-DiT4SR Figure 1, "Params (M) / Ops (G)"), reproduced exactly for the full `dit4sr` config:
  size (M) = sum over parameters of bits / 32 / 1e6
  ops  (G) = sum over the linear layers of the transformer blocks of MACs x w_bits x a_bits / (32 x 32) / 1e9
             per image: one forward per sampling step, two with classifier-free guidance.
Findings (all with `jax.eval_shape`, no weights):
  * FP: 2,716,814,144 parameters at 32 bits = 2,716.8 M (paper 2,717). Our Flax tree holds 2,594,049,216:
    the PyTorch checkpoint also stores 13 x (add_q/k/v_proj + to_add_out + norm_added_q/k) = 122,764,928
    parameters in the dual-attention blocks' `attn2` that the forward never uses (the converter drops them);
    `unused_checkpoint_linears` adds them back for the paper's count (`count_unused=True`).
  * Ops: the MACs of the 533 linears inside the 24 joint blocks for one 512 x 512 output (64 x 64 latent, 1,024
    noisy + 1,024 LR tokens, 333 text tokens), x 40 steps x 2 (CFG) = 170,475.9 G (paper 170,476 G): a
    multiply-accumulate counts as one op; attention score / value products, the patch embedding, the
    time/text embedders, norm_out, proj_out and the depthwise control convolutions are not counted.
  * QuaRot / QueST W4A4: every block linear (also the unused ones) at 4 bits, everything else at 32 bits:
    359.3 M (paper 359); ops = FP / 64 = 2,663.7 G (paper 2,664). Group scales are not counted.
  * SVDQuant / Q-DiT4SR W4A4 (paper 465 M / 2,776 G): the 16-bit low-rank branches are counted at 32 bits in
    size and their MACs at the layer's W4A4 in ops ("paper" convention). With SVDQuant's rank 32 this gives
    444.2 M / 2,753.7 G; rank 40 gives 465.4 M / 2,776.2 G, the only (rank, counting) combination in a grid
    search (rank 8..128, branch at 16/32 bits, ops at 4x4/16x4/16x16, with/without adaLN and unused
    linears, with/without group scales) that hits both figures. We report rank 32 (SVDQuant's published
    rank, MISSION.md) and show rank 40 next to it.
Conventions (`convention=`):
  "paper":   as above (quantized kernels at their w_bits, every other parameter incl. branches at 32 bits;
             ops of kernel + branches at w_bits x a_bits).
  "mission": MISSION.md's reading: branches at their stored bits in size (16; 8 with `lowrank_bits=8`, whose
             per-vector scales go to `scale_bits`) and at 16 x 16 in ops (int8 factors are dequantized and
             run in 16 bits); rest as "paper".
Mixed precision: from a config, the targets (w_bits, a_bits) are used (size is linear in the bits, and
VaSMP / VaTMP meet the averages); from a quantized tree (`qparams=`), each node's w_bits and the mean of
its activation schedule are used.
Scales: `size_M` follows the paper (scales not counted); `scale_bits` / `size_M_with_scales` add the
weight scales as stored: float32 group scales [N, G] (+ int8 zero points), or, with two-level integer
group scales (`QuantConfig.w_group_scale="int"`), the float32 per-channel scale [N] plus the 4-bit packed
integer factors [N, G] (`QuantizedWeight.gscale`); from a quantized tree, the bytes of those arrays.
Resolution: output H x W -> latent (H / 8, W / 8); latents larger than `tile_latent` are processed as
the sampler does (square tiles of min(tile, h, w), overlap `tile_overlap`), each tile a full forward.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qdit4sr_jax.config import ModelConfig
from qdit4sr_jax.quant import hsvd as H
from qdit4sr_jax.quant.config import DEFAULT_INCLUDE, QuantConfig

# Figure 1 of the paper (x4, RealLQ250): (size M, ops G)
PAPER_FIGURE1 = {
    "FP": (2717, 170476),
    "QuaRot W4A4": (359, 2664),
    "QueST W4A4": (359, 2664),
    "SVDQuant W4A4": (465, 2776),
    "Q-DiT4SR W4A4": (465, 2776),
}


@dataclasses.dataclass(frozen=True)
class LinearInfo:
    """One linear layer: path ('/'-joined module path), d_in, d_out, bias, tokens per forward (batch 1)."""
    path: str
    d_in: int
    d_out: int
    bias: bool
    tokens: int
    used: bool = True


# ---------------------------------------------------------------------------------------------- inventory

def _flat_shapes(tree) -> Dict[str, tuple]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out["/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)] = tuple(leaf.shape)
    return out


def _tiles(model_cfg: ModelConfig, h: int, w: int):
    """(number of tiles, tile h, tile w) for a latent h x w, as `sampling.tiled_apply` does."""
    from qdit4sr_jax.sampling import needs_tiling, tile_offsets
    tile, overlap = model_cfg.tile_latent, model_cfg.tile_overlap
    if not needs_tiling(h, w, tile):
        return 1, h, w
    t = min(tile, h, w)
    if overlap >= t and t < tile:
        overlap = t // 2
    return len(tile_offsets(h, t, overlap)) * len(tile_offsets(w, t, overlap)), t, t


def _abstract_forward_inputs(model_cfg: ModelConfig, latent_hw):
    """(model, abstract params, x / lr [1,h,w,C], context [1,L,D], pooled [1,P]) as ShapeDtypeStructs, batch 1."""
    from qdit4sr_jax.model.dit4sr import DiT4SRTransformer, param_shapes
    h, w = latent_hw
    sd = jax.ShapeDtypeStruct
    return (DiT4SRTransformer(model_cfg), param_shapes(model_cfg),
            sd((1, h, w, model_cfg.in_channels), jnp.float32),
            sd((1, model_cfg.context_len, model_cfg.joint_attention_dim), jnp.float32),
            sd((1, model_cfg.pooled_projection_dim), jnp.float32))


def linear_inventory(model_cfg: ModelConfig, latent_hw=(64, 64), *, count_unused: bool = True):
    """Every linear of the transformer with its tokens per forward at `latent_hw` (batch 1), from
    `jax.eval_shape` (no weights, no compute) -> (list of LinearInfo, {path: shape} of all params,
    number of non-linear-kernel, non-bias parameters)."""
    import flax.linen as nn
    from qdit4sr_jax.model.layers import Linear

    model, shapes, x, ctx, pooled = _abstract_forward_inputs(model_cfg, latent_hw)
    flat = _flat_shapes(shapes)
    calls: Dict[str, int] = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Linear) and context.method_name == "__call__":
            path = "/".join(context.module.path)
            calls[path] = calls.get(path, 0) + int(np.prod(args[0].shape[:-1]))
        return next_fun(*args, **kwargs)

    def fwd(p, x, lr, c, pp):
        with nn.intercept_methods(record):
            return model.apply({"params": p}, x, lr if model_cfg.lr_stream else None, jnp.zeros((1,)), c, pp)

    jax.eval_shape(fwd, shapes, x, x, ctx, pooled)
    lin = []
    for k, s in flat.items():
        if k.endswith("/kernel") and len(s) == 2:
            p = k[: -len("/kernel")]
            lin.append(LinearInfo(p, s[0], s[1], (p + "/bias") in flat, calls.get(p, 0), p in calls))
    if count_unused:
        lin += unused_checkpoint_linears(model_cfg)
    lin_keys = {li.path + "/kernel" for li in lin} | {li.path + "/bias" for li in lin}
    other = sum(int(np.prod(s)) for k, s in flat.items() if k not in lin_keys)
    if count_unused:
        other += unused_checkpoint_other(model_cfg)
    return lin, flat, other


def unused_checkpoint_linears(model_cfg: ModelConfig) -> List[LinearInfo]:
    """Linears the PyTorch DiT4SR checkpoint holds but never runs: attn2/{add_q_proj, add_k_proj,
    add_v_proj, to_add_out} [D, D] + bias in every dual-attention block (diffusers builds attn2 with
    added projections that SD3.5's forward ignores)."""
    D = model_cfg.hidden_size
    return [LinearInfo(f"transformer_blocks_{i}/attn2/{n}", D, D, True, 0, used=False)
            for i in model_cfg.dual_attention_layers for n in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]


def unused_checkpoint_other(model_cfg: ModelConfig) -> int:
    """attn2/norm_added_q and norm_added_k scales of the dual-attention blocks (unused)."""
    return 2 * model_cfg.attention_head_dim * len(model_cfg.dual_attention_layers) if model_cfg.qk_norm else 0


# ---------------------------------------------------------------------------------------------- accounting

def _branch_params(d_out: int, d_in: int, qcfg: Optional[QuantConfig]) -> int:
    if qcfg is None or qcfg.lowrank_rank <= 0:
        return 0
    if qcfg.hsvd:
        blk = H.effective_block(d_out, d_in, tuple(qcfg.hsvd_block))
        return H.hsvd_params(d_out, d_in, H.matched_global_rank(d_out, d_in, qcfg.lowrank_rank, blk), blk)
    return min(qcfg.lowrank_rank, d_out, d_in) * (d_out + d_in)


def _config_branch_scales(d_out: int, d_in: int, qcfg: QuantConfig) -> int:
    """Number of branch-factor scales of one [d_out, d_in] linear when `qcfg.lowrank_bits` stores the factors
    as int8 (`qweight.quantize_factor`: one per input channel of lr_a, output channel of lr_b, block vector)."""
    if qcfg.lowrank_bits is None or qcfg.lowrank_rank <= 0:
        return 0
    n = d_in + d_out
    if qcfg.hsvd:
        bo, bi = H.effective_block(d_out, d_in, tuple(qcfg.hsvd_block))
        n += 2 * (-(-d_out // bo)) * (-(-d_in // bi))
    return n


def _node_branch_bits(node) -> float:
    """Bits per stored branch-factor value of a QuantizedWeight: 8 for int8 factors, else its float dtype's."""
    if node.branch_bits is not None:
        return float(node.branch_bits)
    f = node.lr_a if node.lr_a is not None else node.block_u
    return 16.0 if f is None else 8.0 * np.dtype(f.dtype).itemsize


def _node_bits(node):
    """(w_bits, mean activation bits or None, branch params) of a QuantizedWeight."""
    a = None
    if node.a_schedule is not None:
        a = float(np.mean(np.asarray(node.a_schedule)))
    elif node.a_bits is not None:
        a = float(node.a_bits)
    k, n = node.shape
    br = 0
    if node.lr_a is not None:
        br += int(node.lr_a.shape[-1]) * (k + n)
    if node.block_u is not None:
        nbo, nbi = node.block_u.shape[-3], node.block_u.shape[-2]
        br += nbi * n + nbo * k
    return float(node.w_bits), a, br


def _node_scale_bits(node) -> float:
    """Bits of a QuantizedWeight's weight scales as stored: scale, zero points, integer group factors and the
    scales of int8 branch factors."""
    arrays = (node.scale, node.zero, node.gscale, node.lr_a_scale, node.lr_b_scale, node.block_u_scale,
              node.block_v_scale)
    return float(sum(8 * np.dtype(a.dtype).itemsize * int(np.prod(a.shape)) for a in arrays if a is not None))


def _config_scale_bits(d_out: int, d_in: int, qcfg: QuantConfig, w_bits: float) -> float:
    """Bits of the weight scales of one [d_out, d_in] linear quantized by `qcfg` (as `make_qweight` stores
    them; mixed precision: at the rounded target bits)."""
    from qdit4sr_jax.quant import quantizer as qz
    b = int(round(w_bits))
    G, _ = qz.num_groups(d_in, qcfg.w_group_size)
    if getattr(qcfg, "w_group_scale", "float") == "int":
        if G == 1 or qz.int_scale_max(b) == 1:
            return 32.0 * d_out
        return 32.0 * d_out + 8.0 * d_out * (-(-G // 2))
    return (32.0 + (0.0 if qcfg.w_symmetric else 8.0)) * d_out * G


def size_ops(model_cfg: ModelConfig, qcfg: Optional[QuantConfig] = None, *, qparams=None, height: int = 512,
             width: int = 512, steps: Optional[int] = None, guidance: Optional[bool] = None,
             convention: str = "paper", count_unused: bool = True, ops_scope: Sequence[str] = DEFAULT_INCLUDE,
             inventory=None) -> dict:
    """Size (M) and ops per image (G) of `model_cfg` under `qcfg` (None = floating point).

    qparams: a quantized params tree (from `quantize`) to read per-layer bits / schedules / branches from
      (with qcfg too, qcfg decides only for the checkpoint's unused linears, which are not in the tree).
    height, width: output image size in pixels; steps: sampling steps (default model_cfg.num_steps);
    guidance: CFG doubles the forwards (default: model_cfg.guidance_scale != 1).
    convention: "paper" | "mission" (module docstring). ops_scope: regexes of the linears whose MACs count.
    Returns a dict with size_M, ops_G, params, macs_per_forward, forwards, tiles, latent, per_layer,
    scale_bits (weight scales as stored, not in size_M) and size_M_with_scales.
    """
    if convention not in ("paper", "mission"):
        raise ValueError(f"convention must be 'paper' or 'mission', got {convention!r}")
    from qdit4sr_jax.quant import rules
    down = model_cfg.vae.downsample
    if height % down or width % down:
        raise ValueError(f"output size {height}x{width} must be a multiple of the VAE factor {down}")
    lh, lw = height // down, width // down
    n_tiles, th, tw = _tiles(model_cfg, lh, lw)
    lin, _, other = inventory or linear_inventory(model_cfg, (th, tw), count_unused=count_unused)
    steps = model_cfg.num_steps if steps is None else int(steps)
    if guidance is None:
        guidance = model_cfg.guidance_scale != 1.0
    forwards = steps * (2 if guidance else 1) * n_tiles
    nodes = {}
    if qparams is not None:
        from qdit4sr_jax.quant.api import quantized_layers
        nodes = quantized_layers(qparams)
    scope = [re.compile(r) for r in ops_scope]
    bits_sum = 32.0 * other
    scale_bits = 0.0
    ops = 0.0
    params = other
    per_layer = []
    for li in lin:
        n_k = li.d_in * li.d_out
        params += n_k + (li.d_out if li.bias else 0)
        bits_sum += 32.0 * (li.d_out if li.bias else 0)
        sb = 0.0
        b_bits = 16.0           # stored branch bits ("mission" size)
        if li.path in nodes:
            wb, ab, br = _node_bits(nodes[li.path])
            sb = _node_scale_bits(nodes[li.path])
            b_bits = _node_branch_bits(nodes[li.path])
        elif qcfg is not None and (qparams is None or not li.used) and \
                rules.selected(li.path, qcfg.include, qcfg.exclude):
            wb, ab, br = float(qcfg.w_bits), (None if qcfg.a_bits is None else float(qcfg.a_bits)), \
                _branch_params(li.d_out, li.d_in, qcfg)
            sb = _config_scale_bits(li.d_out, li.d_in, qcfg, wb)
            float_bits = 8.0 * np.dtype(jnp.dtype(qcfg.branch_dtype)).itemsize
            b_bits = float_bits
            if qcfg.lowrank_bits is not None:
                b_bits = float(qcfg.lowrank_bits)
                sb += float_bits * _config_branch_scales(li.d_out, li.d_in, qcfg)
        else:
            wb, ab, br = 32.0, 32.0, 0
        scale_bits += sb
        ab = 32.0 if ab is None else ab
        if convention == "paper":
            b_bits = 32.0
        bits_sum += wb * n_k + b_bits * br
        macs = li.tokens * (n_k + br)
        if any(r.search(li.path) for r in scope):
            if convention == "paper":
                ops += li.tokens * (n_k + br) * wb * ab / 1024.0
            else:
                ops += li.tokens * (n_k * wb * ab + br * 256.0) / 1024.0
        per_layer.append(dict(path=li.path, d_in=li.d_in, d_out=li.d_out, tokens=li.tokens, w_bits=wb, a_bits=ab,
                              branch_params=br, macs=macs, used=li.used, scale_bits=sb))
    return dict(size_M=bits_sum / 32.0 / 1e6, ops_G=ops * forwards / 1e9, params=int(params),
                scale_bits=scale_bits, size_M_with_scales=(bits_sum + scale_bits) / 32.0 / 1e6,
                macs_per_forward=float(sum(p["macs"] for p in per_layer
                                           if any(r.search(p["path"]) for r in scope))),
                forwards=forwards, tiles=n_tiles, latent=(lh, lw), steps=steps, guidance=bool(guidance),
                convention=convention, per_layer=per_layer)


def dense_flops_per_forward(model_cfg: ModelConfig, latent_hw=(64, 64), inventory=None) -> dict:
    """All matmul / conv FLOPs (2 x MACs) of one forward (batch 1) from the jaxpr of the model at
    `latent_hw`: {"total": ..., "linear": ..., "attention_and_conv": ...} in FLOP (abstract, no compute)."""
    model, shapes, x, ctx, pooled = _abstract_forward_inputs(model_cfg, latent_hw)
    jaxpr = jax.make_jaxpr(lambda p, x, lr, c, pp: model.apply(
        {"params": p}, x, lr if model_cfg.lr_stream else None, jnp.zeros((1,)), c, pp))(shapes, x, x, ctx, pooled)

    def count(jp):
        tot = 0
        for e in jp.eqns:
            if e.primitive.name == "dot_general":
                (lc, _), _ = e.params["dimension_numbers"]
                a = e.invars[0].aval
                tot += int(np.prod(e.outvars[0].aval.shape)) * int(np.prod([a.shape[i] for i in lc]))
            elif e.primitive.name == "conv_general_dilated":
                rhs = e.invars[1].aval
                dn = e.params["dimension_numbers"]
                spatial = [rhs.shape[i] for i in dn.rhs_spec[2:]]
                tot += int(np.prod(e.outvars[0].aval.shape)) * int(np.prod(spatial)) * int(rhs.shape[dn.rhs_spec[1]])
            for v in e.params.values():
                for sub in (v if isinstance(v, (list, tuple)) else [v]):
                    if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        tot += count(sub.jaxpr)
                    elif hasattr(sub, "eqns"):
                        tot += count(sub)
        return tot

    total = 2 * count(jaxpr.jaxpr)
    lin, _, _ = inventory or linear_inventory(model_cfg, latent_hw, count_unused=False)
    linear = 2 * sum(li.tokens * li.d_in * li.d_out for li in lin)
    return {"total": total, "linear": linear, "attention_and_conv": total - linear}


# ---------------------------------------------------------------------------------------------- the table

REPORT_ROWS = (
    # (label, preset or None, overrides, paper figure key)
    ("FP (32-bit)", None, {}, "FP"),
    ("rotation-w4a4 (QuaRot-style)", "rotation-w4a4", {}, "QuaRot W4A4"),
    ("svdquant-w4a4 (rank 32)", "svdquant-w4a4", {}, "SVDQuant W4A4"),
    ("svdquant-w4a4 (rank 40)", "svdquant-w4a4", {"lowrank_rank": 40}, "SVDQuant W4A4"),
    ("qdit4sr-w4a4 (H-SVD, rank-32 budget)", "qdit4sr-w4a4", {}, "Q-DiT4SR W4A4"),
    ("qdit4sr-w4a6", "qdit4sr-w4a6", {}, None),
)


def report_table(model_cfg: ModelConfig, *, height: int = 512, width: int = 512, steps=None, guidance=None,
                 convention: str = "paper", rows=REPORT_ROWS, inventory=None) -> List[dict]:
    """Size / ops of each row's preset on `model_cfg`, with the paper's figure where it has one.
    inventory: `linear_inventory(model_cfg, tile latent)` if already computed."""
    down = model_cfg.vae.downsample
    _, th, tw = _tiles(model_cfg, height // down, width // down)
    inv = inventory or linear_inventory(model_cfg, (th, tw))
    out = []
    for label, preset, over, key in rows:
        q = None if preset is None else QuantConfig.preset(preset).replace(**over)
        r = size_ops(model_cfg, q, height=height, width=width, steps=steps, guidance=guidance,
                     convention=convention, inventory=inv)
        paper = PAPER_FIGURE1.get(key) if model_cfg.name == "dit4sr" else None
        out.append(dict(label=label, size_M=r["size_M"], ops_G=r["ops_G"], paper=paper, forwards=r["forwards"],
                        params=r["params"], latent=r["latent"], tiles=r["tiles"]))
    return out


def format_table(rows: List[dict]) -> str:
    lines = [f"{'method':40s} {'size (M)':>10s} {'ops (G)':>12s}   {'paper size':>10s} {'paper ops':>10s}"]
    for r in rows:
        p = r["paper"]
        ps = "" if p is None else f"{p[0]:>10,d} {p[1]:>10,d}"
        lines.append(f"{r['label']:40s} {r['size_M']:>10,.1f} {r['ops_G']:>12,.1f}   {ps}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots

def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("plots need matplotlib: pip install 'qdit4sr-jax[plots]'") from e


def plot_weight_bits(qparams, path: str) -> str:
    """Bar chart of each quantized layer's weight bits (VaSMP) -> PNG at `path`."""
    from qdit4sr_jax.quant.api import quantized_layers
    nodes = quantized_layers(qparams)
    plt = _plt()
    names = list(nodes)
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(names)), 3.2))
    ax.bar(range(len(names)), [nodes[n].w_bits for n in names], color="tab:blue")
    sizes = np.array([np.prod(nodes[n].shape) for n in names], np.float64)
    avg = float(np.sum(sizes * [nodes[n].w_bits for n in names]) / np.sum(sizes))
    ax.axhline(avg, color="k", lw=0.8, ls="--", label=f"size-weighted mean {avg:.3f}")
    ax.set_xlabel("layer (tree order)")
    ax.set_ylabel("weight bits")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_activation_schedule(qparams, path: str) -> str:
    """Heatmap [layer x sampling step] of the VaTMP activation bits -> PNG at `path`."""
    from qdit4sr_jax.quant.api import quantized_layers
    nodes = {n: q for n, q in quantized_layers(qparams).items() if q.a_schedule is not None}
    if not nodes:
        raise ValueError("no quantized layer carries an activation schedule (quantize with vatmp=True)")
    plt = _plt()
    m = np.stack([np.asarray(q.a_schedule) for q in nodes.values()])
    fig, ax = plt.subplots(figsize=(6, max(3, 0.05 * m.shape[0])))
    im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(im, ax=ax, label="activation bits")
    ax.set_xlabel("sampling step")
    ax.set_ylabel("layer (tree order)")
    ax.set_title(f"VaTMP schedule, mean {m.mean():.3f} bits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def hsvd_vs_svd_errors(params, qcfg: QuantConfig) -> Dict[str, tuple]:
    """{layer path: (relative error of the rank-r SVD branch, of the H-SVD branches at the same budget)}
    for every linear `qcfg` selects (weights as stored; ||W - branches||_F / ||W||_F)."""
    from qdit4sr_jax.quant import rules
    out = {}
    for path in rules.select_linears(params, qcfg.include, qcfg.exclude):
        node = params
        for k in path:
            node = node[k]
        w = jnp.asarray(node["kernel"]).T
        n, k = w.shape
        blk = H.effective_block(n, k, tuple(qcfg.hsvd_block))
        s = H.svd_branch(w, min(qcfg.lowrank_rank, n, k))
        f = H.hsvd(w, rank=qcfg.lowrank_rank, block=blk, block_solver=getattr(qcfg, "hsvd_block_solver", "svd"))
        out[rules.path_str(path)] = (float(H.relative_error(w, H.branch_dense(s))),
                                     float(H.relative_error(w, H.branch_dense(f))))
    return out


def plot_hsvd_vs_svd(errors: Dict[str, tuple], path: str) -> str:
    """Per-layer relative residual norm of SVD vs H-SVD branches (from `hsvd_vs_svd_errors`) -> PNG."""
    plt = _plt()
    names = list(errors)
    e = np.array([errors[n] for n in names])
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(names)), 3.2))
    x = np.arange(len(names))
    ax.plot(x, e[:, 0], "o-", ms=3, lw=0.8, label=f"SVD (mean {e[:, 0].mean():.4f})")
    ax.plot(x, e[:, 1], "s-", ms=3, lw=0.8, label=f"H-SVD (mean {e[:, 1].mean():.4f})")
    ax.set_xlabel("layer (tree order)")
    ax.set_ylabel("||W - branches|| / ||W||")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layer_costs(per_layer: List[dict], qcfg: QuantConfig, path: str) -> str:
    """From a config alone (`size_ops(...)["per_layer"]`): MACs per forward of each used linear and the
    branch parameters H-SVD gets at `qcfg`'s budget -> PNG at `path`."""
    plt = _plt()
    rows = [p for p in per_layer if p["used"]]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(6, 0.02 * len(rows)), 5), sharex=True)
    x = np.arange(len(rows))
    a1.bar(x, [p["tokens"] * p["d_in"] * p["d_out"] / 1e9 for p in rows], width=1.0, color="tab:gray")
    a1.set_ylabel("GMAC / forward")
    a2.bar(x, [p["branch_params"] / 1e3 for p in rows], width=1.0, color="tab:orange")
    a2.set_ylabel(f"branch params (k), rank-{qcfg.lowrank_rank} budget")
    a2.set_xlabel("linear layer (tree order)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- CLI

def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="qdit4sr-jax report", description="size / ops with the paper's definitions")
    ap.add_argument("--config", default="dit4sr", help="ModelConfig preset")
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--convention", default="paper", choices=("paper", "mission"))
    ap.add_argument("--quantized", default=None, help="orbax checkpoint of a quantized model (for plots)")
    ap.add_argument("--plots", default=None, help="folder for PNG plots (per-layer bits: needs --quantized)")
    ap.add_argument("--json", default=None, help="write the table as JSON here")
    a = ap.parse_args(argv)
    cfg = ModelConfig.preset(a.config)
    rows = report_table(cfg, height=a.height, width=a.width, steps=a.steps, convention=a.convention)
    r0 = rows[0]
    print(f"{cfg.name}: {r0['params']:,} parameters (incl. the checkpoint's unused attn2 add_* ones); "
          f"{a.height}x{a.width} output = latent {r0['latent'][0]}x{r0['latent'][1]} in {r0['tiles']} tile(s); "
          f"{r0['forwards']} forwards per image; convention {a.convention!r}")
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.plots:
        os.makedirs(a.plots, exist_ok=True)
        qcfg = QuantConfig.preset("qdit4sr-w4a4")
        r = size_ops(cfg, qcfg, height=a.height, width=a.width, steps=a.steps, convention=a.convention)
        print(plot_layer_costs(r["per_layer"], qcfg, os.path.join(a.plots, "layer_costs.png")))
        if not a.quantized:
            print("per-layer bit plots need a quantized model: pass --quantized PATH (qdit4sr-jax quantize --out PATH)")
            return 0
        from qdit4sr_jax.checkpoint import load
        loaded = load(a.quantized)
        qparams = loaded[0] if isinstance(loaded, tuple) else loaded
        print(plot_weight_bits(qparams, os.path.join(a.plots, "weight_bits.png")))
        try:
            print(plot_activation_schedule(qparams, os.path.join(a.plots, "activation_bits.png")))
        except ValueError as e:
            print(f"no activation heatmap: {e}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
