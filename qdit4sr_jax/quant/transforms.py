"""Input-dimension transforms of a quantized linear, applied to the weight once and mirrored online on the
activation: the Walsh-Hadamard rotation (QuaRot-style) and the SmoothQuant migration scale.

Both keep the layer's function: x W^T = (x diag(1/s)) (W diag(s))^T and x W^T = (x H)(W H)^T for H
orthonormal (H H^T = I). Floor 2 of the package (docs/ARCHITECTURE.md): imports nothing of the project.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp


def largest_pow2_divisor(d: int, cap: Optional[int] = None) -> int:
    """Largest power of 2 dividing d (and <= cap)."""
    b = d & -d
    if cap is not None:
        while b > cap:
            b //= 2
    return b


def hadamard_transform(x, block: int):
    """x [..., K] -> x @ blockdiag(H_b, ..., H_b), H_b the orthonormal Sylvester Hadamard matrix of size
    b = `block` (a power of 2 dividing K). H_b is symmetric and H_b H_b = I. float32, O(K log b)."""
    k = x.shape[-1]
    if block < 1 or block & (block - 1) or k % block:
        raise ValueError(f"Hadamard block {block} must be a power of 2 dividing d_in={k}")
    return _hadamard(x, int(block))


@partial(jax.jit, static_argnums=1)
def _hadamard(x, block: int):
    """x [..., K] -> x @ blockdiag(H_b, ..., H_b), H_b the orthonormal Sylvester Hadamard matrix of size
    b = `block` (a power of 2 dividing K). H_b is symmetric and H_b H_b = I. float32, O(K log b)."""
    k = x.shape[-1]
    if block < 1 or block & (block - 1) or k % block:
        raise ValueError(f"Hadamard block {block} must be a power of 2 dividing d_in={k}")
    lead = x.shape[:-1]
    y = x.astype(jnp.float32).reshape(*lead, k // block, block)
    h = 1
    while h < block:
        y = y.reshape(*lead, k // block, block // (2 * h), 2, h)
        a, c = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + c, a - c], axis=-2)
        h *= 2
    return (y.reshape(*lead, k) * (1.0 / jnp.sqrt(jnp.float32(block))))


def smooth_scale(ch_absmax, w_nk, alpha: float, eps: float = 1e-5):
    """SmoothQuant migration scale s [K] = max|X_j|^alpha / max_n|W_nj|^(1-alpha) (float32).
    Channels never active (max|X_j| = 0) or with an all-zero weight column get s = 1."""
    xa = jnp.asarray(ch_absmax, jnp.float32)
    wa = jnp.max(jnp.abs(w_nk.astype(jnp.float32)), axis=0)
    s = jnp.power(jnp.maximum(xa, eps), alpha) / jnp.power(jnp.maximum(wa, eps), 1.0 - alpha)
    ok = (xa > 0) & (wa > 0) & jnp.isfinite(s)
    return jnp.where(ok, jnp.maximum(s, eps), 1.0)
