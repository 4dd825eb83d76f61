"""Evaluation of FP and quantized models on image sets: `qdit4sr-jax evaluate` and the fidelity study share it.

- `data`: evaluation images (pairs matched by name, or HR with the project's seeded degradation, or LR only),
  calibration inputs, the model bundle.
- `scores`: per-image figures with their conventions (one implementation each, from `qdit4sr_jax.metrics`).
- `run`: methods (`QuantConfig.preset` names plus `fp`, `bicubic`), size / ops / effective bits, and the
  per-method loop with its per-image result cache (`Evaluation`).
- `output`: atomic writes, Markdown tables, results.csv / results.json, the labelled comparison grid.

    from qdit4sr_jax.evaluation import Options, evaluate
    res = evaluate(Options(hr="photos/", methods="fp,svdquant-w4a4,qdit4sr-w4a4", crop=256, out="eval"))
"""
from __future__ import annotations

from qdit4sr_jax.evaluation.run import (Evaluation, Options, Result, effective_bits, report_text,  # noqa: F401
                                        resolve_methods)
from qdit4sr_jax.evaluation.scores import Scorer, image_metrics  # noqa: F401


def evaluate(options: "Options", log=print) -> dict:
    """Check the inputs, run every method on every image (resuming from options.out) -> the results.json object
    (plus "table": the Markdown table, "keys": its figure columns)."""
    return Evaluation(options, log=log).run()
