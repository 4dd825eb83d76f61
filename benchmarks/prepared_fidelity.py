"""Fidelity of the prepared execution variants: the demo model's outputs with fused, `kernels.prepare`d weights,
one run per variant (`VARIANTS`: the down-projection mode, `prepare(down=...)`, "joint" the default, "input" the
GEMM on the layer's input; and x' rounded to bf16 before its quantization, `prepare(xprime="bfloat16")`; "fast-gpu":
input-bf16 in the Hadamard's GPU formulation, whose two-stage blocks then round their inner stage to bf16), PSNR vs
the FP outputs and vs the first variant (the same study as benchmarks/fidelity.py: held-out crops, calibration on
the training photos; XLA path on CPU).

    python benchmarks/prepared_fidelity.py --presets qdit4sr-paper-w4a4-small qdit4sr-w4a4-small --crop 128

A W4A4 model turns any rounding change into a different quantization noise a few layers later (a code that
flips), so two equally exact paths differ from each other by about as much as each differs from FP; what
matters is that PSNR vs FP does not drop.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from fidelity import Study  # noqa: E402
from qdit4sr_jax.metrics.fullref import psnr  # noqa: E402


VARIANTS = {"joint": dict(down="joint"), "input": dict(down="input"),
            "input-bf16": dict(down="input", xprime="bfloat16"), "joint-bf16": dict(down="joint", xprime="bfloat16"),
            "fast-gpu": dict(down="input", xprime="bfloat16")}
GPU_FORMULATION = ("fast-gpu",)   # run with the Hadamard's GPU formulation (`transforms.set_exact_bf16(True)`):
#                                   exact bf16 GEMMs, and with x' in bf16 every two-stage block's inner stage in bf16


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["qdit4sr-paper-w4a4-small"])
    ap.add_argument("--variants", nargs="+", default=["joint", "input"], choices=sorted(VARIANTS),
                    help="prepare() variants (VARIANTS)")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--limit", type=int, default=None, help="at most this many evaluation images")
    a = ap.parse_args(argv)
    from qdit4sr_jax.quant.config import QuantConfig
    import jax
    from qdit4sr_jax.quant.kernels import prepare, with_execution
    from qdit4sr_jax.quant.transforms import set_exact_bf16
    st = Study(crop=a.crop, limit=a.limit, step_gains=False)
    rows = []
    for preset in a.presets:
        qt = st.quantize(QuantConfig.preset(preset))
        outs = {}
        for v in a.variants:
            t0 = time.perf_counter()
            prev = set_exact_bf16(True if v in GPU_FORMULATION else None)
            jax.clear_caches()                      # the formulation is read when the sampler is traced
            try:
                outs[v] = st._upscale(dict(st.params, transformer=prepare(with_execution(qt, "fused"),
                                                                         **VARIANTS[v])))
            finally:
                set_exact_bf16(prev)
                jax.clear_caches()
            rows.append(dict(preset=preset, variant=v, psnr_fp=float(np.mean([psnr(o, f) for o, f in
                                                                             zip(outs[v], st.fp)]))))
            print(f"{preset} {v}: PSNR vs FP {rows[-1]['psnr_fp']:.3f} dB ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        first = a.variants[0]
        for v in a.variants[1:]:
            print(f"{preset}: {first} vs {v} {np.mean([psnr(x, y) for x, y in zip(outs[first], outs[v])]):.2f} dB",
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
