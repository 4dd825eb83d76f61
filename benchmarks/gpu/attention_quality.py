"""What FP8 attention costs in image quality on the trained demo model (CPU is enough: attention_impl="fp8-ref"
is the FP8 arithmetic of cuDNN's FP8 attention in jnp; see qdit4sr_jax/model/attention.py).

For each bundled sample (qdit4sr_jax/demo.py: HR -> seeded x4 degradation -> LR) the model upscales the LR
image with float attention and with FP8 attention (same seed); for the float model and for each quantized
preset in --quant (calibrated on the same LR images with float attention, as demo.run_demo does). Reports
PSNR of every output vs the float model's float-attention output ("vs FP") and vs HR, and PSNR of
FP8-attention output vs the same weights with float attention ("vs same weights").

  python benchmarks/gpu/attention_quality.py --out /tmp/attention_quality.json
  python benchmarks/gpu/attention_quality.py --quant qdit4sr-w4a4 --out /tmp/attention_quality.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))      # the repository root
sys.path.insert(0, os.path.dirname(_HERE))                       # benchmarks/ (common, step_latency)
sys.path.insert(0, _HERE)                                        # benchmarks/gpu/

import numpy as np  # noqa: E402

from common import environment, write_json  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--quant", nargs="*", default=[], help="quantized presets to add, e.g. qdit4sr-w4a4")
    ap.add_argument("--attention", default="fp8-ref", help="the FP8 attention impl ('fp8' on a GPU)")
    ap.add_argument("--p-mode", default="flash", choices=("flash", "normalized"),
                    help="which softmax probabilities the fp8-ref attention rounds (model/attention.py)")
    ap.add_argument("--limit", type=int, default=None, help="number of bundled samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from qdit4sr_jax import pipeline
    from qdit4sr_jax.data.datasets import val_seed
    from qdit4sr_jax.data.degradation import degrade
    from qdit4sr_jax.demo import bundled_samples
    from qdit4sr_jax.metrics import psnr
    from qdit4sr_jax.io.modelfile import load_pretrained
    from qdit4sr_jax.quant.api import quantize
    from qdit4sr_jax.quant.config import QuantConfig

    if a.p_mode != "flash":       # the model calls attention.fp8_attention_reference with its default p_mode
        import functools
        from qdit4sr_jax.model import attention as A
        A.fp8_attention_reference = functools.partial(A.fp8_attention_reference, p_mode=a.p_mode)
    t0 = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t0:7.1f}s] {s}", flush=True)
    cfg, params = load_pretrained(a.model)
    samples = bundled_samples(a.limit)
    lrs = [degrade(hr, seed=val_seed(name), scale=cfg.scale) for name, hr in samples]
    res = {"env": environment(), "args": vars(a), "model": a.model, "samples": [n for n, _ in samples],
           "rows": []}
    weights = {"fp": params}
    if a.quant:
        calib = pipeline.calibrate_images(cfg, params, lrs, seed=a.seed)
        log(f"calibrated on {len(lrs)} images")
        for m in a.quant:
            weights[m] = dict(params, transformer=quantize(params["transformer"], QuantConfig.preset(m), calib=calib))
    outs = {}
    for w, p in weights.items():
        for impl in (None, a.attention):
            c = cfg.replace(attention_impl=impl)
            outs[(w, impl)] = [pipeline.upscale(c, p, lr, seed=a.seed) for lr in lrs]
            log(f"{w} attention {impl or 'float'}: done")
    fp = outs[("fp", None)]
    for (w, impl), o in outs.items():
        row = {"weights": w, "attention": impl or "float",
               "psnr_vs_fp": [psnr(x, f) for x, f in zip(o, fp)],
               "psnr_vs_hr": [psnr(x, hr) for x, (_, hr) in zip(o, samples)],
               "psnr_vs_same_weights": [psnr(x, f) for x, f in zip(o, outs[(w, None)])]}
        for k in ("psnr_vs_fp", "psnr_vs_hr", "psnr_vs_same_weights"):
            row[k + "_mean"] = float(np.mean(row[k]))
        res["rows"].append(row)
    write_json(a.out, res)
    print(f"\n{res['env']['device']}  jax {res['env']['jax']}  model {a.model}  samples {res['samples']}")
    print("| weights | attention | PSNR vs FP (dB) | PSNR vs same weights, float attention (dB) | PSNR vs HR (dB) |")
    print("|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['weights']} | {r['attention']} | {r['psnr_vs_fp_mean']:.2f} | "
              f"{r['psnr_vs_same_weights_mean']:.2f} | {r['psnr_vs_hr_mean']:.2f} |")
    return res


if __name__ == "__main__":
    main()
