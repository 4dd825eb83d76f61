"""`quantize(params, cfg, calib=None)`: the pure params -> quantized-params transform.

Every selected linear's `kernel` [K, N] is replaced, at the same tree path, by a `QuantizedWeight`
node; everything else is returned unchanged (plain dicts, same keys). Layers are selected with
`QuantConfig.include` / `exclude` regexes over module paths (rules.py). Each layer is quantized by a
jitted `baselines.quantize_linear` with a static `LayerSpec`; layers of equal shape, dtype and spec are
stacked and vmapped in chunks of `chunk` layers (one compilation and one dispatch per chunk).
Deterministic: same inputs, same outputs.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from qdit4sr_jax.quant import rules
from qdit4sr_jax.quant.baselines import LayerSpec, largest_pow2_divisor, quantize_linear
from qdit4sr_jax.quant.config import QuantConfig
from qdit4sr_jax.quant.stats import lookup, normalize_calib


def resolve_config(cfg: Union[str, QuantConfig]) -> QuantConfig:
    if isinstance(cfg, str):
        return QuantConfig.preset(cfg)
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"cfg must be a QuantConfig or a preset name, got {type(cfg).__name__}")
    return cfg.validate()


@partial(jax.jit, static_argnames=("spec",))
def _quantize_stack(ws, chs, scheds, spec: LayerSpec):
    """ws [L, K, N] Flax kernels -> (stacked QuantizedWeight, finite flags [L])."""
    def one(w, ch, sched):
        return quantize_linear(w.T, ch, sched, spec=spec), jnp.all(jnp.isfinite(w))
    return jax.vmap(one)(ws, chs, scheds)


def layer_spec(cfg: QuantConfig, kernel_shape: Tuple[int, int], dtype, w_bits: int) -> LayerSpec:
    """The static recipe of one linear under `cfg` (w_bits may differ per layer)."""
    k = kernel_shape[0]
    rotate = 0
    if cfg.rotate:
        rotate = largest_pow2_divisor(k, cfg.rotate_block)
        rotate = 0 if rotate == 1 else rotate
    return LayerSpec(
        w_bits=int(w_bits), a_bits=None if cfg.a_bits is None else int(round(cfg.a_bits)),
        group_size=cfg.w_group_size, w_symmetric=cfg.w_symmetric, a_symmetric=cfg.a_symmetric,
        clip_ratio=float(cfg.w_clip_ratio), clip_search=bool(cfg.w_clip_search), smooth=cfg.smooth,
        smooth_alpha=float(cfg.smooth_alpha), rotate=rotate,
        lowrank_rank=int(min(cfg.lowrank_rank, *kernel_shape)), lowrank_svd=cfg.lowrank_svd, pack=cfg.pack, execution=cfg.execution,
        branch_dtype=cfg.branch_dtype, dtype=str(jnp.dtype(dtype)))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def quantize(params, cfg: Union[str, QuantConfig], calib=None, *,
             layer_w_bits: Optional[Mapping[str, int]] = None,
             a_schedules: Optional[Mapping[str, object]] = None, chunk: int = 8):
    """Quantize a params tree.

    params: the model's params (nested dicts; a {'params': ...} variables dict is accepted and kept).
    cfg: QuantConfig or preset name ("w4a4", "svdquant-w4a4", ...).
    calib: calibration statistics (`calibrate(...)`'s output, or the raw Flax 'calib' collection);
      needed by smoothing (SmoothQuant / SVDQuant): the per-channel absmax is maxed over steps.
    layer_w_bits: {module path: weight bits} overriding cfg.w_bits per layer (added to cfg.layer_w_bits).
    a_schedules: {module path: int array [T]} per-step activation bits (VaTMP), stored in the nodes.
    Returns the quantized params (same tree paths; kernels replaced by QuantizedWeight nodes).
    """
    cfg = resolve_config(cfg)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        return {"params": quantize(params["params"], cfg, calib, layer_w_bits=layer_w_bits,
                                   a_schedules=a_schedules, chunk=chunk)}
    if cfg.method == "qdit4sr" or cfg.hsvd or cfg.vasmp or cfg.vatmp:
        # the paper's method (H-SVD -> VaSMP -> residual quantization, VaTMP schedules): quant/qdit4sr.py
        from qdit4sr_jax.quant.qdit4sr import quantize_qdit4sr
        return quantize_qdit4sr(params, cfg, calib, layer_w_bits=layer_w_bits, a_schedules=a_schedules,
                                chunk=chunk)
    paths = rules.select_linears(params, cfg.include, cfg.exclude)
    if rules.find_quantized(params) and not paths:
        raise ValueError("params are already quantized (QuantizedWeight nodes found, no float linear selected)")
    if not paths:
        raise ValueError(f"no linear layer matches include={cfg.include} exclude={cfg.exclude}; "
                         f"linear paths in this tree: {[rules.path_str(p) for p in rules.find_linears(params)][:8]}")
    names = {rules.path_str(p): p for p in paths}
    bits_for = dict(cfg.layer_w_bits)
    bits_for.update(layer_w_bits or {})
    scheds = dict(a_schedules or {})
    for what, table in (("layer_w_bits", bits_for), ("a_schedules", scheds)):
        unknown = sorted(set(table) - set(names))
        if unknown:
            raise ValueError(f"{what} names layers that are not selected linears: {unknown[:5]}")
    stats = normalize_calib(calib)
    if cfg.smooth and not stats:
        raise ValueError(f"method {cfg.method!r} uses smoothing and needs calibration statistics: "
                         f"pass calib=qdit4sr_jax.calibrate(...)")

    groups: Dict[tuple, list] = {}
    for name, path in names.items():
        kernel = _get(params, path)["kernel"]
        if 0 in kernel.shape:
            raise ValueError(f"layer {name!r}: cannot quantize a zero-size kernel of shape {kernel.shape}")
        w_bits = bits_for.get(name, cfg.w_bits)
        if float(w_bits) != int(w_bits):
            raise ValueError(f"layer {name!r}: weight bits {w_bits} must be an integer")
        spec = layer_spec(cfg, kernel.shape, kernel.dtype, int(w_bits))
        ch = None
        if spec.smooth:
            st = lookup(stats, name)
            if st is None:
                raise ValueError(f"layer {name!r}: no calibration statistics (smoothing needs them); "
                                 f"calibrated layers: {sorted(stats)[:5]}...")
            ch = jnp.max(st["ch_absmax"], axis=0)
            if ch.shape != (kernel.shape[0],):
                raise ValueError(f"layer {name!r}: calibration ch_absmax has {ch.shape[0]} channels, "
                                 f"kernel has d_in={kernel.shape[0]}")
        sched = scheds.get(name)
        if sched is not None:
            sched = np.asarray(sched)
            if sched.ndim != 1 or not np.issubdtype(sched.dtype, np.integer) or \
                    sched.min() < 2 or sched.max() > 8:
                raise ValueError(f"layer {name!r}: activation schedule must be integers in 2..8 of shape [T], "
                                 f"got {sched.dtype} {sched.shape} {sched.tolist()[:8]}")
            if spec.a_bits is None:
                raise ValueError(f"layer {name!r}: an activation schedule needs cfg.a_bits (the default)")
            sched = jnp.asarray(sched, jnp.int32)
        key = (tuple(kernel.shape), str(kernel.dtype), spec, None if sched is None else sched.shape)
        groups.setdefault(key, []).append((name, path, kernel, ch, sched))

    new = {}
    for (_, _, spec, _), items in groups.items():
        for i in range(0, len(items), chunk):
            part = items[i:i + chunk]
            ws = jnp.stack([jnp.asarray(it[2]) for it in part])
            chs = None if part[0][3] is None else jnp.stack([it[3] for it in part])
            scs = None if part[0][4] is None else jnp.stack([it[4] for it in part])
            nodes, finite = _quantize_stack(ws, chs, scs, spec)
            finite = np.asarray(finite)
            for j, (name, path, _, _, _) in enumerate(part):
                if not finite[j]:
                    raise ValueError(f"layer {name!r}: kernel has non-finite values (NaN/Inf); "
                                     f"fix the checkpoint before quantizing")
                new[path] = jax.tree_util.tree_map(lambda a, j=j: a[j], nodes)
    return rules.replace_kernels(params, new)


def quantized_layers(qparams) -> Dict[str, object]:
    """{module path: QuantizedWeight} of a quantized tree."""
    return {rules.path_str(p): _get(qparams, p)["kernel"] for p in rules.find_quantized(qparams)}
