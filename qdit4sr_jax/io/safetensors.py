"""Dependency-free safetensors reader/writer (numpy + ml_dtypes, incl. bf16 and fp8).

Format: u64 little-endian header length N, N bytes of JSON
{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the raw
little-endian tensor bytes (offsets relative to the end of the header).

  f = SafeTensorsFile(path)      # validates the header; tensors are read lazily (memory-mapped)
  f.keys(); f.shapes() -> {key: shape}; f.metadata -> {str: str}; f.get(key) -> np.ndarray
  load_file(path) -> {key: np.ndarray};  save_file({key: array}, path, metadata) (atomic: temp + rename)
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import Dict, Mapping, Optional, Tuple

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 256 * 1024 * 1024


class SafeTensorsError(ValueError):
    """The file is not a valid safetensors file (names the file and the problem)."""


class SafeTensorsFile:
    """A validated, lazily read safetensors file."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
        except OSError as e:
            raise FileNotFoundError(f"cannot open safetensors file {self.path!r}: {e}") from None
        if size < 8:
            raise SafeTensorsError(f"{self.path!r} is not a safetensors file: {size} bytes, shorter than the "
                                   f"8-byte header length")
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n == 0 or n > _MAX_HEADER or 8 + n > size:
                raise SafeTensorsError(f"{self.path!r} is not a safetensors file or is truncated: header length "
                                       f"{n} does not fit the file size {size}")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafeTensorsError(f"{self.path!r} is not a safetensors file: header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise SafeTensorsError(f"{self.path!r}: header is not a JSON object")
        self.metadata: Dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_len = size - self._data_start
        self._entries: Dict[str, Tuple[np.dtype, Tuple[int, ...], int, int]] = {}
        for key, e in header.items():
            try:
                dt = _DTYPES[e["dtype"]]
                shape = tuple(int(d) for d in e["shape"])
                begin, end = (int(o) for o in e["data_offsets"])
            except KeyError as err:
                raise SafeTensorsError(f"{self.path!r}: tensor {key!r} has an unsupported dtype or a missing "
                                       f"field ({err}); supported dtypes: {sorted(_DTYPES)}") from None
            except (TypeError, ValueError):
                raise SafeTensorsError(f"{self.path!r}: tensor {key!r} has a malformed header entry {e!r}") from None
            nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            if begin < 0 or end - begin != nbytes:
                raise SafeTensorsError(f"{self.path!r}: tensor {key!r} {e['dtype']}{list(shape)} needs {nbytes} "
                                       f"bytes but its offsets [{begin}, {end}] span {end - begin}")
            if end > data_len:
                raise SafeTensorsError(f"{self.path!r} is truncated: tensor {key!r} ends at byte {end} of the data "
                                       f"section but the file holds only {data_len} data bytes")
            self._entries[key] = (dt, shape, begin, end)
        self._mm = None

    def keys(self):
        return list(self._entries)

    def __contains__(self, key):
        return key in self._entries

    def __len__(self):
        return len(self._entries)

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {k: e[1] for k, e in self._entries.items()}

    def dtypes(self) -> Dict[str, np.dtype]:
        return {k: e[0] for k, e in self._entries.items()}

    def get(self, key: str, copy: bool = True) -> np.ndarray:
        """The tensor as a numpy array (a copy unless copy=False, which returns a read-only memmap view)."""
        if key not in self._entries:
            raise KeyError(f"tensor {key!r} is not in {self.path!r}")
        dt, shape, begin, end = self._entries[key]
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = np.asarray(self._mm[self._data_start + begin:self._data_start + end])
        arr = buf.view(dt).reshape(shape)
        return np.array(arr) if copy else arr


def load_file(path: str) -> Dict[str, np.ndarray]:
    f = SafeTensorsFile(path)
    return {k: f.get(k) for k in f.keys()}


class LazyTensor:
    """A tensor produced on demand: `save_file` writes `fn()` (which must return `shape`/`dtype`) when its
    turn comes, so a converter can stream a checkpoint larger than memory."""

    def __init__(self, shape, dtype, fn):
        self.shape, self.dtype, self.fn = tuple(int(d) for d in shape), np.dtype(dtype), fn

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _prepare(key: str, v) -> np.ndarray:
    a = np.asarray(v)
    dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
    if dt not in _NAMES:
        raise TypeError(f"tensor {key!r}: dtype {a.dtype} cannot be stored in safetensors "
                        f"(supported: {sorted(str(d) for d in _NAMES)})")
    a = a.astype(dt, copy=False)
    return a if a.flags.c_contiguous else a.copy(order="C")   # (ascontiguousarray makes 0-d 1-d)


def save_file(tensors: Mapping[str, object], path: str, metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write tensors (numpy / jax arrays, or `LazyTensor`s) atomically: a temp file in the same folder,
    then rename. Nothing is left at `path` (or beside it) if anything fails."""
    entries = {}
    for k, v in tensors.items():
        if isinstance(v, LazyTensor):
            if v.dtype not in _NAMES:
                raise TypeError(f"tensor {k!r}: dtype {v.dtype} cannot be stored in safetensors")
            entries[k] = v
        else:
            entries[k] = _prepare(k, v)
    header: Dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map str -> str; bad entries: {bad}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for k, a in entries.items():
        header[k] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for k, a in entries.items():
                if isinstance(a, LazyTensor):
                    lazy, a = a, _prepare(k, a.fn())
                    if a.shape != lazy.shape or a.dtype != lazy.dtype:
                        raise ValueError(f"lazy tensor {k!r} produced {a.dtype}{list(a.shape)}, declared "
                                         f"{lazy.dtype}{list(lazy.shape)}")
                f.write(a.reshape(-1).view(np.uint8).data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
