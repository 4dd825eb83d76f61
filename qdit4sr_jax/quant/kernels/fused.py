"""Fused quantized linear: one GEMM kernel with the scales, bias and 16-bit branches in its epilogue.

`fused_linear(x, w, bias, act_bits=None, step=None, backend="auto")` computes exactly what
`quant.linear.linear(x, w, bias)` computes for a `QuantizedWeight` (the fake-quant reference,
`quant.reference`), in three
stages:

1. prologue (XLA; fuses into the producer of x): x' = transform(x) (smooth / Hadamard, when present),
   per-token symmetric codes q_x = clip(round(x' / s_x)) as int8 [Mp, K] (Mp = M padded to the row
   tile) with s_x [Mp] float32 (the same quantizer as the reference, so the codes are identical), and
   the branch features dh = x' lr_a and dt (the block rank-1 features t[m, i, j] = <v_ij, x'_j> laid
   out by output block row i) in the branch dtype (`branch_ops`). A `prepared` weight with
   prologue="pallas" does all of this in one Pallas kernel (`prologue_kernel.py`).
   Packed 4-bit weights are unpacked to int8 once per call outside the kernel (`KernelConfig.unpack=
   "xla"`, the default: H100 measurements in benchmarks/gpu_notes.md; two-level "int" group scales are
   folded there too, c * q, and then run as per-channel "nk" weights: `unpacks_in_kernel`), or inside the kernel
   (`unpack="kernel"`): then every run of `chunk` input channels of q_x is stored as [even | odd]
   elements, so that the kernel multiplies the low nibbles with the even half and the high nibbles with
   the odd half (no interleave of the unpacked weight is ever needed).
2. GEMM (Pallas on GPU, lowered by Triton): int8 x int8 -> int32 on the tensor cores; group-wise weights
   scale each group's int32 partial sum in float32 as it leaves the tensor cores.
3. epilogue (same kernel): y = s_x[m] * acc[m, n] (* s_w[n] per channel) + dh[m] @ lr_b[:, n] +
   dt[m, i(n)] @ ub[:, n] + bias, written once in x.dtype (i(n) = n // b_out, the block row of output column
   n; `branch_ops` for the layouts).

Backends: "pallas" (GPU only), "interpret" (the same Pallas kernel run by the Pallas interpreter: CI on
CPU), "xla" (the same prologue and epilogue with XLA ops: the fallback on CPU / TPU, and on GPU for
shapes the kernel does not tile), "auto" ("pallas" on GPU when the shape tiles, else "xla").
Layers the fused path does not cover (float activations, asymmetric activations or weights) run the
reference "int" path of `quant.linear` unchanged.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from qdit4sr_jax.quant import quantizer as qz
from qdit4sr_jax.quant.kernels.branch_ops import (BranchWeights, SharedDown, branch_epilogue, branch_features,
                                                  branch_weights, down_features, joint_features)
from qdit4sr_jax.quant.kernels.operands import (DEFAULT_CONFIG, GROUPED_CONFIG, KernelConfig,  # noqa: F401 (re-exported)
                                                Operands, block_rows, codes_from_scale, default_config, packed_run,
                                                scale_from_max, supports_fused, tiles_ok, unpacks_in_kernel)
from qdit4sr_jax.quant.lowering import target_platform
from qdit4sr_jax.quant.qweight import QuantizedWeight
from qdit4sr_jax.quant.reference import quantized_linear, resolve_act_bits, transform_input

BACKENDS = ("auto", "pallas", "interpret", "xla")


def prologue(x2, w: QuantizedWeight, bits, *, pad_to: int = 1, chunk: Optional[int] = None,
             bw: Optional[BranchWeights] = None, pad_branches: bool = False, xprime: str = "float32",
             joint: bool = False, levels=None, inv_levels=None, step=None,
             shared: Optional[SharedDown] = None, defer_scale: bool = False) -> Operands:
    """x2 [M, K] -> `Operands` (stage 1 of the module docstring). bits: int or traced int32 scalar.
    pad_to: pad the rows to a multiple of this; chunk: with packed weights, split every run of `chunk`
    codes into [even | odd] (None: keep the natural order); bw: the node's `branch_weights`, when
    computed beforehand (a prepared weight), else built here (pad_branches: with the zero padding of ranks
    and block rows that the Pallas kernels' tiles need); xprime: the dtype a transformed x' is kept in before
    its quantization ("float32", as the reference; "bfloat16": rounded once, `prepare(..., xprime=)`); joint:
    with a joint down-projection whose dt starts on an Rb block (`BranchWeights.dt_col`), return the joint
    features unsliced (`Operands.joint`: for the GEMM kernel, which reads them in place); levels, inv_levels
    (float32 [T], `prepared.KernelWeight`) with step (traced int32): the step's code levels 2^(bits-1) - 1 and
    their reciprocal looked up (bits then unused): the same codes and scales as from bits (XLA computes a / levels
    as a * (1 / levels)) but for all-zero rows (scale 2^-126, not 1; codes zero either way), without two scalar
    kernels per layer and call nor a select after the absmax; shared: the `SharedDown` of the layers reading x
    with this one, for a bw whose jd lives there (`bw.jd_col`): the features come from x shared.jd, one GEMM that
    XLA computes once for all members (the same operands: common-subexpression elimination), and this layer's
    start at `Operands.col` (without shared, such a layer computes its features from x' with its own factors: the
    same function, rounded differently). defer_scale (with levels): return each row's max|x'| as `Operands.sx`
    with the table and step (`Operands.sx_inv` / `sx_step`) for the GEMM kernel to make the scale from (the same
    scale; no kernel of its own for it)."""
    m, k = x2.shape
    if bw is None:
        bw = branch_weights(w, pad=pad_branches)
    mp = -(-m // pad_to) * pad_to
    # Rows are padded once, on the layer's input (zero rows: zero codes and features, scale 1 or, with level
    # tables, 2^-126; one pad for the layers sharing x, to_q / to_k / to_v). Padding the codes, scales and features
    # after they were made cost 379 pad kernels per 512-px W4A4 step on the H100 (0.92 ms; XLA fused none into the
    # kernels writing them), padding x' and x 94 (0.38 ms): benchmarks/RESULTS.md 2026-12-06 22:16.
    if mp != m:
        x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
    x_in = x2 if bw is not None and bw.jd_input else None               # the down GEMM reads x itself
    if w.smooth is not None or w.rotate:
        xt = transform_input(x2, w, inner=xprime)        # x' rounded to bf16 anyway: so may its inner stage
        if xprime != "float32":
            xt = xt.astype(xprime)
    else:
        xt = x2
    deferred = {}
    if levels is not None:
        i = jnp.clip(jnp.asarray(step, jnp.int32), 0, levels.shape[0] - 1)
        lev = levels[i]
        # s = max(max|x'| * (1 / levels), 2^-126) (`operands.scale_from_max`): the reduce reads x' alone, so the
        # layers reading one x' (to_q / to_k / to_v) share it, and the floor replaces `where(s > 0, s, 1)` (a select
        # kernel per layer on the H100, 12-06; inside the reduce, 1 / levels made the reduce per layer, 12-07). A
        # zero row gets scale 2^-126 instead of 1 (its codes and outputs are zero either way); rows with max|x'|
        # below 2^-126 levels (subnormal activations) are the only ones whose codes can differ from the stored node's.
        xf = xt.astype(jnp.float32)
        amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
        s = scale_from_max(amax, inv_levels, step)
        q = codes_from_scale(xf, s, lev)
        if defer_scale:
            s = amax
            deferred = dict(sx_inv=inv_levels, sx_step=jnp.reshape(jnp.asarray(step, jnp.int32), (1,)))
    else:
        s, _ = qz.scale_zero(xt, bits, True, -1)                     # [Mp, 1] f32, as the reference
        q = qz.quantize_codes(xt, s, None, bits, True).astype(jnp.int8)  # [Mp, K]
    if w.layout == "gnk":
        G, g = w.groups
        if G * g != k:
            q = jnp.pad(q, ((0, 0), (0, G * g - k)))
    c = 0
    if w.nibbles and chunk:
        c = chunk
        kp = q.shape[1]
        if kp % c or c % 2:
            raise ValueError(f"packed-code run {c} must be even and divide the padded K={kp}")
        q = q.reshape(mp, kp // c, c // 2, 2).transpose(0, 1, 3, 2).reshape(mp, kp)
    d = None                                   # joint features [dh | dt] holding this layer's from column col
    if bw is not None and bw.jd_col is not None and shared is not None:
        col = bw.jd_col
        if shared.jd.shape[0] != k or col + bw.joint_width > shared.jd.shape[1]:
            raise ValueError(f"shared down-projection {tuple(shared.jd.shape)} does not hold this layer's features "
                             f"(K={k}, columns {col}..{col + bw.joint_width})")
        d = down_features(x2, shared.jd)
    elif bw is not None and bw.jd is not None:
        d, col = joint_features(xt, bw, x_in), 0
    if d is None:
        dh, dt = branch_features(xt, bw, x_in)
        return Operands(q, s[:, 0], dh, dt, bw, m, c, **deferred)
    if joint and (not bw.has_blocks or bw.dt_col % bw.rb == 0):        # read in place by the GEMM kernel
        return Operands(q, s[:, 0], d if bw.has_lowrank else None, d if bw.has_blocks else None, bw, m, c, True, col,
                        **deferred)
    rl = bw.lr_a.shape[1] if bw.has_lowrank else 0
    return Operands(q, s[:, 0], d[:, col:col + rl] if bw.has_lowrank else None,
                    d[:, col + bw.dt_col:col + bw.joint_width] if bw.has_blocks else None, bw, m, c, **deferred)


def xla_gemm_epilogue(ops: Operands, w: QuantizedWeight, bias, out_dtype):
    """Stages 2-3 with XLA ops (the fallback): int8 dot_general(s) -> scales -> branches -> bias."""
    mp, kp = ops.xq.shape
    q = ops.xq
    if ops.chunk:                                             # undo the [even | odd] split
        c = ops.chunk
        q = q.reshape(mp, kp // c, 2, c // 2).transpose(0, 1, 3, 2).reshape(mp, kp)
    wq = w.codes()
    i32 = jnp.int32
    if w.layout == "nk":
        acc = jax.lax.dot_general(q, wq, (((1,), (1,)), ((), ())), preferred_element_type=i32)
        y = acc.astype(jnp.float32) * w.scale[:, 0][None, :]
    else:
        G, g = w.groups
        xg = q.reshape(mp, G, g)

        def body(yacc, args):
            xc, wc, sc = args                                 # [Mp, g], [N, g], [N]
            a = jax.lax.dot_general(xc, wc, (((1,), (1,)), ((), ())), preferred_element_type=i32)
            return yacc + a.astype(jnp.float32) * sc[None, :], None

        y, _ = jax.lax.scan(body, jnp.zeros((mp, w.n), jnp.float32),
                            (jnp.transpose(xg, (1, 0, 2)), wq, jnp.transpose(w.scale)))
    y = y * ops.row_scale()[:, None]
    if ops.bw is not None:
        y = branch_epilogue(y, ops.dh, ops.dt, ops.bw)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y[: ops.m].astype(out_dtype)


def choose_backend(backend: str, w: QuantizedWeight, cfg: KernelConfig) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"fused_linear backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "pallas" if target_platform() == "gpu" and tiles_ok(w, cfg) else "xla"
    if backend in ("pallas", "interpret") and not tiles_ok(w, cfg):
        raise ValueError(f"the fused kernel cannot tile a [{w.k} -> {w.n}] layer (layout {w.layout}, groups "
                         f"{w.groups}, packed={w.packed}, block={w.block}) with {cfg}; use backend='xla' "
                         f"or 'auto'")
    if backend == "pallas" and target_platform() != "gpu":
        raise ValueError(f"backend='pallas' needs a GPU (default backend is {target_platform()!r}); "
                         f"use 'interpret' or 'xla'")
    return backend


def fused_linear(x, w: QuantizedWeight, bias=None, *, act_bits=None, step=None, backend: str = "auto",
                 config: Optional[KernelConfig] = None, shared: Optional[SharedDown] = None):
    """x [..., K] (float) through a QuantizedWeight node or its `prepared.KernelWeight` (+ bias [N]) ->
    [..., N] in x.dtype.

    Same function as `quant.linear.linear(x, w, bias, act_bits=..., step=...)`; see the module docstring
    for the stages and backends. config: tile sizes (`KernelConfig`). shared: the `SharedDown` a prepared tree
    holds beside this layer and the others reading x (`prepared.SHARED_INPUTS`), which holds its down-projection.
    """
    from qdit4sr_jax.quant.kernels.prepared import KernelWeight
    kw = w if isinstance(w, KernelWeight) else None      # weight-side operands computed beforehand
    if kw is not None:
        w = kw.reference_node()                          # (for the checks and fallbacks; unused arrays vanish)
    if not isinstance(w, QuantizedWeight):
        raise TypeError(f"fused_linear needs a QuantizedWeight node, got {type(w).__name__}")
    if x.shape[-1] != w.k:
        raise ValueError(f"fused_linear: input has {x.shape[-1]} features but the quantized weight expects {w.k}")
    cfg = config or default_config(w)
    bits = resolve_act_bits(w, act_bits, step)
    if not supports_fused(w, bits):
        y = quantized_linear(x, w, act_bits=act_bits, step=step, execution="int")
        return y if bias is None else y + bias.astype(y.dtype)
    be = choose_backend(backend, w, cfg)
    bw = None
    if kw is not None:
        w, bw = kw.node, kw.bw
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    xprime = kw.xprime if kw is not None else "float32"
    table = kw is not None and kw.levels is not None and act_bits is None and step is not None
    tables = dict(levels=kw.levels, inv_levels=kw.inv_levels, step=step) if table else {}
    if be == "xla":
        ops = prologue(x2, w, bits, bw=bw, xprime=xprime, shared=shared, **tables)
        y = xla_gemm_epilogue(ops, w, bias, x.dtype)
    else:
        from qdit4sr_jax.quant.kernels import prologue_kernel as pk
        from qdit4sr_jax.quant.kernels import prologue_mosaic as pm
        from qdit4sr_jax.quant.kernels.mosaic_gemm import fits as mosaic_fits, mosaic_gemm_epilogue
        from qdit4sr_jax.quant.kernels.pallas_gpu import pallas_gemm_epilogue
        from qdit4sr_jax.quant.lowering import has_wgmma
        chunk = packed_run(w, cfg)
        hopper = be == "pallas" and has_wgmma()                       # the Mosaic kernels need wgmma
        route = pm.PROLOGUE_ROUTES.get(kw.prologue) if kw is not None else None
        if (hopper and route and table and not chunk
                and pm.fits(x2, w, bw, shared, kw.levels, cfg.block_m, route)):
            ops = pm.mosaic_prologue(x2, w, bw, pad_to=cfg.block_m, shared=shared, route=route, **tables)
        elif kw is not None and kw.prologue == "pallas" and pk.fits(w, bw, chunk, cfg.prologue_block_m):
            ops = pk.pallas_prologue(x2, w, bw, bits, pad_to=cfg.block_m, interpret=(be == "interpret"),
                                     block_m=cfg.prologue_block_m,
                                     num_warps=cfg.prologue_rot_warps if w.rotate else cfg.prologue_warps,
                                     levels=tables.get("levels"), step=tables.get("step"))
        else:
            ops = prologue(x2, w, bits, pad_to=cfg.block_m, chunk=chunk, bw=bw, pad_branches=True, xprime=xprime,
                           joint=True, shared=shared, defer_scale=True, **tables)
        if hopper and kw is not None and kw.gemm == "mosaic" and mosaic_fits(ops, w):
            y = mosaic_gemm_epilogue(ops, w, bias, x.dtype)
        else:
            y = pallas_gemm_epilogue(ops, w, bias, x.dtype, cfg, interpret=(be == "interpret"))
    return y.reshape(*lead, w.n)


def with_execution(tree, mode: str):
    """The params tree with every QuantizedWeight node's execution set to mode ("fake" | "int" | "fused");
    `quant.linear.linear` then dispatches "fused" nodes to `fused_linear`."""
    if mode not in ("fake", "int", "fused"):
        raise ValueError(f"execution must be 'fake', 'int' or 'fused', got {mode!r}")
    is_q = lambda n: isinstance(n, QuantizedWeight)
    return jax.tree_util.tree_map(lambda n: n.replace(execution=mode) if is_q(n) else n, tree, is_leaf=is_q)


__all__ = ["fused_linear", "with_execution", "KernelConfig", "DEFAULT_CONFIG", "GROUPED_CONFIG", "default_config",
           "supports_fused", "tiles_ok", "unpacks_in_kernel", "prologue",
           "xla_gemm_epilogue", "Operands", "BACKENDS"]
