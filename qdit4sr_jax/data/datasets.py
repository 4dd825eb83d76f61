"""Photos -> (HR crop, degraded LR) pairs for training and validation.

* `load_photos(data_dir, split)`: the photos listed in `data_dir/manifest.json` (written by
  `qdit4sr_jax.data.gather`) as uint8 [H, W, 3] arrays.
* `random_crop(photo, rng, size)`: mild random rescaling (log-uniform, never upscaling), a random crop,
  a random flip and 90-degree rotation -> uint8 [size, size, 3].
* `make_pair(photos, seed, size, scale)`: one seeded (hr, lr) pair (`degrade` from `degradation.py`).
* `PairBank`: a bank of pairs kept fresh by worker processes in the background; `batch(n)` draws from it.
* `validation_set(data_dir)`: the held-out 256x256 crops with their fixed-seed LR images.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import threading
import zlib
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

from qdit4sr_jax.data.degradation import degrade


def _manifest(data_dir: str) -> dict:
    p = os.path.join(data_dir, "manifest.json")
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p} not found: run `python -m qdit4sr_jax.data.gather --out {data_dir}` first")
    with open(p) as f:
        return json.load(f)


def load_photos(data_dir: str, split: str = "train") -> List[Tuple[str, np.ndarray]]:
    """[(file, uint8 [H, W, 3])] of one split ("train" | "val" | "dev") of the gathered data."""
    if split not in ("train", "val", "dev"):
        raise ValueError(f"split must be 'train', 'val' or 'dev', got {split!r}")
    out = []
    for f in _manifest(data_dir)["files"]:
        if f["split"] == split:
            out.append((f["file"], np.asarray(Image.open(os.path.join(data_dir, f["file"])).convert("RGB"))))
    if not out:
        hint = " (gathered before the dev split existed: re-run `python -m qdit4sr_jax.data.gather`)" \
            if split == "dev" else ""
        raise ValueError(f"no {split} photos listed in {data_dir}/manifest.json{hint}")
    return out


def random_crop(photo: np.ndarray, rng: np.random.Generator, size: int = 256,
                min_scale: float = 0.25) -> np.ndarray:
    """Random rescale s in [max(min_scale, size/min(H,W)), 1] (log-uniform; Lanczos), crop, flip, rot90.

    uint8 [H, W, 3] with min(H, W) >= size -> uint8 [size, size, 3].
    """
    H, W = photo.shape[:2]
    if min(H, W) < size:
        raise ValueError(f"photo {photo.shape} is smaller than the crop size {size}")
    lo = max(min_scale, size / min(H, W))
    s = float(np.exp(rng.uniform(np.log(lo), 0.0))) if lo < 1.0 else 1.0
    c = min(min(H, W), int(round(size / s)))
    y = int(rng.integers(0, H - c + 1))
    x = int(rng.integers(0, W - c + 1))
    crop = photo[y:y + c, x:x + c]
    if c != size:
        crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.LANCZOS))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = np.rot90(crop, int(rng.integers(0, 4)))
    return np.ascontiguousarray(crop)


def photo_weights(photos: List[np.ndarray]) -> np.ndarray:
    """Sampling weights ~ sqrt(pixel count): large photos are seen more, small ones still often."""
    w = np.array([np.sqrt(p.shape[0] * p.shape[1]) for p in photos], np.float64)
    return w / w.sum()


def texture(img: np.ndarray) -> float:
    """Mean absolute horizontal + vertical gradient of the grey image (0..255 scale)."""
    g = img.astype(np.float32).mean(-1)
    return float(np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean())


def make_pair(photos: List[np.ndarray], seed: int, size: int = 256, scale: int = 4,
              weights: Optional[np.ndarray] = None, min_texture: float = 3.0,
              tries: int = 3) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded pair: (hr uint8 [size, size, 3], lr uint8 [size/scale, size/scale, 3]).

    Flat crops (bokeh, sky: `texture` < min_texture) are redrawn up to `tries - 1` times, so that
    the pool's many smooth regions do not dominate training.
    """
    rng = np.random.default_rng(seed)
    w = weights if weights is not None else photo_weights(photos)
    for _ in range(tries):
        hr = random_crop(photos[int(rng.choice(len(photos), p=w))], rng, size)
        if texture(hr) >= min_texture:
            break
    return hr, degrade(hr, int(rng.integers(0, 2**31 - 1)), scale)


# ---- background pair generation -------------------------------------------------------------------
_W: dict = {}


# niceness added to the pair workers: the bank refreshes without pause, so on a machine with few free cores its
# workers would take CPU from the process that compiles and feeds the train step (idle cores they still get)
WORKER_NICE = 10


def _init_worker(data_dir, size, scale):
    try:
        os.nice(WORKER_NICE)
    except (AttributeError, OSError):     # no nice on this platform, or not permitted
        pass
    photos = [p for _, p in load_photos(data_dir, "train")]
    _W.update(photos=photos, weights=photo_weights(photos), size=size, scale=scale)


def _work(seed):
    return make_pair(_W["photos"], seed, _W["size"], _W["scale"], _W["weights"])


class PairBank:
    """A bank of `capacity` training pairs, refreshed continuously by `workers` processes.

    `batch(n, rng)` -> (hr uint8 [n, size, size, 3], lr uint8 [n, size/scale, size/scale, 3]) drawn
    uniformly from the bank. The bank starts full (filled before the constructor returns). Pair seeds
    count up from `seed`, so a run is reproducible up to the timing of the refresh.
    """

    def __init__(self, data_dir: str, capacity: int = 4096, size: int = 256, scale: int = 4,
                 workers: Optional[int] = None, seed: int = 0):
        self.capacity, self.size, self.scale = capacity, size, scale
        self.hr = np.zeros((capacity, size, size, 3), np.uint8)
        self.lr = np.zeros((capacity, size // scale, size // scale, 3), np.uint8)
        self.next_seed = seed
        self.produced = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        workers = workers or max(1, (os.cpu_count() or 2) - 1)
        # forkserver: workers are forked from a clean server process, never from the (multithreaded) JAX one
        ctx = mp.get_context("forkserver")
        self._pool = ctx.Pool(workers, initializer=_init_worker, initargs=(data_dir, size, scale))
        for k, (h, l) in enumerate(self._pool.imap(_work, range(seed, seed + capacity), chunksize=16)):
            self.hr[k], self.lr[k] = h, l
        self.next_seed = seed + capacity
        self.produced = capacity
        self._thread = threading.Thread(target=self._refresh, daemon=True)
        self._thread.start()

    def _refresh(self):
        slot = 0
        while not self._stop.is_set():
            seeds = range(self.next_seed, self.next_seed + 256)
            self.next_seed += 256
            try:
                results = self._pool.map(_work, seeds, chunksize=8)
            except (ValueError, OSError):   # pool closed underneath us at shutdown
                return
            with self._lock:
                for h, l in results:
                    self.hr[slot], self.lr[slot] = h, l
                    slot = (slot + 1) % self.capacity
                self.produced += len(results)

    def batch(self, n: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        idx = rng.integers(0, self.capacity, size=n)
        with self._lock:
            return self.hr[idx], self.lr[idx]

    def close(self, timeout: float = 60.0):
        """Stop the refresh, then the worker processes. The refresh thread finishes the batch of pairs it is
        making first: `multiprocessing.Pool.terminate` while a `map` is feeding tasks can deadlock (its task
        handler blocks on the input queue's lock and terminate joins it forever; seen once in CI on two cores).
        Should the pool's own shutdown still stall past `timeout` seconds, its workers are killed and close
        returns anyway."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

        def shutdown():
            self._pool.terminate()
            self._pool.join()

        stopper = threading.Thread(target=shutdown, daemon=True)
        stopper.start()
        stopper.join(timeout)
        if stopper.is_alive():                   # give up on the pool: no respawns, workers killed, and no
            from multiprocessing.pool import TERMINATE   # second terminate at interpreter exit (it would stall too)
            handler = getattr(self._pool, "_worker_handler", None)
            if handler is not None:
                handler._state = TERMINATE
            for proc in list(getattr(self._pool, "_pool", ())):
                if proc.is_alive():
                    proc.kill()
            finalizer = getattr(self._pool, "_terminate", None)
            if finalizer is not None and hasattr(finalizer, "cancel"):
                finalizer.cancel()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def val_seed(name: str) -> int:
    """The fixed degradation seed of a validation image (crc32 of its file name)."""
    return zlib.crc32(os.path.basename(name).encode())


def validation_set(data_dir: str, scale: int = 4) -> List[Tuple[str, np.ndarray, np.ndarray]]:
    """[(file, hr uint8 [256, 256, 3], lr uint8 [64, 64, 3])] with `degrade(hr, val_seed(file))`."""
    return [(f, hr, degrade(hr, val_seed(f), scale)) for f, hr in load_photos(data_dir, "val")]


DEV_RESEEDS = (1, 2)


def development_set(data_dir: str, scale: int = 4) -> List[Tuple[str, np.ndarray, np.ndarray]]:
    """The development set, for choosing settings (e.g. the sampler's) apart from the validation figures:
    the dev/ crops (other crops of the held-out photos, no overlap with the validation crops) with
    `degrade(hr, val_seed(file))`, then the validation crops under other degradations, seeds
    `val_seed(f"{file}~{r}")` for r in DEV_RESEEDS (names "file~r"). Same format as `validation_set`."""
    out = [(f, hr, degrade(hr, val_seed(f), scale)) for f, hr in load_photos(data_dir, "dev")]
    val = load_photos(data_dir, "val")
    for r in DEV_RESEEDS:
        out += [(f"{f}~{r}", hr, degrade(hr, val_seed(f"{f}~{r}"), scale)) for f, hr in val]
    return out
