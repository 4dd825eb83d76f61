"""Lower a whole quantized DiT4SR step for CUDA on any machine and count its Pallas (Triton) kernels.

Device time is scarce; Pallas' Triton lowering is not. This builds the quantized params tree of a preset
abstractly (`weight_memory.abstract_node`: the shapes and dtypes Q-DiT4SR's quantize stores, nothing
computed), optionally `kernels.prepare`s it, traces one CFG step (`step_latency.make_step`) as for a GPU
(`kernels.lowering_for("gpu")`: the fused layers pick the Pallas kernels) and lowers it with
`lowering_platforms=("cuda",)`. That runs every layer's Pallas -> Triton lowering, so an unsupported
primitive or tile shape shows up here. Triton's own compilation to PTX and everything XLA does afterwards
still need a GPU. XLA attention (cuDNN's needs a GPU to lower). `--platform tpu` lowers the same step for
TPU, where the fused layers take their XLA path (no Pallas kernel yet: no custom calls).

    python benchmarks/gpu/lower_check.py                                   # dit4sr, qdit4sr-w4a4-small, 512 px
    python benchmarks/gpu/lower_check.py --prepare pallas --size 1024      # prepared, prologue kernel
    python benchmarks/gpu/lower_check.py --model tiny --size 32 --prepare pallas
    python benchmarks/gpu/lower_check.py --platform tpu --prepare pallas     # TPU: the XLA path, no custom calls
    python benchmarks/gpu/lower_check.py --preset qdit4sr-paper-w4a4-small --prepare fast-mosaic --census
        # the Mosaic calls of a 512-px step by kernel and operand shapes (before XLA's CSE of identical calls)
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))      # the repository root
sys.path.insert(0, os.path.dirname(_HERE))                       # benchmarks/ (common, step_latency)
sys.path.insert(0, _HERE)                                        # benchmarks/gpu/

import jax  # noqa: E402


def abstract_quantized(model, preset: str, steps: int = 40):
    """ShapeDtypeStruct params tree of `model` (preset name or ModelConfig) quantized with `preset` at its
    w_bits, every node fused; -> (tree, number of quantized linears)."""
    import weight_memory as WM
    from qdit4sr_jax.quant import rules
    from qdit4sr_jax.quant.config import QuantConfig
    from qdit4sr_jax.quant.kernels import with_execution
    cfg = QuantConfig.preset(preset)
    params = WM.abstract_params(model)
    paths = rules.select_linears(params, cfg.include, cfg.exclude)
    q, _ = WM.abstract_tree(params, cfg, paths, [int(round(cfg.w_bits))] * len(paths), steps)
    return with_execution(q, "fused"), len(paths)


PREPARES = ("none", "xla", "pallas", "fast", "fast-mosaic-gemm", "fast-mosaic", "fast-mosaic-separate",
            "fast-mosaic-rot")


def check(model="dit4sr", preset: str = "qdit4sr-w4a4-small", size: int = 512, batch: int = 1,
          prepare: str = "none", platform: str = "gpu") -> dict:
    """-> {layers, triton_kernels, custom_calls, by_name, lower_s}. model: preset name or ModelConfig;
    prepare: none | xla | pallas (the prologue) | fast (the sampler's "fast": input-space down-projections, shared
    by the layers reading one input; Triton GEMMs) | fast-mosaic-gemm ("fast" with the GEMMs on the
    warp-specialized Mosaic kernel, counted as mosaic_kernels) | fast-mosaic-separate (the sampler's: that,
    with rotated layers' prologue on the Mosaic Hadamard kernel) | fast-mosaic (the sampler's: fast-mosaic-separate
    with the layers reading one input as one GEMM, `merged.merge_inputs`; the sampler merges where the members'
    VaTMP schedules are equal, which a calibration gives them but this abstract tree cannot show, so its schedules
    are dropped here, which leaves the kernels as they are) | fast-mosaic-rot (the rotation on one Mosaic GEMM:
    `prologue_mosaic.py`); Mosaic calls are counted before XLA's CSE of identical calls; platform: "gpu" (lowered
    for CUDA) or "tpu" (the fused
    layers take their XLA path there: no custom calls expected)."""
    import step_latency as S
    from qdit4sr_jax.config import ModelConfig
    from qdit4sr_jax.model.dit4sr import DiT4SRTransformer
    from qdit4sr_jax.quant.kernels import lowering_for
    from qdit4sr_jax.quant.kernels import prepare as prep
    from qdit4sr_jax.quant.kernels.mosaic_gemm import mosaic_call_sites, recording_calls
    from qdit4sr_jax.quant.kernels.prepared import SAMPLER_MODES
    if prepare not in PREPARES:
        raise ValueError(f"prepare must be one of {PREPARES}, got {prepare!r}")
    if platform not in ("gpu", "tpu"):
        raise ValueError(f"platform must be gpu or tpu, got {platform!r}")
    t0 = time.perf_counter()
    q, layers = abstract_quantized(model, preset)
    if prepare == "fast-mosaic":            # (docstring) equal schedules assumed, as a calibration gives
        from qdit4sr_jax.quant.qweight import QuantizedWeight
        is_q = lambda n: isinstance(n, QuantizedWeight)
        q = jax.tree_util.tree_map(lambda n: n.replace(a_schedule=None) if is_q(n) else n, q, is_leaf=is_q)
    mcfg = model if isinstance(model, ModelConfig) else ModelConfig.preset(model)
    mcfg = mcfg.replace(dtype="bfloat16", param_dtype="bfloat16", attention_impl=None)
    step = S.make_step(DiT4SRTransformer(mcfg), mcfg.guidance_scale, 1)
    args = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), S.inputs(mcfg, size, batch))
    kw = {"fast": SAMPLER_MODES["fast"], "fast-mosaic": SAMPLER_MODES["fast-mosaic"],
          "fast-mosaic-separate": SAMPLER_MODES["fast-mosaic-separate"],
          "fast-mosaic-gemm": dict(SAMPLER_MODES["fast"], gemm="mosaic"),
          "fast-mosaic-rot": dict(SAMPLER_MODES["fast"], gemm="mosaic", prologue="mosaic-gemm")}.get(
        prepare, dict(prologue=prepare))
    fn = step if prepare == "none" else jax.jit(lambda t, *a: step(prep(t, **kw), *a))
    with lowering_for(platform), recording_calls() as calls:
        text = fn.trace(q, *args).lower(lowering_platforms=("cuda" if platform == "gpu" else "tpu",)).as_text()
    names = re.findall(r"name = \"(qlinear[^\"]*)\"", text)          # the Pallas calls' names
    by_name = {}
    for nm in names:
        by_name[nm] = by_name.get(nm, 0) + 1
    return {"model": mcfg.name, "preset": preset, "size": size, "batch": batch, "prepare": prepare, "layers": layers,
            "platform": platform, "triton_kernels": text.count("__gpu$xla.gpu.triton"),
            "custom_calls": text.count("stablehlo.custom_call"), "by_name": by_name,
            "mosaic_kernels": mosaic_call_sites(text), "mosaic_distinct": text.count("custom_call @mosaic_gpu"),
            "census": [{"kind": kd, "shapes": [list(s) for s in sh], "calls": n}
                       for (kd, sh), n in sorted(calls.items(), key=lambda kv: -kv[1])],
            "text_mb": len(text) / 1e6,
            "lower_s": time.perf_counter() - t0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dit4sr")
    ap.add_argument("--preset", default="qdit4sr-w4a4-small")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prepare", default="none", choices=PREPARES)
    ap.add_argument("--platform", default="gpu", choices=("gpu", "tpu"))
    ap.add_argument("--census", action="store_true", help="also list the Mosaic calls by kernel and operand shapes")
    a = ap.parse_args(argv)
    r = check(a.model, a.preset, a.size, a.batch, a.prepare, a.platform)
    print(f"{r['model']} / {r['preset']} {r['size']} px batch {r['batch']}, prepare {r['prepare']}: {r['layers']} "
          f"quantized linears -> {r['triton_kernels']} Triton kernels {r['by_name']}, {r['mosaic_kernels']} Mosaic "
          f"kernel calls ({r['mosaic_distinct']} distinct), {r['custom_calls']} custom "
          f"calls in all, {r['text_mb']:.1f} MB of text (traced and lowered for {r['platform']} in {r['lower_s']:.1f} s, "
          f"jax {jax.__version__})")
    if a.census:
        for c in r["census"]:
            print(f"{c['calls']:>5} x {c['kind']:<13} {' '.join('x'.join(map(str, sh)) for sh in c['shapes'])}")
    return r


if __name__ == "__main__":
    main()
