"""Amdahl / roofline ceiling of the W4A4 denoising step (issue 24): which prologue designs can reach bf16's speed.

Runs on a CPU in seconds and allocates no full-size array: the step is traced abstractly (`jax.make_jaxpr` over
`jax.ShapeDtypeStruct`s of `model.dit4sr.param_shapes`), never run.

1. Inventory. One denoising step of the full-size `dit4sr` transformer in bf16, built as
   benchmarks/step_latency.py builds it (`make_step` + `inputs`: x and the LR latent concatenated to batch 2B for
   classifier-free guidance, ctx [2B, 333, 4096], pooled [2B, 2048]), traced to a jaxpr; dead code is removed
   (`dce_jaxpr`, as XLA does: with `lr_key_mode="released"` the output of every `to_k_control` is discarded), then
   every `dot_general` is collected, walking into sub-jaxprs (jit / pjit, custom_jvp / custom_vjp, closed_call,
   remat; scan bodies count `length` times; every branch of a cond and the body of a while loop once; loop
   carries count as activations), and
   classified:
     linear     one operand derives from exactly one parameter leaf named `kernel` (2-D, no batch dimensions);
                (M, K, N) with M = every leading dimension of the activation flattened; named by the kernel's
                parameter path (its flax module)
     attention  both operands are activations and the dot has batch dimensions (QK^T, PV)
     other      anything else (none in the DiT4SR step)
   Convolutions (`conv_general_dilated`: the patch embedding and the depthwise `control_conv`) are counted apart.
   A linear is *quantized* when its module path matches `QuantConfig`'s default include / exclude regexes (the
   transformer blocks: 533 of the 540 kernels; the embedders, `norm_out` and `proj_out` stay bf16).
   `dit4sr`: 540 2-D `kernel` leaves in param_shapes, 540 linears in the traced step (one per kernel), 503 live
   after DCE (the 24 + 13 `to_k_control` of attn / attn2 are dead), of which 496 quantized, reading 374 distinct
   input arrays (to_q / to_k / to_v and add_{q,k,v}_proj share theirs); 74 attention dots; 26 convolutions.

2. Floor. For the quantized, live linears of one step:
     linears_bf16 = sum max(2MKN / R_bf16, bytes_bf16 / BW)     (R_bf16 from a measured cuBLAS GEMM)
     linears_int8 = sum max(2MKN / (R_bf16 * INT8_SPEEDUP), bytes_int8 / BW)
     prologue     = sum(M*K) * extra_bytes_per_element / BW
     low-rank     = sum(2 M K r + 2 M r N) / R_bf16 + the [M, r] intermediate (written and read, bf16) / BW
     ratio        = bf16_step / (bf16_step - linears_bf16 + linears_int8 + prologue [+ low-rank])
   and the break-even: the most extra bytes per activation element that still give ratio 1.0.
   bytes_bf16 = 2 (K N + M K + M N); bytes_int8 = W_CODE_BYTES K N + A_CODE_BYTES M K + OUT_BYTES M N. The
   compute term wins for every big linear (M >= 666); the memory term matters only for the adaLN linears (M = 2B).

   Byte accounting of a design (`DESIGNS`): a list of passes, each with its bytes per activation element (M*K) and
   where it runs. The bf16 step already pays the producer's 2-byte write of x and the GEMM's 2-byte read of it (inside
   the measured GEMM time, which is compute-bound). "extra B/elem" counts the passes outside the quantized GEMM (the
   GEMM's read of its int8 codes is inside its measured int8 time); "all passes" also counts the GEMM's 1-byte read
   of the codes as if it were not hidden (the pessimistic sum that the issue's brief gives: 4, 6, 18, 50, 20 B).

Measured inputs (benchmarks/RESULTS.md):
  - bf16 GEMM rate: "GEMM rates" table, `python3 benchmarks/gpu/mosaic_gemm.py`: H100 (2026-12-05 10:46, `--shapes 3
    --deadline 30`) cuBLAS bf16 0.117 ms at 16384 x 1536 x 1536 (661 TFLOP/s), XLA int8 + epilogue 0.105 ms (1.12x);
    H200 (2026-12-05 05:42, `--sweep --deadline 60`) 0.126 ms at 16384 x 1536 x 1536, XLA int8 1.42x / 1.24x / 1.46x
    at 16384 x 1536 x {1536, 6144} and 16384 x 6144 x 1536: 1.3x taken.
  - bf16 step: "Step latency on GPU" table, `benchmarks/step_latency.py`: H100 1024 x 1 147.93 ms and 512 x 1 27.42 ms
    (per step in a 4-step scan; 2026-12-05 10:46-11:08); H200 1024 x 1 144.70 ms (2026-12-05 05:42-06:05) and
    512 x 1 28.23 ms (2026-12-04 20:22-20:49).
  - HBM bandwidth: the cards' datasheet peaks (H100 SXM 3.35 TB/s, H200 4.8 TB/s); real streams reach ~90 %, so
    the prologue times here are floors.
Single-rate caveat: one measured GEMM rate is applied to every shape; small-M GEMMs (512 px: M = 4096; the context
stream: M = 666) run below it in bf16 and int8 alike. The "bf16 stage-1" Hadamard design is counted at 21 / 22 B
(the issue's "~20 B" plus the down-projection's 2-byte read of x', as in the smoothing-only design).

Attention (`attention_ceiling`, 2026-12-07): one ex2 per score element on the SFUs (16 per clock per SM) against
4 x 64 MMA FLOPs at head dim 64: 2.19 ms of exps vs 2.37 ms of bf16 MMAs at 512 px (30.0 / 32.5 ms at 1024 px), so
FP8 (or int8) MMAs make attention at most 1.08x faster if MMAs and exps overlap, 1.35x if they do not; cuDNN's FP8
attention measured 1.06-1.13x of its bf16 (RESULTS.md 2026-11-25), and its bf16 ran at 42 % of the overlapped
floor's rate at 512 px (5.67 ms, H100 profile 2026-12-07).

W8A8 (`w8a8_ceiling`, 2026-12-07): the int8 GEMM gain (no branch) with the activation quantization fused into its
producer or as a one-pass kernel, plus what FP8 attention saves of the measured cuDNN bf16 attention (512 px: 5.67
ms in the step's profile; 1024 px: 24 x 2.495 ms, one call timed alone, 2026-11-25), and the int8 GEMM speed-up that
issue 24's 1.25x would need. H100 at the Mosaic GEMM's 1.81x (`--int8-speedup 1.81`): 512 px 1.30x with the
quantization fused into the producer even with bf16 attention; 1024 px 1.25x only with that and cuDNN FP8 attention
(1.18x with bf16 attention; a one-pass quantization kernel needs 2.85x int8 GEMMs for 1.25x).

Readings (2026-12-06, the defaults above; `--card h100|h200 --sizes 512 1024`): the quantized linears are 31-48 %
of the bf16 step (45.9 ms of 147.9 at 1024 px on the H100); the int8 GEMM rate caps the step at 1.036x (H100, 1024
px) to 1.129x (H200, 512 px) with a free prologue. Break-even extra bytes per activation element, rank-32 branch
included: H100 1.45 (1024 px) / 1.72 (512 px), H200 5.90 / 6.20. So on the H100 (int8 only 1.12x bf16) no prologue
that reads x again reaches 1.0x: only quantization fused into the producer does (1.041x at 1024 px); a one-pass
kernel gives 0.976x. On the H200 (1.3x) a one-pass (1.034x) or two-pass (1.010x) prologue kernel reaches it at 1024
px; no XLA design does (smoothing only 0.888x, dense Hadamard 0.671x with the 3-part split, 0.854x bf16 stage 1).

    python benchmarks/gpu/roofline.py --card h100 --sizes 512 1024
    python benchmarks/gpu/roofline.py --card h200 --sizes 512 1024 --json /tmp/roofline_h200.json
    python benchmarks/gpu/roofline.py --preset tiny --sizes 32 --card h100       # the test's configuration
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))      # the repository root
sys.path.insert(0, os.path.dirname(_HERE))                       # benchmarks/ (step_latency)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# Named assumptions
# ----------------------------------------------------------------------------------------------------------------
GEMM_SHAPE = (16384, 1536, 1536)     # M, K, N of the measured cuBLAS bf16 GEMM (1024 px: M = 2B x 2N tokens)
BF16_BYTES = 2                        # bf16 activations, weights and GEMM outputs
A_CODE_BYTES = 1                      # int8 activation codes as the int8 GEMM reads them (4-bit values in int8)
W_CODE_BYTES = 1                      # int8 weight codes as the prepared tree stores them (unpacked; 0.5 if packed)
OUT_BYTES = 2                         # the quantized GEMM writes bf16, as the bf16 GEMM does
LOWRANK_RANK = 32                     # SVDQuant's / qdit4sr-w4a4's branch rank (QuantConfig.lowrank_rank)
W8A8_TARGET = 1.25                    # issue 24's W8A8 step target, x bf16


@dataclasses.dataclass(frozen=True)
class Card:
    """Measured and datasheet figures of one GPU (sources in the module docstring)."""
    name: str
    hbm_bytes_per_s: float             # datasheet HBM bandwidth
    bf16_gemm_ms: float                # cuBLAS bf16 at GEMM_SHAPE
    int8_speedup: float                # int8 GEMM (XLA / cuBLASLt + epilogue) time = bf16 time / this
    bf16_step_ms: Dict[int, float]     # measured bf16 step (batch 1, CFG) per output size in pixels
    sms: int = 132                     # streaming multiprocessors (H100 SXM / H200)
    clock_ghz: float = 1.98            # datasheet boost clock (an upper bound on the sustained one)
    bf16_dense_tflops: float = 989.0   # datasheet dense bf16 tensor-core peak (FP8: twice)
    exp_per_clk_sm: int = 16           # MUFU ex2 results per clock per SM (compute capability 9.0)
    bf16_attention_ms: Dict[int, float] = dataclasses.field(default_factory=dict)   # measured cuDNN bf16, per size
    fp8_attention_speedup: float = 1.13   # measured cuDNN FP8 over cuDNN bf16, one call at 1024 px (inputs FP8)

    @property
    def exp_per_s(self) -> float:
        return self.sms * self.exp_per_clk_sm * self.clock_ghz * 1e9

    @property
    def bf16_flops_per_s(self) -> float:
        m, k, n = GEMM_SHAPE
        return 2.0 * m * k * n / (self.bf16_gemm_ms * 1e-3)


CARDS = {
    "h100": Card("H100 SXM", 3.35e12, 0.117, 1.12, {512: 27.42, 1024: 147.93},
                 bf16_attention_ms={512: 5.67, 1024: 24 * 2.495}),
    "h200": Card("H200 SXM", 4.8e12, 0.126, 1.3, {512: 28.23, 1024: 144.70}),
}


@dataclasses.dataclass(frozen=True)
class Pass:
    """One memory pass of a prologue design: bytes per activation element (M*K of the linear), and whether it is
    the quantized GEMM's own operand read (hidden under its compute in the measured int8 GEMM time)."""
    what: str
    bytes: float
    in_gemm: bool = False


# Each design: the passes of its int8 path that differ from bf16's "producer writes x (2 B), GEMM reads x (2 B)".
DESIGNS: Dict[str, Tuple[Pass, ...]] = {
    "ideal (rotation + quantization fused into the producer)": (
        Pass("producer writes int8 codes (1 B) instead of bf16 x (2 B)", -1),
        Pass("GEMM reads the int8 codes", A_CODE_BYTES, True)),
    "one-pass prologue kernel": (
        Pass("read x bf16", 2), Pass("write int8 codes", 1),
        Pass("GEMM reads the int8 codes", A_CODE_BYTES, True)),
    "two-pass prologue kernel (x read twice)": (
        Pass("read x bf16 (absmax)", 2), Pass("read x bf16 (quantize)", 2), Pass("write int8 codes", 1),
        Pass("GEMM reads the int8 codes", A_CODE_BYTES, True)),
    "XLA, no rotation (smoothing only)": (
        Pass("read x bf16", 2), Pass("write x' = x / s f32", 4), Pass("read x' (absmax)", 4),
        Pass("read x' (quantize)", 4), Pass("write int8 codes", 1), Pass("read x' as bf16 (down-projection)", 2),
        Pass("GEMM reads the int8 codes", A_CODE_BYTES, True)),
    "XLA, dense Hadamard, 3-part bf16 split": (
        Pass("read x bf16", 2), Pass("write x' = x / s f32", 4), Pass("read x' (absmax)", 4),
        Pass("read x' (quantize)", 4), Pass("write int8 codes", 1), Pass("read x' as bf16 (down-projection)", 2),
        Pass("stage 1: write the 3 bf16 parts", 6), Pass("stage 1 GEMM: read the parts", 6),
        Pass("stage 1 GEMM: write f32", 4), Pass("stage 2: write the 3 bf16 parts", 6),
        Pass("stage 2 GEMM: read the parts", 6), Pass("stage 2 GEMM: write f32", 4),
        Pass("GEMM reads the int8 codes", A_CODE_BYTES, True)),
    "XLA, dense Hadamard, bf16 stage-1 input, stage 2 fused elementwise": (
        Pass("read x bf16", 2), Pass("write x' = x / s bf16", 2), Pass("stage 1 GEMM: read x' bf16", 2),
        Pass("stage 1 GEMM: write f32", 4), Pass("read stage-1 output (stage 2 + absmax)", 4),
        Pass("read stage-1 output (stage 2 + quantize)", 4), Pass("write int8 codes", 1),
        Pass("read x' bf16 (down-projection, H folded into the branch factor)", 2),
        Pass("GEMM reads the int8 codes", A_CODE_BYTES, True)),
}


def design_bytes(passes: Sequence[Pass]) -> Tuple[float, float]:
    """(extra bytes per activation element outside the quantized GEMM, the same with every pass counted)."""
    return sum(p.bytes for p in passes if not p.in_gemm), sum(p.bytes for p in passes)


# ----------------------------------------------------------------------------------------------------------------
# Tracing the step
# ----------------------------------------------------------------------------------------------------------------
def step_cfg(preset: str):
    """The model config of step_latency.py's bf16 step: bf16 compute and params, XLA attention (cuDNN's does not
    trace on a CPU; the same QK^T / PV FLOPs)."""
    from qdit4sr_jax.config import ModelConfig
    return ModelConfig.preset(preset).replace(dtype="bfloat16", param_dtype="bfloat16", attention_impl=None)


def abstract_inputs(cfg, size: int, batch: int = 1):
    """ShapeDtypeStructs of step_latency.inputs(cfg, size, batch) (x, lr [B, h, w, C] f32; ctx [2B, L, D],
    pooled [2B, P] in the compute dtype; t, dsig f32 scalars; i int32)."""
    lat = size // cfg.vae.downsample
    if lat < cfg.patch_size or lat % cfg.patch_size:
        raise ValueError(f"size {size}: latent {lat} must be a positive multiple of the patch size {cfg.patch_size}")
    s = jax.ShapeDtypeStruct
    c, dt = cfg.in_channels, cfg.compute_dtype
    return (s((batch, lat, lat, c), jnp.float32), s((batch, lat, lat, c), jnp.float32),
            s((2 * batch, cfg.context_len, cfg.joint_attention_dim), dt), s((2 * batch, cfg.pooled_projection_dim), dt),
            s((), jnp.float32), s((), jnp.float32), s((), jnp.int32))


def trace_step(cfg, size: int, batch: int = 1, dce: bool = True):
    """(ClosedJaxpr of one step, [parameter path per leading invar]) for `cfg` at `size` px; nothing allocated.
    dce: drop the equations whose results the step does not use (as XLA does)."""
    from qdit4sr_jax.model.dit4sr import DiT4SRTransformer, param_shapes
    import step_latency as S
    params = param_shapes(cfg)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    paths = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in flat]
    step = S.make_step(DiT4SRTransformer(cfg), cfg.guidance_scale)
    closed = jax.make_jaxpr(step)(params, *abstract_inputs(cfg, size, batch))
    if dce:
        from jax._src.interpreters import partial_eval as pe
        from jax.extend import core as jcore
        jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars), instantiate=True)
        closed = jcore.ClosedJaxpr(jaxpr, closed.consts)
    return closed, paths


def kernel_paths(cfg) -> Dict[str, List[str]]:
    """{"linear": module paths of the 2-D `kernel` leaves, "conv": those of the 4-D ones} of param_shapes(cfg)."""
    from qdit4sr_jax.model.dit4sr import param_shapes
    out = {"linear": [], "conv": []}
    for p, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]:
        keys = [str(getattr(k, "key", k)) for k in p]
        if keys[-1] == "kernel":
            out["linear" if len(leaf.shape) == 2 else "conv"].append("/".join(keys[:-1]))
    return out


@dataclasses.dataclass
class Dot:
    """One dot_general (or conv) of the step. kind: linear | attention | other | conv. For a linear: m, k, n and
    the module path of its kernel; for the others m, k, n = rows, contraction, columns per batch and `batch`."""
    kind: str
    name: str
    m: int
    k: int
    n: int
    batch: int = 1
    count: int = 1
    dtypes: Tuple[str, str] = ("", "")
    input_key: str = ""              # a linear's activation operand (equal for linears that read the same array)

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.k * self.n * self.count


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def _subjaxprs(eqn):
    """[(Jaxpr, consts, invar origins index map or None, multiplier, maps outputs)] of eqn's sub-jaxprs.
    index map: for each sub-jaxpr invar, the index of the eqn invar it receives (None: unknown)."""
    from jax.extend import core as jcore
    name, p, nin = eqn.primitive.name, eqn.params, len(eqn.invars)

    def unwrap(j):
        if isinstance(j, jcore.ClosedJaxpr):
            return j.jaxpr, j.consts
        return j, ()

    out = []
    if name == "scan":
        j, c = unwrap(p["jaxpr"])
        nc, nk = p["num_consts"], p["num_carry"]           # carries may change inside: treated as activations
        out.append((j, c, list(range(nc)) + [None] * nk + list(range(nc + nk, nin)), int(p["length"]), False))
    elif name == "cond":
        for br in p["branches"]:
            j, c = unwrap(br)
            out.append((j, c, list(range(1, nin)), 1, False))
    elif name == "while":
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        j, c = unwrap(p["body_jaxpr"])
        out.append((j, c, list(range(cn, cn + bn)) + [None] * (nin - cn - bn), 1, False))
    else:
        for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
            j, c = unwrap(p.get(key))
            if not hasattr(j, "eqns"):
                continue
            idx = list(range(nin)) if len(j.invars) == nin else [None] * len(j.invars)
            out.append((j, c, idx, 1, len(j.outvars) == len(eqn.outvars)))
            break
    return out


def collect_dots(closed, param_paths: Sequence[str]) -> List[Dot]:
    """Every dot_general / conv_general_dilated of `closed` (recursively), classified (see Dot). The first
    len(param_paths) invars of `closed` are the parameter leaves named by param_paths."""
    from jax.extend import core as jcore
    dots: List[Dot] = []
    n_params = len(param_paths)

    def read(env, v):
        if isinstance(v, jcore.Literal):
            return frozenset()
        return env.get(v)                                # None: an activation (not purely parameter-derived)

    frames = [0]

    def walk(jaxpr, in_origins, mult, prefix):
        frames[0] += 1
        frame = frames[0]                                # one id per walked (sub-)jaxpr instance
        env = {}
        for v in jaxpr.constvars:
            env[v] = frozenset()
        for v, o in zip(jaxpr.invars, in_origins):
            env[v] = o
        for eqn in jaxpr.eqns:
            ins = [read(env, v) for v in eqn.invars]
            stack = str(eqn.source_info.name_stack)
            where = stack if (not prefix or stack.startswith(prefix)) else f"{prefix}/{stack}"
            prim = eqn.primitive.name
            if prim == "dot_general":
                d = _classify_dot(eqn, ins, mult, where, param_paths)
                if d.kind == "linear":
                    act = eqn.invars[0] if ins[1] is not None else eqn.invars[1]
                    d.input_key = f"{frame}:{act}"
                dots.append(d)
            elif prim == "conv_general_dilated":
                dots.append(_conv(eqn, mult, where))
            outs = None
            for j, consts, idx, m, maps_out in _subjaxprs(eqn):
                sub_in = [ins[i] if i is not None else None for i in idx]
                res = walk(j, sub_in, mult * m, where)
                if maps_out:
                    outs = res
            if outs is None:
                o = None if any(x is None for x in ins) else frozenset().union(*ins) if ins else frozenset()
                outs = [o] * len(eqn.outvars)
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [read(env, v) for v in jaxpr.outvars]

    origins = [frozenset([i]) for i in range(n_params)]
    origins += [None] * (len(closed.jaxpr.invars) - n_params)
    walk(closed.jaxpr, origins, 1, "")
    return dots


def _classify_dot(eqn, ins, mult, where, param_paths) -> Dot:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    a, b = (v.aval for v in eqn.invars)
    dtypes = (str(a.dtype), str(b.dtype))
    for act, w, act_c, w_c, origin in ((a, b, lc, rc, ins[1]), (b, a, rc, lc, ins[0])):
        if (origin and len(origin) == 1 and not lb and len(w.shape) == 2 and len(w_c) == 1
                and param_paths[next(iter(origin))].endswith("/kernel")):
            k = _prod(act.shape[d] for d in act_c)
            m = _prod(act.shape) // k
            n = _prod(w.shape) // k
            return Dot("linear", param_paths[next(iter(origin))][:-len("/kernel")], m, k, n, 1, mult, dtypes)
    kind = "attention" if (lb and ins[0] is None and ins[1] is None) else "other"
    k = _prod(a.shape[d] for d in lc)
    bt = _prod(a.shape[d] for d in lb)
    m = _prod(a.shape) // (k * bt)
    n = _prod(b.shape) // (k * bt)
    return Dot(kind, where, m, k, n, bt, mult, dtypes)


def _conv(eqn, mult, where) -> Dot:
    """A convolution as a Dot: m = output positions, k = kernel taps x input channels per group, n = features."""
    lhs, rhs = (v.aval for v in eqn.invars)
    out = eqn.outvars[0].aval
    spec = eqn.params["dimension_numbers"]
    o_dim = spec.rhs_spec[0]
    feats = rhs.shape[o_dim]
    k = _prod(rhs.shape) // feats
    return Dot("conv", where, _prod(out.shape) // feats, k, feats, 1, mult, (str(lhs.dtype), str(rhs.dtype)))


# ----------------------------------------------------------------------------------------------------------------
# Inventory
# ----------------------------------------------------------------------------------------------------------------
def role(path: str) -> str:
    """Module path with block indices replaced by * (transformer_blocks_7/attn/to_q -> transformer_blocks_*/attn/to_q)."""
    return re.sub(r"transformer_blocks_\d+", "transformer_blocks_*", path)


def is_quantized(path: str, include=None, exclude=None) -> bool:
    """Whether QuantConfig's layer selection (default include / exclude regexes) quantizes the linear at `path`."""
    from qdit4sr_jax.quant.config import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
    from qdit4sr_jax.quant.rules import selected
    return selected(path, DEFAULT_INCLUDE if include is None else include,
                    DEFAULT_EXCLUDE if exclude is None else exclude)


def inventory(cfg, size: int, batch: int = 1) -> dict:
    """Dots of one step of `cfg` at `size` px (traced abstractly, after DCE) and their summary:
    {"size", "batch", "dots": [Dot as dict], "linears": [{m, k, n, count, gflop, act, out, quantized, roles}],
     "totals": {...}, "check": {kernel leaves vs linears found}}."""
    closed, paths = trace_step(cfg, size, batch, dce=True)
    dots = collect_dots(closed, paths)
    closed_all, _ = trace_step(cfg, size, batch, dce=False)
    traced = [d for d in collect_dots(closed_all, paths) if d.kind == "linear"]
    lin = [d for d in dots if d.kind == "linear"]
    groups = collections.OrderedDict()
    for d in sorted(lin, key=lambda d: (-d.m * d.k * d.n, d.m, d.k, d.n)):
        q = is_quantized(d.name)
        g = groups.setdefault((d.m, d.k, d.n, q), {"m": d.m, "k": d.k, "n": d.n, "quantized": q, "count": 0,
                                                   "roles": collections.Counter()})
        g["count"] += d.count
        g["roles"][role(d.name)] += d.count
    rows = []
    for g in groups.values():
        g["gflop"] = 2 * g["m"] * g["k"] * g["n"] * g["count"] / 1e9
        g["act"] = g["m"] * g["k"]
        g["out"] = g["m"] * g["n"]
        g["roles"] = dict(g["roles"])
        rows.append(g)
    kp = kernel_paths(cfg)
    used = {d.name for d in lin}
    used_traced = {d.name for d in traced}

    def tot(ds):
        return {"count": sum(d.count for d in ds), "gflop": sum(d.flops for d in ds) / 1e9}

    totals = {"linear": tot(lin), "linear_quantized": tot([d for d in lin if is_quantized(d.name)]),
              "attention": tot([d for d in dots if d.kind == "attention"]),
              "conv": tot([d for d in dots if d.kind == "conv"]), "other": tot([d for d in dots if d.kind == "other"]),
              "act_elems": sum(d.m * d.k * d.count for d in lin),
              "act_elems_quantized": sum(d.m * d.k * d.count for d in lin if is_quantized(d.name)),
              "out_elems": sum(d.m * d.n * d.count for d in lin)}
    shared = {}
    for d in lin:
        if is_quantized(d.name):
            shared[d.input_key] = d.m * d.k * d.count
    totals["quantized_inputs"] = len(shared)
    totals["act_elems_quantized_shared"] = sum(shared.values())
    check = {"kernel_leaves_2d": len(kp["linear"]), "kernel_leaves_4d": len(kp["conv"]),
             "quantizable_kernels": sum(is_quantized(p) for p in kp["linear"]),
             "linears_traced": sum(d.count for d in traced), "kernels_traced": len(used_traced),
             "linears_live": totals["linear"]["count"], "kernels_live": len(used),
             "dead_after_dce": sorted({role(p) for p in used_traced - used}),
             "dead_count": len(used_traced - used),
             "never_traced": sorted(set(kp["linear"]) - used_traced)}
    return {"preset": cfg.name, "size": size, "batch": batch, "dots": [dataclasses.asdict(d) for d in dots],
            "linears": rows, "totals": totals, "check": check}


# ----------------------------------------------------------------------------------------------------------------
# Floor
# ----------------------------------------------------------------------------------------------------------------
def linear_times(linears: Sequence[dict], card: Card, rank: int = LOWRANK_RANK) -> dict:
    """Seconds per step of the quantized linears in `linears` (inventory rows: m, k, n, count, quantized):
    {"bf16", "int8", "lowrank", "act_elems", "flops", "memory_bound"} (see the module docstring)."""
    r16 = card.bf16_flops_per_s
    r8 = r16 * card.int8_speedup
    bw = card.hbm_bytes_per_s
    out = {"bf16": 0.0, "int8": 0.0, "lowrank": 0.0, "act_elems": 0, "flops": 0, "memory_bound": 0}
    for g in linears:
        if not g.get("quantized", True):
            continue
        m, k, n, c = g["m"], g["k"], g["n"], g["count"]
        f = 2.0 * m * k * n
        t16 = max(f / r16, BF16_BYTES * (k * n + m * k + m * n) / bw)
        t8 = max(f / r8, (W_CODE_BYTES * k * n + A_CODE_BYTES * m * k + OUT_BYTES * m * n) / bw)
        out["memory_bound"] += c * (t16 > f / r16)
        out["bf16"] += c * t16
        out["int8"] += c * t8
        out["lowrank"] += c * ((2.0 * m * k * rank + 2.0 * m * rank * n) / r16 + 2 * BF16_BYTES * m * rank / bw)
        out["act_elems"] += c * m * k
        out["flops"] += c * f
    return out


def floor_table(linears: Sequence[dict], card: Card, step_ms: float, rank: int = LOWRANK_RANK,
                designs: Optional[Dict[str, Tuple[Pass, ...]]] = None, shared_elems: Optional[int] = None) -> dict:
    """Predicted W4A4 step / bf16 step per prologue design for one size: {"linears": linear_times in ms,
    "step_ms", "break_even_bytes" (no branch, with branch), "rows": [{design, extra_b, all_b, prologue_ms,
    ratio, ratio_lowrank, ratio_all_lowrank, ratio_shared_lowrank}]}. Ratios > 1 mean faster than bf16.
    shared_elems: sum(M*K) over the distinct inputs of the linears (one prologue per input array, shared by
    to_q / to_k / to_v etc.: possible only when those layers share their smoothing and rotation); default: none
    shared (the "shared" figures then equal the others)."""
    designs = DESIGNS if designs is None else designs
    t = linear_times(linears, card, rank)
    bw = card.hbm_bytes_per_s
    step = step_ms * 1e-3
    if t["bf16"] >= step:
        raise ValueError(f"the linears' bf16 time {t['bf16'] * 1e3:.2f} ms exceeds the measured step {step_ms} ms: "
                         "wrong card figures or step time")
    gain = t["bf16"] - t["int8"]
    elems = max(t["act_elems"], 1)
    shared = elems if shared_elems is None else max(int(shared_elems), 1)
    rows = []
    for name, passes in designs.items():
        eb, ab = design_bytes(passes)
        pro, pro_all = elems * eb / bw, elems * ab / bw
        rows.append({"design": name, "extra_b": eb, "all_b": ab, "prologue_ms": pro * 1e3,
                     "ratio": step / (step - gain + pro),
                     "ratio_lowrank": step / (step - gain + pro + t["lowrank"]),
                     "ratio_all_lowrank": step / (step - gain + pro_all + t["lowrank"]),
                     "ratio_shared_lowrank": step / (step - gain + shared * eb / bw + t["lowrank"])})
    ms = {k: (v * 1e3 if k in ("bf16", "int8", "lowrank") else v) for k, v in t.items()}
    return {"card": card.name, "step_ms": step_ms, "linears": ms, "linear_share": t["bf16"] / step,
            "ceiling": step / (step - gain),
            "break_even_bytes": (gain * bw / elems, (gain - t["lowrank"]) * bw / elems),
            "shared_elems": shared, "break_even_bytes_shared": (gain * bw / shared, (gain - t["lowrank"]) * bw / shared),
            "rows": rows}


# ----------------------------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------------------------
def _short_roles(roles: dict, width: int = 110) -> str:
    s = ", ".join(f"{r.replace('transformer_blocks_*/', '')} x{c}" for r, c in roles.items())
    return s if len(s) <= width else s[:width - 3] + "..."


def inventory_markdown(inv: dict) -> str:
    t, c = inv["totals"], inv["check"]
    lines = [f"### Linears of one step: `{inv['preset']}`, {inv['size']} px, batch {inv['batch']} (CFG: 2B = "
             f"{2 * inv['batch']})", "",
             "| M x K x N | count | GFLOP | act M*K | out M*N | quantized | layers (transformer_blocks_* / ...) |",
             "|---|---|---|---|---|---|---|"]
    for g in inv["linears"]:
        lines.append(f"| {g['m']} x {g['k']} x {g['n']} | {g['count']} | {g['gflop']:.2f} | {g['act']:,} | "
                     f"{g['out']:,} | {'yes' if g['quantized'] else 'no'} | {_short_roles(g['roles'])} |")
    lines += ["", f"Totals: {t['linear']['count']} linears, {t['linear']['gflop']:.1f} GFLOP "
              f"({t['linear_quantized']['count']} quantized, {t['linear_quantized']['gflop']:.1f} GFLOP); activation "
              f"elements sum(M*K) {t['act_elems']:,} ({t['act_elems_quantized']:,} quantized, "
              f"{t['act_elems_quantized_shared']:,} over their {t['quantized_inputs']} distinct inputs); outputs sum(M*N) "
              f"{t['out_elems']:,}; attention {t['attention']['count']} dots, {t['attention']['gflop']:.1f} GFLOP; "
              f"convolutions {t['conv']['count']}, {t['conv']['gflop']:.1f} GFLOP; other dots {t['other']['count']}.",
              f"Check: {c['kernel_leaves_2d']} 2-D `kernel` leaves in param_shapes ({c['quantizable_kernels']} selected "
              f"by QuantConfig's default include; {c['kernel_leaves_4d']} conv kernels); the traced step runs "
              f"{c['linears_traced']} linears on {c['kernels_traced']} distinct kernels; after dead-code elimination "
              f"{c['linears_live']} on {c['kernels_live']} ({c['dead_count']} dead: {', '.join(c['dead_after_dce']) or '-'}); "
              f"kernels never traced: {', '.join(c['never_traced']) or 'none'}."]
    return "\n".join(lines)


def floor_markdown(fl: dict, size: int) -> str:
    li = fl["linears"]
    be0, be1 = fl["break_even_bytes"]
    lines = [f"### Floor: {fl['card']}, {size} px, bf16 step {fl['step_ms']:.2f} ms", "",
             f"Quantized linears: {li['flops'] / 1e12:.2f} TFLOP, sum(M*K) {li['act_elems']:,}; at bf16 "
             f"{li['bf16']:.2f} ms ({100 * fl['linear_share']:.1f} % of the step), at int8 {li['int8']:.2f} ms "
             f"({li['memory_bound']} memory-bound in bf16); rank-{LOWRANK_RANK} branches {li['lowrank']:.2f} ms. "
             f"Ceiling (int8 GEMMs, no prologue, no branch): {fl['ceiling']:.3f}x. Break-even extra bytes per "
             f"activation element: {be0:.2f} B without the branch, {be1:.2f} B with it. One prologue per distinct "
             f"input array (shared by to_q / to_k / to_v ...): sum(M*K) {fl['shared_elems']:,}, break-even "
             f"{fl['break_even_bytes_shared'][0]:.2f} / {fl['break_even_bytes_shared'][1]:.2f} B.", "",
             "| design | extra B/elem | all passes B/elem | prologue ms | x bf16 (no branch) | x bf16 (+ branch) "
             "| x bf16 (all passes + branch) | x bf16 (+ branch, shared prologue) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in fl["rows"]:
        lines.append(f"| {r['design']} | {r['extra_b']:g} | {r['all_b']:g} | {r['prologue_ms']:.2f} | "
                     f"{r['ratio']:.3f} | {r['ratio_lowrank']:.3f} | {r['ratio_all_lowrank']:.3f} | "
                     f"{r['ratio_shared_lowrank']:.3f} |")
    return "\n".join(lines)


def _parse_steps(items, option: str = "--step-ms") -> Dict[int, float]:
    """SIZE=MS items -> {size: ms}; an error naming `option` for a malformed one."""
    out = {}
    for it in items or []:
        try:
            s, v = it.split("=")
            out[int(s)] = float(v)
        except ValueError:
            raise SystemExit(f"{option}: {it!r} is not SIZE=MS (e.g. 1024=147.93)") from None
    return out


def attention_ceiling(inv: dict, card: Card) -> dict:
    """How much FP8 (or int8) tensor cores can speed up the step's softmax attention on `card`: {scores (score
    elements per step), mma_bf16_ms / mma_fp8_ms (QK^T + PV at the datasheet dense peak, FP8 twice bf16), exp_ms
    (one ex2 per score element on the SFUs, `Card.exp_per_s`), overlapped (bf16 / FP8 time when MMAs and exps
    overlap perfectly: max of the two) and serial (when they do not: their sum) speed-ups, measured_ms (cuDNN bf16,
    if known) and its fraction of the overlapped bf16 bound}. Both times are floors (the softmax also needs FMAs for
    the max, the scale and the sum, and the conversions of P); the ratio of the floors is what a lower MMA cost can
    buy at most once the exps are what is left: at head dim 64 an exp costs about what the bf16 MMAs of its score
    element cost (4 x 64 FLOPs), so FP8 MMAs gain little."""
    att = [d for d in inv["dots"] if d["kind"] == "attention"]
    # QK^T contracts over the head dim, fewer than its token rows (PV contracts over the tokens: rows = head dim)
    scores = sum(d["batch"] * d["m"] * d["n"] * d["count"] for d in att if d["k"] < d["m"])
    flops = sum(2 * d["batch"] * d["m"] * d["k"] * d["n"] * d["count"] for d in att)
    mma = flops / (card.bf16_dense_tflops * 1e12) * 1e3
    exp = scores / card.exp_per_s * 1e3
    out = {"scores": scores, "head_dim": flops / (4 * scores) if scores else 0.0, "mma_bf16_ms": mma,
           "mma_fp8_ms": mma / 2, "exp_ms": exp, "overlapped": max(mma, exp) / max(mma / 2, exp),
           "serial": (mma + exp) / (mma / 2 + exp), "measured_ms": card.bf16_attention_ms.get(inv["size"])}
    if out["measured_ms"]:
        out["measured_vs_floor"] = max(mma, exp) / out["measured_ms"]
    return out


def w8a8_ceiling(linears: Sequence[dict], card: Card, step_ms: float, at: dict, target: float = W8A8_TARGET) -> dict:
    """The W8A8 step's best case / bf16 step for one size: int8 GEMMs at `card.int8_speedup`, no branch, with the
    activation quantization in the producer ("fused": the producer writes int8 instead of bf16) or as a one-pass
    kernel, and attention (`at`, from `attention_ceiling`: its measured_ms of cuDNN bf16 per step, None: unknown)
    at bf16, at the measured cuDNN FP8 speed-up, and at `at`'s FP8 bounds. Per row also the int8 GEMM speed-up over bf16
    that `target` would need (inf: not reachable even with free linears). {"rows": [{prologue, attention, speedup,
    ratio, int8_needed}], "linear_share", "attention_share"}."""
    t = linear_times(linears, card, rank=0)
    step, lin16, lin8 = step_ms * 1e-3, t["bf16"], t["int8"]
    attention_ms = at.get("measured_ms")
    att = (attention_ms or 0.0) * 1e-3
    prologues = {"fused into the producer": DESIGNS["ideal (rotation + quantization fused into the producer)"],
                 "one-pass kernel": DESIGNS["one-pass prologue kernel"]}
    atts = [("bf16", 1.0), ("cuDNN FP8 (measured)", card.fp8_attention_speedup),
            ("FP8 bound, overlapped", at["overlapped"]), ("FP8 bound, serialized", at["serial"])]
    rows = []
    for pname, passes in prologues.items():
        pro = t["act_elems"] * design_bytes(passes)[0] / card.hbm_bytes_per_s
        for aname, sp in (atts if att else atts[:1]):
            saved = att * (1.0 - 1.0 / sp)
            rest = step - lin16 - saved + pro               # everything but the int8 GEMMs
            need = step / target - rest                     # the int8 GEMM time the target allows
            rows.append({"prologue": pname, "attention": aname, "speedup": sp,
                         "ratio": step / (rest + lin8), "int8_needed": lin16 / need if need > 0 else float("inf")})
    return {"step_ms": step_ms, "target": target, "int8_speedup": card.int8_speedup, "linear_share": lin16 / step,
            "attention_ms": attention_ms, "attention_share": att / step, "rows": rows}


def w8a8_markdown(w8: dict, size: int, card: Card) -> str:
    att = (f"attention {w8['attention_ms']:.2f} ms ({100 * w8['attention_share']:.0f} %)" if w8["attention_ms"]
           else "attention time unknown (--attention-ms)")
    lines = [f"### W8A8 ceiling: {card.name}, {size} px, bf16 step {w8['step_ms']:.2f} ms; linears "
             f"{100 * w8['linear_share']:.0f} %, {att}; int8 GEMMs at {w8['int8_speedup']}x bf16", "",
             f"| activation quantization | attention | attention x bf16 | step x bf16 | int8 GEMM x bf16 needed for "
             f"{w8['target']}x |", "|---|---|---|---|---|"]
    for r in w8["rows"]:
        need = "unreachable" if r["int8_needed"] == float("inf") else f"{r['int8_needed']:.2f}"
        lines.append(f"| {r['prologue']} | {r['attention']} | {r['speedup']:.2f} | {r['ratio']:.3f} | {need} |")
    return "\n".join(lines)


def attention_markdown(at: dict, size: int, card: Card) -> str:
    meas = (f"; cuDNN bf16 measured {at['measured_ms']:.2f} ms ({100 * at['measured_vs_floor']:.0f} % of the "
            f"overlapped floor's rate)" if at.get("measured_ms") else "")
    return (f"attention at {size} px on {card.name}: {at['scores'] / 1e9:.2f} G score elements (head dim "
            f"{at['head_dim']:.0f}); MMAs {at['mma_bf16_ms']:.2f} ms bf16 / {at['mma_fp8_ms']:.2f} ms FP8 at the dense "
            f"peak, exps {at['exp_ms']:.2f} ms on the SFUs ({card.exp_per_clk_sm}/clk/SM at {card.clock_ghz} GHz): "
            f"FP8 attention can be at most {at['overlapped']:.2f}x (MMAs and exps overlapped) to {at['serial']:.2f}x "
            f"(serialized) of bf16{meas}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dit4sr")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="output sizes in pixels")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--card", choices=sorted(CARDS), default="h100")
    ap.add_argument("--hbm", type=float, default=None, help="HBM bytes/s (default: the card's datasheet peak)")
    ap.add_argument("--bf16-gemm-ms", type=float, default=None,
                    help=f"measured bf16 ms of the {'x'.join(map(str, GEMM_SHAPE))} GEMM (default: the card's)")
    ap.add_argument("--int8-speedup", type=float, default=None, help="int8 GEMM speed-up over bf16 (default: card's)")
    ap.add_argument("--step-ms", nargs="+", default=None, metavar="SIZE=MS",
                    help="measured bf16 step per size, e.g. 512=27.42 1024=147.93 (default: the card's)")
    ap.add_argument("--rank", type=int, default=LOWRANK_RANK, help="low-rank branch rank")
    ap.add_argument("--attention-ms", nargs="+", default=None, metavar="SIZE=MS",
                    help="measured cuDNN bf16 attention per step, e.g. 512=5.67 (default: the card's)")
    ap.add_argument("--json", default=None, metavar="OUT", help="write the inventory and floor tables here")
    a = ap.parse_args(argv)
    base = CARDS[a.card]
    card = dataclasses.replace(
        base, hbm_bytes_per_s=a.hbm or base.hbm_bytes_per_s, bf16_gemm_ms=a.bf16_gemm_ms or base.bf16_gemm_ms,
        int8_speedup=a.int8_speedup or base.int8_speedup, bf16_step_ms={**base.bf16_step_ms, **_parse_steps(a.step_ms)},
        bf16_attention_ms={**base.bf16_attention_ms, **_parse_steps(a.attention_ms, "--attention-ms")})
    cfg = step_cfg(a.preset)
    print(f"card {card.name}: HBM {card.hbm_bytes_per_s / 1e12:.2f} TB/s, bf16 GEMM {card.bf16_gemm_ms} ms at "
          f"{'x'.join(map(str, GEMM_SHAPE))} = {card.bf16_flops_per_s / 1e12:.0f} TFLOP/s, int8 x{card.int8_speedup}; "
          f"W codes {W_CODE_BYTES} B, A codes {A_CODE_BYTES} B, outputs {OUT_BYTES} B\n")
    res = {"card": dataclasses.asdict(card), "preset": a.preset, "designs": {
        k: [dataclasses.asdict(p) for p in v] for k, v in DESIGNS.items()}, "sizes": {}}
    for size in a.sizes:
        inv = inventory(cfg, size, a.batch)
        print(inventory_markdown(inv), "\n")
        entry = {"inventory": {k: v for k, v in inv.items() if k != "dots"}}
        step_ms = card.bf16_step_ms.get(size)
        if step_ms is None:
            print(f"(no bf16 step time for {size} px on {card.name}: pass --step-ms {size}=MS for the floor)\n")
        else:
            fl = floor_table(inv["linears"], card, step_ms, a.rank,
                             shared_elems=inv["totals"]["act_elems_quantized_shared"])
            print(floor_markdown(fl, size), "\n")
            entry["floor"] = fl
        entry["attention"] = attention_ceiling(inv, card)
        print(attention_markdown(entry["attention"], size, card), "\n")
        if step_ms is not None:
            entry["w8a8"] = w8a8_ceiling(inv["linears"], card, step_ms, entry["attention"])
            print(w8a8_markdown(entry["w8a8"], size, card), "\n")
        res["sizes"][str(size)] = entry
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return res


if __name__ == "__main__":
    main()
