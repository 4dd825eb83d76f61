"""Which linears get quantized: regex rules over '/'-joined module paths (like qwix's module-path rules).

A linear module is any dict node of the params tree holding a 2-D floating `kernel` (the contract: only
`qdit4sr_jax.model.layers.Linear` holds linear weights); its path is the path of that dict, e.g.
"transformer_blocks_0/attn/to_q" (the kernel lives at ".../to_q/kernel"). Convolution kernels (4-D) and
already-quantized nodes are never selected.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Tuple

import jax.numpy as jnp

from qdit4sr_jax.quant.qweight import QuantizedWeight


def _is_mapping(x) -> bool:
    return isinstance(x, Mapping)


def find_linears(params) -> List[Tuple[str, ...]]:
    """Paths (tuples of keys) of every module dict with a 2-D float `kernel`, in tree order."""
    out: List[Tuple[str, ...]] = []

    def walk(node, path):
        if not _is_mapping(node):
            return
        k = node.get("kernel", None)
        if k is not None and not isinstance(k, QuantizedWeight) and hasattr(k, "ndim") and k.ndim == 2 \
                and jnp.issubdtype(k.dtype, jnp.floating):
            out.append(path)
        for key in node:
            walk(node[key], path + (str(key),))

    walk(params, ())
    return out


def find_quantized(params) -> List[Tuple[str, ...]]:
    """Paths of every module dict whose `kernel` is a QuantizedWeight."""
    out: List[Tuple[str, ...]] = []

    def walk(node, path):
        if not _is_mapping(node):
            return
        if isinstance(node.get("kernel", None), QuantizedWeight):
            out.append(path)
        for key in node:
            walk(node[key], path + (str(key),))

    walk(params, ())
    return out


def path_str(path: Iterable[str]) -> str:
    return "/".join(path)


def selected(path: str, include: Iterable[str], exclude: Iterable[str]) -> bool:
    """True when some include regex matches (re.search) and no exclude regex does."""
    return any(re.search(p, path) for p in include) and not any(re.search(p, path) for p in exclude)


def select_linears(params, include, exclude) -> List[Tuple[str, ...]]:
    for pat in tuple(include) + tuple(exclude):
        try:
            re.compile(pat)
        except re.error as e:
            raise ValueError(f"bad include/exclude regex {pat!r}: {e}") from None
    return [p for p in find_linears(params) if selected(path_str(p), include, exclude)]


def replace_kernels(params, new: Dict[Tuple[str, ...], object]):
    """Copy of `params` (plain dicts, same keys and order) with node[path]['kernel'] = new[path]."""
    def walk(node, path):
        if not _is_mapping(node):
            return node
        out = {}
        for key in node:
            p = path + (str(key),)
            if key == "kernel" and path in new:
                out[key] = new[path]
            else:
                out[key] = walk(node[key], p)
        return out

    return walk(params, ())
