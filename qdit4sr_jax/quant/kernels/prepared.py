"""Execution-ready weights: a fused layer's weight-only operands computed once per run, not once per call.

A stored `QuantizedWeight` keeps its codes packed (4-bit nibbles, two-level integer group factors) and its
branch factors possibly in int8; `fused_linear` turns them into kernel operands on every call: int8 codes
(unpacked, group factors folded, c * q), float branch factors, and the branch factors padded and laid
out for the kernels (`branch_ops`). On one 1536 x 1536 layer that is 5 of the W4A4 layer's 20 XLA kernels (CPU; see
benchmarks/gpu/layer_kernels.py), and every one of them is a launch per layer and step on a GPU unless XLA
happens to hoist it out of the sampler's loop.

`prepare(tree, unpack=True)` replaces every fused node by a `KernelWeight`: the same node with float branch
factors and (unpack=True) int8 codes, plus the branches in kernel layout (`branch_ops.branch_weights`: the
up-projections lr_b and ub, the down-projections padded / transposed for the prologue). The function is unchanged (the same operands reach the same
kernel: tests compare prepared and stored nodes bit for bit); `quant.linear.linear` dispatches a
`KernelWeight` to `fused_linear`. The sampler prepares inside its jit before the step loop when asked
(`sampling.sample(..., prepare_weights="unpacked" | "packed")`), so a run pays the weight-side work once.

Memory, for as long as the prepared tree lives (a sampling run): unpacked codes take 8 bits per weight instead
of 4, and int8 branch factors become bf16 (zero-padded to the kernels' tile sizes). The full DiT4SR at
qdit4sr-w4a4-small: 1.445 GB stored (1/3.59 of bf16), 2.880 GB prepared (1/1.80), 1.615 GB prepared with
unpack=False (1/3.21; packed codes are then unpacked per call, or inside the kernel with
`KernelConfig(unpack="kernel")`) (`python benchmarks/weight_memory.py --preset qdit4sr-w4a4-small`). Speed: the
1024-px W4A4-small step ran 0.77x of bf16 prepared (H100, 192.25 vs 147.93 ms) and 0.73-0.77x stored (H200), so
the weight-side work is not what makes W4A4 slow (benchmarks/RESULTS.md, 2026-12-05). Hence not the sampler's
default.

With down="input" (the sampler's "fast"), layers that read one input (to_q / to_k / to_v, add_q / k / v_proj:
`SHARED_INPUTS`) get one down-projection: `share_inputs` puts their input-space [lr_a | V_d] side by side in a
`branch_ops.SharedDown` under the group's key (e.g. attn/qkv_down), the model passes it to each member
(`model.mmdit.JointAttention`), and the step computes one x jd GEMM per group, whose columns each member's GEMM
kernel reads in place, instead of one per layer (which XLA's DotMerger joined by concatenating the three weights in
every step and slicing the features apart).

With merge=True, layers that read one input and quantize it alike (to_q / to_k / to_v, add_*_proj:
`merged.MERGED_INPUTS`) become one layer before they are prepared: `merged.merge_nodes` stacks their codes along N,
their H-SVD blocks by block row and their low-rank factors block-diagonally (read per member by the kernels:
`branch_ops`' blocked low-rank), under the group's key ("qkv", "add_qkv"), which the model runs as one layer and
splits (`quant.linear.linear_group`): one GEMM, one prologue and one down-projection per group, each output column
computed as before (to float rounding: tests). The 512-px W8A8 step lowers for CUDA with 374 Mosaic GEMM calls
instead of 496, the paper preset's -small form with 1,122 Mosaic calls instead of 1,488
(`benchmarks/gpu/lower_check.py --preset P --prepare fast-mosaic` vs `fast-mosaic-separate`); on an H100 the
512-px step ran 0.63x of bf16 merged vs 0.60x separate for the paper preset's -small form, W8A8 0.94x vs 0.92x
(benchmarks/RESULTS.md, 2026-12-07 22:50-23:10), so the sampler's "fast-mosaic" merges. Members with VaTMP schedules
merge where the schedules are known equal, i.e. outside a jit (`merged.merge_tree`; the sampler does so before its
jitted loop): inside `prepare`, which runs traced, they stay separate.

prologue="pallas" also replaces the XLA prologue (smoothing, per-token quantization, the branch
down-projections: several kernels) by one Pallas kernel per layer (`prologue_kernel.py`) wherever the Pallas
GEMM runs (GPU; the interpreter in tests); the XLA backend (CPU, TPU) keeps the XLA prologue. On an H200 it
did not pay: the 1024-px W4A4-small step took 199.15 ms prepared with it vs 199.43 ms stored (benchmarks/RESULTS.md,
2026-12-05), hence "xla" is the default.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from qdit4sr_jax.quant.kernels.merged import MERGED_INPUTS, can_merge, merge_inputs, merge_tree  # noqa: F401
from qdit4sr_jax.quant.kernels.prologue_mosaic import PROLOGUE_ROUTES, pad_columns
from qdit4sr_jax.quant.qweight import QuantizedWeight


PROLOGUES = ("xla", "pallas", "mosaic", "mosaic-gemm")
DOWNS = ("joint", "split", "input")
XPRIMES = ("float32", "bfloat16")
GEMMS = ("triton", "mosaic")
# The sampler's `prepare_weights` modes -> `prepare` arguments. "unpacked" / "packed" compute what the stored
# tree computes (the same operands reach the same kernels); "fast" (unpacked, the branch down-projection on the
# layer's input, x' rounded once to bf16) rounds differently and ran fastest on the H100: the paper preset's
# -small form 0.49x / 0.67x of bf16 at 512 / 1024 px vs 0.47x / 0.62x "unpacked" (benchmarks/RESULTS.md,
# 2026-12-06 07:10; 0.54x / 0.73x since), PSNR vs FP on the demo 32.289 vs 32.274 dB (2026-12-06 05:30).
# "fast-mosaic" (the fastest on Hopper): "fast" with, on a Hopper GPU (`lowering.has_wgmma`), the GEMMs on the
# warp-specialized Mosaic kernel and rotated layers' codes from the Mosaic Hadamard kernel, and the layers reading
# one input as one layer (`merged`; the sampler merges before its loop); elsewhere it is "fast" with the groups
# merged (the kernels are picked when traced). Checked against the Triton path on an H100 (rel. 7.6e-5, 2026-12-07
# 16:05; the merged group 23:01); the paper preset's -small form 0.63x of bf16 at 512 px vs 0.60x with the groups
# separate ("fast-mosaic-separate", the default before 2026-12-07 23:10) and 0.54x for "fast" (03:26).
_FAST = dict(unpack=True, down="input", xprime="bfloat16")
_MOSAIC = dict(_FAST, gemm="mosaic", prologue="mosaic")
SAMPLER_MODES = {"packed": dict(unpack=False), "unpacked": dict(unpack=True), "fast": _FAST,
                 "fast-mosaic": dict(_MOSAIC, merge=True), "fast-mosaic-separate": _MOSAIC}
# Layers that read one input (the groups of `merged.MERGED_INPUTS`), by the key of the `branch_ops.SharedDown` that
# `prepare(..., down="input")` puts beside them in their parent dict (the model passes it to each:
# `model.mmdit.JointAttention`): "qkv_down", "add_qkv_down".
SHARED_INPUTS = {key + "_down": names for key, names in MERGED_INPUTS.items()}


@dataclasses.dataclass(frozen=True)
class KernelWeight:
    """node: the QuantizedWeight without its branch factors and, when unpacked, with int8 codes (packed=False;
    two-level factors folded: layout "nk", gscale None); bw: its branches, in float, in kernel layout
    (`branch_ops.BranchWeights`, None without branches); levels / inv_levels: with a VaTMP schedule, the code
    levels per step (`prologue_kernel.level_table`) and their reciprocals, which the prologue (kernel or XLA)
    indexes at the traced step instead of computing 2^(bits-1) - 1 and 1 / levels per layer and call (scalar
    kernels of their own on a GPU: 496 per 512-px W4A4 step, benchmarks/RESULTS.md 2026-12-06 19:53); with fixed
    activation bits (W8A8) a one-step table, for the same reason (the 512-px W8A8 step ran 327 select kernels for
    the scales' `where(s > 0, s, 1)` without it: RESULTS.md 2026-12-07 16:05);
    prologue (static): "xla" (XLA ops), "pallas" (one Pallas kernel: `prologue_kernel.py`, where the layer
    fits it, else XLA), "mosaic" (a rotated layer's x' and row maxima from the Mosaic Hadamard kernel on a GPU,
    `prologue_mosaic.py`, where the layer fits it, else XLA) or "mosaic-gemm" (x', row maxima and branch features
    from one Mosaic GEMM); xprime (static): the dtype of a transformed x' before its quantization in the XLA
    prologue (`prepare_weight`); gemm (static): the GEMM kernel on a GPU, "triton" (`pallas_gpu`, every layout)
    or "mosaic" (`mosaic_gemm.mosaic_gemm_epilogue`, warp-specialized wgmma, on a Hopper GPU where the layer `fits`
    it, else Triton; `lowering.has_wgmma`)."""
    node: QuantizedWeight
    bw: Any = None
    levels: Any = None            # with a VaTMP schedule: code levels per step, float32 [T]
    inv_levels: Any = None        # ... and 1 / levels, float32 [T]
    prologue: str = "xla"
    xprime: str = "float32"
    gemm: str = "triton"

    def reference_node(self) -> QuantizedWeight:
        """The QuantizedWeight this weight computes (branch factors rebuilt from `bw`, padding as zeros):
        what the reference paths and the fused path's fallbacks run."""
        from qdit4sr_jax.quant.kernels.branch_ops import node_factors
        return self.node.replace(**node_factors(self.bw, self.node.n))

    @property
    def execution(self) -> str:
        return self.node.execution

    @property
    def shape(self):
        return self.node.shape


jax.tree_util.register_dataclass(KernelWeight, data_fields=["node", "bw", "levels", "inv_levels"],
                                 meta_fields=["prologue", "xprime", "gemm"])


def prepare_weight(w: QuantizedWeight, *, unpack: bool = True, prologue: str = "xla",
                   down: str = "joint", xprime: str = "float32", gemm: str = "triton") -> KernelWeight:
    """One node -> its `KernelWeight` (traceable; see the module docstring). down: "joint" (the low-rank and
    H-SVD down-projections of the XLA prologue as one GEMM, `branch_ops.joint_down`), "split" (one GEMM for
    the low-rank factor, a batched einsum over the input blocks and a layout pass for the blocks) or "input"
    (the joint GEMM moved to the layer's input x: `branch_ops.input_space_down`; for rotated / smoothed layers
    the down GEMM then skips the bf16 copy of x' and no longer waits for the rotation; the same function, the
    branch rounded differently; the Pallas prologue kernel, which computes x' anyway, ignores it). xprime:
    "float32" (the reference's x') or "bfloat16": a rotated / smoothed layer's x' rounded once to bf16 before the
    per-token quantization in the XLA prologue, so the rotation GEMM writes and the absmax / quantization passes
    read 2 bytes per element instead of 4 (the codes are those of bf16(x'); the Pallas prologue kernel keeps
    float32). gemm: `KernelWeight.gemm`."""
    from qdit4sr_jax.quant.kernels.branch_ops import branch_weights
    if not isinstance(w, QuantizedWeight):
        raise TypeError(f"prepare_weight needs a QuantizedWeight node, got {type(w).__name__}")
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue must be one of {PROLOGUES}, got {prologue!r}")
    if down not in DOWNS:
        raise ValueError(f"down must be one of {DOWNS}, got {down!r}")
    if xprime not in XPRIMES:
        raise ValueError(f"xprime must be one of {XPRIMES}, got {xprime!r}")
    if gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
    node = w.float_branches()
    if unpack:
        node = node.unpacked()                   # int8 codes; folded codes c * q are per-channel int8 codes
    bw = branch_weights(node, joint=down in ("joint", "input"))   # the factors live on in bw only
    if down == "input" and bw is not None and bw.jd is not None:
        from qdit4sr_jax.quant.kernels.branch_ops import input_space_down
        bw = input_space_down(bw, node)
        if prologue in PROLOGUE_ROUTES:                     # the Mosaic GEMMs' column tiles, once, not per call
            bw = dataclasses.replace(bw, jd=pad_columns(bw.jd))
    levels = inv_levels = None
    if node.a_schedule is not None or node.a_bits is not None:    # the prologue looks the step's levels up; fixed
        from qdit4sr_jax.quant.kernels.prologue_kernel import level_table    # bits (W8A8): a one-step table
        levels = level_table(node.a_schedule if node.a_schedule is not None else [node.a_bits])
        inv_levels = 1.0 / levels
    return KernelWeight(node.replace(lr_a=None, lr_b=None, block_u=None, block_v=None), bw, levels, inv_levels,
                        prologue, xprime, gemm)


def share_inputs(params: dict) -> dict:
    """One dict of a prepared tree -> the same with the input-space down-projections of each `SHARED_INPUTS`
    group present (e.g. to_q / to_k / to_v: all prepared, not for the Pallas prologue kernel,
    `branch_ops.can_share_down`) moved into one `branch_ops.SharedDown` under the group's key; other dicts
    unchanged. Memory: the same columns, held once, plus zero columns where a member's start must align (none on
    DiT4SR: 128 columns per member), and the members' level tables stacked (`SharedDown.levels`, a few hundred
    bytes); the step computes one down GEMM per group instead of one per layer (which XLA's DotMerger joined by
    concatenating the three weights in every step, 37 x bf16[1536, 384] per 512-px W4A4 step in the optimized HLO
    of 2026-12-06, and slicing the features apart: benchmarks/gpu_notes.md)."""
    from qdit4sr_jax.quant.kernels.branch_ops import can_share_down, share_down
    out = dict(params)
    for key, names in SHARED_INPUTS.items():
        kws = [params[n].get("kernel") if isinstance(params.get(n), dict) else None for n in names]
        if key in params or not all(isinstance(k, KernelWeight) and k.prologue != "pallas" for k in kws):
            continue
        if not can_share_down([k.bw for k in kws]):
            continue
        shared, bws = share_down([k.bw for k in kws])
        tables = [k.levels for k in kws]
        if all(t is not None for t in tables) and len({t.shape for t in tables}) == 1:
            shared = dataclasses.replace(shared, levels=jax.numpy.stack(tables),
                                         inv_levels=jax.numpy.stack([k.inv_levels for k in kws]),
                                         members=tuple(b.jd_col for b in bws))
        if any(k.prologue in PROLOGUE_ROUTES for k in kws):
            shared = dataclasses.replace(shared, jd=pad_columns(shared.jd))
        for n, k, b in zip(names, kws, bws):
            out[n] = {**params[n], "kernel": dataclasses.replace(k, bw=b)}
        out[key] = shared
    return out


@functools.lru_cache(maxsize=None)
def _jitted_prepare_weight(options: tuple):
    """`prepare_weight` with these (name, value) options as one jitted function: compiled once per distinct layer
    (its shapes and static fields), however many layers share them."""
    return jax.jit(functools.partial(prepare_weight, **dict(options)))


def prepare(tree, *, unpack: bool = True, prologue: str = "xla", down: str = "joint", xprime: str = "float32",
            share: bool = True, gemm: str = "triton", merge: bool = False, per_layer_jit: bool = False):
    """The params tree with every QuantizedWeight whose execution is "fused" replaced by its `KernelWeight`
    and the "bias" beside it in float32, the kernels' epilogue dtype (bf16 values are exact in float32; saves a
    convert per layer and call); other nodes, float leaves and already prepared nodes unchanged. Traceable:
    call it inside the jit that runs the steps, before the loop. down, xprime: `prepare_weight`'s; share (with
    down="input"): layers reading one input get one down-projection (`share_inputs`); gemm: the GEMM kernel on a
    GPU (`KernelWeight.gemm`); merge: layers reading one input that can run as one layer become one before they
    are prepared (`merged.merge_inputs`; the model splits the output); groups with traced VaTMP schedules stay
    separate (`merged.merge_tree` outside the jit merges them). per_layer_jit: to prepare a tree once outside a jit
    (as the benchmarks do), each layer through a jitted `prepare_weight` compiled once per distinct layer, instead of
    the whole tree as one program (4.3 vs 6.9 s for a 4-block full-width DiT4SR on a CPU, growing with the blocks;
    the same values: `benchmarks/prepare_time.py --blocks 4`); inside a jit it changes nothing."""
    def fused(n):
        return isinstance(n, QuantizedWeight) and n.execution == "fused"

    options = dict(unpack=unpack, prologue=prologue, down=down, xprime=xprime, gemm=gemm)
    weight_fn = (_jitted_prepare_weight(tuple(sorted(options.items()))) if per_layer_jit
                 else functools.partial(prepare_weight, **options))

    def walk(t):
        if fused(t):
            return weight_fn(t)
        if isinstance(t, dict):
            t = merge_inputs(t) if merge else t
            out = {k: walk(v) for k, v in t.items()}
            if fused(t.get("kernel")) and t.get("bias") is not None:
                out["bias"] = t["bias"].astype(jax.numpy.float32)
            return share_inputs(out) if share else out
        if isinstance(t, (list, tuple)) and not hasattr(t, "_fields"):
            return type(t)(walk(v) for v in t)
        return t
    return walk(tree)


__all__ = ["KernelWeight", "PROLOGUES", "DOWNS", "XPRIMES", "GEMMS", "SAMPLER_MODES", "SHARED_INPUTS", "MERGED_INPUTS",
           "can_merge", "merge_inputs", "merge_tree", "prepare", "prepare_weight", "share_inputs"]
