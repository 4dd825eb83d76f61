"""`qdit4sr-jax` command line: demo | upscale | quantize | evaluate | report | convert."""
from __future__ import annotations

import argparse
import os
import sys
import time


def _compile_cache(a) -> None:
    """--compile-cache DIR: JAX's persistent compilation cache (`quant.api.enable_compilation_cache`), set before
    the command compiles anything."""
    if getattr(a, "compile_cache", None):
        from qdit4sr_jax.quant.api import enable_compilation_cache
        print(f"compilation cache: {enable_compilation_cache(a.compile_cache, min_compile_time_s=1.0)}")


def _add_compile_cache(parser) -> None:
    parser.add_argument("--compile-cache", default=None, metavar="DIR",
                        help="JAX persistent compilation cache directory (opt-in): a later run with the same model, "
                             "settings and JAX version loads the compiled programs (quantize passes, sampler) "
                             "instead of compiling them")


def _load_model(spec: str):
    from qdit4sr_jax.io.modelfile import load_pretrained
    return load_pretrained(spec)


def cmd_demo(a) -> int:
    from qdit4sr_jax.demo import format_table, run_demo
    t0 = time.perf_counter()
    _compile_cache(a)
    rows = run_demo(a.out, model=a.model, limit=a.images, crop=a.crop, num_steps=a.steps, seed=a.seed,
                    progress=not a.no_progress)
    print(format_table(rows))
    print(f"grid: {os.path.join(a.out, 'demo_grid.png')}   total {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_upscale(a) -> int:
    from qdit4sr_jax import pipeline
    _compile_cache(a)
    cfg, params = _load_model(a.model)
    if a.quantized and a.preset:
        raise ValueError("--quantized and --preset both give the quantized transformer: pass one")
    if not (a.quantized or a.preset) and (a.execution != "stored" or a.prepare != "none"):
        raise ValueError("--execution / --prepare apply to a quantized transformer: pass --quantized DIR or "
                         "--preset NAME")
    if a.prepare != "none" and a.execution not in ("fused", "stored"):
        raise ValueError(f"--prepare {a.prepare} prepares fused layers: use --execution fused")
    if a.preset:
        from qdit4sr_jax.quant.config import QuantConfig
        QuantConfig.preset(a.preset)                # an unknown preset fails before any work
    img = pipeline.read_images(a.input)[0]          # a bad input fails before any quantization
    if a.quantized or a.preset:
        if a.quantized:
            from qdit4sr_jax.checkpoint import load as load_quantized
            qparams, qcfg = load_quantized(a.quantized)
        else:
            qparams, qcfg, _ = _quantize_transformer(a, cfg, params)
        if a.execution != "stored":
            from qdit4sr_jax.quant.kernels import with_execution
            qparams = with_execution(qparams, a.execution)
        params = dict(params, transformer=qparams)
        print(f"quantized transformer: {qcfg.name if hasattr(qcfg, 'name') else qcfg}")
    out = pipeline.upscale(cfg, params, img, seed=a.seed, num_steps=a.steps,
                           color_fix=a.color_fix,
                           prepare_weights=None if a.prepare == "none" else a.prepare)
    pipeline.save_image(out, a.output)
    print(f"wrote {a.output} ({out.shape[1]}x{out.shape[0]})")
    return 0


def _quantize_transformer(a, cfg, params):
    """Quantize params["transformer"] with preset a.preset, calibrating (where the preset needs it) on the LR
    images of folder a.calib or the bundled samples, sampled with a.steps / a.seed -> (tree, QuantConfig, s)."""
    from qdit4sr_jax import pipeline
    from qdit4sr_jax.quant.api import quantize
    from qdit4sr_jax.quant.config import QuantConfig
    qcfg = QuantConfig.preset(a.preset)
    calib = None
    if qcfg.needs_calibration:
        images = pipeline.read_images(a.calib) if a.calib else [lr for lr in _demo_lrs(cfg)]
        calib = pipeline.calibrate_images(cfg, params, images, seed=a.seed, num_steps=a.steps,
                                          step_gains=qcfg.needs_step_gains)
    t0 = time.perf_counter()
    q = quantize(params["transformer"], qcfg, calib=calib)
    return q, qcfg, time.perf_counter() - t0


def cmd_quantize(a) -> int:
    from qdit4sr_jax.checkpoint import save
    _compile_cache(a)                     # before any compilation (calibration included)
    cfg, params = _load_model(a.model)
    q, qcfg, dt = _quantize_transformer(a, cfg, params)
    info = save(a.out, q, qcfg)
    print(f"quantized with {a.preset} in {dt:.1f} s; saved to {a.out} "
          f"({info['bytes_on_disk'] / 2**20:.2f} MiB on disk, {info['quantized_layers']} quantized layers)")
    return 0


def _demo_lrs(cfg):
    from qdit4sr_jax.data.datasets import val_seed
    from qdit4sr_jax.data.degradation import degrade
    from qdit4sr_jax.demo import bundled_samples
    return [degrade(hr, seed=val_seed(n), scale=cfg.scale) for n, hr in bundled_samples()]


def cmd_evaluate(a) -> int:
    from qdit4sr_jax.evaluation import Evaluation, Options, report_text
    _compile_cache(a)
    o = Options(model=a.model, hr=a.hr, lr=a.lr, methods=a.methods, steps=a.steps, seed=a.seed, calib=a.calib,
                calib_on_eval=a.calib_on_eval, crop=a.crop, border=a.border, y_channel=a.y_channel, out=a.out,
                limit=a.limit, devices=a.devices, grid_crop=a.grid_crop, niqe_patch=a.niqe_patch, prompt=a.prompt,
                progress=not a.no_progress, learned=not a.no_learned)
    t0 = time.perf_counter()
    ev = Evaluation(o, log=lambda *m: print(*m, file=sys.stderr))     # every input checked, nothing written yet
    res = ev.run()
    print(report_text(res, a.out))
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_report(a) -> int:
    from qdit4sr_jax import report
    return report.main(["--config", a.config] + (["--plots", a.plots] if a.plots else []))


def cmd_convert(a) -> int:
    from converters.__main__ import main as convert_main
    return convert_main(a.args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qdit4sr-jax", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="quantize the embedded demo model and compare FP / RTN / Q-DiT4SR / "
                                    "Q-DiT4SR-sens at W4A4")
    d.add_argument("--out", default="qdit4sr-demo", help="folder for demo_grid.png")
    d.add_argument("--model", default="demo", help="'demo' or a model .safetensors file")
    d.add_argument("--images", type=int, default=None, help="use only the first N bundled samples")
    d.add_argument("--crop", type=int, default=None, help="centre-crop the samples to this HR size")
    d.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true")
    _add_compile_cache(d)
    d.set_defaults(fn=cmd_demo)

    u = sub.add_parser("upscale", help="super-resolve one image")
    u.add_argument("input")
    u.add_argument("output")
    u.add_argument("--model", default="demo")
    u.add_argument("--quantized", default=None, help="a quantized transformer saved by `quantize`")
    u.add_argument("--preset", default=None,
                   help="quantize the transformer with this preset first, in this run (as `quantize` does, "
                        "nothing saved); instead of --quantized")
    u.add_argument("--calib", default=None, help="with --preset: folder of LR images for calibration (default: "
                                                 "bundled samples)")
    u.add_argument("--steps", type=int, default=None)
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--color-fix", default="model", choices=["model", "adain", "wavelet", "none"],
                   help="colour correction towards the bicubic input (model: the model's default)")
    u.add_argument("--execution", default="stored", choices=["stored", "fake", "int", "fused"],
                   help="how the quantized layers run: as saved, fake-quant, XLA int8, or the fused kernels")
    u.add_argument("--prepare", default="none",
                   choices=["none", "packed", "unpacked", "fast", "fast-mosaic", "fast-mosaic-separate"],
                   help="fused layers: weight-side kernel operands once per run (more memory; see README); fast: "
                        "also x' in bf16 and the branch down-projection on the layer's input (rounds differently); "
                        "fast-mosaic: fast with the Mosaic GPU kernels on Hopper and to_q / to_k / to_v (add_*_proj) as "
                        "one layer (the fastest there; docs/PRESETS.md); fast-mosaic-separate: each layer apart")
    _add_compile_cache(u)
    u.set_defaults(fn=cmd_upscale)

    q = sub.add_parser("quantize", help="quantize a model's transformer and save it with orbax")
    q.add_argument("--model", default="demo")
    q.add_argument("--preset", default="qdit4sr-w4a4")
    q.add_argument("--out", required=True)
    q.add_argument("--calib", default=None, help="folder of LR images for calibration (default: bundled samples)")
    q.add_argument("--steps", type=int, default=None)
    q.add_argument("--seed", type=int, default=0)
    _add_compile_cache(q)
    q.set_defaults(fn=cmd_quantize)

    e = sub.add_parser("evaluate", help="the paper's table on your model and images: PSNR / SSIM / NIQE / texture, "
                                        "size and ops of FP and each quantization method",
                       description="Evaluate FP, bicubic and quantization presets on an image set; writes "
                                   "results.csv, results.json, images/<method>/, grid.png into --out and resumes "
                                   "an interrupted run from there.")
    e.add_argument("--model", default="demo", help="'demo', a model .safetensors file or a training-state folder")
    e.add_argument("--hr", default=None, help="folder of HR images (alone: LR made by the seeded x4 degradation)")
    e.add_argument("--lr", default=None, help="folder of LR images (with --hr: paired by file name; alone: "
                                              "no-reference metrics)")
    e.add_argument("--methods", default="fp,rtn-w4a4,svdquant-w4a4,qdit4sr-w4a4",
                   help="comma-separated: fp, bicubic and quantization presets (rtn-w4a4, svdquant-w4a6, "
                        "qdit4sr-w4a4, qdit4sr-w4a4-sens, ...); fp and bicubic are always included")
    e.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    e.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every method")
    e.add_argument("--calib", default="samples",
                   help="calibration inputs: 'samples' (bundled samples not scored; default), 'train', N (the "
                        "first N inputs, then not scored) or a folder of LR images")
    e.add_argument("--calib-on-eval", action="store_true", help="allow calibrating on images that are scored")
    e.add_argument("--crop", type=int, default=None, help="centre crop, HR pixels (a multiple of 16)")
    e.add_argument("--border", type=int, default=0, help="pixels cropped from every side before PSNR / SSIM vs HR "
                                                         "(SR papers: the scale)")
    e.add_argument("--y-channel", action="store_true", help="PSNR / SSIM vs HR on the BT.601 Y channel (default RGB)")
    e.add_argument("--limit", type=int, default=None, help="use only the first N images")
    e.add_argument("--devices", type=int, default=None,
                   help="spread images over this many local devices (qdit4sr_jax.parallel)")
    e.add_argument("--prompt", default=None, metavar="NPZ",
                   help="prompt embeddings (python -m converters prompts); default: the model file's")
    e.add_argument("--niqe-patch", type=int, default=None,
                   help="NIQE patch size (default: the metric's; shipped pristine models: 96, 48, 32; an image needs "
                        "two whole patches)")
    e.add_argument("--grid-crop", type=int, default=64, help="crop size (HR px) of the comparison grid's tiles")
    e.add_argument("--out", default="qdit4sr-eval", help="output folder (a rerun resumes from it)")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--no-learned", action="store_true", help="do not look for LPIPS / pyiqa")
    _add_compile_cache(e)
    e.set_defaults(fn=cmd_evaluate)

    r = sub.add_parser("report", help="size / ops report (paper's definitions) and plots")
    r.add_argument("--config", default="dit4sr")
    r.add_argument("--plots", default=None, help="folder for PNG plots")
    r.set_defaults(fn=cmd_report)

    c = sub.add_parser("convert", help="convert a PyTorch checkpoint (see `python -m converters -h`)")
    c.add_argument("args", nargs=argparse.REMAINDER)
    c.set_defaults(fn=cmd_convert)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return int(a.fn(a) or 0)
    except (ValueError, OSError, TypeError) as e:
        print(f"qdit4sr-jax {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
