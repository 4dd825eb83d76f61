"""Wall time of the Q-DiT4SR quantization of the full-size DiT4SR transformer on the accelerator.

1. `quantize(params, "qdit4sr-w4a4", calib)`: H-SVD branches + VaSMP weight bits + residual quantization
   + VaTMP activation schedules from given (random) statistics over the default 40 steps. Timed twice:
   cold (includes the jit compilations) and warm (same shapes, compiled).
2. The two allocators alone on the full model's layers: VaSMP (from the residual variances of step 1)
   and VaTMP's DP (all layers x 40 steps).
3. Calibration of one 512x512 image over the default sampler (40 steps, CFG 8 = batch 2), collecting
   every linear's input statistics (`qdit4sr_jax.calibrate(model_cfg, ...)`), cold and warm.

4. With --compile-cache DIR (after steps 1-2, before 3): two child processes each quantize once with
   JAX's persistent compilation cache in a fresh directory under DIR: the first starts from an empty
   cache (cold, writing it), the second reads it (warm cache). The in-process cold number of step 1
   never uses the cache (it is the one the target is about).

Compiled programs are counted (JAX's backend-compile events) and listed by name in the JSON.
--phases (default: the warm run, or the cold one with --no-warm) records wall seconds per phase of one
quantize run (`quantize_qdit4sr(timings=...)`: layer setup, pass 1 per layer shape = H-SVD + VaSMP's
squared errors, VaSMP, VaTMP, pass 2 per shape, node assembly, tree rebuild; XLA compile seconds per
phase), printed as a table and stored as quantize_<run>_phases. The timed run waits for each phase's
device work, so host and device work no longer overlap in it: compare its total with the untimed run.

  python benchmarks/quantize_time.py --out $OUT/quantize_time.json
  python benchmarks/quantize_time.py --calib-size 0 --out $OUT/qt.json      # cold untimed, warm by phase
  python benchmarks/quantize_time.py --calib-size 0 --compile-cache /tmp/jaxcache --deadline 170 --out $OUT/qt.json
  python benchmarks/quantize_time.py --preset tiny --calib-size 64      # CPU smoke test
  OMP_NUM_THREADS=2 JAX_PLATFORMS=cpu python benchmarks/quantize_time.py --num-layers 2 --calib-size 0 --no-warm
      # CPU: full width, 2 blocks (block 0 dual-attention)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import CompileTimer, environment, gib, random_calib, random_params, tree_bytes, write_json  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dit4sr")
    ap.add_argument("--quant", default="qdit4sr-w4a4")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, 40)")
    ap.add_argument("--calib-size", type=int, default=512, help="output size of the calibration image (0: skip)")
    ap.add_argument("--no-warm", action="store_true", help="skip the warm repeats")
    ap.add_argument("--num-layers", type=int, default=None,
                    help="override the model's block count (full width, fewer blocks: CPU measurements); "
                         "dual attention stays on blocks < 13 that exist")
    ap.add_argument("--compile-cache", default=None, metavar="DIR",
                    help="also time two child processes with JAX's persistent compilation cache in a fresh "
                         "directory under DIR: empty cache (cold, writes it), then warm cache")
    ap.add_argument("--use-cache", default=None, metavar="DIR", help=argparse.SUPPRESS)   # child mode
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds: skip the cache children / calibration once this much time has passed")
    ap.add_argument("--phases", default="auto", choices=("auto", "cold", "warm", "all", "none"),
                    help="which quantize run records wall seconds per phase (quantize_qdit4sr(timings=...); "
                         "waits for each phase's device work, so host and device no longer overlap): auto = "
                         "the warm run when there is one (the cold figure stays untimed), else the cold run")
    ap.add_argument("--xla-autotune", type=int, default=None, metavar="LEVEL",
                    help="XLA:GPU autotune level for the quantize programs (qdit4sr.GPU_COMPILER_OPTIONS; default: "
                         "the module's, 0 = no autotuning); -1: XLA's default (autotuning on)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t_start:7.1f}s] {s}", flush=True)
    res = {"args": vars(a), "notes": []}
    if a.use_cache:                                   # child: the cache is on before any compilation
        from qdit4sr_jax.quant.api import enable_compilation_cache
        enable_compilation_cache(a.use_cache)
    from qdit4sr_jax.config import ModelConfig
    from qdit4sr_jax.quant import rules
    from qdit4sr_jax.quant.config import QuantConfig
    from qdit4sr_jax.quant.qdit4sr import quantize_qdit4sr
    from qdit4sr_jax.quant.timing import format_phases
    from qdit4sr_jax.quant.vasmp import allocate_weight_bits
    from qdit4sr_jax.quant.vatmp import schedule_activation_bits

    from qdit4sr_jax.quant import qdit4sr as Q
    if a.xla_autotune is not None:
        Q.GPU_COMPILER_OPTIONS = {} if a.xla_autotune < 0 else {"xla_gpu_autotune_level": int(a.xla_autotune)}
    res["compiler_options"] = {"options": dict(Q.GPU_COMPILER_OPTIONS), "backends": list(Q.COMPILER_OPTIONS_BACKENDS)}
    attn = "cudnn" if jax.default_backend() == "gpu" else None
    mcfg = ModelConfig.preset(a.preset).replace(dtype="bfloat16", param_dtype="bfloat16", attention_impl=attn)
    if a.num_layers:
        mcfg = mcfg.replace(num_layers=a.num_layers,
                            dual_attention_layers=tuple(i for i in mcfg.dual_attention_layers if i < a.num_layers))
    steps = a.steps or mcfg.num_steps
    qcfg = QuantConfig.preset(a.quant)
    res["env"] = environment()
    log(f"env {res['env']}")
    params = random_params(mcfg)
    jax.block_until_ready(jax.tree_util.tree_leaves(params))
    n_lin = len(rules.select_linears(params, qcfg.include, qcfg.exclude))
    res.update(n_linears=n_lin, bf16_weight_bytes=tree_bytes(params))
    log(f"params {gib(res['bf16_weight_bytes'])} GiB, {n_lin} quantized linears")
    calib = random_calib(params, qcfg, steps)

    # ---- 1. quantize
    runs = ["cold"] + ([] if a.no_warm else ["warm"])
    timed = {"auto": {runs[-1]}, "cold": {"cold"}, "warm": {"warm"}, "all": set(runs), "none": set()}[a.phases]
    info = None
    for kind in runs:
        tim = {} if kind in timed else None
        t0 = time.perf_counter()
        hits = [0]
        on_hit = lambda event, **kw: hits.__setitem__(0, hits[0] + (event == "/jax/compilation_cache/cache_hits"))
        jax.monitoring.register_event_listener(on_hit)
        with CompileTimer() as ct, ProgramLog() as pl:
            q, info = quantize_qdit4sr(params, qcfg, calib, return_info=True, timings=tim)
            jax.block_until_ready(jax.tree_util.tree_leaves(q))
        res[f"quantize_{kind}_s"] = time.perf_counter() - t0
        res[f"quantize_{kind}_compile"] = dict(ct.summary(), persistent_cache_hits=hits[0])
        try:
            from jax._src import monitoring as _mon
            _mon.unregister_event_listener(on_hit)
        except Exception:
            pass
        res[f"quantize_{kind}_programs"] = pl.summary()
        if tim is not None:
            res[f"quantize_{kind}_phases"] = tim
            log(f"quantize ({kind}) phases (timed run: each phase waits for its device work):\n{format_phases(tim)}")
        res["quantized_weight_bytes"] = tree_bytes(q)
        log(f"quantize ({kind}) {res[f'quantize_{kind}_s']:.2f} s ({ct.summary()}), weights {gib(res['quantized_weight_bytes'])} GiB "
            f"(1/{res['bf16_weight_bytes'] / res['quantized_weight_bytes']:.2f} of bf16)")
        del q
    bits = np.array(list(info["w_bits"].values()))
    sizes = np.array([info["size"][k] for k in info["w_bits"]])
    res["w_bits_hist"] = {int(b): int(c) for b, c in zip(*np.unique(bits, return_counts=True))}
    res["w_bits_avg"] = float((bits * sizes).sum() / sizes.sum())

    # ---- 2. the allocators alone
    order = list(info["residual_var"])
    var = [info["residual_var"][k] for k in order]
    sz = np.array([info["size"][k] for k in order], np.int64)
    t0 = time.perf_counter()
    allocate_weight_bits(var, sz, qcfg.w_bits, qcfg.w_bit_candidates)
    res["vasmp_s"] = time.perf_counter() - t0
    av = np.stack([np.asarray(calib[k]["var"], np.float64) for k in order])
    t0 = time.perf_counter()
    sched = schedule_activation_bits(av, qcfg.a_bits, qcfg.a_bit_candidates)
    res["vatmp_s"] = time.perf_counter() - t0
    res["vatmp_shape"] = list(av.shape)
    res["a_bits_avg"] = float(sched.mean())
    log(f"VaSMP {res['vasmp_s'] * 1e3:.1f} ms, VaTMP DP {res['vatmp_s'] * 1e3:.1f} ms for {av.shape} (layers x steps)")
    write_json(a.out, res)
    if a.use_cache:                                   # child: step 1 only
        return res
    if a.compile_cache:                               # ---- 4. new processes, persistent cache cold / warm
        res["compile_cache"] = _cache_children(a, log, t_start)
        write_json(a.out, res)

    # ---- 3. calibration over the sampler
    if a.calib_size and not (a.deadline and time.perf_counter() - t_start > a.deadline):
        from qdit4sr_jax.quant.calibrate import calibrate_sampler
        lat = a.calib_size // mcfg.vae.downsample
        k = jax.random.split(jax.random.PRNGKey(1), 4)
        shp = (1, lat, lat, mcfg.in_channels)
        lr, noise = jax.random.normal(k[0], shp), jax.random.normal(k[1], shp)
        ctx = jax.random.normal(k[2], (1, mcfg.context_len, mcfg.joint_attention_dim)) * 0.5
        pooled = jax.random.normal(k[3], (1, mcfg.pooled_projection_dim)) * 0.5
        kw = dict(context=ctx, pooled=pooled, neg_context=ctx * 0.1, neg_pooled=pooled * 0.1, num_steps=steps)
        if mcfg.guidance_scale == 1.0:
            kw.pop("neg_context"), kw.pop("neg_pooled")
        for kind in runs:
            try:
                t0 = time.perf_counter()
                st = calibrate_sampler(mcfg, params, lr, noise, **kw)
                jax.block_until_ready(jax.tree_util.tree_leaves(st))
                res[f"calibrate_{kind}_s"] = time.perf_counter() - t0
                res["calibrated_layers"] = len(st)
                log(f"calibration ({kind}) {a.calib_size}px x {steps} steps: {res[f'calibrate_{kind}_s']:.2f} s, "
                    f"{len(st)} layers")
            except Exception as e:
                res["notes"].append(f"calibration failed: {e!r}"[:400])
                log(res["notes"][-1])
                break
    write_json(a.out, res)
    print(f"\n{res['env']['device']}  jax {res['env']['jax']}  {a.preset} / {a.quant}")
    print("| what | seconds |\n|---|---|")
    for key in ("quantize_cold_s", "quantize_warm_s", "vasmp_s", "vatmp_s", "calibrate_cold_s", "calibrate_warm_s"):
        if key in res:
            extra = ""
            if f"{key[:-2]}_compile" in res:
                c = res[f"{key[:-2]}_compile"]
                extra = f" ({c['compiles']} programs compiled, {c['backend_compile_s']:.1f} s XLA compile)"
            print(f"| {key[:-2]} | {res[key]:.3f}{extra} |")
    for kind, r in (res.get("compile_cache") or {}).items():
        if isinstance(r, dict) and "quantize_cold_s" in r:
            c = r["quantize_cold_compile"]
            print(f"| quantize, new process, {kind} | {r['quantize_cold_s']:.3f} ({c['compiles']} programs, "
                  f"{c.get('persistent_cache_hits', 0)} of them loaded from the cache; {c['backend_compile_s']:.1f} s "
                  f"compile or load) |")
    print(f"weights: bf16 {gib(res['bf16_weight_bytes'])} GiB -> {gib(res['quantized_weight_bytes'])} GiB; "
          f"avg w bits {res['w_bits_avg']:.2f} {res['w_bits_hist']}; avg a bits {res['a_bits_avg']:.2f}")
    for kind in runs:
        if f"quantize_{kind}_phases" in res:
            print(f"\nquantize ({kind}, timed by phase: {res[f'quantize_{kind}_s']:.3f} s):")
            print(format_phases(res[f"quantize_{kind}_phases"]))
    return res


class ProgramLog(logging.Handler):
    """Counts "Finished XLA compilation of <name> in <t> sec" records (jax_log_compiles) inside a `with`:
    summary() -> {program name: [count, seconds]}."""

    PAT = re.compile(r"Finished XLA compilation of (.*) in ([0-9.eE+-]+) sec")

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.by_name = {}

    def emit(self, record):
        m = self.PAT.match(record.getMessage())
        if m:
            c = self.by_name.setdefault(m.group(1), [0, 0.0])
            c[0] += 1
            c[1] += float(m.group(2))

    def __enter__(self):
        self._prev = jax.config.jax_log_compiles
        jax.config.update("jax_log_compiles", True)
        lg = logging.getLogger("jax")
        self._level = lg.level
        lg.addHandler(self)
        lg.setLevel(min(lg.level or logging.WARNING, logging.WARNING))
        return self

    def __exit__(self, *exc):
        lg = logging.getLogger("jax")
        lg.removeHandler(self)
        lg.setLevel(self._level)
        jax.config.update("jax_log_compiles", self._prev)
        return False

    def summary(self):
        return {k: [v[0], round(v[1], 3)] for k, v in sorted(self.by_name.items())}


def _cache_children(a, log, t_start):
    """Two child processes (cold then warm persistent cache, fresh directory under a.compile_cache):
    each runs step 1 once (--no-warm --calib-size 0), without preallocating device memory (this process
    still holds its share). Returns {"dir", "cold_cache": json | error, "warm_cache": json | error}."""
    root = os.path.abspath(os.path.expanduser(a.compile_cache))
    cache = os.path.join(root, f"quantize_time-{os.getpid()}-{int(time.time())}")
    os.makedirs(cache, exist_ok=True)
    out = {"dir": cache}
    base = [sys.executable, os.path.abspath(__file__), "--preset", a.preset, "--quant", a.quant, "--no-warm",
            "--calib-size", "0", "--use-cache", cache, "--phases", "none"]
    if a.xla_autotune is not None:
        base += ["--xla-autotune", str(a.xla_autotune)]
    if a.steps:
        base += ["--steps", str(a.steps)]
    if a.num_layers:
        base += ["--num-layers", str(a.num_layers)]
    for kind in ("cold_cache", "warm_cache"):
        left = None if not a.deadline else a.deadline - (time.perf_counter() - t_start)
        if left is not None and left < 30:
            out[kind] = f"skipped: deadline ({a.deadline} s) nearly reached"
            log(out[kind])
            continue
        path = os.path.join(cache, f"{kind}.json")
        t0 = time.perf_counter()
        try:
            env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
            p = subprocess.run(base + ["--out", path], capture_output=True, text=True, env=env,
                               timeout=None if left is None else max(left - 5, 20))
            if p.returncode != 0:
                raise RuntimeError(f"exit {p.returncode}: {p.stderr[-600:]}")
            with open(path) as f:
                out[kind] = json.load(f)
            out[kind]["process_s"] = time.perf_counter() - t0
            n_files = sum(len(fs) for _, _, fs in os.walk(cache))
            log(f"new process, {kind}: quantize {out[kind]['quantize_cold_s']:.2f} s "
                f"({out[kind]['quantize_cold_compile']}), process {out[kind]['process_s']:.1f} s, cache files {n_files}")
        except Exception as e:                        # one failed mode must not stop the others
            out[kind] = f"failed: {e!r}"[:800]
            log(out[kind])
    return out


if __name__ == "__main__":
    main()
