"""Stored weight bytes of a quantized full-size DiT4SR transformer, counted without computing it (CPU, seconds).

Every selected linear's node is built by `jax.eval_shape` of the Q-DiT4SR quantize programs themselves
(`quant.qdit4sr._branches_program` -> factor shapes, `_residual_program` at the layer's weight bits ->
node arrays incl. b-bit packed codes, `_finish_node` -> the QuantizedWeight), then put into the tree like
`quantize` does; the total is `common.tree_bytes` of that abstract tree, i.e. the bytes a real quantize
stores (step_latency.py prints the same count from the real tree on the GPU), and the bytes of the same tree
`kernels.prepare`d for a sampling run (unpacked or still packed codes). The bf16 baseline is the
float tree in bf16 (step_latency.py's `param_dtype="bfloat16"`).

Weight bits per layer (`--alloc`):
  uniform         every layer at the preset's w_bits (4). With codes stored at exactly b bits each, this is
                  an upper bound of the code bytes of any VaSMP allocation that meets the average-bits budget
                  (sum n_l b_l <= 4 sum n_l; every DiT4SR K is a multiple of 8, so no run padding).
  hist            `--hist 3:24,5:29` (the rest at w_bits), given by `--assign`: "largest" (the listed widths,
                  lowest first, to the largest layers) or "smallest"; the mean bits per weight is printed.
  FILE.json       {module path: bits} of a real allocation (e.g. quantize(..., return_info=True)[1]["w_bits"]).
For comparison the code bytes are also given in the storage before b-bit packing (<= 4 bits as nibbles,
5..7 bits as int8).

  python benchmarks/weight_memory.py                                   # uniform 4 bits, qdit4sr-w4a4-fast
  python benchmarks/weight_memory.py --alloc hist --hist 3:24,5:29 --assign largest
  python benchmarks/weight_memory.py --unpack-time        # + device time of codes() per width (GPU check)
  python benchmarks/weight_memory.py --preset qdit4sr-w4a4-small       # int8 branch factors (lowrank_bits=8)
  python benchmarks/weight_memory.py --lowrank-bits 8                  # the same: override the preset's value

`--unpack-time` times `QuantizedWeight.codes()` (packed storage -> int8 codes, the per-call unpack of the
int / fused-xla / Pallas unpack="xla" paths) of the DiT4SR layer shapes at 2..8 bits on the default device.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import compile_and_time, environment, tree_bytes, weight_breakdown, write_json  # noqa: E402

from qdit4sr_jax.config import ModelConfig  # noqa: E402
from qdit4sr_jax.model.dit4sr import param_shapes  # noqa: E402
from qdit4sr_jax.quant import qdit4sr as Q  # noqa: E402
from qdit4sr_jax.quant import quantizer as qz  # noqa: E402
from qdit4sr_jax.quant import rules  # noqa: E402
from qdit4sr_jax.quant.api import layer_spec  # noqa: E402
from qdit4sr_jax.quant.config import QuantConfig  # noqa: E402
from qdit4sr_jax.quant.qweight import QuantizedWeight  # noqa: E402


def abstract_params(model, dtype: str = "bfloat16"):
    """ShapeDtypeStruct tree of the model's params (a preset name or a ModelConfig) with float leaves in `dtype`."""
    def cast(s):
        dt = jnp.dtype(dtype) if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype
        return jax.ShapeDtypeStruct(s.shape, dt)
    cfg = model if isinstance(model, ModelConfig) else ModelConfig.preset(model)
    return jax.tree_util.tree_map(cast, param_shapes(cfg))


def _kernel(tree, path):
    for key in path:
        tree = tree[key]
    return tree["kernel"]


def abstract_node(cfg: QuantConfig, shape, dtype, bits: int, steps: int) -> QuantizedWeight:
    """The QuantizedWeight (ShapeDtypeStruct arrays) that Q-DiT4SR's quantize stores for a kernel [K, N]
    at `bits`, from eval_shape of its pass-1 and pass-2 programs."""
    k, n = shape
    spec0 = layer_spec(cfg, shape, dtype, 8)
    bspec = Q.branch_spec(cfg, shape, spec0, measured=False)      # the factors do not depend on `measured`
    ws = (jax.ShapeDtypeStruct(shape, dtype),)
    chs = (jax.ShapeDtypeStruct((k,), jnp.float32),) if spec0.smooth else None
    facs = jax.eval_shape(lambda ws, chs: Q._branches_program(ws, chs, bspec), ws, chs)[0]
    a_default = None if cfg.a_bits is None else int(round(cfg.a_bits))
    spec = dataclasses.replace(spec0, a_bits=a_default)
    idx = jax.ShapeDtypeStruct((1,), jnp.int32)
    arrays = jax.eval_shape(lambda ws, chs, facs, idx: Q._residual_program(ws, chs, facs, idx, spec, bspec, (bits,)),
                            ws, chs, facs, idx)[0]
    (_, temps), = Q._bits_classes([bits], (n, k), spec, bspec, facs[0], k).values()
    sched = np.full((steps,), a_default, np.int32) if (cfg.vatmp and a_default is not None) else None
    node = Q._finish_node(temps[bits], arrays, bits, spec.pack, sched)
    if node.a_schedule is not None:
        node = node.replace(a_schedule=jax.ShapeDtypeStruct(node.a_schedule.shape, node.a_schedule.dtype))
    return node


def abstract_tree(params, cfg: QuantConfig, paths, bits, steps: int):
    """The abstract params tree with the kernel at each of `paths` replaced by its `abstract_node` at
    `bits[i]` (one node per distinct (shape, dtype, bits)) -> (tree, nodes in the order of paths)."""
    cache, nodes = {}, []
    for p, b in zip(paths, bits):
        kern = _kernel(params, p)
        key = (tuple(kern.shape), str(kern.dtype), b)
        if key not in cache:
            cache[key] = abstract_node(cfg, key[0], kern.dtype, b, steps)
        nodes.append(cache[key])
    return rules.replace_kernels(params, dict(zip(paths, nodes))), nodes


def allocation(names, sizes, cfg, alloc: str, hist: str, assign: str):
    """{module path: bits} for `--alloc`."""
    base = int(round(cfg.w_bits))
    if alloc == "uniform":
        return {nm: base for nm in names}
    if alloc == "hist":
        counts = {int(b): int(c) for b, c in (kv.split(":") for kv in hist.split(","))}
        if sum(counts.values()) > len(names):
            raise ValueError(f"--hist {hist} lists {sum(counts.values())} layers, the model has {len(names)}")
        order = sorted(range(len(names)), key=lambda i: (-sizes[i] if assign == "largest" else sizes[i], i))
        out, pos = {nm: base for nm in names}, 0
        for b in sorted(counts):
            for i in order[pos: pos + counts[b]]:
                out[names[i]] = b
            pos += counts[b]
        return out
    with open(alloc) as f:
        table = {str(k): int(v) for k, v in json.load(f).items()}
    missing = sorted(set(names) - set(table))
    if missing:
        raise ValueError(f"{alloc}: no bits for {len(missing)} selected layers, e.g. {missing[:3]}")
    return {nm: table[nm] for nm in names}


def old_code_bytes(node: QuantizedWeight) -> int:
    """Code bytes in the storage before b-bit packing: nibbles for <= 4 bits, int8 for 5..8 bits."""
    rows = int(np.prod(node.qvalue.shape[:-1]))
    last = node.k if node.layout == "nk" else node.groups[1]
    return rows * (-(-last // 2) if node.w_bits <= 4 else last)


def measure(model="dit4sr", preset="qdit4sr-w4a4-fast", alloc="uniform", hist="3:24,5:29",
            assign="largest", steps=40, lowrank_bits="preset") -> dict:
    """lowrank_bits: "preset" keeps the preset's `QuantConfig.lowrank_bits`, else None / 8 overrides it."""
    cfg = QuantConfig.preset(preset)
    if lowrank_bits != "preset":
        cfg = cfg.replace(lowrank_bits=lowrank_bits).validate()
    params = abstract_params(model)
    paths = rules.select_linears(params, cfg.include, cfg.exclude)
    names = [rules.path_str(p) for p in paths]
    sizes = [int(np.prod(_kernel(params, p).shape)) for p in paths]
    bits = allocation(names, sizes, cfg, alloc, hist, assign)
    q, nodes = abstract_tree(params, cfg, paths, [bits[nm] for nm in names], steps)
    bf16, total = tree_bytes(params), tree_bytes(q)
    from qdit4sr_jax.quant.kernels import prepare, with_execution
    fused = with_execution(q, "fused")
    prepared = {u: tree_bytes(jax.eval_shape(lambda t, u=u: prepare(t, unpack=u), fused)) for u in (True, False)}
    old_codes = sum(old_code_bytes(n) for n in nodes)
    parts = weight_breakdown(q)
    hist_out = {}
    for nm in names:
        hist_out[bits[nm]] = hist_out.get(bits[nm], 0) + 1
    return {"model": model, "preset": preset, "lowrank_bits": cfg.lowrank_bits, "alloc": alloc, "assign": assign if alloc == "hist" else None,
            "layers": len(names), "bits_histogram": dict(sorted(hist_out.items())),
            "mean_w_bits": float(np.dot([bits[nm] for nm in names], sizes) / np.sum(sizes)),
            "bf16_bytes": bf16, "quantized_bytes": total, "ratio": bf16 / total,
            "breakdown": parts, "codes_bytes_before_bbit": old_codes,
            "quantized_bytes_before_bbit": total - parts["qvalue"] + old_codes,
            "ratio_before_bbit": bf16 / (total - parts["qvalue"] + old_codes),
            "bytes_for_target_3.5": bf16 / 3.5,
            "prepared_bytes": prepared[True], "prepared_packed_bytes": prepared[False]}


UNPACK_SHAPES = ((1536, 1536), (1536, 6144), (6144, 1536))     # Flax kernels [K, N] of the DiT4SR linears


def unpack_times(bits_list=(2, 3, 4, 5, 6, 7, 8), shapes=UNPACK_SHAPES, iters: int = 20) -> list:
    """Median device ms of jit(node.codes()) for per-channel ("nk") nodes of random codes, per (shape, bits)."""
    from qdit4sr_jax.quant.qweight import packs
    rows = []
    for k, n in shapes:
        for b in bits_list:
            lo, hi = -2 ** (b - 1) + 1, 2 ** (b - 1) - 1
            q = jax.random.randint(jax.random.PRNGKey(b), (n, k), lo, hi + 1, jnp.int8)
            stored = qz.pack_codes(q, b) if packs(b) else q
            node = QuantizedWeight(qvalue=stored, scale=jnp.ones((n, 1), jnp.float32), shape=(k, n), w_bits=b,
                                   packed=packs(b))
            fn = jax.jit(lambda nd: nd.codes())
            ok = bool(jnp.array_equal(fn(node), q))
            t = compile_and_time(fn, (node,), warmup=3, iters=iters)
            rows.append({"k": k, "n": n, "bits": b, "stored_bytes": int(stored.nbytes), "exact": ok,
                         "median_ms": t["median_ms"], "p10_ms": t["p10_ms"], "p90_ms": t["p90_ms"]})
            print(f"  unpack [{n}, {k}] {b} bits: {stored.nbytes / 2**20:7.2f} MiB stored, "
                  f"{t['median_ms']:.4f} ms (p10 {t['p10_ms']:.4f}, p90 {t['p90_ms']:.4f}), exact {ok}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dit4sr")
    ap.add_argument("--preset", default="qdit4sr-w4a4-fast")
    ap.add_argument("--alloc", default="uniform", help="uniform | hist | FILE.json ({module path: bits})")
    ap.add_argument("--hist", default="3:24,5:29", help="with --alloc hist: bits:count,... (rest at w_bits)")
    ap.add_argument("--assign", default="largest", choices=("largest", "smallest"))
    ap.add_argument("--steps", type=int, default=40, help="VaTMP schedule length (int32 per layer)")
    ap.add_argument("--unpack-time", action="store_true", help="also time codes() per width on the device")
    ap.add_argument("--lowrank-bits", default="preset", choices=("preset", "none", "8"),
                    help="storage of the branch factors: the preset's (default), none (branch_dtype) or 8 (int8)")
    ap.add_argument("--out", default=None, help="write the result as JSON")
    a = ap.parse_args(argv)
    lb = {"preset": "preset", "none": None, "8": 8}[a.lowrank_bits]
    r = measure(a.model, a.preset, a.alloc, a.hist, a.assign, a.steps, lb)
    gb = lambda b: f"{b / 1e9:.3f} GB"
    print(f"{r['model']} / {r['preset']} (lowrank_bits {r['lowrank_bits']}): {r['layers']} quantized linears, bits {r['bits_histogram']} "
          f"(alloc {r['alloc']}{'' if r['assign'] is None else ', ' + r['assign']}; mean {r['mean_w_bits']:.4f} "
          f"bits per weight)")
    print(f"  bf16 weights        {gb(r['bf16_bytes'])}")
    print(f"  quantized weights   {gb(r['quantized_bytes'])}  = 1/{r['ratio']:.3f} of bf16 "
          f"(target 1/3.5: <= {gb(r['bytes_for_target_3.5'])}, "
          f"{'met' if r['ratio'] >= 3.5 else 'missed by ' + gb(r['quantized_bytes'] - r['bytes_for_target_3.5'])})")
    print(f"  prepared for a run   {gb(r['prepared_bytes'])}  = 1/{r['bf16_bytes'] / r['prepared_bytes']:.3f} "
          f"(kernels.prepare, as sampling.sample holds them: int8 codes, float branches in kernel layout); codes kept packed "
          f"{gb(r['prepared_packed_bytes'])} = 1/{r['bf16_bytes'] / r['prepared_packed_bytes']:.3f}")
    print(f"  before b-bit packing {gb(r['quantized_bytes_before_bbit'])}  = 1/{r['ratio_before_bbit']:.3f} "
          f"(codes {gb(r['codes_bytes_before_bbit'])})")
    labels = {"qvalue": "codes", "lr_a": "low-rank lr_a", "lr_b": "low-rank lr_b", "block_u": "block u",
              "block_v": "block v", "scale": "scales", "gscale": "int group factors", "smooth": "smoothing",
              "a_schedule": "VaTMP schedules", "zero": "zero points", "other": "unquantized params",
              "lr_a_scale": "lr_a scales", "lr_b_scale": "lr_b scales", "block_u_scale": "block u scales",
              "block_v_scale": "block v scales"}
    for f, b in sorted(r["breakdown"].items(), key=lambda kv: -kv[1]):
        print(f"    {labels.get(f, f):20s} {gb(b)}")
    if a.unpack_time:
        print(f"codes() unpack on {environment()['device']}:")
        r["unpack"] = unpack_times()
        r["environment"] = environment()
    write_json(a.out, r)
    return r


if __name__ == "__main__":
    main()
