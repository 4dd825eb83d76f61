"""GPU check of the prologue kernel with the rotation inside (quant/kernels/prologue_kernel.py) at DiT4SR's shapes:
the kernel (Triton) against the XLA prologue on the same device, and the whole prepared layer against the
fake-quant reference.

    python3 benchmarks/gpu/prologue_check.py --m 8192 --k 1536 --n 1536 --out /tmp/check.json

Per case (the paper preset's layer: signs, full Hadamard, no smoothing, bf16 x; and the same with smoothing):
codes that differ from XLA's (count, largest difference: float32 rounding of differently ordered sums moves a
code by one at most), the largest relative difference of the per-token scales and of the branch features, and
the layer's relative error vs `linear(..., execution="fake")` with and without the kernel. Runs on CPU too
(the Pallas interpreter, slow: use small --m / --k there).

    python3 benchmarks/gpu/prologue_check.py --shared --m 8192 --k 1536 --n 1536

checks instead the shared down-projection of to_q / to_k / to_v (`prepared.share_inputs`, prepared "fast"): each
member's output through the GEMM kernel reading its features in place at its column offset vs the same member
prepared unshared, and both vs the fake-quant reference; on a GPU also the group's three layers per call, shared
vs per layer, and three bf16 GEMMs of the same shapes.
"""
from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))      # the repository root
sys.path.insert(0, os.path.dirname(_HERE))                       # benchmarks/ (common)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import rel_err  # noqa: E402


def _layer(k, n, smooth, seed=0, rank=32, block=256, group_scale="int"):
    from qdit4sr_jax.quant.qweight import make_qweight
    rng = np.random.default_rng(seed)
    nbo, nbi = -(-n // block), -(-k // block)
    extra = dict(lr_a=rng.normal(size=(k, rank)) / k ** 0.5, lr_b=rng.normal(size=(rank, n)) * 0.1,
                 block_u=rng.normal(size=(nbo, nbi, block)) * 0.1, block_v=rng.normal(size=(nbo, nbi, block)) / block,
                 block=(block, block))
    if smooth:
        extra["smooth"] = np.exp(rng.normal(size=k) * 0.3).astype(np.float32)
    w = jnp.asarray(rng.normal(size=(n, k)) / k ** 0.5, jnp.float32)
    return make_qweight(w, w_bits=4, group_size=64, group_scale=group_scale, a_bits=4, execution="fused", rotate=k,
                        signs=True, lowrank_bits=8, **extra)


def _input(m, k):
    """The checks' activations: bf16 [m, k], Student-t rows with one outlier channel."""
    x = np.random.default_rng(1).standard_t(5, size=(m, k)).astype(np.float32)
    x[:, 7] *= 20.0
    return jnp.asarray(x, jnp.bfloat16)


def _backend(interpret):
    """(fused_linear backend, KernelConfig or None): the Pallas interpreter with small tiles off a GPU."""
    from qdit4sr_jax.quant.kernels import KernelConfig
    if not interpret:
        return "auto", None
    return "interpret", KernelConfig(block_m=16, block_n=16, block_k=64, num_warps=4, num_stages=2)


def check(m, k, n, smooth, interpret, block=256):
    from qdit4sr_jax.quant.kernels import fused_linear, prepare_weight
    from qdit4sr_jax.quant.kernels import prologue_kernel as pk
    from qdit4sr_jax.quant.kernels.fused import prologue
    from qdit4sr_jax.quant.linear import linear
    node = _layer(k, n, smooth, block=block)
    kw = prepare_weight(node, prologue="pallas")
    if not pk.fits(kw.node, kw.bw, 0):
        return dict(case=f"K={k} smooth={smooth}", fits=False)
    x = _input(m, k)
    fields = lambda o: (o.xq, o.sx, o.dh, o.dt)
    a = dict(zip(("xq", "sx", "dh", "dt"), jax.jit(lambda x: fields(prologue(x, kw.node, 4, pad_to=16, bw=kw.bw)))(x)))
    b = dict(zip(("xq", "sx", "dh", "dt"), jax.jit(lambda x: fields(pk.pallas_prologue(
        x, kw.node, kw.bw, 4, pad_to=16, interpret=interpret)))(x)))
    d = np.abs(np.asarray(a["xq"], np.int32) - np.asarray(b["xq"], np.int32))
    out = dict(case=f"K={k} smooth={smooth}", fits=True, codes_differing=int((d > 0).sum()), codes_total=int(d.size),
               code_diff_max=int(d.max()), scale_rel_max=float(np.max(np.abs(np.asarray(a["sx"]) / np.asarray(b["sx"]) - 1))))
    for name in ("dh", "dt"):
        ga, gb = a[name], b[name]
        if ga is not None:
            out[f"{name}_rel"] = rel_err(np.asarray(gb, np.float32)[:, : ga.shape[1]], np.asarray(ga, np.float32))
    backend, cfg = _backend(interpret)
    ref = linear(x, node, None, act_bits=4, execution="fake")
    for lab, p in (("xla_prologue", "xla"), ("kernel", "pallas")):
        kp = prepare_weight(node, prologue=p)
        y = jax.jit(lambda x, kp=kp: fused_linear(x, kp, None, act_bits=4, backend=backend,
                                                                config=cfg))(x)
        out[f"layer_rel_{lab}"] = rel_err(np.asarray(y, np.float32), np.asarray(ref, np.float32))
    return out


def shared_check(m, k, n, interpret, block=256, step=2):
    """Rows {member, jd_col, rel_shared_vs_alone, max_abs_diff, rel_vs_fake, rel_alone_vs_fake,
    max_abs_diff_exact_vs_stored} of three layers reading one x [m, k] (bf16) with different VaTMP schedules, at
    `step`: prepared "fast" with and without their `SharedDown`, and prepared exact (`unpack=True`, the scale made
    in the GEMM kernel from one shared max-reduce: `operands.Operands.row_scale`) vs the stored nodes (expected:
    0.0); then, on a GPU, the group per call."""
    from qdit4sr_jax.quant.kernels import fused_linear, prepare
    from qdit4sr_jax.quant.kernels.prepared import SAMPLER_MODES
    from qdit4sr_jax.quant.linear import linear
    names = ("to_q", "to_k", "to_v")
    scheds = ([4, 3, 5, 4], [4, 4, 4, 4], [5, 4, 3, 4])
    tree = {nm: {"kernel": _layer(k, n, False, seed=i, block=block).replace(a_schedule=jnp.asarray(sc, jnp.int32))}
            for i, (nm, sc) in enumerate(zip(names, scheds))}
    shared = jax.jit(lambda t: prepare(t, **SAMPLER_MODES["fast"]))(tree)
    alone = jax.jit(lambda t: prepare(t, **SAMPLER_MODES["fast"], share=False))(tree)
    exact = jax.jit(lambda t: prepare(t, unpack=True))(tree)
    if "qkv_down" not in shared:
        raise RuntimeError("prepare made no shared down-projection for these layers")
    x = _input(m, k)
    t = jnp.int32(step)
    backend, cfg = _backend(interpret)
    run = jax.jit(lambda tr, v, s: [fused_linear(v, tr[nm]["kernel"], None, step=s, backend=backend, config=cfg,
                                                 shared=tr.get("qkv_down")) for nm in names])
    ys, ya, ye, yt = run(shared, x, t), run(alone, x, t), run(exact, x, t), run(tree, x, t)
    rows = []
    for nm, a, b, e, st in zip(names, ys, ya, ye, yt):
        ref = np.asarray(linear(x, tree[nm]["kernel"], None, step=t, execution="fake"), np.float32)
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        rows.append(dict(member=nm, jd_col=shared[nm]["kernel"].bw.jd_col, rel_shared_vs_alone=rel_err(a, b),
                         max_abs_diff=float(np.abs(a - b).max()), rel_vs_fake=rel_err(a, ref),
                         rel_alone_vs_fake=rel_err(b, ref), max_abs_diff_exact_vs_stored=float(
                             np.abs(np.asarray(e, np.float32) - np.asarray(st, np.float32)).max())))
    if not interpret:       # the group's three layers per call (host clock: dispatch included), bf16 GEMMs beside
        from common import compile_and_time
        ws = [jnp.asarray(np.random.default_rng(i).normal(size=(k, n)) / k ** 0.5, jnp.bfloat16) for i in range(3)]
        tm = {lab: compile_and_time(f, a, warmup=3, iters=30)["median_ms"] * 1e3 for lab, f, a in (
            ("shared_us", run, (shared, x, t)), ("per_layer_us", run, (alone, x, t)),
            ("bf16_us", jax.jit(lambda v, w: [v @ wi for wi in w]), (x, ws)))}
        rows.append(dict(member="q/k/v group, median per call", **tm))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--k", type=int, default=1536)
    ap.add_argument("--n", type=int, default=1536)
    ap.add_argument("--block", type=int, default=256, help="H-SVD block (b_out = b_in)")
    ap.add_argument("--shared", action="store_true", help="check the shared q / k / v down-projection instead")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    interpret = jax.default_backend() != "gpu"
    if a.shared:
        rows = shared_check(a.m, a.k, a.n, interpret, a.block)
    else:
        rows = [check(a.m, a.k, a.n, s, interpret, a.block) for s in (False, True)]
    print(f"{jax.devices()[0].device_kind}  jax {jax.__version__}  [{a.m} x {a.k}] -> {a.n}"
          + ("  (Pallas interpreter)" if interpret else ""))
    for r in rows:
        print(r, flush=True)
    if a.out:
        from common import write_json
        write_json(a.out, {"m": a.m, "k": a.k, "n": a.n, "device": jax.devices()[0].device_kind, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
