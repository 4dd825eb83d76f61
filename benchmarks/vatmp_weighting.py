"""VaTMP as in the paper (sum_t sigma_{l,t}^2 2^(-2 a_t)) vs VaTMP weighted by the sampler's step sensitivities
(`QuantConfig.vatmp_step_weights="sensitivity"`, quant/stepgain.py), on the demo model at W4A4.

    python benchmarks/vatmp_weighting.py [--steps 4] [--crop 128] [--limit 9] [--model demo]

Same data and settings as benchmarks/fidelity.py (held-out crops of data/val, else the bundled samples;
calibration on 4 training crops). Prints the measured step gains, PSNR vs the FP output / vs HR of
SVDQuant-style, Q-DiT4SR with the paper's VaTMP, Q-DiT4SR with step-weighted VaTMP and Q-DiT4SR without VaTMP,
and the mean / minimum activation bits each schedule gives every step.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fidelity as F  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--limit", type=int, default=9)
    ap.add_argument("--bits", default="w4a4")
    a = ap.parse_args(argv)
    from qdit4sr_jax.quant.api import quantize, quantized_layers

    st = F.Study(a.model, crop=a.crop, limit=a.limit, calib="train", n_calib=4, num_steps=a.steps)
    gains = np.asarray(next(iter(st.calib.values()))["step_gain"], np.float64)
    full = F.method_config("qdit4sr", a.bits)
    rows = [(f"svdquant-{a.bits}", F.method_config("svdquant", a.bits)),
            (f"qdit4sr-{a.bits} (paper VaTMP)", full),
            (f"qdit4sr-{a.bits}-sens (step-weighted VaTMP)", full.replace(vatmp_step_weights="sensitivity")),
            (f"qdit4sr-{a.bits}, no VaTMP", full.replace(vatmp=False))]
    lines = [f"steps {st.steps}; step gains (g_t = |d x_final / d output_t|_F^2 / N): "
             + ", ".join(f"{g:.3g}" for g in gains), "",
             "| config | PSNR vs FP | PSNR vs HR | mean a-bits per step | min a-bits per step |", "|---|---|---|---|---|"]
    for label, q in rows:
        r = st.run(label, q)
        sched = "-"
        mins = "-"
        if q.vatmp:
            s = np.stack([np.asarray(n.a_schedule) for n in quantized_layers(st.quantize(q)).values()])
            sched = " / ".join(f"{v:.2f}" for v in s.mean(0))
            mins = " / ".join(str(int(v)) for v in s.min(0))
        lines.append(f"| {label} | {r.mean('psnr_fp'):.2f} | {r.mean('psnr_hr'):.2f} | {sched} | {mins} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
