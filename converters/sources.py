"""Open a PyTorch checkpoint without loading it all: .safetensors (lazy, our reader), a diffusers folder
(`diffusion_pytorch_model[.safetensors|.bin]`, sharded `*.safetensors.index.json`), or `.bin`/`.pt`/`.pth`
through `torch.load(weights_only=True)` (never unrestricted pickle).

`open_checkpoint(path) -> (shapes {key: shape}, get(key) -> np.ndarray)`.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, Tuple

import numpy as np

from qdit4sr_jax.io.safetensors import SafeTensorsFile

Source = Tuple[Dict[str, Tuple[int, ...]], Callable[[str], np.ndarray]]


def _safetensors(path: str) -> Source:
    f = SafeTensorsFile(path)
    return f.shapes(), lambda k: f.get(k, copy=False)


def _index(path: str) -> Source:
    with open(path) as fh:
        weight_map = json.load(fh)["weight_map"]
    folder = os.path.dirname(path)
    files = {name: SafeTensorsFile(os.path.join(folder, name)) for name in sorted(set(weight_map.values()))}
    shapes = {k: files[n].shapes()[k] for k, n in weight_map.items()}
    return shapes, lambda k: files[weight_map[k]].get(k, copy=False)


def _torch(path: str) -> Source:
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path!r} needs torch (pip install 'qdit4sr-jax[torch]'), or convert it to "
                          f".safetensors first") from None
    from converters.keytable import to_numpy
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be memory-mapped; retry plainly
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - report any unpickling refusal clearly
            raise ValueError(f"cannot read {path!r} with torch.load(weights_only=True): {e}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise ValueError(f"{path!r} does not hold a flat state dict of tensors")
    return {k: tuple(v.shape) for k, v in sd.items()}, lambda k: to_numpy(sd[k])


def open_checkpoint(path: str) -> Source:
    if os.path.isdir(path):
        for name, opener in (("diffusion_pytorch_model.safetensors", _safetensors),
                             ("diffusion_pytorch_model.safetensors.index.json", _index),
                             ("diffusion_pytorch_model.bin", _torch)):
            if os.path.exists(os.path.join(path, name)):
                return opener(os.path.join(path, name))
        raise FileNotFoundError(f"{path!r} is a folder without diffusion_pytorch_model.(safetensors|bin)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    if path.endswith(".index.json"):
        return _index(path)
    if path.endswith(".safetensors"):
        return _safetensors(path)
    if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        return _torch(path)
    raise ValueError(f"unknown checkpoint type {path!r}: expected .safetensors, .bin/.pt/.pth, an "
                     f"index.json or a diffusers folder")
