"""Input-activation statistics of a linear layer, recorded during calibration.

`activation_stats(x)` for x [..., d_in] returns float32 values:
  var:       []      variance over all elements
  absmax:    []      max |x|
  ch_absmax: [d_in]  per-input-channel max |x| (SmoothQuant / SVDQuant smoothing)
  tok_var:   []      mean over tokens of the per-token variance (per-token quantizer noise scale)
Calibration over a sampler may add, per layer, `step_gain` [T]: the sampler's step sensitivities
(`quant.stepgain`; the same vector for every layer of one run), averaged like variances when merged.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def activation_stats(x):
    x = x.astype(jnp.float32)
    flat = x.reshape(-1, x.shape[-1])
    return {
        "var": jnp.var(flat),
        "absmax": jnp.max(jnp.abs(flat)),
        "ch_absmax": jnp.max(jnp.abs(flat), axis=0),
        "tok_var": jnp.mean(jnp.var(flat, axis=-1)),
    }


# ---- calibration statistics as a pytree keyed by module path ---------------------------------------
# Normalised form ("stats"): {module path "a/b/c": {"var": [T], "absmax": [T], "ch_absmax": [T, K],
# "tok_var": [T]}} with a leading step axis T (T = 1 for a single forward pass), float32: numpy arrays
# when given numpy arrays (no extra axes to reduce), jax arrays otherwise.

STAT_NAMES = ("var", "absmax", "ch_absmax", "tok_var", "step_gain")
_MAX_STATS = ("absmax", "ch_absmax")


def _is_stats(d) -> bool:
    return isinstance(d, dict) and "ch_absmax" in d and all(k in STAT_NAMES for k in d)


def _with_step_axis(d):
    """Add the leading step axis when missing (ch_absmax is [K] without it, [T, K] with it); extra axes
    between T and the statistic (e.g. [T, tiles, K] from a tiled sampler) are reduced (max / mean)."""
    nd = jnp.ndim(d["ch_absmax"])
    out = {}
    # host (numpy) statistics stay on the host when only the step axis is added: the quantizers read
    # them on the host, and 4 uploads per layer (then a download) cost ~1 ms per layer on a GPU
    host = nd <= 2 and all(isinstance(v, (np.ndarray, np.generic, float, int)) for v in d.values())
    for k, v in d.items():
        v = np.asarray(v, np.float32) if host else jnp.asarray(v, jnp.float32)
        if nd == 1:
            v = v[None]
        elif nd > 2:
            axes = tuple(range(1, v.ndim - (1 if k == "ch_absmax" else 0)))
            v = jnp.max(v, axis=axes) if k in _MAX_STATS else jnp.mean(v, axis=axes)
        out[k] = v
    return out


def combine_calls(calls):
    """Merge the stats of several calls of the same layer within one step (max of maxima, mean of
    variances)."""
    calls = [_with_step_axis(c) for c in calls]
    if len(calls) == 1:
        return calls[0]
    out = {}
    for k in calls[0]:
        vals = jnp.stack([c[k] for c in calls])
        out[k] = jnp.max(vals, axis=0) if k in _MAX_STATS else jnp.mean(vals, axis=0)
    return out


def normalize_calib(calib):
    """Turn a Flax `calib` collection (nested dicts, each Linear holding {'act': (stats, ...)}), optionally
    wrapped as {'calib': ...}, or an already flat {path: stats} dict, into {path: stats with [T, ...]}."""
    if calib is None:
        return {}
    if isinstance(calib, dict) and set(calib) == {"calib"}:
        calib = calib["calib"]
    calib = jax_tree_to_dicts(calib)
    out = {}

    def walk(node, path):
        if _is_stats(node):
            out["/".join(path)] = _with_step_axis(node)
            return
        if not isinstance(node, dict):
            raise ValueError(f"calibration statistics: unexpected {type(node).__name__} at "
                             f"{'/'.join(path) or '<root>'}")
        for key, val in node.items():
            if key == "act" and isinstance(val, (tuple, list)):
                out["/".join(path)] = combine_calls(list(val))
            elif isinstance(key, str) and "/" in key and _is_stats(val):
                out[key] = _with_step_axis(val)
            else:
                walk(val, path + (str(key),))

    walk(calib, ())
    return out


def jax_tree_to_dicts(tree):
    """FrozenDict / Mapping -> plain nested dicts (leaves unchanged)."""
    from collections.abc import Mapping
    if isinstance(tree, Mapping):
        return {k: jax_tree_to_dicts(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(jax_tree_to_dicts(v) for v in tree)
    return tree


def merge_stats(*stats_list):
    """Merge normalised stats of several calibration runs over the same steps (e.g. several images):
    maxima of maxima, means of variances. Every run must cover the same layers and steps."""
    if not stats_list:
        raise ValueError("merge_stats needs at least one stats dict")
    keys = set(stats_list[0])
    for s in stats_list[1:]:
        if set(s) != keys:
            raise ValueError(f"merge_stats: runs cover different layers: {sorted(keys ^ set(s))[:5]}")
    return {p: combine_calls([s[p] for s in stats_list]) for p in stats_list[0]}


def lookup(stats, path: str):
    """Stats of module `path`: exact key, else the longest stats key that `path` ends with ('/'-aligned),
    so that a params tree with an extra prefix (e.g. 'transformer/...') finds the model's stats."""
    if path in stats:
        return stats[path]
    best = None
    for k in stats:
        if path.endswith("/" + k) and (best is None or len(k) > len(best)):
            best = k
    return None if best is None else stats[best]
