"""Step sensitivity of the sampler: how much an error in the model output at step t reaches the final sample.

VaTMP (the paper's formulation) minimises sum_t sigma_{l,t}^2 2^(-2 a_t) per layer: every step counts the
same. A sampler does not treat its steps the same: an error in the model output at step t moves the next
latent by (sigma_{t+1} - sigma_t) times its velocity effect and then passes through the remaining steps,
which can damp it (later steps re-estimate x0) or keep it (the last step lands on the model's estimate).
With few steps this matters: on a 2-step demo model, equal weighting gave one step 3-bit activations and
cost 3.4 dB (benchmarks/RESULTS.md, 2026-11-25 13:38 entry).

`step_sensitivity` measures the gain g_t = ||J_t||_F^2 / N of the sampler, with J_t = d x_final / d o_t the
Jacobian of the final latent (N values) with respect to an offset o_t added to the (guided) model output at
step t (`sampling.sample(output_offsets=...)`). It is estimated with random probes r ~ N(0, I) and one
reverse-mode pass per probe: E ||J_t^T r||^2 = ||J_t||_F^2, and dividing by ||r||^2 instead of N makes the
estimate exact when J_t is a multiple of the identity (the last step of a velocity model: g = dsigma^2).
For an output error of per-element variance e_t at step t, g_t e_t is its contribution to the final MSE
(linearised). If a layer's activation-quantization noise reaches the model output with a gain that does not
depend on the step, the expected final distortion of layer l is proportional to
sum_t g_t sigma_{l,t}^2 2^(-2 a_t): VaTMP with step weights g_t (`quantize(..., step_weights=g)`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def step_sensitivity(cfg, params, lr_latent, noise, *, probes: int = 2, seed: int = 0, num_steps=None,
                     **sample_kwargs) -> np.ndarray:
    """Gains g_t >= 0 of the sampler's steps -> float64 [T] (T = num_steps or cfg.num_steps).

    cfg: ModelConfig; params: the transformer's (float) params; lr_latent, noise: [B, h, w, C] float32, as
    for `sampling.sample` (with its other keyword arguments: context, pooled, guidance_scale, ...).
    probes: random probe vectors (each one reverse pass through the whole sampler).
    """
    from qdit4sr_jax.sampling import sample
    if int(probes) < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    T = int(cfg.num_steps if num_steps is None else num_steps)
    lr_latent = jnp.asarray(lr_latent, jnp.float32)
    noise = jnp.asarray(noise, jnp.float32)
    zeros = jnp.zeros((T,) + tuple(noise.shape), jnp.float32)

    def final(offsets):
        return sample(cfg, params, lr_latent, noise, num_steps=T, output_offsets=offsets, **sample_kwargs)

    _, vjp = jax.vjp(final, zeros)
    num = np.zeros(T, np.float64)
    den = 0.0
    for k in range(int(probes)):
        r = jax.random.normal(jax.random.PRNGKey(seed * 1009 + k), noise.shape, jnp.float32)
        (g,) = vjp(r)                                                     # [T, B, h, w, C]
        num += np.asarray(jnp.sum(jnp.square(g).reshape(T, -1), axis=1), np.float64)
        den += float(jnp.sum(jnp.square(r)))
    gains = num / den
    if not np.all(np.isfinite(gains)):
        raise ValueError(f"step sensitivities are not finite: {gains.tolist()} (NaN/Inf in the sampler)")
    return gains


def check_step_weights(weights, steps: int) -> np.ndarray:
    """Validated VaTMP step weights -> float64 [steps]: finite, >= 0, not all zero."""
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or w.shape[0] != int(steps):
        raise ValueError(f"step_weights must have shape [T] = [{steps}] (the calibrated steps), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"step_weights must be finite and >= 0, got {w.tolist()}")
    if not np.any(w > 0):
        raise ValueError("step_weights are all zero")
    return w


__all__ = ["step_sensitivity", "check_step_weights"]
