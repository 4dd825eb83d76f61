"""Execution-ready weights: a fused layer's weight-only operands computed once per run, not once per call.

A stored `QuantizedWeight` keeps its codes packed (4-bit nibbles, two-level integer group factors) and its
branch factors possibly in int8; `fused_linear` turns them into kernel operands on every call: int8 codes
(unpacked, group factors folded, c * q), float branch factors and the joint up-projection U = [lr_b ;
u_blocks] [R, N]. On one 1536 x 1536 layer that is 5 of the W4A4 layer's 20 XLA kernels (CPU; see
benchmarks/layer_kernels.py), and every one of them is a launch per layer and step on a GPU unless XLA
happens to hoist it out of the sampler's loop.

`prepare(tree, unpack=True)` replaces every fused node by a `KernelWeight`: the same node with float branch
factors and (unpack=True) int8 codes, plus U. The function is unchanged (the same operands reach the same
kernel: tests compare prepared and stored nodes bit for bit); `quant.linear.linear` dispatches a
`KernelWeight` to `fused_linear`. The sampler prepares inside its jit before the step loop when asked
(`sampling.sample(..., prepare_weights="unpacked" | "packed")`), so a run pays the weight-side work once.

Memory, for as long as the prepared tree lives (a sampling run): unpacked codes take 8 bits per weight instead
of 4, and int8 branch factors become bf16 beside a copy of the up-projections in U. The full DiT4SR at
qdit4sr-w4a4-small: 1.445 GB stored (1/3.59 of bf16), 2.883 GB prepared (1/1.80), 1.617 GB prepared with
unpack=False (1/3.21; packed codes are then unpacked per call, or inside the kernel with
`KernelConfig(unpack="kernel")`) (`python benchmarks/weight_memory.py --preset qdit4sr-w4a4-small`). Hence
not the sampler's default.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

from qdit4sr_jax.quant.qweight import QuantizedWeight


@dataclasses.dataclass(frozen=True)
class KernelWeight:
    """node: the QuantizedWeight with float branch factors (no factor scales) and, when unpacked, int8 codes
    (packed=False; two-level factors folded: layout "nk", gscale None); u: U [R, N] in the branch dtype (None
    without branches); r: R (static)."""
    node: QuantizedWeight
    u: Any = None
    r: int = 0

    @property
    def execution(self) -> str:
        return self.node.execution

    @property
    def shape(self):
        return self.node.shape


jax.tree_util.register_dataclass(KernelWeight, data_fields=["node", "u"], meta_fields=["r"])


def prepare_weight(w: QuantizedWeight, *, unpack: bool = True) -> KernelWeight:
    """One node -> its `KernelWeight` (traceable; see the module docstring)."""
    from qdit4sr_jax.quant.kernels.fused import joint_up
    if not isinstance(w, QuantizedWeight):
        raise TypeError(f"prepare_weight needs a QuantizedWeight node, got {type(w).__name__}")
    node = w.float_branches()
    if unpack and (node.packed or node.gscale is not None):
        folded = node.gscale is not None                     # folded codes c * q are per-channel int8 codes
        node = node.replace(qvalue=node.codes(), packed=False, gscale=None,
                            group_size=None if folded else node.group_size)
    u, r = joint_up(node)
    return KernelWeight(node, u, r)


def _is_node(n) -> bool:
    return isinstance(n, (QuantizedWeight, KernelWeight))


def prepare(tree, *, unpack: bool = True):
    """The params tree with every QuantizedWeight whose execution is "fused" replaced by its `KernelWeight`
    (other nodes, float leaves and already prepared nodes unchanged). Traceable: call it inside the jit
    that runs the steps, before the loop."""
    def one(n):
        if isinstance(n, QuantizedWeight) and n.execution == "fused":
            return prepare_weight(n, unpack=unpack)
        return n
    return jax.tree_util.tree_map(one, tree, is_leaf=_is_node)


def weight_bytes(tree) -> int:
    """Bytes of the arrays of a (possibly prepared) tree; works on `jax.eval_shape` outputs too."""
    import numpy as np
    leaves = jax.tree_util.tree_leaves(tree)
    return int(sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape)) for a in leaves))


__all__ = ["KernelWeight", "prepare", "prepare_weight", "weight_bytes"]
