"""`quantize(params, cfg, calib=None)`: the pure params -> quantized-params transform.

Every selected linear's `kernel` [K, N] is replaced, at the same tree path, by a `QuantizedWeight`
node; everything else is returned unchanged (plain dicts, same keys). Layers are selected with
`QuantConfig.include` / `exclude` regexes over module paths (rules.py). Each layer is quantized by a
jitted `baselines.quantize_linear` with a static `LayerSpec`; layers of equal shape, dtype and spec are
stacked and vmapped in chunks of one size <= `chunk` per group (`balanced_chunks`: one compilation per
group, one dispatch per chunk). `enable_compilation_cache(dir)` opts in to JAX's persistent cache.
Deterministic: same inputs, same outputs.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from qdit4sr_jax.quant import rules
from qdit4sr_jax.quant.baselines import quantize_linear
from qdit4sr_jax.quant.plan import LayerSpec, balanced_chunks, layer_spec, precompile  # noqa: F401  (re-exported)
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


def enable_compilation_cache(path: str, *, min_compile_time_s: float = 0.0) -> str:
    """Opt in to JAX's persistent compilation cache in directory `path` (created if missing): a later
    process running the same programs (same shapes, config, JAX version and device) loads them instead
    of compiling; `quantize` of the full DiT4SR compiles ~12 programs (benchmarks/quantize_time.py).
    Call before the first compilation you want cached; programs that compiled faster than
    `min_compile_time_s` are not written (JAX's default is 1 s). Returns the absolute path.
    The cache directory is trusted code: do not share it with users you do not trust (JAX's warning).
    Equivalent to `jax.config.update("jax_compilation_cache_dir", path)` plus the threshold."""
    if not path:
        raise ValueError("enable_compilation_cache: give a directory path")
    path = os.path.abspath(os.path.expanduser(str(path)))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    try:                               # a cache already initialised (another directory) is re-read
        from jax.experimental.compilation_cache import compilation_cache as _cc
        _cc.reset_cache()
    except Exception:                  # older / newer JAX without reset_cache: the config update suffices
        pass
    return path


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def quantize(params, cfg: Union[str, QuantConfig], calib=None, *,
             layer_w_bits: Optional[Mapping[str, int]] = None,
             a_schedules: Optional[Mapping[str, object]] = None, chunk: int = 8,
             timings: Optional[dict] = None, step_weights=None):
    """Quantize a params tree.

    params: the model's params (nested dicts; a {'params': ...} variables dict is accepted and kept).
    cfg: QuantConfig or preset name ("w4a4", "svdquant-w4a4", ...).
    calib: calibration statistics (`calibrate(...)`'s output, or the raw Flax 'calib' collection);
      needed by smoothing (SmoothQuant / SVDQuant): the per-channel absmax is maxed over steps.
    layer_w_bits: {module path: weight bits} overriding cfg.w_bits per layer (added to cfg.layer_w_bits).
    a_schedules: {module path: int array [T]} per-step activation bits (VaTMP), stored in the nodes.
    step_weights: optional [T] weights of the sampling steps in VaTMP's objective (needs cfg.vatmp), e.g.
      `quant.stepgain.step_sensitivity(...)`; None: cfg.vatmp_step_weights decides (the paper's unweighted
      sum over steps, or the "step_gain" of the calibration statistics).
    timings: optional dict filled with wall seconds per phase (quant/timing.py; waits for the device
      work of each phase, so leave it None when not measuring).
    Returns the quantized params (same tree paths; kernels replaced by QuantizedWeight nodes).
    """
    cfg = resolve_config(cfg)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        return {"params": quantize(params["params"], cfg, calib, layer_w_bits=layer_w_bits,
                                   a_schedules=a_schedules, chunk=chunk, timings=timings,
                                   step_weights=step_weights)}
    if cfg.method == "qdit4sr" or cfg.hsvd or cfg.vasmp or cfg.vatmp:
        # the paper's method (H-SVD -> VaSMP -> residual quantization, VaTMP schedules): quant/qdit4sr.py
        from qdit4sr_jax.quant.qdit4sr import quantize_qdit4sr
        return quantize_qdit4sr(params, cfg, calib, layer_w_bits=layer_w_bits, a_schedules=a_schedules,
                                chunk=chunk, timings=timings, step_weights=step_weights)
    if step_weights is not None:
        raise ValueError(f"step_weights weight the steps of VaTMP's objective; method {cfg.method!r} has no "
                         f"VaTMP (QuantConfig.vatmp=False)")
    from qdit4sr_jax.quant.timing import Phases
    with Phases(timings) as tm:
        return _quantize_baseline(params, cfg, calib, layer_w_bits, a_schedules, chunk, tm)


def _quantize_baseline(params, cfg, calib, layer_w_bits, a_schedules, chunk, tm):
    """The baseline methods (RTN / SmoothQuant / SVDQuant / rotation) of `quantize`; tm: timing.Phases."""
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
    tm.lap("select layers + per-layer specs")

    new = {}
    for (_, _, spec, _), items in groups.items():
        for part in balanced_chunks(items, chunk):       # one chunk size per group: no remainder program
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
            tm.lap(f"quantize {'x'.join(map(str, ws.shape[1:]))} (stack + dispatch + device + unstack)")
    out = rules.replace_kernels(params, new)
    tm.lap("tree rebuild")
    if tm.on:
        tm.lap("wait for outputs", jax.tree_util.tree_leaves(out))
    return out


def quantized_layers(qparams) -> Dict[str, object]:
    """{module path: QuantizedWeight} of a quantized tree."""
    return {rules.path_str(p): _get(qparams, p)["kernel"] for p in rules.find_quantized(qparams)}
