"""Calibration: run the model with the `calib` collection mutable and return per-layer input statistics.

Every `Linear` sows `activation_stats(x)` under its own module path when `calib` is mutable (layers.py),
so one forward collects every layer at once with no Python callback per layer; the sampler
(`qdit4sr_jax.sampling.sample(..., collect_stats=True)`) stacks them per step inside its `lax.scan`.
The result is `stats.normalize_calib`'s form: {module path: {"var": [T], "absmax": [T],
"ch_absmax": [T, d_in], "tok_var": [T]}} (T = 1 for a single forward).
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax

from qdit4sr_jax.model.layers import CALIB
from qdit4sr_jax.quant.stats import merge_stats, normalize_calib  # noqa: F401  (re-export merge_stats)


def calibrate_forward(module: nn.Module, params, *args, **kwargs):
    """One jitted forward of `module` (a Flax linen module) with `calib` mutable -> stats with T = 1.
    args are the module's call arguments (arrays); kwargs are passed as static Python values."""
    @jax.jit
    def run(p, *a):
        _, var = module.apply({"params": p}, *a, mutable=[CALIB], **kwargs)
        return var.get(CALIB, {})

    calib = run(params, *args)
    if not calib:
        raise ValueError(f"{type(module).__name__} sowed no calibration statistics: it has no "
                         f"qdit4sr_jax.model.layers.Linear")
    return normalize_calib(calib)


def calibrate_sampler(model_cfg, params, lr_latent, noise, **sample_kwargs):
    """Run the whole sampler (`sampling.sample`, every step) collecting statistics -> stats with T = steps.
    sample_kwargs go to `sampling.sample` (context, pooled, num_steps, guidance_scale, ...)."""
    from qdit4sr_jax.sampling import sample
    _, calib = sample(model_cfg, params, lr_latent, noise, collect_stats=True, **sample_kwargs)
    return normalize_calib(calib)


def calibrate(model, params, *args, **kwargs):
    """Collect input-activation statistics of every `Linear`.

    model: a Flax module (one forward: `calibrate(module, params, *inputs, step=...)`), a `ModelConfig`
      (the sampler over all steps: `calibrate(cfg, params, lr_latent, noise, context=..., ...)`), or a
      callable `fn(params, *args, **kwargs) -> (output, calib_collection)`.
    Returns {module path: stats with a leading step axis}. Several runs merge with `merge_stats`.
    """
    from qdit4sr_jax.config import ModelConfig
    if isinstance(model, nn.Module):
        return calibrate_forward(model, params, *args, **kwargs)
    if isinstance(model, ModelConfig):
        return calibrate_sampler(model, params, *args, **kwargs)
    if isinstance(model, Callable):
        out = model(params, *args, **kwargs)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError("calibrate(fn, ...): fn must return (output, calib_collection)")
        return normalize_calib(out[1])
    raise TypeError(f"calibrate: model must be a Flax module, a ModelConfig or a callable, got {type(model).__name__}")
