"""The one linear layer every model linear goes through.

`linear(x, w, bias=None, *, act_bits=None, step=None)`:
  x:    [..., d_in] activations (compute dtype)
  w:    float kernel [d_in, d_out] (Flax layout)  -- or a quantized-weight node (quant issue)
  bias: [d_out] or None
  step: sampling-step index (int or traced int32 scalar); quantized nodes use it to pick the
        activation bit-width from their per-step schedule.
Returns [..., d_out] in x.dtype.
"""
from __future__ import annotations

import jax.numpy as jnp


def linear(x, w, bias=None, *, act_bits=None, step=None):
    y = jnp.einsum("...k,kn->...n", x, w.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y
