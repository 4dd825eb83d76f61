"""How long `kernels.prepare` takes outside a jit: the whole tree as one jitted program vs per layer
(`prepare(..., per_layer_jit=True)`: a jitted `prepare_weight` compiled once per distinct layer).

A DiT4SR of the full width with --blocks transformer blocks (random weights, `common.random_params`) is quantized
with --preset (random calibration statistics, `common.random_calib`) and prepared as the sampler's --mode
prepares it; both ways must give the same tree leaf for leaf. The benchmarks prepare their trees this way once per
device call (`step_latency.py`): on an H100 a full-size W4A4 tree as one program took ~70 s to compile
(benchmarks/RESULTS.md 2026-12-07 22:50).

  python benchmarks/prepare_time.py --blocks 4            # CPU: ~3 min, most of it the quantization
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import environment, random_calib, random_params, write_json  # noqa: E402


def main(argv=None):
    from qdit4sr_jax.config import ModelConfig
    from qdit4sr_jax.quant.api import quantize
    from qdit4sr_jax.quant.config import QuantConfig
    from qdit4sr_jax.quant.kernels import prepare, with_execution
    from qdit4sr_jax.quant.kernels.merged import merge_tree
    from qdit4sr_jax.quant.kernels.prepared import SAMPLER_MODES
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--preset", default="qdit4sr-paper-w4a4-small")
    ap.add_argument("--mode", default="fast-mosaic-separate", choices=sorted(SAMPLER_MODES))
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    cfg = ModelConfig.preset("dit4sr").replace(num_layers=a.blocks, dtype="bfloat16", param_dtype="bfloat16",
                                               dual_attention_layers=tuple(range(min(a.blocks, 13))))
    params = random_params(cfg)
    qcfg = QuantConfig.preset(a.preset).replace(execution="int")
    t0 = time.perf_counter()
    q = jax.block_until_ready(quantize(params, qcfg, random_calib(params, qcfg, 40)))
    res = {"env": environment(), "blocks": a.blocks, "preset": a.preset, "mode": a.mode,
           "quantize_s": time.perf_counter() - t0}
    kw = SAMPLER_MODES[a.mode]
    tree = with_execution(q, "fused")
    tree = merge_tree(tree) if kw.get("merge") else tree
    t0 = time.perf_counter()
    whole = jax.block_until_ready(jax.jit(lambda t: prepare(t, **kw))(tree))
    res["whole_jit_s"] = time.perf_counter() - t0
    for key in ("per_layer_s", "per_layer_again_s"):
        t0 = time.perf_counter()
        per_layer = jax.block_until_ready(prepare(tree, **kw, per_layer_jit=True))
        res[key] = time.perf_counter() - t0
    a_, b_ = jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(per_layer)
    res["same"] = len(a_) == len(b_) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a_, b_))
    print(f"{a.blocks} blocks, {a.preset}, {a.mode}: quantize {res['quantize_s']:.1f} s; prepare as one jit "
          f"{res['whole_jit_s']:.1f} s, per layer {res['per_layer_s']:.1f} s (again {res['per_layer_again_s']:.1f} s); "
          f"same tree: {res['same']} (jax {jax.__version__}, {jax.default_backend()})")
    if a.out:
        write_json(a.out, res)
    return res


if __name__ == "__main__":
    main()
