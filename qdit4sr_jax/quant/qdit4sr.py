"""The Q-DiT4SR method inside `quantize`: (optional smoothing / rotation) -> H-SVD branches ->
VaSMP weight bits from the residual variances -> residual quantized at those bits; VaTMP activation
schedule from calibration statistics stored in every node (`QuantizedWeight.a_schedule`, indexed by
the sampling step inside the jitted sampler).

`quantize(params, cfg)` dispatches here when `cfg.method == "qdit4sr"` or any of `cfg.hsvd`,
`cfg.vasmp`, `cfg.vatmp` is set. Knobs (QuantConfig):
  hsvd, hsvd_block, lowrank_rank   H-SVD at the parameter budget of a rank-`lowrank_rank` SVD branch
                                   (hsvd=False with lowrank_rank > 0: plain SVD branch, the ablation)
  vasmp, w_bits, w_bit_candidates  per-layer bits, size-weighted average <= w_bits (exact allocator)
  vasmp_distortion                 "measured" (default): per layer and candidate, the squared error of
                                   the config's weight quantizer on the residual (data-free);
                                   "model": n sigma^2 2^(-2b) from the residual variance (MISSION.md)
  hsvd_refine_iters                extra alternating global/block refits (0 = the paper's order)
  hsvd_block_solver                "subspace" (fast) or "svd" (exact) rank-1 fit of each block
  lowrank_svd                      "exact" or "randomized" SVD of the global branch
  vatmp, a_bits, a_bit_candidates  per-layer, per-step bits; the average over steps equals a_bits
                                   (floor(a_bits * T) / T); needs `calib` with T steps (stat "var")
  smooth / rotate, w_group_size, ... as for the baselines.
Two passes, each one jitted + vmapped program per group of equal-shape layers: pass 1 computes the
branches (kept in `branch_dtype`), the variance of the residual W - branches (computed from the
rounded factors, so the quantized residual absorbs their rounding) and VaSMP's measured distortions;
pass 2 rebuilds the residual from the stored factors (no second SVD) and quantizes it at the allocated
bits. Compiled programs: one per (layer shape, pass), whatever the number of layers or the widths VaSMP
picks: layers run in fixed-size chunks (`api.balanced_chunks`, the last padded with a repeat), the
weight bits are data (`_residual_program`), and arrays stay on the device (the chunk's kernels go in as
a tuple and the per-layer results come out as a tuple: no stacking, slicing or host round trip outside
the programs). Each program compiles on its first call (concurrent compilation in threads is opt-in:
`compile_threads`); `timings=` records wall seconds per phase (quant/timing.py).
The full DiT4SR (6 layer shapes) compiles 12 programs instead of 52 (benchmarks/quantize_time.py).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from qdit4sr_jax.quant import hsvd as H
from qdit4sr_jax.quant import quantizer as qz
from qdit4sr_jax.quant import rules
from qdit4sr_jax.quant.plan import LayerSpec, balanced_chunks, layer_spec, precompile
from qdit4sr_jax.quant.transforms import sign_weight, hadamard_transform, smooth_scale
from qdit4sr_jax.quant.qweight import ARRAY_FIELDS, STATIC_FIELDS, make_qweight, packs
from qdit4sr_jax.quant.stats import lookup, normalize_calib
from qdit4sr_jax.quant.vasmp import allocate_bits_table, allocate_weight_bits
from qdit4sr_jax.quant.vatmp import schedule_activation_bits


@dataclasses.dataclass(frozen=True)
class BranchSpec:
    """Static recipe of pass 1 for one layer shape."""
    smooth: bool
    smooth_alpha: float
    rotate: int
    rank: int                                   # rank budget (SVD rank, or H-SVD matched budget)
    hsvd: bool
    block: Optional[Tuple[int, int]]            # effective (b_out, b_in) when hsvd
    branch_dtype: str
    refine_iters: int = 0
    block_solver: str = "svd"
    global_solver: str = "exact"
    # VaSMP "measured" distortion: squared error of this weight quantizer at each of `mse_bits`
    mse_bits: Tuple[int, ...] = ()
    group_size: Optional[int] = None
    w_symmetric: bool = True
    clip_ratio: float = 1.0
    clip_search: bool = False
    group_scale: str = "float"                  # "float" | "int" (two-level integer group scales)
    rotate_signs: bool = False                  # randomised Hadamard (the nodes' static `signs`)

    @property
    def has_divisor(self) -> bool:
        """Whether the nodes carry a `smooth` divisor (smoothing; rotation signs are the static `signs`)."""
        return bool(self.smooth)


def _transformed(w_kn, ch, spec):
    """Flax kernel [K, N] -> (W' [N, K] float32 in the transformed input space, smooth [K] | None)."""
    w = w_kn.T.astype(jnp.float32)
    s = None
    if spec.smooth:
        s = smooth_scale(ch, w, spec.smooth_alpha)
        w = w * s[None, :]
    if spec.rotate and spec.rotate_signs:          # randomised Hadamard: the node multiplies x by the signs
        w = sign_weight(w)
    if spec.rotate:
        w = hadamard_transform(w, spec.rotate)
    return w, s


def _branch_dense(lr_a, lr_b, bu, bv, n, k):
    """Dense [N, K] float32 of the (rounded) branch factors."""
    d = jnp.zeros((n, k), jnp.float32)
    if lr_a is not None:
        d = d + (lr_a.astype(jnp.float32) @ lr_b.astype(jnp.float32)).T
    if bu is not None:
        d = d + H.block_dense(bu.astype(jnp.float32), bv.astype(jnp.float32), n, k)
    return d


def _branches_one(w_kn, ch, spec: BranchSpec):
    """One layer of pass 1: Flax kernel [K, N] -> (factor dict in branch_dtype, smooth [K] | None,
    residual variance f32 [], squared errors f32 [len(mse_bits)] | None, all-finite flag)."""
    bdt = jnp.dtype(spec.branch_dtype)
    w, s = _transformed(w_kn, ch, spec)
    n, k = w.shape
    out = {}
    if spec.hsvd:
        f = H.hsvd(w, rank=spec.rank, block=spec.block, refine_iters=spec.refine_iters,
                   block_solver=spec.block_solver, global_solver=spec.global_solver)
        out = dict(lr_a=f.V.astype(bdt), lr_b=f.U.T.astype(bdt), block_u=f.u.astype(bdt),
                   block_v=f.v.astype(bdt))
    elif spec.rank:
        f = H.svd_branch(w, spec.rank, spec.global_solver)
        out = dict(lr_a=f.V.astype(bdt), lr_b=f.U.T.astype(bdt))
    r = w - _branch_dense(out.get("lr_a"), out.get("lr_b"), out.get("block_u"), out.get("block_v"), n, k)
    mse = jnp.stack([_quant_sq_err(r, b, spec) for b in spec.mse_bits]) if spec.mse_bits else None
    return out, s, jnp.var(r), mse, jnp.all(jnp.isfinite(w_kn))


def _unstack(tree, n: int):
    """Stacked pytree (leading axis n) -> tuple of n per-layer pytrees (device arrays stay on device)."""
    return tuple(jax.tree_util.tree_map(lambda a, j=j: a[j], tree) for j in range(n))


@partial(jax.jit, static_argnames=("spec",))
def _branches_program(ws, chs, spec: BranchSpec):
    """Pass 1 for a chunk of C equal-shape layers, vmapped.

    ws: tuple of C Flax kernels [K, N]; chs: tuple of C calibration absmax [K] float32, or None.
    Returns (tuple of C factor dicts {lr_a [K, r], lr_b [r, N], block_u, block_v} in branch_dtype,
    residual variances f32 [C], squared errors f32 [C, len(mse_bits)] | None, all-finite flags bool [C])."""
    w = jnp.stack(ws)
    ch = None if chs is None else jnp.stack(chs)
    fac, _, var, mse, finite = jax.vmap(lambda a, c: _branches_one(a, c, spec))(w, ch)
    return _unstack(fac, len(ws)), var, mse, finite


def _quant_sq_err(r, bits, spec):
    """Total squared error of quantizing r [N, K] at `bits` with the config's weight quantizer."""
    if spec.group_scale == "int":                  # the node's own quantizer (incl. its per-channel fallbacks)
        node = make_qweight(r, w_bits=bits, group_size=spec.group_size, w_symmetric=spec.w_symmetric,
                            clip_ratio=spec.clip_ratio, clip_search=spec.clip_search, pack=False,
                            group_scale="int")
        return jnp.sum(jnp.square(node.dequantize_residual() - r))
    q, sc, z = qz.quantize_weight(r, bits, spec.group_size, spec.w_symmetric, spec.clip_ratio, spec.clip_search)
    return jnp.sum(jnp.square(qz.dequantize_weight(q, sc, z, r.shape[1]) - r))


def _residual_node(r, s, f, bits: int, spec: LayerSpec, bspec: BranchSpec):
    """The node of one layer at static `bits`, codes left unpacked and no a_schedule (both are added
    outside the program, exactly as `make_qweight` would: `_finish_node`)."""
    return make_qweight(
        r, w_bits=bits, group_size=spec.group_size, w_symmetric=spec.w_symmetric,
        a_bits=spec.a_bits, a_symmetric=spec.a_symmetric, clip_ratio=spec.clip_ratio,
        clip_search=spec.clip_search, pack=False, execution=spec.execution, dtype=spec.dtype,
        smooth=s, lr_a=f.get("lr_a"), lr_b=f.get("lr_b"), block_u=f.get("block_u"),
        block_v=f.get("block_v"), block=bspec.block if "block_u" in f else None, rotate=spec.rotate,
        signs=bool(spec.rotate and spec.rotate_signs), a_schedule=None, branch_dtype=spec.branch_dtype,
        **_group_scale_kw(spec))


def _group_scale_kw(spec) -> dict:
    """make_qweight's group_scale argument, passed only when it is not the default "float"."""
    gs = getattr(spec, "group_scale", "float")
    lb = getattr(spec, "lowrank_bits", None)           # int8 branch factors: make_qweight quantizes them
    return ({} if gs == "float" else {"group_scale": gs}) | ({} if lb is None else {"lowrank_bits": lb})


def _node_arrays(node) -> dict:
    return {name: getattr(node, name) for name in ARRAY_FIELDS if getattr(node, name) is not None}


@partial(jax.jit, static_argnames=("spec", "bspec", "bits"))
def _residual_program(ws, chs, facs, idx, spec: LayerSpec, bspec: BranchSpec, bits: Tuple[int, ...]):
    """Pass 2 for a chunk of C equal-shape layers, vmapped: rebuild each residual from its stored factors
    and quantize it at bits[idx[c]]. The weight bits are data (idx int32 [C]) picked by `lax.switch`
    among the static widths `bits` (one bit-exact quantizer per width, all in this one program; under
    vmap every width is computed and the right one selected, cheap next to pass 1).

    ws / chs: as `_branches_program`; facs: tuple of C factor dicts (its output).
    Returns a tuple of C dicts of node arrays (`ARRAY_FIELDS` that are present); with packing, for every
    width b in `bits` that packs (`qweight.packs`), "qvalue_packed_{b}" holds `pack_codes(qvalue, b)`
    ("qvalue" is dropped when every width packs)."""
    w = jnp.stack(ws)
    ch = None if chs is None else jnp.stack(chs)
    fac = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *facs)

    def one(w_kn, c, f, i):
        wt, s = _transformed(w_kn, c, bspec)
        n, k = wt.shape
        r = wt - _branch_dense(f.get("lr_a"), f.get("lr_b"), f.get("block_u"), f.get("block_v"), n, k)
        fns = [partial(lambda r, s, f, b: _node_arrays(_residual_node(r, s, f, b, spec, bspec)), b=b)
               for b in bits]
        out = fns[0](r, s, f) if len(fns) == 1 else jax.lax.switch(i, fns, r, s, f)
        packed = [b for b in bits if packs(b, spec.pack)]
        for b in packed:
            out[f"qvalue_packed_{b}"] = qz.pack_codes(out["qvalue"], b)
        if len(packed) == len(bits):
            del out["qvalue"]
        return out

    return _unstack(jax.vmap(one)(w, ch, fac, idx), len(ws))


# XLA:GPU autotunes the matmuls / fusions of a program while compiling it (timing candidate kernels on
# the card). The quantize programs run a few times each, so XLA's default kernels do: their compilation
# skips the autotuning (`compiler_options`). Empty dict: XLA's defaults. Applied on these backends only.
GPU_COMPILER_OPTIONS: Dict[str, object] = {"xla_gpu_autotune_level": 0}
COMPILER_OPTIONS_BACKENDS = ("gpu",)
_STATIC = {"_branches_program": ("spec",), "_residual_program": ("spec", "bspec", "bits")}
_OPTIONS_ACCEPTED: Dict[tuple, bool] = {}   # compiler options -> whether this XLA accepts them
_VARIANTS: Dict[tuple, object] = {}         # (program name, options) -> the program jitted with them


def _program(fn):
    """`fn` (a jitted pass program) as compiled on this backend: with `GPU_COMPILER_OPTIONS` on GPU.
    The options are tried once on a trivial program; an XLA that rejects them gets `fn` (with a warning)."""
    if jax.default_backend() not in COMPILER_OPTIONS_BACKENDS or not GPU_COMPILER_OPTIONS:
        return fn
    opts = tuple(sorted(GPU_COMPILER_OPTIONS.items()))
    if opts not in _OPTIONS_ACCEPTED:
        try:
            jax.jit(lambda x: x * 2.0, compiler_options=dict(opts)).lower(jnp.float32(1.0)).compile()
            _OPTIONS_ACCEPTED[opts] = True
        except Exception as e:
            import warnings
            warnings.warn(f"quantize: XLA rejected compiler options {dict(opts)} ({e!r:.300}); using its defaults")
            _OPTIONS_ACCEPTED[opts] = False
    if not _OPTIONS_ACCEPTED[opts]:
        return fn
    key = (fn.__name__, opts)
    if key not in _VARIANTS:
        _VARIANTS[key] = jax.jit(fn.__wrapped__, static_argnames=_STATIC[fn.__name__], compiler_options=dict(opts))
    return _VARIANTS[key]


def _finish_node(template, arrays: dict, bits: int, pack: bool, a_schedule):
    """QuantizedWeight from `_residual_program`'s arrays for one layer and the static fields of
    `template` (jax.eval_shape of `_residual_node` at `bits`): packs like make_qweight(pack=pack).
    a_schedule: int [T] (numpy, or an int32 device array), or None."""
    arrays = dict(arrays)
    packed = packs(bits, pack)
    q = arrays.pop(f"qvalue_packed_{bits}", None)
    for key in [key for key in arrays if key.startswith("qvalue_packed_")]:
        del arrays[key]
    if packed:
        arrays["qvalue"] = q
    if a_schedule is not None:
        arrays["a_schedule"] = (a_schedule if isinstance(a_schedule, jax.Array)
                                else jax.device_put(np.asarray(a_schedule, np.int32)))
    fields = {name: arrays.get(name) for name in ARRAY_FIELDS}
    return dataclasses.replace(template, packed=packed, **fields)


def _bits_classes(bits_used, r_shape, spec: LayerSpec, bspec: BranchSpec, f_example, k: int):
    """Group the weight widths of one layer shape by the structure of their nodes (array shapes and
    static fields other than w_bits / packed): widths of one class share a `_residual_program`.
    Returns ({class key: (bits tuple, {bits: template node})})."""
    r = jax.ShapeDtypeStruct(r_shape, jnp.float32)
    s = jax.ShapeDtypeStruct((k,), jnp.float32) if bspec.has_divisor else None
    classes = {}
    for b in sorted(set(bits_used)):
        t = jax.eval_shape(lambda r, s, f, b=b: _residual_node(r, s, f, b, spec, bspec), r, s, f_example)
        key = (tuple((nm, tuple(a.shape), str(a.dtype)) for nm, a in _node_arrays(t).items()),
               tuple((nm, getattr(t, nm)) for nm in STATIC_FIELDS if nm not in ("w_bits", "packed")))
        bs, temps = classes.setdefault(key, ((), {}))
        classes[key] = (bs + (b,), {**temps, b: t})
    return classes


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def branch_spec(cfg, kernel_shape, spec0: LayerSpec, measured: bool) -> BranchSpec:
    """The static pass-1 recipe of a Flax kernel [K, N] under `cfg` (spec0: its `api.layer_spec`;
    measured: VaSMP's measured distortion is on)."""
    k, n = kernel_shape
    rank = int(min(cfg.lowrank_rank, n, k))
    blk = H.effective_block(n, k, tuple(cfg.hsvd_block)) if cfg.hsvd else None
    if cfg.hsvd:
        H.matched_global_rank(n, k, cfg.lowrank_rank, blk)        # clear error before tracing
    return BranchSpec(smooth=spec0.smooth, smooth_alpha=spec0.smooth_alpha, rotate=spec0.rotate,
                      rank=int(cfg.lowrank_rank) if cfg.hsvd else rank, hsvd=bool(cfg.hsvd), block=blk,
                      branch_dtype=cfg.branch_dtype, refine_iters=int(getattr(cfg, "hsvd_refine_iters", 0)),
                      block_solver=str(getattr(cfg, "hsvd_block_solver", "svd")),
                      global_solver=str(getattr(cfg, "lowrank_svd", "exact")),
                      mse_bits=tuple(int(b) for b in cfg.w_bit_candidates) if measured else (),
                      group_size=spec0.group_size, w_symmetric=spec0.w_symmetric,
                      clip_ratio=spec0.clip_ratio, clip_search=spec0.clip_search,
                      group_scale=getattr(spec0, "group_scale", "float"),
                      rotate_signs=bool(getattr(spec0, "rotate_signs", False)))


def activation_schedules(stats: Mapping[str, dict], names, avg_bits, candidates,
                         step_weights=None, use_step_gain: bool = False) -> Dict[str, np.ndarray]:
    """VaTMP for the named layers from calibration stats ({path: {"var": [T], ...}}) -> {path: int [T]}.

    step_weights: optional [T] weights w_t >= 0 of the steps (`quant.stepgain.step_sensitivity`): the DP then
    minimises sum_t w_t sigma_{l,t}^2 2^(-2 a_t) instead of the paper's unweighted sum. use_step_gain: take
    each layer's weights from its stats' "step_gain" (QuantConfig.vatmp_step_weights="sensitivity")."""
    missing = [n for n in names if lookup(stats, n) is None]
    if missing:
        raise ValueError(f"VaTMP: no calibration statistics for layers {missing[:5]}; calibrated layers: "
                         f"{sorted(stats)[:5]}...")
    var = [np.asarray(lookup(stats, n)["var"], np.float64).reshape(-1) for n in names]
    steps = {v.shape[0] for v in var}
    if len(steps) != 1:
        raise ValueError(f"VaTMP: calibration statistics have different step counts {sorted(steps)}; "
                         f"calibrate every layer over the same sampling run")
    var = np.stack(var)
    from qdit4sr_jax.quant.stepgain import check_step_weights
    if step_weights is not None:
        var = var * check_step_weights(step_weights, var.shape[1])[None, :]
    elif use_step_gain:
        no_gain = [n for n in names if "step_gain" not in lookup(stats, n)]
        if no_gain:
            raise ValueError(f"QuantConfig.vatmp_step_weights='sensitivity' needs the sampler's step gains in the "
                             f"calibration statistics (calibrate_images(..., step_gains=True)); layers without "
                             f"them: {no_gain[:3]}")
        var = var * np.stack([check_step_weights(np.asarray(lookup(stats, n)["step_gain"]).reshape(-1),
                                                 var.shape[1]) for n in names])
    sched = schedule_activation_bits(var, avg_bits, candidates)
    return {n: sched[i] for i, n in enumerate(names)}


def quantize_qdit4sr(params, cfg, calib=None, *, layer_w_bits: Optional[Mapping[str, int]] = None,
                     a_schedules: Optional[Mapping[str, object]] = None, chunk: int = 8,
                     return_info: bool = False, compile_threads: int = 1, timings: Optional[dict] = None,
                     step_weights=None):
    """Quantize `params` with the Q-DiT4SR recipe of `cfg` (a validated QuantConfig).

    params: the model params tree (kernels [d_in, d_out]). calib: calibration statistics (needed by
    VaTMP and smoothing). layer_w_bits / a_schedules: explicit per-layer overrides (layer_w_bits cannot
    be combined with VaSMP). chunk: layers per vmapped program call (memory vs dispatches).
    compile_threads: > 1 compiles each pass's programs concurrently in that many threads before they
      run (`api.precompile`); default 1: each program compiles on its first call (on the H100 the
      concurrent compilation did not shorten the quantize: 82.8 s vs 83.4 s, benchmarks/RESULTS.md).
    timings: a dict to fill with wall seconds per phase (`timing.Phases`: "phases", "compile_s",
      "compiles", "total_s"); timing waits for each phase's device work (block_until_ready), so it
      serialises host and device. None (default): no timing, no synchronisation.
    step_weights: optional [T] VaTMP step weights (`activation_schedules`; needs cfg.vatmp).
    Returns the quantized tree (same paths), or (tree, info) with
    return_info=True: info = {"w_bits": {path: bits}, "a_schedule": {path: int [T]},
    "residual_var": {path: float}, "size": {path: params}}.
    """
    from qdit4sr_jax.quant.timing import Phases
    with Phases(timings) as tm:
        return _quantize_qdit4sr(params, cfg, calib, layer_w_bits, a_schedules, chunk, return_info,
                                 compile_threads, tm, step_weights)


def _shape_name(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def _quantize_qdit4sr(params, cfg, calib, layer_w_bits, a_schedules, chunk, return_info, compile_threads, tm,
                      step_weights=None):
    """The recipe in five phases: checks -> VaTMP -> pass 1 (branches) -> VaSMP -> pass 2 (residuals)."""
    names, fixed_bits, stats, measured = _check_inputs(params, cfg, calib, layer_w_bits, a_schedules, step_weights)
    tm.lap("select layers + calib stats")
    scheds = _vatmp_phase(cfg, stats, names, a_schedules, step_weights)
    tm.lap("VaTMP")
    layers = _layer_table(params, cfg, names, stats, measured)
    tm.lap("layer specs (per-layer host loop)")
    _pass1(layers, chunk, compile_threads, tm)
    order, sizes, w_bits = _vasmp_phase(layers, cfg, fixed_bits, measured)
    tm.lap("VaSMP")
    new = _pass2(layers, cfg, w_bits, scheds, chunk, compile_threads, tm)
    out = rules.replace_kernels(params, new)
    tm.lap("tree rebuild")
    if tm.on:
        tm.lap("wait for outputs", jax.tree_util.tree_leaves(out))
    if not return_info:
        return out
    info = {"w_bits": w_bits, "a_schedule": scheds, "residual_var": {nm: layers[nm]["var"] for nm in order},
            "size": {nm: int(s) for nm, s in zip(order, sizes)}}
    if measured:
        info["sq_err"] = {nm: dict(zip(map(int, cfg.w_bit_candidates), layers[nm]["mse"].tolist())) for nm in order}
    return out, info


def _check_inputs(params, cfg, calib, layer_w_bits, a_schedules, step_weights):
    """Phase 0: every check that needs no SVD. Returns (names {path str: tree path}, fixed_bits {path: bits},
    stats (normalised calibration statistics), measured: VaSMP uses the measured distortion table)."""
    if cfg.hsvd and cfg.lowrank_rank <= 0:
        raise ValueError("QuantConfig.hsvd=True needs lowrank_rank > 0 (the parameter budget of the branches)")
    fixed_bits = dict(cfg.layer_w_bits)
    fixed_bits.update(layer_w_bits or {})
    if cfg.vasmp and fixed_bits:
        raise ValueError("QuantConfig.vasmp=True allocates every layer's weight bits; do not also pass "
                         "layer_w_bits (set vasmp=False to use explicit per-layer bits)")
    if cfg.vatmp and cfg.a_bits is None:
        raise ValueError("QuantConfig.vatmp=True needs a_bits (the target average activation bits)")
    if step_weights is not None and not cfg.vatmp:
        raise ValueError("step_weights weight the steps of VaTMP's objective: they need QuantConfig.vatmp=True")
    for on, avg, cands, what in ((cfg.vasmp, cfg.w_bits, cfg.w_bit_candidates, "weight"),
                                 (cfg.vatmp, cfg.a_bits, cfg.a_bit_candidates, "activation")):
        if on and float(avg) < min(cands):                       # fail before any SVD is computed
            raise ValueError(f"infeasible {what}-bit budget: average {avg} is below the smallest candidate "
                             f"{min(cands)} (candidates {tuple(cands)})")
    paths = rules.select_linears(params, cfg.include, cfg.exclude)
    if not paths:
        raise ValueError(f"no linear layer matches include={cfg.include} exclude={cfg.exclude}")
    names = {rules.path_str(p): p for p in paths}
    for what, table in (("layer_w_bits", fixed_bits), ("a_schedules", dict(a_schedules or {}))):
        unknown = sorted(set(table) - set(names))
        if unknown:
            raise ValueError(f"{what} names layers that are not selected linears: {unknown[:5]}")
    stats = normalize_calib(calib)
    if cfg.smooth and not stats:
        raise ValueError("smoothing needs calibration statistics: pass calib=qdit4sr_jax.calibrate(...)")
    if cfg.vatmp and not stats:
        raise ValueError("VaTMP (QuantConfig.vatmp=True) needs calibration statistics over the sampling "
                         "steps: pass calib=qdit4sr_jax.calibrate(model_cfg, params, lr_latent, noise, ...) "
                         "or set vatmp=False")
    distortion = getattr(cfg, "vasmp_distortion", "measured")
    if distortion not in ("measured", "model"):
        raise ValueError(f"QuantConfig.vasmp_distortion must be 'measured' or 'model', got {distortion!r}")
    return names, fixed_bits, stats, bool(cfg.vasmp) and distortion == "measured"


def _vatmp_phase(cfg, stats, names, a_schedules, step_weights) -> Dict[str, np.ndarray]:
    """Phase 1: VaTMP's per-layer, per-step activation bits (a function of the calibration statistics alone, so it
    runs, and fails, before any SVD), with explicit `a_schedules` overriding. Returns {path: int [T]}."""
    scheds = {}
    if cfg.vatmp:
        scheds = activation_schedules(stats, list(names), cfg.a_bits, cfg.a_bit_candidates, step_weights,
                                      use_step_gain=cfg.vatmp_step_weights == "sensitivity")
    for nm, s in (a_schedules or {}).items():
        scheds[nm] = np.asarray(s)
    for nm, s in scheds.items():
        if s.ndim != 1 or not np.issubdtype(s.dtype, np.integer) or s.min() < 2 or s.max() > 8:
            raise ValueError(f"layer {nm!r}: activation schedule must be integers in 2..8 of shape [T]")
    return scheds


def _layer_table(params, cfg, names, stats, measured) -> Dict[str, dict]:
    """Per layer: {path, kernel [K, N], ch (smoothing's ch_absmax [K] on the host) | None, bspec (BranchSpec)}."""
    ch_host = {}
    if cfg.smooth:                       # every layer's ch_absmax on the host in one transfer, not one each
        for name in names:
            st = lookup(stats, name)
            if st is None:
                raise ValueError(f"layer {name!r}: no calibration statistics (smoothing needs them)")
            ch_host[name] = st["ch_absmax"]
        ch_host = jax.device_get(ch_host)
    layers = {}
    for name, path in names.items():
        kernel = _get(params, path)["kernel"]
        k, n = kernel.shape
        spec0 = layer_spec(cfg, kernel.shape, kernel.dtype, 8)
        ch = None
        if spec0.smooth:
            ch = np.max(np.asarray(ch_host[name], np.float32), axis=0)        # on the host: no compilation
            if ch.shape != (k,):
                raise ValueError(f"layer {name!r}: calibration ch_absmax has {ch.shape[0]} channels, kernel d_in={k}")
        layers[name] = dict(path=path, kernel=kernel, ch=ch, bspec=branch_spec(cfg, kernel.shape, spec0, measured))
    return layers


def _grouped(layers) -> Dict[tuple, list]:
    """Layer names by (kernel shape, dtype, BranchSpec): one program per group."""
    g = {}
    for name, L in layers.items():
        g.setdefault((tuple(L["kernel"].shape), str(L["kernel"].dtype), L["bspec"]), []).append(name)
    return g


def _pass1(layers, chunk, compile_threads, tm) -> None:
    """Phase 2: the branches (H-SVD or SVD) of every layer, the residual variance and (measured VaSMP) the
    squared errors at each candidate; fills layers[name]["fac"], ["var"], ["mse"]. One program per group,
    fixed-size chunks, the last padded with its last layer."""
    calls = []
    for (_, _, bspec), group in _grouped(layers).items():
        for part in balanced_chunks(group, chunk):
            ws = tuple(layers[nm]["kernel"] for nm in part)
            chs = None if layers[part[0]]["ch"] is None else tuple(layers[nm]["ch"] for nm in part)
            calls.append((part, (ws, chs, bspec)))
    tm.lap("pass 1 plan")
    if compile_threads > 1:
        precompile(_program(_branches_program), [args for _, args in calls], compile_threads)
        tm.lap("pass 1 precompile (threads)")
    pending = []
    for part, args in calls:
        pending.append((part, _program(_branches_program)(*args)))               # dispatched, not awaited
        if tm.on:                                      # charge each shape's compile + device time to it
            tm.lap(f"pass 1 H-SVD + sq. errors {_shape_name(args[0][0].shape)} (dispatch + device)", pending[-1][1])
    del calls
    for part, (facs, var, mse, finite) in pending:
        var, finite = np.asarray(var, np.float64), np.asarray(finite)
        mse = None if mse is None else np.asarray(mse, np.float64)
        for j, nm in enumerate(part):
            if not finite[j]:
                raise ValueError(f"layer {nm!r}: kernel has non-finite values (NaN/Inf)")
            if "fac" in layers[nm]:
                continue                                                  # chunk padding (a repeat)
            layers[nm]["fac"] = facs[j]
            layers[nm]["var"] = float(var[j])
            if mse is not None:
                layers[nm]["mse"] = mse[j]
    del pending
    tm.lap("pass 1 collect (device_get, per-layer loop)")


def _vasmp_phase(layers, cfg, fixed_bits, measured):
    """Phase 3: every layer's weight bits: VaSMP (measured table or the variance model; cfg.vasmp_solver) or the
    fixed / per-layer bits. Returns (layer order, sizes int64 [L], {path: bits})."""
    order = list(layers)
    sizes = np.array([int(np.prod(layers[nm]["kernel"].shape)) for nm in order], np.int64)
    if measured:
        bits = allocate_bits_table(np.stack([layers[nm]["mse"] for nm in order]), sizes, cfg.w_bits,
                                   cfg.w_bit_candidates, solver=cfg.vasmp_solver)
    elif cfg.vasmp:
        bits = allocate_weight_bits([layers[nm]["var"] for nm in order], sizes, cfg.w_bits, cfg.w_bit_candidates,
                                    solver=cfg.vasmp_solver)
    else:
        if float(cfg.w_bits) != int(cfg.w_bits):
            raise ValueError(f"w_bits={cfg.w_bits} is fractional; that needs vasmp=True")
        bits = [fixed_bits.get(nm, cfg.w_bits) for nm in order]
    return order, sizes, {nm: int(b) for nm, b in zip(order, bits)}


def _pass2(layers, cfg, w_bits, scheds, chunk, compile_threads, tm) -> dict:
    """Phase 4: every residual (rebuilt from pass 1's factors, no second SVD) quantized at its bits, with its
    activation schedule. One program per (shape, dtype, recipe, node structure): the weight bits are data (see
    `_residual_program`), so VaSMP's choice of widths does not multiply the compilations.
    Returns {tree path: QuantizedWeight}."""
    a_default = None if cfg.a_bits is None else int(round(cfg.a_bits))
    if scheds and a_default is None:
        raise ValueError("an activation-bit schedule needs a default a_bits (used when no step is given)")
    calls = []
    for (shape, dt, bspec), group in _grouped(layers).items():
        spec = dataclasses.replace(layer_spec(cfg, shape, dt, 8), a_bits=a_default)
        f0 = layers[group[0]]["fac"]
        classes = _bits_classes([w_bits[nm] for nm in group], (shape[1], shape[0]), spec, bspec, f0, shape[0])
        for bits_cls, temps in classes.values():
            members = [nm for nm in group if w_bits[nm] in bits_cls]
            for part in balanced_chunks(members, chunk):
                ws = tuple(layers[nm]["kernel"] for nm in part)
                chs = None if layers[part[0]]["ch"] is None else tuple(layers[nm]["ch"] for nm in part)
                facs = tuple(layers[nm]["fac"] for nm in part)
                idx = np.array([bits_cls.index(w_bits[nm]) for nm in part], np.int32)
                calls.append((part, temps, spec.pack, (ws, chs, facs, idx, spec, bspec, bits_cls)))
    tm.lap("pass 2 plan (bit classes, eval_shape)")
    if compile_threads > 1:
        precompile(_program(_residual_program), [c[-1] for c in calls], compile_threads)
        tm.lap("pass 2 precompile (threads)")
    sched_dev = jax.device_put({nm: np.asarray(s, np.int32) for nm, s in scheds.items()})   # one transfer
    new = {}
    for part, temps, pack, args in calls:
        outs = _program(_residual_program)(*args)
        if tm.on:
            tm.lap(f"pass 2 residual quantization {_shape_name(args[0][0].shape)} (dispatch + device)", outs)
        for nm, arrays in zip(part, outs):
            b = w_bits[nm]
            new[layers[nm]["path"]] = _finish_node(temps[b], arrays, b, pack, sched_dev.get(nm))
        tm.lap("pass 2 finish nodes (per-layer host loop, a_schedule transfer)")
    return new


__all__ = ["quantize_qdit4sr", "activation_schedules", "BranchSpec"]
