"""Small shared layers. `Linear` is the only place the model touches a linear weight."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from qdit4sr_jax.quant.linear import linear
from qdit4sr_jax.quant.stats import activation_stats

CALIB = "calib"  # variable collection that receives input-activation statistics when mutable


class Linear(nn.Module):
    """y = linear(x, kernel, bias). params: kernel [d_in, features] (or a quantized-weight node), bias [features].

    The kernel is read as stored (any pytree node) when present, so a quantized tree applies unchanged.
    When the caller makes the `calib` collection mutable, the input statistics are sown there under
    the module's own path (same path as its params). shared: `quant.linear.linear`'s (a prepared tree's
    down-projection of the layers reading x, which the parent module passes).
    """
    features: int
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, step=None, shared=None):
        if self.has_variable("params", "kernel"):
            kernel = self.get_variable("params", "kernel")
        else:
            kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None
        if self.is_mutable_collection(CALIB) and not self.is_initializing():
            self.sow(CALIB, "act", activation_stats(x))
        return linear(x, kernel, bias, step=step, shared=shared)
