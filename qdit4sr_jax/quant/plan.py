"""Per-layer planning of `quantize`: the static recipe of one linear (`LayerSpec`, `layer_spec`), fixed-size
chunks of equal-shape layers (`balanced_chunks`), and opt-in concurrent precompilation (`precompile`).

Floor 3 of the package (docs/ARCHITECTURE.md): imports only the config and the transforms below it; the
recipes (baselines.py, qdit4sr.py) and the entry (api.py) build on it.
"""
from __future__ import annotations

import dataclasses
from typing import List, Mapping, Optional, Sequence, Tuple

import jax.numpy as jnp

from qdit4sr_jax.quant.config import QuantConfig
from qdit4sr_jax.quant.transforms import rotation_block


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Static recipe for one linear (hashable: a jit static argument)."""
    w_bits: int
    a_bits: Optional[int]
    group_size: Optional[int] = 64
    w_symmetric: bool = True
    a_symmetric: bool = True
    clip_ratio: float = 1.0
    clip_search: bool = False
    smooth: bool = False
    smooth_alpha: float = 0.5
    rotate: int = 0                  # Hadamard block, 0 = off
    rotate_signs: bool = False       # randomised Hadamard: fixed signs (the node's static `signs`)
    lowrank_rank: int = 0
    lowrank_svd: str = "exact"       # "exact" | "randomized"
    pack: bool = True
    execution: str = "fake"
    branch_dtype: str = "bfloat16"
    dtype: str = "float32"           # original kernel dtype
    group_scale: str = "float"       # "float" | "int" (two-level integer group scales, qweight.make_qweight)
    lowrank_bits: Optional[int] = None   # None: branch factors in branch_dtype; 8: int8 (qweight.make_qweight)



_PRECOMPILED: set = set()          # signatures `precompile` compiled in this process


def precompile(fn, calls: Sequence[tuple], threads: int) -> int:
    """Opt-in: compile the distinct programs of `fn(*args)` for every args tuple in `calls` in `threads`
    concurrent threads (XLA compilation runs outside the GIL), so that the calls made afterwards find
    them in jit's cache. Only the first call of each distinct signature (shapes, dtypes, static values)
    is compiled, and only once per process. threads <= 1: do nothing (the programs compile on their
    first call). On the H100 this did not shorten the full-model quantize (82.8 s concurrent vs 83.4 s
    serial; summed compile time 165 s vs 33 s), so `quantize_qdit4sr` uses it only when asked
    (`compile_threads`). A compilation that fails here is left to the real call (which then reports
    the error). Returns the number of programs submitted."""
    if threads <= 1:
        return 0
    seen, todo = set(), []
    for args in calls:
        key = (getattr(fn, "__qualname__", repr(fn)), tuple(_signature(a) for a in args))
        if key not in seen and key not in _PRECOMPILED:   # already compiled here: jit's cache has it
            seen.add(key)
            todo.append(args)
    _PRECOMPILED.update(seen)
    if len(todo) <= 1:
        return 0
    from concurrent.futures import ThreadPoolExecutor

    def one(args):
        try:
            fn.lower(*args).compile()
        except Exception:                                # the real call compiles and raises
            pass

    with ThreadPoolExecutor(min(len(todo), int(threads))) as ex:
        list(ex.map(one, todo))
    return len(todo)


def _signature(a):
    """Hashable compile signature of an argument: (shape, dtype) of arrays, recursively; static values as is."""
    if a is None or isinstance(a, (str, int, float, bool)):
        return a
    if hasattr(a, "shape") and hasattr(a, "dtype"):
        return ("array", tuple(a.shape), str(a.dtype))
    if isinstance(a, (tuple, list)):
        return (type(a).__name__,) + tuple(_signature(x) for x in a)
    if isinstance(a, Mapping):
        return ("map",) + tuple((k, _signature(v)) for k, v in sorted(a.items()))
    return a                                             # static dataclasses (LayerSpec, BranchSpec): hashable


def balanced_chunks(items: Sequence, chunk: int) -> List[list]:
    """Split `items` (n >= 1) into ceil(n / chunk) chunks of one size C = ceil(n / ceil(n / chunk)) <= chunk;
    the last chunk is padded by repeating its last item. Every chunk of a group then has the same
    shape, so a jitted per-chunk function compiles once per group (no remainder program), with fewer
    than C padded repeats (e.g. n = 34, chunk 8: 5 chunks of 7, one repeat)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    items = list(items)
    if not items:
        return []
    n_chunks = -(-len(items) // chunk)
    size = -(-len(items) // n_chunks)
    parts = [items[i:i + size] for i in range(0, len(items), size)]
    parts[-1] = parts[-1] + [parts[-1][-1]] * (size - len(parts[-1]))
    return parts


def layer_spec(cfg: QuantConfig, kernel_shape: Tuple[int, int], dtype, w_bits: int) -> LayerSpec:
    """The static recipe of one linear under `cfg` (w_bits may differ per layer)."""
    k = kernel_shape[0]
    rotate = 0
    if cfg.rotate:
        rotate = rotation_block(k, cfg.rotate_block)
        rotate = 0 if rotate == 1 else rotate
    return LayerSpec(
        w_bits=int(w_bits), a_bits=None if cfg.a_bits is None else int(round(cfg.a_bits)),
        group_size=cfg.w_group_size, w_symmetric=cfg.w_symmetric, a_symmetric=cfg.a_symmetric,
        clip_ratio=float(cfg.w_clip_ratio), clip_search=bool(cfg.w_clip_search), smooth=cfg.smooth,
        smooth_alpha=float(cfg.smooth_alpha), rotate=rotate,
        **({"rotate_signs": True} if rotate and getattr(cfg, "rotate_signs", False) else {}),
        lowrank_rank=int(min(cfg.lowrank_rank, *kernel_shape)), lowrank_svd=cfg.lowrank_svd, pack=cfg.pack, execution=cfg.execution,
        branch_dtype=cfg.branch_dtype, dtype=str(jnp.dtype(dtype)),
        **({} if getattr(cfg, "w_group_scale", "float") == "float" else {"group_scale": cfg.w_group_scale}),
        **({} if getattr(cfg, "lowrank_bits", None) is None else {"lowrank_bits": int(cfg.lowrank_bits)}))
