"""Layers that read one input, run as one layer (quant/kernels/merged.py): the merged node's columns are the
members' outputs (bit for bit without branches; to float rounding with low-rank and H-SVD branches, mixed weight
bits and an equal VaTMP schedule), on the fused backends and the reference; what may not merge stays apart; the
model and the sampler run merged trees."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params, rel_err
import qdit4sr_jax
from qdit4sr_jax import sampling
from qdit4sr_jax.config import ModelConfig
from qdit4sr_jax.model.dit4sr import param_shapes
from qdit4sr_jax.quant.kernels import KernelConfig, fused_linear, prepare, with_execution
from qdit4sr_jax.quant.kernels.merged import MERGED_INPUTS, can_merge, merge_nodes, merge_tree
from qdit4sr_jax.quant.kernels.prepared import SAMPLER_MODES
from qdit4sr_jax.quant.linear import linear, linear_group
from qdit4sr_jax.quant.qweight import make_qweight

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from benchmarks.common import tree_bytes  # noqa: E402  (the benchmarks' byte count of a tree)

N, K = 64, 128
CFG = KernelConfig(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=2)
NAMES = ("to_q", "to_k", "to_v")


def _x(seed):
    x = np.random.default_rng(100 + seed).standard_t(5, size=(3, 7, K)).astype(np.float32)
    x[..., 3] *= 10.0
    return jnp.asarray(x)


def _group(seed, **kw):
    """{to_q, to_k, to_v} of one input without branches (make_qweight kwargs kw), each with a bias."""
    rng = np.random.default_rng(seed)
    return {n: {"kernel": make_qweight(jnp.asarray(rng.normal(size=(N, K)).astype(np.float32) * 0.05),
                                       execution="fused", **kw),
                "bias": jnp.asarray(rng.normal(size=(N,)).astype(np.float32))} for n in ("to_q", "to_k", "to_v")}



@pytest.mark.parametrize("backend", ["xla", "interpret"])
@pytest.mark.parametrize("kw", [dict(w_bits=8, a_bits=8), dict(w_bits=4, a_bits=4, group_size=64),
                                dict(w_bits=4, a_bits=6, rotate=K, signs=True)], ids=["w8a8", "w4a4-g64", "w4a6-rot"])
def test_layers_reading_one_input_run_as_one_gemm(backend, kw):
    """prepare(..., merge=True) stacks to_q / to_k / to_v without branches into one KernelWeight under "qkv"
    (`MERGED_INPUTS`; the members leave the tree), whose one GEMM gives each member's outputs bit for bit in its
    columns (`linear_group`), per channel and group-wise, rotated or not, at every step."""
    tree = {"attn": _group(21, **kw)}
    alone, merged = prepare(tree)["attn"], prepare(tree, merge=True)["attn"]
    assert set(merged) == {"qkv"} and MERGED_INPUTS["qkv"] == ("to_q", "to_k", "to_v")
    m = merged["qkv"]
    assert m["kernel"].shape == (K, 3 * N) and m["bias"].shape == (3 * N,) and m["bias"].dtype == jnp.float32
    assert tree_bytes(merged) == tree_bytes(alone) - 2 * 2 * 4      # two members' one-step level tables fewer
    x = _x(21)
    run = jax.jit(lambda t, s: [fused_linear(x, t[n]["kernel"], t[n]["bias"], step=s, backend=backend, config=CFG)
                                for n in ("to_q", "to_k", "to_v")])
    one = jax.jit(lambda p, s: jnp.split(fused_linear(x, p["kernel"], p["bias"], step=s, backend=backend, config=CFG),
                                         3, axis=-1))
    for s in (0, 2):
        for got, want in zip(one(m, jnp.int32(s)), run(alone, jnp.int32(s))):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for got, want in zip(linear_group(x, m, 3, step=0), [linear(x, alone[n]["kernel"], alone[n]["bias"], step=0)
                                                          for n in ("to_q", "to_k", "to_v")]):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not can_merge([alone["to_q"]["kernel"]])
    with pytest.raises(ValueError, match="equal parts"):
        linear_group(x, m, 5)


def _branched(seed, ranks=(12, 40, 12), bits=(4, 4, 5), schedule=(4, 6, 8)):
    """{to_q, to_k, to_v} of one input (K = 128) as the paper preset makes them: rotated with signs, low-rank
    ranks `ranks`, H-SVD blocks (32 x 64), weight bits `bits` (VaSMP's cells), one VaTMP schedule (one input's
    statistics), each with a bias."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, r, b in zip(NAMES, ranks, bits):
        w = jnp.asarray(rng.normal(size=(N, K)).astype(np.float32) * 0.05)
        node = make_qweight(w, w_bits=b, a_bits=4, execution="fused", rotate=K, signs=True,
                            lr_a=rng.normal(size=(K, r)) * 0.1, lr_b=rng.normal(size=(r, N)) * 0.1,
                            block_u=rng.normal(size=(N // 32, K // 64, 32)) * 0.2,
                            block_v=rng.normal(size=(N // 32, K // 64, 64)) * 0.2, block=(32, 64),
                            a_schedule=jnp.asarray(schedule, jnp.int32))
        out[name] = {"kernel": node, "bias": jnp.asarray(rng.normal(size=(N,)).astype(np.float32))}
    return out


def test_merged_node_is_the_members_side_by_side():
    """`merge_nodes` of a branched group (ranks 12 / 40 / 12, H-SVD blocks, 4 / 4 / 5 weight bits, one schedule):
    codes and scales stacked, lr_a side by side and lr_b block diagonal (ranks padded to the largest, lr_groups = 3),
    blocks by block row; its reference output
    ("fake" and "int") is the members' side by side at every step, to float rounding."""
    tree = _branched(1)
    nodes = [tree[n]["kernel"] for n in NAMES]
    m = merge_nodes(nodes)
    assert m.shape == (K, 3 * N) and m.w_bits == 5 and not m.packed and m.lr_groups == 3
    assert m.lr_a.shape == (K, 120) and m.lr_b.shape == (120, 3 * N)         # ranks 12 / 40 / 12 padded to 40
    assert m.block_u.shape == (6, 2, 32) and m.block_v.shape == (6, 2, 64)
    lr_b = np.asarray(m.lr_b, np.float32)
    assert not lr_b[:40, N:].any() and not lr_b[40:80, :N].any() and not lr_b[40:80, 2 * N:].any()
    assert not lr_b[12:40].any() and not np.asarray(m.lr_a[:, 12:40], np.float32).any()       # the padding
    np.testing.assert_array_equal(np.asarray(m.codes()[N:2 * N]), np.asarray(nodes[1].codes()))
    x = _x(1)
    for execution in ("fake", "int"):
        for s in (0, 1, 2):
            got = linear(x, m, step=s, execution=execution)
            want = jnp.concatenate([linear(x, n, step=s, execution=execution) for n in nodes], axis=-1)
            assert rel_err(got, want) <= 1e-6, (execution, s, rel_err(got, want))


@pytest.mark.parametrize("backend", ["xla", "interpret"])
@pytest.mark.parametrize("mode", ["unpacked", "fast"])
def test_branched_layers_run_as_one_gemm(backend, mode):
    """The branched group merged by `merge_tree` (its schedules are concrete here) and prepared: one KernelWeight
    under "qkv" (no shared down-projection left to make) whose one fused call gives each member's outputs to float
    rounding, as the unmerged prepared group (with its shared down-projection under "fast") gives them."""
    tree = {"attn": _branched(2)}
    kw = SAMPLER_MODES[mode]
    merged, alone = prepare(merge_tree(tree), **kw)["attn"], prepare(tree, **kw)["attn"]
    assert set(merged) == {"qkv"} and merged["qkv"]["kernel"].node.shape == (K, 3 * N)
    bw = merged["qkv"]["kernel"].bw                   # blocked low-rank: Rl = 64 per member, read per 64 columns
    assert bw.lr_block == N and bw.lr_b.shape == (64, 3 * N) and bw.lr_a.shape == (K, 3 * 64)
    x = _x(2)
    shared = alone.get("qkv_down")
    one = jax.jit(lambda p, s: jnp.split(fused_linear(x, p["kernel"], p["bias"], step=s, backend=backend, config=CFG),
                                         3, axis=-1))
    run = jax.jit(lambda t, s: [fused_linear(x, t[n]["kernel"], t[n]["bias"], step=s, backend=backend, config=CFG,
                                             shared=shared) for n in NAMES])
    ref = [linear(x, tree["attn"][n]["kernel"], tree["attn"][n]["bias"], step=1, execution="fake") for n in NAMES]
    for s in (0, 1, 2):
        for got, want in zip(one(merged["qkv"], jnp.int32(s)), run(alone, jnp.int32(s))):
            assert rel_err(got, want) <= 2e-6, (s, rel_err(got, want))
    for got, want, r in zip(one(merged["qkv"], jnp.int32(1)), run(alone, jnp.int32(1)), ref):
        assert rel_err(got, r) <= 1.01 * rel_err(want, r) + 1e-7


def test_what_may_not_merge_stays_apart():
    """Members with different or traced (inside a jit) schedules, other activation bits, another width, another
    smoothing divisor, or block rows that straddle members stay separate layers; biases stack with zeros for the
    members without one."""
    tree = _branched(3)
    other = dict(tree, to_k={**tree["to_k"], "kernel": tree["to_k"]["kernel"].replace(
        a_schedule=jnp.asarray([4, 6, 6], jnp.int32))})
    bits = dict(tree, to_v={**tree["to_v"], "kernel": tree["to_v"]["kernel"].replace(a_bits=6, a_schedule=None)})
    narrow = dict(tree, to_v={"kernel": make_qweight(jnp.ones((N // 2, K)) * 0.1, w_bits=8, a_bits=4,
                                                     execution="fused")})
    smooth = {n: {**tree[n], "kernel": tree[n]["kernel"].replace(smooth=jnp.full((K,), 1.0 + i))}
              for i, n in enumerate(NAMES)}
    ragged = {n: {"kernel": make_qweight(jnp.ones((48, K)) * 0.1, w_bits=4, a_bits=4, execution="fused",
                                         block_u=np.ones((2, 2, 32)), block_v=np.ones((2, 2, 64)), block=(32, 64))}
              for n in NAMES}                                      # N = 48: block row 1 would straddle two members
    twice = {n: {"kernel": merge_tree({"attn": tree})["attn"]["qkv"]["kernel"]} for n in NAMES}   # lr_groups 3
    for t in (other, bits, narrow, smooth, ragged, twice):
        assert "qkv" not in merge_tree({"attn": t})["attn"]
    assert "qkv" in merge_tree({"attn": tree})["attn"]
    assert not can_merge([tree["to_q"]["kernel"]])
    inside = jax.jit(lambda t: prepare(t, merge=True))({"attn": tree})["attn"]     # schedules traced: unknown
    assert "qkv" not in inside and set(NAMES) <= set(inside)
    plain = {n: {"kernel": m["kernel"].replace(a_schedule=None)} for n, m in tree.items()}
    assert "qkv" in jax.jit(lambda t: prepare(t, merge=True))({"attn": plain})["attn"]   # none to know: merged
    no_bias = {n: {"kernel": m["kernel"]} for n, m in tree.items()}
    one_bias = dict(no_bias, to_k=tree["to_k"])
    assert set(merge_tree({"attn": no_bias})["attn"]["qkv"]) == {"kernel"}
    b = prepare({"attn": one_bias}, merge=True)["attn"]["qkv"]["bias"]
    np.testing.assert_array_equal(np.asarray(b), np.concatenate([np.zeros(N), np.asarray(tree["to_k"]["bias"]),
                                                                 np.zeros(N)]))


def _tiny_params():
    cfg = ModelConfig.preset("tiny")
    params = random_params(param_shapes(cfg))
    return cfg, params


@pytest.mark.slow
def test_model_reads_merged_layers():
    """The tiny DiT4SR under the paper preset's -small form (signed Hadamard, H-SVD blocks and low-rank factors; no
    VaTMP schedule, so the jitted prepare merges) prepared "fast" with merge=True: every attention's to_q / to_k /
    to_v and add_*_proj run as one layer per group (`MERGED_INPUTS`), and the transformer gives what the unmerged
    prepared tree gives. (W8A8 groups: bit-exact per layer above; lowered per step in tests/test_lower_check.py.)"""
    from qdit4sr_jax.model.dit4sr import DiT4SRTransformer
    from qdit4sr_jax.quant.config import QuantConfig
    cfg, params = _tiny_params()
    qc = QuantConfig.preset("qdit4sr-paper-w4a4-small").replace(vatmp=False, vasmp=False, hsvd_block=(16, 16),
                                                               lowrank_rank=8)
    q = with_execution(qdit4sr_jax.quantize(params, qc), "fused")
    prep = jax.jit(prepare, static_argnames=("unpack", "down", "xprime", "share", "merge"))
    merged, alone = prep(q, **SAMPLER_MODES["fast"], merge=True), prep(q, **SAMPLER_MODES["fast"])
    attn = [merged[b][a] for b in merged if b.startswith("transformer_blocks_") for a in merged[b] if "attn" in a]
    assert len(attn) == 4 and all("qkv" in a and "to_q" not in a and "qkv_down" not in a for a in attn)
    assert sum("add_qkv" in a for a in attn) == 3
    lat = lambda s, shape: jnp.asarray(np.random.default_rng(s).normal(size=shape), jnp.float32)
    x, lr, ctx, pool = lat(1, (1, 16, 16, 4)), lat(2, (1, 16, 16, 4)), lat(3, (1, 7, 24)), lat(4, (1, 20))
    run = jax.jit(lambda t: DiT4SRTransformer(cfg).apply({"params": t}, x, lr, jnp.full((1,), 500.0), ctx, pool))
    a, b = np.asarray(run(merged)), np.asarray(run(alone))
    assert np.isfinite(a).all() and rel_err(a, b) <= 1e-4, rel_err(a, b)


@pytest.mark.slow
def test_sampler_merges_scheduled_groups_before_its_loop():
    """`sampling.sample(..., prepare_weights="fast-mosaic")` on a tree whose q / k / v groups carry one VaTMP
    schedule each (as a calibration gives them): merged before the jitted loop (`merge_tree` sees the values), it
    samples what "fast-mosaic-separate" samples (off Hopper: "fast"), to float rounding."""
    cfg, params = _tiny_params()
    q = with_execution(qdit4sr_jax.quantize(params, "w4a4"), "fused")
    sched = jnp.asarray([4, 6], jnp.int32)
    is_q = lambda n: hasattr(n, "a_schedule")
    q = jax.tree_util.tree_map(lambda n: n.replace(a_schedule=sched) if is_q(n) else n, q, is_leaf=is_q)
    assert sum("qkv" in a for b in merge_tree(q).values() if isinstance(b, dict) for a in b.values()
               if isinstance(a, dict)) == 4
    lat = lambda s, shape: jnp.asarray(np.random.default_rng(s).normal(size=shape), jnp.float32)
    lr, noise, ctx, pool = lat(1, (1, 16, 16, 4)), lat(2, (1, 16, 16, 4)), lat(3, (1, 7, 24)), lat(4, (1, 20))
    run = lambda prep: np.asarray(sampling.sample(cfg, q, lr, noise, context=ctx, pooled=pool, num_steps=2,
                                                  guidance_scale=1.0, tile_latent=0, prepare_weights=prep))
    merged, alone = run("fast-mosaic"), run("fast-mosaic-separate")
    assert np.isfinite(merged).all() and rel_err(merged, alone) <= 1e-4, rel_err(merged, alone)
