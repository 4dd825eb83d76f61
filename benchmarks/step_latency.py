"""Per-step latency and memory of the full-size DiT4SR transformer: bf16 vs quantized executions.

One denoising step as the real pipeline runs it (qdit4sr_jax/sampling.py): classifier-free guidance
doubles the batch (negative and positive prompt in one call of batch 2B), the transformer sees the
noisy latent and the LR latent (two token streams of (H/16)(W/16) tokens each) plus 333 text tokens,
then the guidance combination and the Euler update. 512x512 output = 64x64 latent, 1024x1024 = 128x128
latent (untiled). Random weights of the real shapes, made on the device in bf16.

Modes (--modes):
  bf16          the float model (compute and weights in bf16)
  w8a8-int      RTN W8 per channel, A8 per token: int8 x int8 -> int32 through XLA (`execution="int"`)
  w8a8-fused    the same weights through the fused kernel (quant/kernels, `execution="fused"`)
  w4a4-int      qdit4sr-w4a4 (H-SVD branches, VaSMP weight bits, VaTMP activation schedule from random
                statistics; 4-bit codes packed two per byte) through XLA int8
  w4a4-fused    the same weights through the fused kernel
  w4a4-fake     the same weights as fake quantization (float reference; for contrast)
  w4a4pc-fused  qdit4sr-w4a4 with per-channel (not group-64) weight scales, fused kernel
  w4a4i-fused   qdit4sr-w4a4-fast: group-64 accuracy with two-level integer group scales (per-channel float
                scale x 4-bit integer factor per group, folded into the int8 codes once per call), so the
                fused kernel runs its per-channel loop; w4a4i-int / w4a4i-fake: the same weights through
                XLA int8 / fake quantization
  w4a4s-fused   qdit4sr-w4a4-small: w4a4i plus int8 low-rank branch factors (`lowrank_bits=8`, the smallest
                tree: 1/3.59 of bf16); w4a4s-int: the same weights through XLA int8
  *-prep        (w8a8-prep, w4a4i-prep, w4a4s-prep) the fused mode with its weights `kernels.prepare`d before
                the timed step (unpacked int8 codes, float branch factors in kernel layout), as
                `sampling.sample` runs them: the per-step cost inside a sampling run; weight bytes are those
                of the prepared tree
  *-prepk       the same with the prologue (smoothing, per-token quantization, branch down-projections) as one
                Pallas kernel per layer (`kernels.prepare(..., prologue="pallas")`; GPU: Triton)
  qwix-w8a8     qwix's int8 PTQ of the same model, when qwix is importable (else recorded as skipped)
  p:PRESET:KIND any `QuantConfig.preset` name (e.g. p:qdit4sr-paper-w4a4-small:prep) run as KIND: fused (stored
                tree), prep (`kernels.prepare`d: joint down-projection, the default), prepsplit (prepared with
                down="split"), prepin (prepared, the down-projection on the layer's input: down="input", one
                down GEMM per to_q / to_k / to_v group: `prepared.share_inputs`), prepbf (prepin with x' rounded
                to bf16 before its quantization: xprime="bfloat16", the sampler's "fast"), prepbfns (prepbf with
                a down GEMM per layer: share=False), prepbfm (prepbf with the GEMMs on the warp-specialized
                Mosaic kernel: gemm="mosaic"), prepbfh (prepbfm with x' and its row maxima from the Mosaic
                Hadamard kernel: prologue="mosaic", `kernels/prologue_mosaic.py`), prepbfhq (prepbfh with the
                layers reading one input as one GEMM: the sampler's "fast-mosaic", `kernels/merged.py`; prepbfh is
                its "fast-mosaic-separate"),
                prepbfr (prepbfm with x', row maxima and features of 1536-input layers from one Mosaic GEMM:
                prologue="mosaic-gemm"),
                prepk (prepared, prologue kernel), int (XLA int8 reference path); p:PRESET:KIND:IMPL the same
                with the online Hadamard as IMPL (`transforms.HADAMARD_IMPLS`) for this mode only
--hadamard IMPL runs the online rotation of the rotating presets as `transforms.set_hadamard_impl(IMPL)`
(default "auto" = `transforms.auto_impl`: "full" up to 2048 on a GPU, else "dense"; "butterfly" is the
implementation before 2026-12-05). --prologue-tile 16x4x16 sets the prologue kernel's rows x warps (x warps of
rotated layers) of the prepk modes (`kernels.operands.set_prologue_tiles`). --mosaic-tiles tile_m=128,wg_dim=m,...
sets the warp-specialized GEMM's tiles of the prepbfm modes (`kernels.mosaic_gemm.set_fused_tiles`).
Each mode: compile time, median / p10 / p90 of `--iters` timed steps after warm-up (block_until_ready),
weight bytes (all params: codes, scales, integer group factors, branches, smoothing, schedules and every
unquantized parameter; `quantize.<recipe>.weight_breakdown` splits them) and the compiled step's temp /
argument bytes; ratios to bf16 of the same run.

  python benchmarks/step_latency.py --sizes 512 1024 --batch 1 --out $OUT/step_latency.json
  python benchmarks/step_latency.py --preset tiny --sizes 32 --iters 3       # CPU smoke test
  python benchmarks/step_latency.py --cases 512x1 --modes bf16 w4a4s-fused --scan-steps 4   # per step, in a scan
  python benchmarks/step_latency.py --cases 512x1 --scan-steps 4 --xla-variants default cb-off cb-while
      # the same steps compiled under XLA option sets (`XLA_VARIANTS`: command buffers / CUDA graphs), one process
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common import (CompileTimer, add_prologue_args, apply_prologue_args, weight_breakdown, compile_and_time,  # noqa: E402
                    device_bytes_in_use, environment, gib, random_calib, random_params, tree_bytes, write_json)

MODES = ("bf16", "w8a8-int", "w8a8-fused", "w4a4-int", "w4a4-fused", "w4a4-fake", "w4a4pc-fused", "qwix-w8a8",
         "w4a4i-fused", "w4a4i-int", "w4a4i-fake", "w4a4s-fused", "w4a4s-int", "w8a8-prep", "w4a4i-prep",
         "w4a4s-prep", "w8a8-prepk", "w4a4i-prepk", "w4a4s-prepk")


# XLA compile options per variant (passed to `jax.jit(compiler_options=...)`, so one process compiles each):
# XLA's default command buffers (CUDA graphs) hold fusions, cuBLAS / cuBLASLt, custom calls, cuDNN and dynamic-slice
# fusions in graphs of >= 5 ops; "cb-off" runs every thunk as its own launch; "cb-while" adds while loops and
# conditionals (the sampler's scan becomes one graph, CUDA conditional nodes); "-min1" graphs every sequence.
_CB_DEFAULT = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION"
XLA_VARIANTS = {
    "default": {},
    # XLA's DotMerger (default: up to 32 MB) joins dots that share an operand into one dot against a concatenation
    # of the others, then slices the result: in the W4A4 step the branch down GEMMs of to_q / to_k / to_v (231 slice
    # kernels per 512-px step) and the streams' rotations by one +-1 matrix (45 concatenations of their inputs);
    # in bf16 the q / k / v weights, copied every step. "no-dot-merge" turns it off.
    "no-dot-merge": {"xla_gpu_dot_merger_threshold_mb": 0},
    # XLA emits its own dots (the branch down / up GEMMs, the rotation's +-1 GEMMs) as Triton GEMMs, the branch down
    # GEMM (K = 1536, N = rank) split 4-way along K plus a reduce kernel (241 + 241 per 512-px W4A4 step);
    # "no-triton-gemm" sends them to cuBLAS instead (our Pallas int GEMMs are custom calls, unaffected).
    "no-triton-gemm": {"xla_gpu_enable_triton_gemm": False},
    "cb-off": {"xla_gpu_enable_command_buffer": ""},
    "cb-while": {"xla_gpu_enable_command_buffer": _CB_DEFAULT + ",WHILE,CONDITIONAL"},
    "cb-while-min1": {"xla_gpu_enable_command_buffer": _CB_DEFAULT + ",WHILE,CONDITIONAL",
                      "xla_gpu_graph_min_graph_size": 1},
    "cb-min1": {"xla_gpu_graph_min_graph_size": 1},
    # DotMerger off (the W4A4 default) with the whole scanned step as one CUDA graph where XLA can: whether the ~12 ms
    # of gaps between the Mosaic route's ~3,000 kernels per 512-px step (2026-12-07 profile) go away
    "nodm-cb-while-min1": {"xla_gpu_dot_merger_threshold_mb": 0,
                           "xla_gpu_enable_command_buffer": _CB_DEFAULT + ",WHILE,CONDITIONAL",
                           "xla_gpu_graph_min_graph_size": 1},
}


PRESET_KINDS = ("fused", "prep", "prepsplit", "prepin", "prepbf", "prepbfns", "prepbfm", "prepbfh", "prepbfhq",
                "prepbfr", "prepk", "int")


def is_mode(m: str) -> bool:
    """A fixed mode (MODES) or p:PRESET:KIND[:HADAMARD] (KIND in PRESET_KINDS, HADAMARD in HADAMARD_IMPLS)."""
    from qdit4sr_jax.quant.transforms import HADAMARD_IMPLS
    if m in MODES:
        return True
    parts = m.split(":")
    return (len(parts) in (3, 4) and parts[0] == "p" and parts[2] in PRESET_KINDS and bool(parts[1])
            and (len(parts) == 3 or parts[3] in HADAMARD_IMPLS))


def mode_hadamard(m: str, default: str) -> str:
    """The online Hadamard implementation a mode runs: its p:PRESET:KIND:HADAMARD field, else default."""
    parts = m.split(":")
    return parts[3] if m.startswith("p:") and len(parts) == 4 else default


def mode_arg(m: str) -> str:
    if not is_mode(m):
        raise argparse.ArgumentTypeError(f"mode {m!r}: one of {MODES} or p:PRESET:KIND[:HADAMARD] with KIND in "
                                         f"{PRESET_KINDS}")
    return m


def make_step(model, guidance: float, scan_steps: int = 1, compiler_options=None):
    """Jitted step(params, x [B,h,w,C], lr [B,h,w,C], ctx [2B,L,D], pooled [2B,P], t [], dsig [], i [] int32).
    scan_steps > 1: that many steps inside one `lax.scan` (as `sampling.sample` runs them, so XLA may hoist the
    weight-only work of the quantized layers out of the loop); step index i, i + 1, ... for the VaTMP lookup."""
    def one(params, x, lr, ctx, pooled, t, dsig, i):
        b = x.shape[0]
        xin = jnp.concatenate([x, x], axis=0)
        lrin = jnp.concatenate([lr, lr], axis=0)
        tb = jnp.full((2 * b,), t, jnp.float32)
        v = model.apply({"params": params}, xin, lrin, tb, ctx, pooled, step=i)
        vu, vc = jnp.split(v.astype(jnp.float32), 2, axis=0)
        return x + dsig * (vu + guidance * (vc - vu))

    opts = dict(compiler_options) if compiler_options else None
    if scan_steps <= 1:
        return jax.jit(one, compiler_options=opts)

    @partial(jax.jit, compiler_options=opts)
    def steps(params, x, lr, ctx, pooled, t, dsig, i):
        def body(xc, k):
            return one(params, xc, lr, ctx, pooled, t, dsig, i + k), None
        return jax.lax.scan(body, x, jnp.arange(scan_steps, dtype=jnp.int32))[0]
    return steps


def inputs(model_cfg, size: int, batch: int, seed: int = 0):
    """Step inputs for an output of size x size pixels (latent size / 8)."""
    lat = size // model_cfg.vae.downsample
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    c = model_cfg.in_channels
    x = jax.random.normal(k[0], (batch, lat, lat, c), jnp.float32)
    lr = jax.random.normal(k[1], (batch, lat, lat, c), jnp.float32)
    ctx = (jax.random.normal(k[2], (2 * batch, model_cfg.context_len, model_cfg.joint_attention_dim)) * 0.5
           ).astype(model_cfg.compute_dtype)
    pooled = (jax.random.normal(k[3], (2 * batch, model_cfg.pooled_projection_dim)) * 0.5).astype(model_cfg.compute_dtype)
    return x, lr, ctx, pooled, jnp.float32(500.0), jnp.float32(-0.025), jnp.int32(10)


def quantized_trees(params, modes, steps: int, log):
    """{mode: params} for the requested quantized modes (quantizing each recipe once)."""
    from qdit4sr_jax.quant.api import quantize
    from qdit4sr_jax.quant.config import QuantConfig
    from qdit4sr_jax.quant.kernels import prepare, with_execution
    from qdit4sr_jax.quant.kernels.prepared import SAMPLER_MODES
    trees, info = {}, {}
    recipes = {}
    if any(m.startswith("w8a8") for m in modes):
        recipes["w8a8"] = (QuantConfig.preset("w8a8").replace(execution="int"), None)
    if any(m.startswith("w4a4-") for m in modes):
        recipes["w4a4"] = (QuantConfig.preset("qdit4sr-w4a4").replace(execution="int"), "calib")
    if any(m.startswith("w4a4pc") for m in modes):
        recipes["w4a4pc"] = (QuantConfig.preset("qdit4sr-w4a4").replace(execution="int", w_group_size=None), "calib")
    if any(m.startswith("w4a4i-") for m in modes):
        recipes["w4a4i"] = (QuantConfig.preset("qdit4sr-w4a4-fast").replace(execution="int"), "calib")
    if any(m.startswith("w4a4s-") for m in modes):
        recipes["w4a4s"] = (QuantConfig.preset("qdit4sr-w4a4-small").replace(execution="int"), "calib")
    for m in modes:
        if m.startswith("p:"):
            preset = m.split(":")[1]
            try:
                recipes["p:" + preset] = (QuantConfig.preset(preset).replace(execution="int"), "calib")
            except Exception as e:                              # an unknown preset: record, keep the others
                info["p:" + preset] = {"error": repr(e)[:300]}
                log(f"preset {preset}: {e!r:.300}")
    for name, (qcfg, need) in recipes.items():
        calib = random_calib(params, qcfg, steps) if need else None
        t0 = time.perf_counter()
        try:
            with CompileTimer() as ct:
                q = quantize(params, qcfg, calib)
                jax.block_until_ready(jax.tree_util.tree_leaves(q))
        except Exception as e:                                  # keep the other recipes' runs
            info[name] = {"error": repr(e)[:500]}
            log(f"quantize {name} failed: {info[name]['error']}")
            continue
        info[name] = {"quantize_s": time.perf_counter() - t0, "weight_bytes": tree_bytes(q),
                      "weight_breakdown": weight_breakdown(q), **ct.summary()}
        log(f"quantized {name}: {info[name]['quantize_s']:.1f} s ({ct.summary()}), "
            f"{gib(info[name]['weight_bytes'])} GiB = 1/{tree_bytes(params) / info[name]['weight_bytes']:.2f} of "
            f"bf16; bytes by field {info[name]['weight_breakdown']}")
        for m in modes:
            kind = m.split("-", 1)[1] if m.startswith(name + "-") else None
            if m.startswith("p:"):
                kind = m.split(":")[2] if ":".join(m.split(":")[:2]) == name else None
            if kind in ("prepsplit", "prepin", "prepbf", "prepbfns", "prepbfm", "prepbfh", "prepbfhq", "prepbfr"):
                kw = dict(prepsplit=dict(down="split"), prepin=dict(down="input"), prepbf=SAMPLER_MODES["fast"],
                          prepbfns=dict(SAMPLER_MODES["fast"], share=False),
                          prepbfm=dict(SAMPLER_MODES["fast"], gemm="mosaic"),
                          prepbfh=SAMPLER_MODES["fast-mosaic-separate"],
                          prepbfhq=SAMPLER_MODES["fast-mosaic"],
                          prepbfr=dict(SAMPLER_MODES["fast"], gemm="mosaic", prologue="mosaic-gemm"))[kind]
                # per layer, outside a jit: a full-size tree as one jitted program took ~70 s to compile on an
                # H100 (12-07 22:50); merge=True then merges groups with (equal) VaTMP schedules, as the sampler
                trees[m] = jax.block_until_ready(prepare(with_execution(q, "fused"), **kw, per_layer_jit=True))
            elif kind == "int":
                trees[m] = q
            elif kind in ("fused", "fake"):
                trees[m] = with_execution(q, kind)
            elif kind in ("prep", "prepk"):
                pro = "pallas" if kind == "prepk" else "xla"
                trees[m] = jax.block_until_ready(jax.jit(lambda t, pro=pro: prepare(t, prologue=pro))(
                    with_execution(q, "fused")))
    return trees, info


def qwix_tree(model, params, example, log):
    """qwix int8 PTQ of the same model (None with a reason when qwix is not importable or fails)."""
    try:
        import qwix  # noqa: F401
    except Exception as e:                                    # benchmark-only dependency
        return None, f"qwix not importable: {e!r}"[:300]
    try:
        rules = [qwix.QuantizationRule(module_path=r".*transformer_blocks_.*", op_names=("dot_general", "einsum"),
                                       weight_qtype=jnp.int8,
                                       act_qtype=jnp.int8)]
        qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
        abs_q = jax.eval_shape(lambda: qmodel.init(jax.random.PRNGKey(0), *example))["params"]
        qparams = qwix.quantize_params(params, abs_q)
        return (qmodel, qparams), None
    except Exception as e:
        log(f"qwix failed: {e!r}")
        return None, f"qwix failed: {e!r}"[:300]


def parse_cases(items):
    """['1024x1', '512x4'] -> [(1024, 1), (512, 4)]; a clear error for anything else."""
    out = []
    for it in items:
        try:
            size, b = (int(v) for v in it.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--cases: {it!r} is not SIZExBATCH (e.g. 1024x1)") from None
        if size <= 0 or b <= 0:
            raise SystemExit(f"--cases: {it!r} needs a positive size and batch")
        out.append((size, b))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dit4sr")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="output sizes in pixels")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--cases", nargs="+", default=None, metavar="SIZExBATCH",
                    help="(size, batch) pairs in this order, e.g. 1024x1 512x1 512x4 (replaces --sizes x --batch)")
    ap.add_argument("--modes", nargs="+", default=list(MODES[:6]), type=mode_arg,
                    help=f"{', '.join(MODES)}, or p:PRESET:KIND (KIND in {PRESET_KINDS})")
    ap.add_argument("--hadamard", default="auto", help="online Hadamard implementation (transforms.HADAMARD_IMPLS)")
    ap.add_argument("--prologue-tile", default=None, metavar="ROWSxWARPS[xROTWARPS]",
                    help="prologue kernel tile of the prepk modes (kernels.set_prologue_tiles), e.g. 16x4x16")
    ap.add_argument("--mosaic-tiles", default=None, metavar="FIELD=VALUE,...",
                    help="tiles of the Mosaic GEMM in the prepbfm modes (mosaic_gemm.set_fused_tiles), e.g. "
                         "tile_m=128,wg_dim=m,epi_n=32,out_slots=1")
    add_prologue_args(ap)
    ap.add_argument("--attention", default="cudnn", help="'cudnn', 'fp8' (cuDNN FP8), 'fp8-ref' or 'xla' "
                    "(cudnn / fp8 fall back to xla if the bf16 step fails with them)")
    ap.add_argument("--quant-attention", default=None, help="attention of the quantized modes, if not --attention "
                    "(e.g. 'fp8': W8A8 with cuDNN FP8 attention, bf16 on cuDNN bf16 in the same run)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--scan-steps", type=int, default=1,
                    help="time N steps inside one lax.scan (as the sampler runs them); figures are per step")
    ap.add_argument("--xla-variants", nargs="+", default=["default"], choices=sorted(XLA_VARIANTS),
                    help="compile every step under each of these XLA option sets (XLA_VARIANTS); ratios are to bf16 "
                         "of the same variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--calib-steps", type=int, default=40)
    ap.add_argument("--deadline", type=float, default=None, help="skip remaining work after this many seconds")
    ap.add_argument("--out", default=None, help="JSON results file")
    a = ap.parse_args(argv)
    cases = parse_cases(a.cases) if a.cases else [(s, b) for s in a.sizes for b in a.batch]
    from qdit4sr_jax.quant.transforms import hadamard_impl, set_hadamard_impl
    set_hadamard_impl(a.hadamard)
    if a.prologue_tile:
        from qdit4sr_jax.quant.kernels.operands import set_prologue_tiles
        t = [int(v) for v in a.prologue_tile.lower().split("x")]
        if len(t) not in (2, 3):
            raise SystemExit(f"--prologue-tile: {a.prologue_tile!r} is not ROWSxWARPS[xROTWARPS]")
        set_prologue_tiles(prologue_block_m=t[0], prologue_warps=t[1], prologue_rot_warps=t[-1])
    if a.mosaic_tiles:
        from qdit4sr_jax.quant.kernels.mosaic_gemm import parse_tiles, set_fused_tiles
        try:
            set_fused_tiles(**parse_tiles(a.mosaic_tiles))
        except ValueError as e:
            raise SystemExit(f"--mosaic-tiles: {e}")
    apply_prologue_args(a)
    a.sizes = sorted({s for s, _ in cases})
    t_start = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t_start:7.1f}s] {s}", flush=True)
    from qdit4sr_jax.config import ModelConfig
    from qdit4sr_jax.model.dit4sr import DiT4SRTransformer

    attn = None if a.attention == "xla" else a.attention
    mcfg = ModelConfig.preset(a.preset).replace(dtype="bfloat16", param_dtype="bfloat16", attention_impl=attn)
    if jax.default_backend() != "gpu" and attn == "cudnn":     # ("fp8" runs its jnp reference off GPU)
        mcfg = mcfg.replace(attention_impl=None)
    res = {"env": environment(), "args": vars(a), "model": a.preset, "cfg_batch_doubled": True, "runs": [],
           "notes": []}
    log(f"env {res['env']}")
    mem0 = device_bytes_in_use()
    params = random_params(mcfg)
    jax.block_until_ready(jax.tree_util.tree_leaves(params))
    res["bf16_weight_bytes"] = tree_bytes(params)
    res["device_bytes_after_params"] = None if mem0 is None else device_bytes_in_use() - mem0
    log(f"params: {gib(res['bf16_weight_bytes'])} GiB")
    trees, qinfo = quantized_trees(params, [m for m in a.modes if m not in ("bf16", "qwix-w8a8")],
                                   a.calib_steps, log)
    res["quantize"] = qinfo
    trees["bf16"] = params
    model = DiT4SRTransformer(mcfg)
    models = {m: model for m in trees}
    if a.quant_attention not in (None, a.attention):
        qmodel = DiT4SRTransformer(mcfg.replace(attention_impl=None if a.quant_attention == "xla" else a.quant_attention))
        models = {m: (model if m == "bf16" else qmodel) for m in trees}
    if "qwix-w8a8" in a.modes:
        ex = inputs(mcfg, min(a.sizes), 1)
        example = (jnp.concatenate([ex[0]] * 2), jnp.concatenate([ex[1]] * 2), jnp.full((2,), 500.0), ex[2], ex[3])
        got, why = qwix_tree(model, params, example, log)
        if got is None:
            res["notes"].append(why)
        else:
            models["qwix-w8a8"], trees["qwix-w8a8"] = got
    steps = {}
    for (size, b), variant in [(c, v) for c in cases for v in a.xla_variants]:
        args = inputs(mcfg, size, b)
        base = None
        xopts = XLA_VARIANTS[variant]
        for mode in [m for m in a.modes if m in trees]:
            if a.deadline and time.perf_counter() - t_start > a.deadline:
                res["notes"].append(f"deadline: skipped {mode} at {size} batch {b}")
                continue
            mdl = models[mode]
            had = mode_hadamard(mode, a.hadamard)
            key = (id(mdl), mcfg.attention_impl, variant, had)    # one jit per Hadamard impl (read when traced)
            if key not in steps:
                steps[key] = make_step(mdl, mcfg.guidance_scale, a.scan_steps, xopts)
            run = {"mode": mode, "size": size, "batch": b, "latent": size // mcfg.vae.downsample,
                   "weight_bytes": tree_bytes(trees[mode]), "xla_variant": variant}
            try:
                left = None if not a.deadline else max(5.0, a.deadline - (time.perf_counter() - t_start))
                with hadamard_impl(had):
                    run.update(compile_and_time(steps[key], (trees[mode],) + args, warmup=a.warmup,
                                                iters=a.iters, budget_s=left))
            except Exception as e:
                if mode == "bf16" and mcfg.attention_impl in ("cudnn", "fp8"):
                    res["notes"].append(f"{mcfg.attention_impl} attention failed ({e!r:.300}); falling back "
                                        "to XLA attention")
                    log(res["notes"][-1])
                    mcfg = mcfg.replace(attention_impl=None)
                    model = DiT4SRTransformer(mcfg)
                    models = {m: (model if models[m] is mdl else models[m]) for m in models}
                    steps.clear()
                    steps[(id(model), None, variant, had)] = make_step(model, mcfg.guidance_scale, a.scan_steps,
                                                                       xopts)
                    run.update(compile_and_time(steps[(id(model), None, variant, had)], (trees[mode],) + args,
                                                warmup=a.warmup, iters=a.iters))
                else:
                    run["error"] = repr(e)[:500]
                    log(f"{mode} {size} b{b} failed: {run['error']}")
                    res["runs"].append(run)
                    continue
            run["attention"] = models[mode].cfg.attention_impl or "xla"
            run["scan_steps"] = a.scan_steps
            if a.scan_steps > 1:           # per step: the timed call ran scan_steps steps
                for f in ("median_ms", "p10_ms", "p90_ms", "min_ms", "max_ms", "warmup_ms"):
                    run[f] /= a.scan_steps
            res["runs"].append(run)
            if mode == "bf16":             # the ratios of this case's runs, those timed before bf16 included
                base = run["median_ms"]
                for r in res["runs"]:
                    if (r["size"], r["batch"], r.get("xla_variant")) == (size, b, variant) and "median_ms" in r:
                        r["speedup_vs_bf16"] = base / r["median_ms"]
            else:
                run["speedup_vs_bf16"] = None if base is None else base / run["median_ms"]
            ratio = "-" if base is None else f"{run['speedup_vs_bf16']:.2f}"
            log(f"{mode:13s} {variant:8s} {size}px b{b}: {run['median_ms']:.2f} ms (p10 {run['p10_ms']:.2f}, "
                f"p90 {run['p90_ms']:.2f}, n={run['n']}), compile {run['compile_s']:.1f} s, x{ratio} vs bf16")
            write_json(a.out, res)
    write_json(a.out, res)
    print_table(res)
    return res


def print_table(res):
    bw = res.get("bf16_weight_bytes")
    a_q = res.get("args", {}).get("quant_attention")
    print(f"\n{res['env']['device']}  jax {res['env']['jax']}  model {res['model']}  (CFG: batch doubled)")
    print("| mode | XLA | size | batch | median ms | p10-p90 ms | x bf16 | compile s | weights GiB | w / bf16 | temp GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["runs"]:
        if "error" in r:
            print(f"| {r['mode']} | {r.get('xla_variant', 'default')} | {r['size']} | {r['batch']} | error | | | | | | |")
            continue
        sp = r.get("speedup_vs_bf16")
        attn = f" (attention {r['attention']})" if a_q and r["mode"] != "bf16" else ""
        print(f"| {r['mode']}{attn} | {r.get('xla_variant', 'default')} | {r['size']} | {r['batch']} | {r['median_ms']:.2f} | {r['p10_ms']:.2f}-{r['p90_ms']:.2f} "
              f"| {'-' if sp is None else f'{sp:.2f}'} | {r['compile_s']:.1f} | {gib(r['weight_bytes'])} "
              f"| 1/{bw / r['weight_bytes']:.2f} | {gib(r.get('temp_bytes'))} |")
    for n in res.get("notes", []):
        print("note:", n)


if __name__ == "__main__":
    main()
