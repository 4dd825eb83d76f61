"""Shared helpers of the GPU benchmarks: random full-size params made on the device, random calibration
statistics, timing of compiled functions, memory figures, environment description.

Run from the repository root (`python benchmarks/<script>.py`); the scripts add the root to sys.path.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from functools import partial
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np


def environment() -> dict:
    """Device, JAX version and host facts for the results record."""
    d = jax.devices()[0]
    return {"jax": jax.__version__, "backend": jax.default_backend(), "device": getattr(d, "device_kind", str(d)),
            "n_devices": jax.device_count(), "python": platform.python_version(),
            "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


@partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _draw(key, shape, dtype, kind, std):
    if kind == "ones":
        return jnp.ones(shape, dtype)
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


def random_params(model_cfg, seed: int = 0):
    """Params of `model_cfg` with random values of the real shapes, drawn directly on the default device in
    the config's param dtype: kernels N(0, 1/fan_in) (the zero-initialised control projections too, so
    that every layer has a non-trivial weight), norm scales 1, biases and embeddings N(0, 0.02^2)."""
    from qdit4sr_jax.model.dit4sr import param_shapes
    shapes = param_shapes(model_cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    base = jax.random.PRNGKey(seed)
    out = []
    for i, (path, s) in enumerate(flat):
        name = str(getattr(path[-1], "key", path[-1]))
        shape, dtype = tuple(s.shape), jnp.dtype(s.dtype)
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            if len(shape) == 4 and shape[2] == 1:           # depthwise conv [3, 3, 1, C]
                fan_in = shape[0] * shape[1]
            out.append(_draw(jax.random.fold_in(base, i), shape, dtype, "normal", float(1.0 / math.sqrt(fan_in))))
        elif name == "scale":
            out.append(_draw(base, shape, dtype, "ones", 1.0))
        else:
            out.append(_draw(jax.random.fold_in(base, i), shape, dtype, "normal", 0.02))
    return jax.tree_util.tree_unflatten(treedef, out)


def random_calib(params, quant_cfg, steps: int, seed: int = 0) -> Dict[str, dict]:
    """Random calibration statistics ({module path: {"var": [T], "absmax": [T], "ch_absmax": [T, K],
    "tok_var": [T]}}) for every linear `quant_cfg` selects: log-normal per-layer scale times a smooth
    per-step profile (what VaTMP needs: given statistics instead of a calibration run). Layers that read one input
    (`quant.kernels.prepared.SHARED_INPUTS`: to_q / to_k / to_v, add_*_proj) get the same statistics, as a real
    calibration gives them (their VaTMP schedules are then equal, as in use)."""
    from qdit4sr_jax.quant import rules
    from qdit4sr_jax.quant.kernels.prepared import SHARED_INPUTS
    group_of = {m: g for g, members in SHARED_INPUTS.items() for m in members}
    rng = np.random.default_rng(seed)
    out = {}
    t = np.linspace(0.0, 1.0, steps)
    first = {}                                    # (parent path, group) -> the stats of its first member
    for path in rules.select_linears(params, quant_cfg.include, quant_cfg.exclude):
        name = rules.path_str(path)
        key = (tuple(path[:-1]), group_of.get(path[-1]))
        if key[1] is not None and key in first:
            out[name] = first[key]
            continue
        node = params
        for k in path:
            node = node[k]
        kdim = node["kernel"].shape[0]
        level = np.exp(rng.normal(0.0, 1.0))
        prof = np.exp(rng.normal(0.0, 0.5) * t + rng.normal(0.0, 0.3) * np.sin(3 * t + rng.uniform(0, 6)))
        var = (level * prof).astype(np.float32)
        ch = (np.sqrt(var)[:, None] * np.exp(rng.normal(0.0, 0.5, size=(1, kdim))) * 4).astype(np.float32)
        out[name] = {"var": var, "absmax": ch.max(axis=1), "ch_absmax": ch, "tok_var": var * 0.9}
        if key[1] is not None:
            first[key] = out[name]
    return out


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of a pytree (QuantizedWeight nodes count their arrays)."""
    return int(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)
                   if hasattr(x, "shape")))


def weight_breakdown(tree) -> dict:
    """Bytes of a params tree by kind: {QuantizedWeight array field: bytes summed over the nodes, "other":
    every other leaf (unquantized parameters)}; the values sum to `tree_bytes(tree)`. Works on
    arrays and on `jax.eval_shape` trees (ShapeDtypeStruct leaves)."""
    from qdit4sr_jax.quant.qweight import ARRAY_FIELDS, QuantizedWeight
    out = {"other": 0}
    is_q = lambda x: isinstance(x, QuantizedWeight)
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_q):
        if is_q(leaf):
            for f in ARRAY_FIELDS:
                a = getattr(leaf, f)
                if a is not None:
                    out[f] = out.get(f, 0) + int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
        elif hasattr(leaf, "shape"):
            out["other"] += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    return out


def device_bytes_in_use() -> Optional[int]:
    st = jax.devices()[0].memory_stats()
    return None if not st else int(st.get("bytes_in_use", 0))


def device_peak_bytes() -> Optional[int]:
    st = jax.devices()[0].memory_stats()
    return None if not st else int(st.get("peak_bytes_in_use", 0))


def block(x):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def compile_and_time(fn: Callable, args, *, warmup: int = 3, iters: int = 20, budget_s: Optional[float] = None):
    """Lower + compile `fn` (a jitted function) on `args` (timed separately), then run it `warmup` times and
    time `iters` runs, each ended by block_until_ready (host clock). Returns a dict of figures (ms, bytes).
    budget_s caps the timed loop's wall time (fewer iterations, never fewer than 3)."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = {}
    try:
        ma = compiled.memory_analysis()
        if ma is not None:
            mem = {"arg_bytes": int(ma.argument_size_in_bytes), "out_bytes": int(ma.output_size_in_bytes),
                   "temp_bytes": int(ma.temp_size_in_bytes)}
    except Exception as e:                                # memory_analysis is best-effort on some backends
        mem = {"memory_analysis_error": repr(e)[:200]}
    t0 = time.perf_counter()
    for _ in range(warmup):
        block(compiled(*args))
    first_s = (time.perf_counter() - t0) / max(warmup, 1)
    times = []
    start = time.perf_counter()
    for i in range(iters):
        t0 = time.perf_counter()
        block(compiled(*args))
        times.append((time.perf_counter() - t0) * 1e3)
        if budget_s is not None and i >= 2 and time.perf_counter() - start > budget_s:
            break
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(round(p * (len(times) - 1))))]
    return {"median_ms": statistics.median(times), "p10_ms": q(0.1), "p90_ms": q(0.9), "min_ms": times[0],
            "max_ms": times[-1], "n": len(times), "compile_s": compile_s, "warmup_ms": first_s * 1e3, **mem}


class CompileTimer:
    """Sums JAX's compile-duration events (tracing, lowering, XLA backend compile) inside a `with` block."""
    EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
              "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
              "/jax/core/compile/backend_compile_duration": "backend_compile_s"}

    def __init__(self):
        self.totals = {v: 0.0 for v in self.EVENTS.values()}
        self.count = 0

    def _cb(self, event, duration, **kw):
        if event in self.EVENTS:
            self.totals[self.EVENTS[event]] += float(duration)
            self.count += event.endswith("backend_compile_duration")

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._cb)
        return self

    def __exit__(self, *exc):
        from jax._src import monitoring
        try:
            monitoring.unregister_event_duration_listener(self._cb)
        except Exception:
            pass
        return False

    def summary(self) -> dict:
        return {**self.totals, "compiles": self.count}


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 (host arrays; b all zero counts as norm 1e-30)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def write_json(path: Optional[str], obj) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def gib(b) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


def add_prologue_args(ap):
    """--codes-in-kernel / --run-tile: the Mosaic prologue's settings for the prepbfh modes (`apply_prologue_args`)."""
    ap.add_argument("--codes-in-kernel", type=int, nargs="+", default=None, metavar="RUN",
                    help="prologue_mosaic.CODES_IN_KERNEL for the prepbfh modes: the Hadamard plan run lengths whose "
                         "codes the Mosaic kernel makes (64 128: K = 1536 too; check with mosaic_fused_check.py first)")
    ap.add_argument("--run-tile", type=int, default=None,
                    help="prologue_mosaic.RUN_TILE (8: K = 1536 run maxima reduced in the Mosaic GEMM's epilogue)")
    ap.add_argument("--hadamard-run", nargs="+", default=None, metavar="K=RUN",
                    help="mosaic_hadamard.RUN_LENGTH entries, e.g. 1536=128: the Hadamard kernel's run length at K "
                         "(128 at K = 1536: 4 rows of x per tile instead of 2)")


def apply_prologue_args(a):
    """Set `prologue_mosaic.CODES_IN_KERNEL` / `RUN_TILE` and `mosaic_hadamard.RUN_LENGTH` from `add_prologue_args`'
    options (read when a step is traced)."""
    from qdit4sr_jax.quant.kernels import mosaic_hadamard, prologue_mosaic
    for item in a.hadamard_run or ():
        k, _, run = item.partition("=")
        if not (k.isdigit() and run.isdigit()) or mosaic_hadamard.hadamard_plan(int(k), int(run)) is None:
            raise SystemExit(f"--hadamard-run {item!r}: K=RUN with a Hadamard plan of runs RUN (64 or 128) at K")
        mosaic_hadamard.RUN_LENGTH[int(k)] = int(run)
    if a.codes_in_kernel:
        prologue_mosaic.CODES_IN_KERNEL = tuple(a.codes_in_kernel)
    if a.run_tile:
        prologue_mosaic.RUN_TILE = a.run_tile
