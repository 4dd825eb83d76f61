"""Layers that read one input, run as one layer: their `QuantizedWeight`s stacked along N.

`merge_nodes(nodes)`: the nodes of layers that read one x [M, K] (to_q / to_k / to_v, add_*_proj:
`MERGED_INPUTS`) -> one node of N = sum N_i whose output columns [sum N_<i, sum N_<=i) are member i's, to float
rounding (the same codes, scales and branch products; only the order of float sums may differ):
  qvalue  int8 [N, K] ("nk") / [G, N, g] ("gnk")  the members' codes, unpacked (integer group factors folded:
                                `QuantizedWeight.unpacked`), stacked along N
  scale   float32 [N, G]                           stacked along N
  lr_a    [K, n r]                                 side by side, each member's rank zero-padded to r = max r_i
  lr_b    [n r, N]                                 block diagonal (zeros elsewhere: member i's features meet only
                                                   its own columns), lr_groups = n: the kernels read each member's
                                                   r features for its N_i columns (`branch_ops`' blocked low-rank),
                                                   so the epilogue's rank stays that of one member
  block_u / block_v [sum n_bo_i, n_bi, b]          stacked along the block rows (every N_i a multiple of b_out, so
                                                   block row i of the merged node lies inside one member)
  a_schedule, smooth                               the members' (equal: see `can_merge`)
  w_bits                                           the widest member's (the codes are int8 either way)
so a fused path runs the group as one GEMM with one prologue: one activation quantization (one x, one level per
step), one branch down-projection and one launch instead of three, on a grid that fills the GPU (add_q_proj at
512 px, 768 rows: 72 of the Mosaic GEMM's 64 x 256 CTA tiles for the H100's 132 SMs; 216 merged).

Members must quantize x alike: the same activation bits or VaTMP schedule, smoothing divisor, rotation and
signs. A real calibration gives layers reading one x identical statistics, so VaTMP gives them one schedule; the
schedules are arrays, so they are compared only where their values are known (`merge_tree` outside a jit, e.g.
`sampling.sample` before its jitted loop); traced ones (inside a jit) count as different, and such groups stay
separate layers.

`merge_inputs(params)` does this for the groups of one dict of a params tree (the model runs the merged layer under
the group's key and splits its output: `quant.linear.linear_group`, `model.mmdit.JointAttention`); `merge_tree`
for a whole tree; `kernels.prepare(..., merge=True)` before it prepares the nodes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qdit4sr_jax.quant.qweight import STATIC_FIELDS, QuantizedWeight

# Layers that read one input and can run as one layer, by the key under which `merge_inputs` puts their weights
# stacked along N, {"kernel": QuantizedWeight, "bias": float32 [sum N]}, in their place (`model.mmdit.JointAttention`
# splits the output: `quant.linear.linear_group`).
MERGED_INPUTS = {"qkv": ("to_q", "to_k", "to_v"), "add_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}
# static fields that members may differ in: the output width, and the weight bits / packing (unpacked codes are int8)
_FREE = ("shape", "w_bits", "packed")


def _same_values(arrays) -> bool:
    """Whether the arrays (all None, or all arrays) are known to be equal: all None, or all concrete (not traced)
    and equal element by element."""
    if all(a is None for a in arrays):
        return True
    if any(a is None or isinstance(a, jax.core.Tracer) or not hasattr(a, "__array__") for a in arrays):
        return False                                    # traced or abstract (jax.eval_shape): values unknown
    first = np.asarray(arrays[0])
    return all(np.asarray(a).shape == first.shape and np.array_equal(np.asarray(a), first) for a in arrays[1:])


def _config(n: QuantizedWeight) -> tuple:
    """K and the static fields that members must share, as `QuantizedWeight.unpacked` leaves them (integer group
    factors folded: per channel), without unpacking anything."""
    folded = n.gscale is not None
    return (n.k,) + tuple(None if (f == "group_size" and folded) else getattr(n, f)
                          for f in STATIC_FIELDS if f not in _FREE)


def _factor_dtype(n: QuantizedWeight, name: str):
    """The float dtype of branch factor `name` (`QuantizedWeight.factor`: an int8 factor's scale dtype), or None."""
    scale = getattr(n, name + "_scale")
    return scale.dtype if scale is not None else (getattr(n, name).dtype if getattr(n, name) is not None else None)


def can_merge(nodes) -> bool:
    """Whether these `QuantizedWeight`s of layers reading one input can be one node (`merge_nodes`): two or more,
    symmetric (no zero points), layout "nk" or "gnk", alike in K and every static field but N, w_bits and packing
    (as `QuantizedWeight.unpacked` leaves them), with the same activation schedule and smoothing divisor (known
    values: `_same_values`), all or none with low-rank factors (then of one width N and not merged before: the
    kernels read the block-diagonal lr_b per member, `QuantizedWeight.lr_groups`), all or none with block factors,
    every N a multiple of the block height, branch factors of one dtype. Reads only shapes, dtypes and the
    schedules."""
    if len(nodes) < 2 or not all(isinstance(n, QuantizedWeight) for n in nodes):
        return False
    if any(n.zero is not None or n.layout not in ("nk", "gnk") for n in nodes):
        return False
    if len({_config(n) for n in nodes}) != 1:
        return False
    if not (_same_values([n.a_schedule for n in nodes]) and _same_values([n.smooth for n in nodes])):
        return False
    if len({n.lr_a is not None for n in nodes}) != 1 or len({n.block_u is not None for n in nodes}) != 1:
        return False
    if nodes[0].lr_a is not None and (len({n.n for n in nodes}) != 1 or nodes[0].lr_groups != 1):
        return False
    if nodes[0].block_u is not None and any(n.n % n.block[0] for n in nodes):
        return False
    return len({(_factor_dtype(n, "lr_a"), _factor_dtype(n, "block_u")) for n in nodes}) == 1


def merge_nodes(nodes) -> QuantizedWeight:
    """`QuantizedWeight`s that `can_merge` -> one node of N = sum N_i (module docstring), int8 codes unpacked.
    Memory: the members' arrays once more while both trees live, lr_b with its zero blocks (held dense by the node;
    `kernels.prepare` keeps only the diagonal blocks)."""
    if not can_merge(nodes):
        raise ValueError("merge_nodes: these layers cannot run as one (see merged.can_merge)")
    ns = [n.unpacked().float_branches() for n in nodes]
    first = ns[0]
    axis = 0 if first.layout == "nk" else 1                      # qvalue [N, K] or [G, N, g]; scale [N, G]
    kw = dict(qvalue=jnp.concatenate([n.qvalue for n in ns], axis=axis),
              scale=jnp.concatenate([n.scale for n in ns], axis=0),
              shape=(first.k, sum(n.n for n in ns)), w_bits=max(n.w_bits for n in ns), packed=False)
    if first.lr_a is not None:                               # each member's rank padded to the largest (zeros)
        r = max(n.lr_a.shape[1] for n in ns)
        kw["lr_a"] = jnp.concatenate([jnp.pad(n.lr_a, ((0, 0), (0, r - n.lr_a.shape[1]))) for n in ns], axis=1)
        kw["lr_b"] = jax.scipy.linalg.block_diag(
            *[jnp.pad(n.lr_b, ((0, r - n.lr_b.shape[0]), (0, 0))) for n in ns]).astype(first.lr_b.dtype)
        kw["lr_groups"] = len(ns)
    if first.block_u is not None:
        kw["block_u"] = jnp.concatenate([n.block_u for n in ns], axis=0)
        kw["block_v"] = jnp.concatenate([n.block_v for n in ns], axis=0)
    return first.replace(**kw)


def merge_inputs(params: dict) -> dict:
    """One dict of a params tree -> the same with each `MERGED_INPUTS` group whose members are {"kernel": node,
    "bias": optional} dicts of one width that `can_merge` replaced by {"kernel": `merge_nodes`, "bias": the members'
    biases (zeros where absent; none if none has one) stacked, float32} under the group's key; other entries
    unchanged."""
    out = dict(params)
    for key, names in MERGED_INPUTS.items():
        members = [params.get(n) for n in names]
        if key in params or not all(isinstance(m, dict) and set(m) <= {"kernel", "bias"} for m in members):
            continue
        nodes = [m.get("kernel") for m in members]
        if not can_merge(nodes) or len({n.n for n in nodes}) != 1:
            continue
        for n in names:
            del out[n]
        out[key] = {"kernel": merge_nodes(nodes)}
        if any(m.get("bias") is not None for m in members):
            out[key]["bias"] = jnp.concatenate([
                m["bias"].astype(jnp.float32) if m.get("bias") is not None else jnp.zeros((n.n,), jnp.float32)
                for m, n in zip(members, nodes)])
    return out


def merge_tree(tree):
    """`merge_inputs` on every dict of a params tree (lists and tuples walked too). Call it where the arrays are
    concrete (outside a jit) to merge groups with VaTMP schedules: inside a jit only groups without one merge."""
    if isinstance(tree, dict):
        return merge_inputs({k: merge_tree(v) for k, v in tree.items()})
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(merge_tree(v) for v in tree)
    return tree


__all__ = ["MERGED_INPUTS", "can_merge", "merge_nodes", "merge_inputs", "merge_tree"]
