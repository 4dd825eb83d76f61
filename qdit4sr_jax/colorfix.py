"""Colour correction of the super-resolved image towards the (bicubic-upsampled) LR image, as DiT4SR does.

Both functions take target, source float arrays [..., H, W, 3] in [0, 1] (same shape) and return the
corrected target, clipped to [0, 1], float32.
  adain_color_fix:   per-image, per-channel mean/std matching (unbiased variance + 1e-5, as the reference).
  wavelet_color_fix: target's high frequencies + source's low frequencies; 5 levels of a dilated 3x3
                     binomial blur (dilation 2^i, edge-replicate padding).
"""
from __future__ import annotations

import jax.numpy as jnp

from qdit4sr_jax.config import COLOR_FIXES

_EPS = 1e-5
_K = ((0.0625, 0.125, 0.0625), (0.125, 0.25, 0.125), (0.0625, 0.125, 0.0625))


def _mean_std(x):
    n = x.shape[-3] * x.shape[-2]
    mean = jnp.mean(x, axis=(-3, -2), keepdims=True)
    var = jnp.sum((x - mean) ** 2, axis=(-3, -2), keepdims=True) / max(n - 1, 1) + _EPS
    return mean, jnp.sqrt(var)


def _check(target, source):
    if target.shape != source.shape or target.ndim < 3 or target.shape[-1] != 3:
        raise ValueError(f"colour fix needs equal [..., H, W, 3] shapes, got {tuple(target.shape)} "
                         f"and {tuple(source.shape)}")


def adain_color_fix(target, source):
    """Match each channel's mean and std of `target` to `source`."""
    _check(target, source)
    t, s = jnp.asarray(target, jnp.float32), jnp.asarray(source, jnp.float32)
    tm, ts = _mean_std(t)
    sm, ss = _mean_std(s)
    return jnp.clip((t - tm) / ts * ss + sm, 0.0, 1.0)


def wavelet_blur(x, radius: int):
    """Dilated 3x3 binomial blur with edge-replicate padding of `radius`: [..., H, W, C] -> same."""
    pad = [(0, 0)] * (x.ndim - 3) + [(radius, radius), (radius, radius), (0, 0)]
    p = jnp.pad(x, pad, mode="edge")
    H, W = x.shape[-3], x.shape[-2]
    out = jnp.zeros_like(x)
    for i in range(3):
        for j in range(3):
            out = out + _K[i][j] * p[..., i * radius:i * radius + H, j * radius:j * radius + W, :]
    return out


def wavelet_decomposition(x, levels: int = 5):
    """-> (high, low) with high + low == x."""
    high = jnp.zeros_like(x)
    for i in range(levels):
        low = wavelet_blur(x, 2 ** i)
        high = high + (x - low)
        x = low
    return high, x


def wavelet_color_fix(target, source):
    """High frequencies of `target` + low frequencies of `source`."""
    _check(target, source)
    th, _ = wavelet_decomposition(jnp.asarray(target, jnp.float32))
    _, sl = wavelet_decomposition(jnp.asarray(source, jnp.float32))
    return jnp.clip(th + sl, 0.0, 1.0)


def resolve(method, cfg):
    """A `pipeline.upscale`-style colour-fix argument -> 'adain' | 'wavelet' | None. method: 'model' (the
    model's default, `ModelConfig.color_fix`), 'adain', 'wavelet', 'none' or None (no fix)."""
    if method == "model":
        method = cfg.color_fix
    if method is None or method == "none":
        return None
    if method not in COLOR_FIXES:
        raise ValueError(f"color_fix must be 'model', 'adain', 'wavelet' or None, got {method!r}")
    return method


def color_fix(method, target, source):
    """method: 'adain' | 'wavelet' | None (target unchanged, clipped)."""
    if method is None or method == "none":
        return jnp.clip(jnp.asarray(target, jnp.float32), 0.0, 1.0)
    if method == "adain":
        return adain_color_fix(target, source)
    if method == "wavelet":
        return wavelet_color_fix(target, source)
    raise ValueError(f"color_fix must be 'adain', 'wavelet' or None, got {method!r}")
