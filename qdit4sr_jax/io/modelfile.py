"""Float model files: one .safetensors whose keys are '/'-joined tree paths and whose metadata holds the
`ModelConfig` as JSON.

  save_model(path, cfg, params)   params: {"transformer": tree, "vae": tree, "prompt": tree, ...}
                                  (any nested dict of arrays); written atomically (temp + rename)
  load_model(path) -> (ModelConfig, params)   params as numpy arrays, same nesting
  load_pretrained("demo" | path) -> (ModelConfig, params)
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from qdit4sr_jax.config import ModelConfig, VAEConfig
from qdit4sr_jax.io.safetensors import LazyTensor, SafeTensorsFile, save_file

FORMAT = "qdit4sr-jax/float-model"
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
PRETRAINED = {"demo": os.path.join(ASSETS, "demo.safetensors")}


def _to_dict(obj) -> Dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = _to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
    return out


def _from_dict(cls, d: Mapping[str, Any]):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} JSON has unknown fields {unknown}: the file was written by a newer "
                         f"qdit4sr-jax; upgrade to read it")
    kw = {}
    for k, v in d.items():
        if dataclasses.is_dataclass(hints.get(k)):
            v = _from_dict(hints[k], v)
        elif isinstance(v, list):
            v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        kw[k] = v
    return cls(**kw)


def config_to_json(cfg: ModelConfig) -> str:
    return json.dumps(_to_dict(cfg), sort_keys=True)


def config_from_json(s: str) -> ModelConfig:
    return _from_dict(ModelConfig, json.loads(s))


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested dict -> {'a/b/c': leaf}; any non-Mapping value (array, QuantizedWeight, ...) is a leaf."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten_tree(v, path))
        else:
            out[path] = v
    return out


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if "/" in str(k):
            raise ValueError(f"tree key {k!r} under {prefix!r} contains '/'")
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, path))
        elif hasattr(v, "shape") and hasattr(v, "dtype"):
            out[path] = v
        else:
            raise TypeError(f"leaf {path!r} is a {type(v).__name__}, not an array: float model files hold "
                            f"float params only (save quantized trees with qdit4sr_jax.checkpoint)")
    return out


def save_model(path: str, cfg: ModelConfig, params: Mapping[str, Any]) -> None:
    """Write `params` (nested dict of arrays or `LazyTensor`s) and `cfg` to one .safetensors file, atomically."""
    flat = {k: v if isinstance(v, LazyTensor) else np.asarray(v) for k, v in _flatten(params).items()}
    meta = {"format": FORMAT, "model_config": config_to_json(cfg)}
    save_file(flat, path, meta)


def load_model(path: str, *, check: bool = False) -> Tuple[ModelConfig, Dict[str, Any]]:
    """Read a file written by `save_model` -> (ModelConfig, nested dict of numpy arrays).
    With ``check`` the transformer / VAE trees are validated against the config (`check_params`;
    `load_pretrained` checks by default)."""
    f = SafeTensorsFile(path)
    if f.metadata.get("format") != FORMAT or "model_config" not in f.metadata:
        raise ValueError(f"{path!r} is a safetensors file but not a qdit4sr-jax model file (metadata format "
                         f"{f.metadata.get('format')!r}); convert PyTorch checkpoints with `python -m converters`")
    try:
        cfg = config_from_json(f.metadata["model_config"])
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path!r}: the ModelConfig in its metadata is corrupt ({e}); re-convert or re-save "
                         f"the model file") from None
    params: Dict[str, Any] = {}
    for key in f.keys():
        node = params
        *parents, last = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = f.get(key)
    if check:
        check_params(cfg, params, source=repr(path))
    return cfg, params


def check_params(cfg: ModelConfig, params: Mapping[str, Any], *, source: str = "params",
                 finite: bool = True) -> None:
    """Validate a model bundle {"transformer": ..., "vae": ...} against the trees `cfg` implies.

    Checks params["transformer"] (float arrays or `QuantizedWeight` nodes, whose `shape` is the kernel
    shape) and, for an SD3 VAE, params["vae"] when present: missing and unexpected keys, shape
    mismatches, non-float dtypes and (``finite``) NaN/Inf values. Raises one ValueError listing every
    problem found, with what to do.
    """
    from qdit4sr_jax.model.dit4sr import param_shapes
    from qdit4sr_jax.quant.qweight import QuantizedWeight
    problems = []

    def compare(name, tree, abstract):
        if not isinstance(tree, Mapping):
            problems.append(f"{name}: expected a nested dict of arrays, got {type(tree).__name__}")
            return
        want, got = flatten_tree(abstract), flatten_tree(tree)
        for k in sorted(set(want) - set(got)):
            problems.append(f"missing {name}/{k} {tuple(want[k].shape)}")
        for k in sorted(set(got) - set(want)):
            problems.append(f"unexpected key {name}/{k}: the config {cfg.name!r} has no such parameter")
        for k in sorted(set(want) & set(got)):
            v, w = got[k], want[k]
            shape = tuple(v.shape) if hasattr(v, "shape") else None
            if shape != tuple(w.shape):
                problems.append(f"shape mismatch {name}/{k}: got {shape}, config {cfg.name!r} implies "
                                f"{tuple(w.shape)}")
            elif isinstance(v, QuantizedWeight):
                continue
            elif not np.issubdtype(np.dtype(v.dtype), np.floating) and str(v.dtype) != "bfloat16":
                problems.append(f"{name}/{k}: dtype {v.dtype} is not floating point")
            elif finite:
                bad = int(np.size(v) - np.count_nonzero(np.isfinite(np.asarray(v, np.float32))))
                if bad:
                    problems.append(f"{name}/{k}: {bad} NaN/Inf value(s)")

    if "transformer" in params:
        compare("transformer", params["transformer"], param_shapes(cfg))
    if cfg.vae.kind == "sd3" and params.get("vae"):
        import jax
        from qdit4sr_jax.model import vae as _vae
        compare("vae", params["vae"], jax.eval_shape(lambda k: _vae.init(cfg.vae, k, 64), jax.random.PRNGKey(0)))
    if problems:
        shown = problems[:60] + ([f"... and {len(problems) - 60} more"] if len(problems) > 60 else [])
        raise ValueError(f"{source} do(es) not fit ModelConfig {cfg.name!r}: {len(problems)} problem(s)\n  "
                         + "\n  ".join(shown) + "\nRe-convert the checkpoint with the matching config "
                         "(`python -m converters transformer --config ...`); NaN/Inf values mean a corrupt "
                         "or diverged checkpoint: re-download or re-convert it.")


def load_pretrained(name_or_path: str, *, check: bool = True) -> Tuple[ModelConfig, Dict[str, Any]]:
    """"demo" (the small model shipped in qdit4sr_jax/assets/) or a path to a model file; with ``check``
    the weights are validated against the stored config (missing / unexpected keys, shapes, NaN/Inf)."""
    path = PRETRAINED.get(name_or_path, name_or_path)
    if not os.path.exists(path):
        if name_or_path in PRETRAINED:
            raise FileNotFoundError(f"pretrained model {name_or_path!r} is not available: {path} does not exist "
                                    f"(the demo model has not been trained/shipped in this checkout yet)")
        raise FileNotFoundError(f"no model file at {path!r}; known names: {sorted(PRETRAINED)}")
    return load_model(path, check=check)
