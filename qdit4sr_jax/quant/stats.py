"""Input-activation statistics of a linear layer, recorded during calibration.

`activation_stats(x)` for x [..., d_in] returns float32 values:
  var:       []      variance over all elements
  absmax:    []      max |x|
  ch_absmax: [d_in]  per-input-channel max |x| (SmoothQuant / SVDQuant smoothing)
  tok_var:   []      mean over tokens of the per-token variance (per-token quantizer noise scale)
"""
from __future__ import annotations

import jax.numpy as jnp


def activation_stats(x):
    x = x.astype(jnp.float32)
    flat = x.reshape(-1, x.shape[-1])
    return {
        "var": jnp.var(flat),
        "absmax": jnp.max(jnp.abs(flat)),
        "ch_absmax": jnp.max(jnp.abs(flat), axis=0),
        "tok_var": jnp.mean(jnp.var(flat, axis=-1)),
    }
