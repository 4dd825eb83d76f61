"""Save / load quantized params trees with orbax.

On-disk layout of `save(path, qparams, cfg)` (a directory):
  path/state/                orbax PyTree checkpoint of the arrays: every QuantizedWeight becomes a dict
                             of its present arrays (packed codes stay uint8 at their w_bits bits per code,
                             `quantizer.pack_codes`) at the
                             node's own tree path; float leaves are stored as they are (dtype kept).
  path/qdit4sr_quant.json    {"format", "version", "quant_config": QuantConfig.to_dict(),
                             "nodes": {tree path of the kernel: static fields + "arrays": [names]}}
Version 2 stores every w_bits < 8 node's codes b-bit packed (`quantizer.pack_codes`); version 1 (<= 4-bit
codes as `pack_int4` nibbles, 5..7-bit codes as int8) still loads: its 2-/3-bit nibbles and unpacked
5..7-bit codes are repacked on load (the 4-bit and 8-bit layouts did not change). Version 3 adds int8
branch factors (`QuantConfig.lowrank_bits=8`: "lr_a_scale", "lr_b_scale", "block_u_scale",
"block_v_scale" next to int8 "lr_a", ...); a file is written as version 3 only when it holds such factors
(otherwise version 2, readable by version-2 code), and versions 1 and 2 still load. Version 4 adds the
static field "signs" (rotation signs as a constant, `QuantizedWeight.signs`); a file is written as version 4
only when a node has signs=True (older readers would drop them silently), and a node without the field loads
with signs=False, its old meaning.
The checkpoint is written to a temporary sibling directory and renamed to `path` only when complete,
so a failure mid-save leaves nothing at `path`. `load` validates every node (present arrays, dtype and
shape against the stored bits / layout, codes inside the bit-width's range) and raises ValueError
naming the layer and the problem.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from qdit4sr_jax.quant import quantizer as qz
from qdit4sr_jax.quant.config import QuantConfig
from qdit4sr_jax.quant.kernels.prepared import KernelWeight
from qdit4sr_jax.quant.qweight import (ARRAY_FIELDS, BRANCH_FACTORS, FACTOR_AXIS, LAYOUTS, OPTIONAL_STATIC,
                                       STATIC_FIELDS, QuantizedWeight)

FORMAT = "qdit4sr-jax/quantized-params"
VERSION = 4
READ_VERSIONS = (1, 2, 3, 4)
FACTOR_SCALES_VERSION = 3           # first version with int8 branch factors (lr_a_scale, ...)
SIGNS_VERSION = 4                   # first version with the static field "signs"
META = "qdit4sr_quant.json"
STATE = "state"


def _flatten(tree, nodes, path=()):
    """Replace QuantizedWeight nodes by dicts of their arrays; record their static fields in `nodes`."""
    if isinstance(tree, QuantizedWeight):
        arrays = {f: getattr(tree, f) for f in ARRAY_FIELDS if getattr(tree, f) is not None}
        nodes["/".join(path)] = dict(tree.static_dict(), arrays=sorted(arrays))
        return arrays
    if isinstance(tree, dict) or hasattr(tree, "items"):
        out = {}
        for k, v in tree.items():
            if not isinstance(k, str):
                raise ValueError(f"checkpoint: tree keys must be strings, got {k!r} at {'/'.join(path)}")
            if v is None:
                continue
            out[k] = _flatten(v, nodes, path + (k,))
        return out
    if isinstance(tree, KernelWeight):
        raise ValueError(f"checkpoint: {'/'.join(path)} is a prepared weight (quant.kernels.prepare), an execution "
                         f"form for one run; save the quantized tree it was prepared from")
    if not hasattr(tree, "dtype"):
        raise ValueError(f"checkpoint: leaf at {'/'.join(path)} is a {type(tree).__name__}, not an array")
    return tree


def dir_size(path: str) -> int:
    """Total bytes of the files under `path`."""
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def save(path: str, qparams, cfg: Optional[QuantConfig] = None, *, overwrite: bool = False) -> dict:
    """Write `qparams` (a quantized params tree) and `cfg` to the directory `path`, atomically.

    Returns {"path", "bytes_on_disk", "bytes_arrays", "quantized_layers"}.
    Raises FileExistsError if `path` exists and overwrite is False.
    """
    import orbax.checkpoint as ocp
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"checkpoint path {path} exists; pass overwrite=True to replace it")
    nodes: dict = {}
    state = _flatten(qparams, nodes)
    has_scales = any(f + "_scale" in st["arrays"] for st in nodes.values() for f in BRANCH_FACTORS)
    has_signs = any(st.get("signs") for st in nodes.values())
    version = min(VERSION, SIGNS_VERSION if has_signs else FACTOR_SCALES_VERSION if has_scales
                  else FACTOR_SCALES_VERSION - 1)
    meta = {"format": FORMAT, "version": version,
            "quant_config": None if cfg is None else cfg.to_dict(), "nodes": nodes}
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        ocp.PyTreeCheckpointer().save(os.path.join(tmp, STATE), state)
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        if os.path.exists(path):                       # overwrite: move the old one aside first
            old = tmp + ".old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    leaves = jax.tree_util.tree_leaves(state)
    return {"path": path, "bytes_on_disk": dir_size(path),
            "bytes_arrays": int(sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape)) for a in leaves)),
            "quantized_layers": len(nodes)}


def _code_length(st) -> int:
    """Codes per row along the packed axis: K ("nk") or the group length g ("gnk")."""
    k, _ = st["shape"]
    return k if st["layout"] == "nk" else qz.num_groups(k, st["group_size"])[1]


def _expected_qvalue(st) -> tuple:
    k, n = st["shape"]
    G, _ = qz.num_groups(k, st["group_size"])
    last = _code_length(st)
    if st["packed"]:
        last = qz.packed_length(last, st["w_bits"])
    shape = (n, last) if st["layout"] == "nk" else (G, n, last)
    return shape, (np.uint8 if st["packed"] else np.int8)


def _upgrade_v1(name: str, st: dict, arrays: dict) -> tuple:
    """A version-1 node -> (static fields, arrays) of version 2: 2-/3-bit `pack_int4` nibbles and
    unpacked (int8) 5..7-bit codes are repacked at their bit-width; 4- and 8-bit nodes are unchanged."""
    w_bits, q = st.get("w_bits"), arrays.get("qvalue")
    if (q is None or any(f not in st for f in STATIC_FIELDS) or st["layout"] not in LAYOUTS
            or not isinstance(w_bits, int) or not 2 <= w_bits <= 7 or w_bits == 4):
        return st, arrays
    q = np.asarray(q)
    last = _code_length(st)
    if st.get("packed"):
        if w_bits > 4:
            raise ValueError(f"checkpoint layer {name!r}: packed codes but w_bits={w_bits} (version-1 files "
                             f"pack only <= 4-bit codes): wrong bit-width in the metadata")
        if q.dtype != np.uint8 or q.shape[-1] != -(-last // 2):
            raise ValueError(f"checkpoint layer {name!r}: version-1 packed codes are {q.dtype} {tuple(q.shape)}, "
                             f"not uint8 nibbles of {last} codes: wrong bit-width or corrupted metadata")
        codes = np.asarray(qz.unpack_int4(q, last))
    else:
        if q.dtype != np.int8:
            return st, arrays                          # reported by the version-2 checks
        codes = q
    lo, hi = -2 ** (w_bits - 1), 2 ** (w_bits - 1) - 1
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise ValueError(f"checkpoint layer {name!r}: codes span [{codes.min()}, {codes.max()}], outside the "
                         f"{w_bits}-bit range [{lo}, {hi}]: wrong bit-width in the metadata")
    return dict(st, packed=True), dict(arrays, qvalue=np.asarray(qz.pack_codes(codes, w_bits)))


def _rebuild_node(name: str, st: dict, arrays: dict) -> QuantizedWeight:
    missing = [f for f in STATIC_FIELDS if f not in st]
    if missing:
        raise ValueError(f"checkpoint layer {name!r}: metadata lacks static fields {missing}")
    listed = st.get("arrays", [])
    absent = [f for f in set(listed) | {"qvalue", "scale"} if f not in arrays]
    if absent:
        raise ValueError(f"checkpoint layer {name!r}: missing array field(s) {sorted(absent)}")
    try:
        w_bits = qz.check_bits(st["w_bits"], "weight bits")
        if st["a_bits"] is not None:
            qz.check_bits(st["a_bits"], "activation bits")
    except ValueError as e:
        raise ValueError(f"checkpoint layer {name!r}: {e}") from None
    if st["layout"] not in LAYOUTS:
        raise ValueError(f"checkpoint layer {name!r}: unknown layout {st['layout']!r}")
    if st["packed"] and w_bits == 8:
        raise ValueError(f"checkpoint layer {name!r}: packed codes but w_bits=8 (8-bit codes are stored as "
                         f"int8): wrong bit-width in the metadata")
    if not st["w_symmetric"] and "zero" not in arrays:
        raise ValueError(f"checkpoint layer {name!r}: asymmetric weights need a 'zero' array")
    q = np.asarray(arrays["qvalue"])
    shape, dtype = _expected_qvalue(st)
    if q.dtype != dtype or tuple(q.shape) != shape:
        raise ValueError(f"checkpoint layer {name!r}: stored codes are {q.dtype} {tuple(q.shape)} but "
                         f"w_bits={w_bits}, layout={st['layout']}, packed={st['packed']} imply "
                         f"{np.dtype(dtype)} {shape}: wrong bit-width or corrupted metadata")
    codes = np.asarray(qz.unpack_codes(q, w_bits, _code_length(st))) if st["packed"] else q
    qmin, qmax = qz.code_range(w_bits, st["w_symmetric"])
    if codes.size and (codes.min() < qmin or codes.max() > qmax):
        raise ValueError(f"checkpoint layer {name!r}: codes span [{codes.min()}, {codes.max()}], outside the "
                         f"{w_bits}-bit range [{qmin}, {qmax}]: wrong bit-width in the metadata")
    if "gscale" in arrays:
        _check_group_factors(name, st, w_bits, np.asarray(arrays["gscale"]))
    _check_branch_factors(name, arrays)
    static = {f: st[f] for f in STATIC_FIELDS}
    static["shape"] = tuple(static["shape"])
    static["block"] = None if static["block"] is None else tuple(static["block"])
    kw = {f: (jnp.asarray(arrays[f]) if f in arrays else None) for f in ARRAY_FIELDS}
    return QuantizedWeight(**kw, **static)


def _check_branch_factors(name: str, arrays: dict) -> None:
    """int8 branch factors (`QuantizedWeight.lr_a_scale`, ...): an int8 factor needs its float scale of
    the factor's shape with the vector axis (`FACTOR_AXIS`) of size 1, and a scale needs an int8 factor."""
    for f in BRANCH_FACTORS:
        a, s = arrays.get(f), arrays.get(f + "_scale")
        if a is None and s is None:
            continue
        if a is None:
            raise ValueError(f"checkpoint layer {name!r}: factor scale {f + '_scale'!r} without its factor {f!r}")
        a = np.asarray(a)
        if s is None:
            if a.dtype == np.int8:
                raise ValueError(f"checkpoint layer {name!r}: int8 branch factor {f!r} without its scale "
                                 f"{f + '_scale'!r}: corrupted checkpoint")
            continue
        s = np.asarray(s)
        shape = tuple(1 if i == FACTOR_AXIS[f] else d for i, d in enumerate(a.shape))
        if a.dtype != np.int8 or not jnp.issubdtype(s.dtype, jnp.floating) or tuple(s.shape) != shape:
            raise ValueError(f"checkpoint layer {name!r}: branch factor {f!r} is {a.dtype} {tuple(a.shape)} with "
                             f"scale {s.dtype} {tuple(s.shape)}; int8 factors need a float scale {shape}")


def _check_group_factors(name: str, st: dict, w_bits: int, gs: np.ndarray) -> None:
    """Two-level group scales (`QuantizedWeight.gscale`): layout "nk", a group size, uint8
    [N, ceil(G / 2)] packed factors in 1..c_max."""
    k, n = st["shape"]
    if st["layout"] != "nk" or st["group_size"] is None:
        raise ValueError(f"checkpoint layer {name!r}: integer group factors ('gscale') need layout 'nk' and a "
                         f"group size, got layout {st['layout']!r}, group_size {st['group_size']!r}")
    G, _ = qz.num_groups(k, st["group_size"])
    shape = (n, -(-G // 2))
    if gs.dtype != np.uint8 or tuple(gs.shape) != shape:
        raise ValueError(f"checkpoint layer {name!r}: integer group factors are {gs.dtype} {tuple(gs.shape)} but "
                         f"shape {st['shape']} with group_size {st['group_size']} implies uint8 {shape}")
    c = np.asarray(qz.unpack_group_factors(gs, G))
    cmax = qz.int_scale_max(w_bits)
    if c.size and (c.min() < 1 or c.max() > cmax):
        raise ValueError(f"checkpoint layer {name!r}: integer group factors span [{c.min()}, {c.max()}], outside "
                         f"1..{cmax} for {w_bits}-bit codes (c * q must fit int8): corrupted checkpoint")


def load(path: str, *, expect_cfg: Optional[QuantConfig] = None):
    """Read a checkpoint written by `save` -> (qparams, cfg). Arrays come back as jax arrays with the
    stored dtypes (bit-exact). expect_cfg: if given, the stored QuantConfig must equal it."""
    import orbax.checkpoint as ocp
    path = os.path.abspath(os.fspath(path))
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path} is not a qdit4sr-jax quantized checkpoint (no {META})")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is corrupt (not JSON: {e}); the checkpoint is damaged: re-export it "
                         f"with qdit4sr_jax.save") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} is not a JSON object; the checkpoint is damaged: re-export it")
    if meta.get("format") != FORMAT or meta.get("version") not in READ_VERSIONS:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} v{meta.get('version')} is not "
                         f"{FORMAT!r} v{' / v'.join(map(str, READ_VERSIONS))}")
    for key in ("quant_config", "nodes"):
        if key not in meta:
            raise ValueError(f"{meta_path}: missing field {key!r}")
    cfg = None if meta["quant_config"] is None else QuantConfig.from_dict(meta["quant_config"])
    if expect_cfg is not None and cfg != expect_cfg:
        diff = {k: (v, getattr(expect_cfg, k)) for k, v in vars(cfg or QuantConfig()).items()
                if getattr(expect_cfg, k) != v}
        raise ValueError(f"{path}: stored QuantConfig differs from the expected one (stored, expected): {diff}")
    if not os.path.isdir(os.path.join(path, STATE)):
        raise FileNotFoundError(f"{path} is an incomplete quantized checkpoint: {STATE}/ is missing; re-export it")
    with warnings.catch_warnings():   # single-host restore: orbax's note about sharding files is noise
        warnings.filterwarnings("ignore", message="Sharding info not provided")
        try:
            state = ocp.PyTreeCheckpointer().restore(os.path.join(path, STATE))
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged files
            raise ValueError(f"{path}/{STATE}: cannot read the arrays ({type(e).__name__}: {str(e)[:300]}); the "
                             f"checkpoint is truncated or damaged: re-export it with qdit4sr_jax.save") from None

    def get(tree, parts):
        for p in parts:
            if not isinstance(tree, dict) or p not in tree:
                return None
            tree = tree[p]
        return tree

    nodes = {}
    for name, st in meta["nodes"].items():
        st = {**OPTIONAL_STATIC, **st}                 # fields newer than the file take their old meaning
        arrays = get(state, name.split("/"))
        if not isinstance(arrays, dict):
            raise ValueError(f"checkpoint layer {name!r}: its arrays are missing from {path}/{STATE}")
        if meta["version"] == 1:
            st, arrays = _upgrade_v1(name, st, arrays)
        nodes[name] = _rebuild_node(name, st, arrays)

    def build(tree, parts):
        name = "/".join(parts)
        if name in nodes:
            return nodes[name]
        if isinstance(tree, dict):
            return {k: build(v, parts + (k,)) for k, v in tree.items()}
        return jnp.asarray(tree)

    return build(state, ()), cfg
