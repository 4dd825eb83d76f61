"""Prepared weights (quant/kernels/prepared.py): a fused node's weight-side operands computed beforehand give
exactly the stored node's outputs (both fused backends, every weight feature), dispatch through
`quant.linear.linear`, leave other nodes alone, and the sampler runs prepared and unprepared alike."""
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
from qdit4sr_jax.quant.kernels import KernelConfig, fused_linear, prepare, prepare_weight, with_execution
from qdit4sr_jax.quant.kernels.prepared import KernelWeight
from qdit4sr_jax.quant.linear import linear
from qdit4sr_jax.quant.qweight import QuantizedWeight, make_qweight
from qdit4sr_jax.quant.reference import transform_input

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from benchmarks.common import tree_bytes  # noqa: E402  (the benchmarks' byte count of a tree)

N, K = 64, 128
CFG = KernelConfig(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=2)
CFG_K = KernelConfig(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=2, unpack="kernel")


def _node(seed, **kw):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(N, K)).astype(np.float32) * 0.05)
    extra = {}
    if kw.pop("branches", False):
        bo, bi = 32, 64
        extra = dict(lr_a=rng.normal(size=(K, 12)) * 0.1, lr_b=rng.normal(size=(12, N)) * 0.1,
                     block_u=rng.normal(size=(N // bo, K // bi, bo)) * 0.2,
                     block_v=rng.normal(size=(N // bo, K // bi, bi)) * 0.2, block=(bo, bi),
                     smooth=np.exp(rng.normal(size=(K,)) * 0.3).astype(np.float32))
    return make_qweight(w, a_bits=4, execution="fused", **extra, **kw)


def _x(seed):
    x = np.random.default_rng(100 + seed).standard_t(5, size=(3, 7, K)).astype(np.float32)
    x[..., 3] *= 10.0
    return jnp.asarray(x)


NODES = {  # name -> make_qweight kwargs
    "w8 per channel": dict(w_bits=8),
    "w4 packed, group 32": dict(w_bits=4, group_size=32),
    "w4 int group scales + branches": dict(w_bits=4, group_size=32, group_scale="int", branches=True),
    "w4 int8 branch factors": dict(w_bits=4, group_size=64, branches=True, lowrank_bits=8),
    "w3 packed per channel + branches": dict(w_bits=3, branches=True),
}


@pytest.mark.parametrize("name", list(NODES))
@pytest.mark.parametrize("backend,cfg,unpack", [("xla", CFG, True), ("interpret", CFG, True),
                                                ("interpret", CFG_K, False)])
def test_prepared_equals_stored(name, backend, cfg, unpack):
    node = _node(len(name), **NODES[name])
    kw = prepare_weight(node, unpack=unpack)
    assert isinstance(kw, KernelWeight) and kw.shape == node.shape and kw.execution == "fused"
    assert kw.node.branch_bits is None                                 # float factors
    if unpack:
        assert not kw.node.packed and kw.node.gscale is None and kw.node.qvalue.dtype == jnp.int8
    bias = jnp.asarray(np.random.default_rng(1).normal(size=(N,)).astype(np.float32))
    x = _x(len(name))
    for bits in (4, 6):
        out = fused_linear(x, kw, bias, act_bits=bits, backend=backend, config=cfg)
        ref = fused_linear(x, node, bias, act_bits=bits, backend=backend, config=cfg)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
        fake = linear(x, node, bias, act_bits=bits, execution="fake")
        assert rel_err(out, fake) <= 2e-6
    # unpacked codes are the stored codes() (two-level factors folded)
    if unpack:
        np.testing.assert_array_equal(np.asarray(kw.node.codes()), np.asarray(node.codes()))


def test_linear_dispatch_tree_prepare_and_bytes():
    fused = _node(3, w_bits=4, group_size=32, group_scale="int", branches=True)
    fake = fused.replace(execution="fake")
    bias = jnp.asarray(np.random.default_rng(5).normal(size=(N,)), jnp.bfloat16)
    tree = {"a": {"kernel": fused, "bias": bias}, "b": {"kernel": fake, "bias": bias}, "c": jnp.ones((4, 4))}
    p = jax.jit(prepare)(tree)
    assert isinstance(p["a"]["kernel"], KernelWeight)
    assert p["a"]["bias"].dtype == jnp.float32 and p["b"]["bias"].dtype == jnp.bfloat16   # only beside fused nodes
    np.testing.assert_array_equal(np.asarray(p["a"]["bias"]), np.asarray(bias, np.float32))
    assert isinstance(p["b"]["kernel"], QuantizedWeight)              # not fused: unchanged
    assert p["c"] is not None and prepare(p)["a"]["kernel"].node.qvalue.shape == (N, K)   # idempotent
    x = _x(0)
    y = linear(x, p["a"]["kernel"], step=None)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(linear(x, fused)))
    # the reference paths run the prepared node's function too
    assert rel_err(linear(x, p["a"]["kernel"], execution="fake"), linear(x, fake)) <= 1e-6
    # unpacking doubles the 4-bit codes' bytes; keeping them packed only adds U
    stored = tree_bytes(fused)
    assert tree_bytes(prepare_weight(fused)) > stored + N * K // 2 - 1
    assert tree_bytes(prepare_weight(fused, unpack=False)) < tree_bytes(prepare_weight(fused))
    assert tree_bytes(jax.eval_shape(prepare_weight, fused)) == tree_bytes(prepare_weight(fused))
    with pytest.raises(TypeError, match="QuantizedWeight"):
        prepare_weight(jnp.zeros((K, N)))


def test_per_layer_jit_prepares_the_same_tree():
    """`prepare(..., per_layer_jit=True)` (outside a jit, one compile per distinct layer) gives the tree that
    `jax.jit(prepare)` gives, leaf for leaf, as the sampler's "fast" prepares it (a q / k / v group sharing one
    down-projection, layers of two kinds) through one jitted function, which jit compiles once per kind of layer."""
    from qdit4sr_jax.quant.kernels.prepared import SAMPLER_MODES, _jitted_prepare_weight
    bias = jnp.asarray(np.random.default_rng(5).normal(size=(N,)), jnp.bfloat16)
    kinds = [NODES["w4 int group scales + branches"], NODES["w8 per channel"]]
    tree = {"attn": {n: {"kernel": _node(i, **kinds[0]), "bias": bias} for i, n in enumerate(("to_q", "to_k", "to_v"))},
            "ff": {"kernel": _node(7, **kinds[1]), "bias": bias}, "other": jnp.ones((4, 4))}
    kw = SAMPLER_MODES["fast"]
    whole = jax.jit(lambda t: prepare(t, **kw))(tree)
    _jitted_prepare_weight.cache_clear()
    per_layer = prepare(tree, **kw, per_layer_jit=True)
    assert "qkv_down" in per_layer["attn"] and _jitted_prepare_weight.cache_info().currsize == 1
    a, ta = jax.tree_util.tree_flatten(whole)
    b, tb = jax.tree_util.tree_flatten(per_layer)
    assert ta == tb and len(a) > 20
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # outside a jit the schedules are concrete: "fast-mosaic" merges a group with one schedule (as the sampler does)
    sched = jnp.asarray([4, 6], jnp.int32)
    group = {n: {"kernel": _node(i, **kinds[1]).replace(a_schedule=sched), "bias": bias}
             for i, n in enumerate(("to_q", "to_k", "to_v"))}
    merged = prepare({"attn": group}, **SAMPLER_MODES["fast-mosaic"], per_layer_jit=True)["attn"]
    assert set(merged) == {"qkv"} and merged["qkv"]["kernel"].node.n == 3 * N


def test_prepared_tree_is_not_saved(tmp_path):
    from qdit4sr_jax import checkpoint
    tree = {"a": {"kernel": _node(4, w_bits=4, group_size=32)}}
    with pytest.raises(ValueError, match="prepared weight"):
        checkpoint.save(str(tmp_path / "q"), prepare(tree))
    assert not (tmp_path / "q").exists()                           # nothing half-written


@pytest.mark.slow
def test_sampler_prepared_equals_per_call():
    cfg = ModelConfig.preset("tiny")
    params = random_params(param_shapes(cfg))
    lat = lambda s, shape: jnp.asarray(np.random.default_rng(s).normal(size=shape), jnp.float32)
    lr, noise, ctx, pool = lat(1, (1, 16, 16, 4)), lat(2, (1, 16, 16, 4)), lat(3, (1, 7, 24)), lat(4, (1, 20))
    q = with_execution(qdit4sr_jax.quantize(params, "w4a4"), "fused")
    run = lambda prep: np.asarray(sampling.sample(cfg, q, lr, noise, context=ctx, pooled=pool, num_steps=2,
                                                  guidance_scale=1.0, tile_latent=0, prepare_weights=prep))
    base = run(None)
    assert np.isfinite(base).all()
    for prep in ("unpacked", "packed"):
        np.testing.assert_allclose(run(prep), base, rtol=0, atol=1e-5)
    assert np.array_equal(run("fast"), base)      # no transform, no branches: "fast" has nothing to round otherwise
    qr = with_execution(qdit4sr_jax.quantize(params, "rotation-w4a4"), "fused")   # signed Hadamard: x' exists
    rot = lambda prep: np.asarray(sampling.sample(cfg, qr, lr, noise, context=ctx, pooled=pool, num_steps=2,
                                                  guidance_scale=1.0, tile_latent=0, prepare_weights=prep))
    fp = np.asarray(sampling.sample(cfg, params, lr, noise, context=ctx, pooled=pool, num_steps=2,
                                    guidance_scale=1.0, tile_latent=0))
    fast, stored = rot("fast"), rot(None)       # x' rounded to bf16: other codes, a new draw of W4A4 noise
    assert np.array_equal(rot("fast-mosaic-separate"), fast)         # off Hopper the Mosaic kernels do not apply
    assert rel_err(fast, stored) > 0 and rel_err(fast, fp) <= 1.1 * rel_err(stored, fp)   # (0.146 vs 0.147)
    ahead = np.asarray(sampling.sample(cfg, prepare(q, prologue="pallas"), lr, noise, context=ctx, pooled=pool,
                                       num_steps=2, guidance_scale=1.0, tile_latent=0))     # prepared beforehand
    np.testing.assert_allclose(ahead, base, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="prepare_weights"):
        run(True)


PROLOGUE_NODES = {  # name -> make_qweight kwargs for the prologue kernel (K = 128: chunks of 64 = b_in)
    "w8 per channel, no branches": dict(w_bits=8),
    "w4 group 32 (gnk), branches, smoothing": dict(w_bits=4, group_size=32, branches=True),
    "w4 int group scales + int8 branch factors": dict(w_bits=4, group_size=32, group_scale="int", branches=True,
                                                      lowrank_bits=8),
    "w4 low-rank only": dict(w_bits=4, lr_only=True),
}


def _prologue_node(name):
    kw = dict(PROLOGUE_NODES[name])
    if kw.pop("lr_only", False):
        rng = np.random.default_rng(7)
        kw.update(lr_a=rng.normal(size=(K, 5)) * 0.1, lr_b=rng.normal(size=(5, N)) * 0.1)
    return _node(len(name) + 1, **kw)


@pytest.mark.parametrize("name", list(PROLOGUE_NODES))
def test_prologue_kernel_matches_xla_prologue(name):
    from qdit4sr_jax.quant.kernels import prologue_kernel as pk
    from qdit4sr_jax.quant.kernels.fused import prologue
    node = _prologue_node(name)
    kw = prepare_weight(node, prologue="pallas")
    assert pk.fits(kw.node, kw.bw, 0)
    x = _x(9).reshape(-1, K)                                       # 21 rows: padded to the row tile
    for bits in (4, jnp.int32(6)):
        a = prologue(x, kw.node, bits, pad_to=16, bw=kw.bw)
        b = pk.pallas_prologue(x, kw.node, kw.bw, bits, pad_to=16, interpret=True)
        assert b.m == a.m == 21 and b.xq.shape == a.xq.shape == (32, K)
        np.testing.assert_array_equal(np.asarray(b.xq), np.asarray(a.xq))      # the same codes, bit for bit
        np.testing.assert_array_equal(np.asarray(b.sx), np.asarray(a.sx))
        for got, want in ((b.dh, a.dh), (b.dt, a.dt)):
            assert (got is None) == (want is None)
            if got is not None:                                    # per-chunk sums: within one bf16 rounding
                got = np.asarray(got, np.float32)[:, : want.shape[1]]
                np.testing.assert_allclose(got, np.asarray(want, np.float32), rtol=2 ** -7, atol=1e-6)
        if b.dt is not None:                                       # the kernel's extra block rows are zero
            assert not np.asarray(b.dt, np.float32)[:, a.dt.shape[1]:].any()
    # another row tile (KernelConfig.prologue_block_m): the rows pad to the larger tile, same codes
    c = pk.pallas_prologue(x, kw.node, kw.bw, 4, pad_to=16, interpret=True, block_m=32, num_warps=8)
    a = prologue(x, kw.node, 4, pad_to=32, bw=kw.bw)
    np.testing.assert_array_equal(np.asarray(c.xq), np.asarray(a.xq))
    with pytest.raises(ValueError, match="row tiles"):
        pk.pallas_prologue(x, kw.node, kw.bw, 4, pad_to=48, interpret=True, block_m=32)


@pytest.mark.parametrize("name", list(PROLOGUE_NODES))
def test_prologue_kernel_end_to_end(name):
    node = _prologue_node(name).replace(a_schedule=jnp.asarray([4, 3, 8], jnp.int32))
    kw = prepare_weight(node, prologue="pallas")
    bias = jnp.asarray(np.random.default_rng(2).normal(size=(N,)).astype(np.float32))
    x = _x(4)
    run = jax.jit(lambda x, t: fused_linear(x, kw, bias, step=t, backend="interpret", config=CFG))
    for t in range(3):
        ref = linear(x, node, bias, step=t, execution="fake")
        assert rel_err(run(x, jnp.int32(t)), ref) <= 2e-5, (t, rel_err(run(x, jnp.int32(t)), ref))
    # a layer the kernel does not cover (a Hadamard in runs of 8, below a Triton tile) takes the XLA prologue
    rot = prepare_weight(node.replace(rotate=8), prologue="pallas")
    from qdit4sr_jax.quant.kernels import prologue_kernel as pk
    assert not pk.fits(rot.node, rot.bw, 0)
    ref = linear(x, node.replace(rotate=8), bias, act_bits=4, execution="fake")
    assert rel_err(fused_linear(x, rot, bias, act_bits=4, backend="interpret", config=CFG), ref) <= 2e-6
    with pytest.raises(ValueError, match="prologue"):
        prepare_weight(node, prologue="triton")


@pytest.mark.parametrize("rank,bi,down", [(12, 4, "joint"), (40, 64, "joint"), (12, 4, "input"), (0, 8, "input"),
                                          (12, 0, "joint")])
def test_joint_features_are_read_in_place(rank, bi, down):
    """A joint down-projection's features [dh | dt] reach the GEMM kernel unsliced (`Operands.joint`, no copy of
    either part): dt starts on an Rb block (dt_col = max(Rl, Rb): 16 < 32, 64 > 16 here), the parts equal the
    sliced ones, and the kernel's output is the reference's to float rounding (low-rank and / or blocks, x' and
    input-space jd)."""
    from qdit4sr_jax.quant.kernels.fused import prologue
    rng = np.random.default_rng(rank + bi)
    extra, bo = {}, 32
    if rank:
        extra.update(lr_a=rng.normal(size=(K, rank)) * 0.1, lr_b=rng.normal(size=(rank, N)) * 0.1)
    if bi:
        extra.update(block_u=rng.normal(size=(N // bo, K // bi, bo)) * 0.2,
                     block_v=rng.normal(size=(N // bo, K // bi, bi)) * 0.2, block=(bo, bi))
    w = jnp.asarray(rng.normal(size=(N, K)).astype(np.float32) * 0.05)
    node = make_qweight(w, w_bits=4, a_bits=4, execution="fused", rotate=K, signs=True, **extra)
    kw = prepare_weight(node, down=down)
    bw = kw.bw
    x2 = _x(rank + bi).reshape(-1, K)
    ops = prologue(x2, kw.node, 4, pad_to=16, bw=bw, joint=True)
    sep = prologue(x2, kw.node, 4, pad_to=16, bw=bw)
    assert ops.joint and not sep.joint
    if rank:
        np.testing.assert_array_equal(np.asarray(ops.dh[:, : bw.lr_a.shape[1]]), np.asarray(sep.dh))
    if bi:
        assert bw.dt_col % bw.rb == 0 and bw.dt_col >= (bw.lr_a.shape[1] if rank else 0)
        np.testing.assert_array_equal(np.asarray(ops.dt[:, bw.dt_col:]), np.asarray(sep.dt))
    if rank and bi:
        assert ops.dh is ops.dt and bw.dt_col == max(bw.lr_a.shape[1], bw.rb)
    bias = jnp.asarray(rng.normal(size=(N,)).astype(np.float32))
    out = fused_linear(_x(rank + bi), kw, bias, act_bits=4, backend="interpret", config=CFG)
    ref = fused_linear(_x(rank + bi), kw, bias, act_bits=4, backend="xla")
    assert rel_err(out, ref) <= 2e-6


@pytest.mark.parametrize("backend", ["xla", "interpret"])
def test_level_tables_give_the_stored_codes(backend):
    """A prepared node with a VaTMP schedule carries its per-step code levels and their reciprocals
    (`KernelWeight.levels` / `inv_levels`); the XLA prologue looks them up at the traced step instead of computing
    2^(bits-1) - 1 and 1 / levels per call, with the stored node's outputs bit for bit at every step (also past the
    schedule's end, clipped as `resolve_act_bits` clips), and the scalar level kernels gone from the compiled step."""
    import re
    rng = np.random.default_rng(11)
    sched = np.array([4, 6, 3, 8, 5], np.int32)
    w = jnp.asarray(rng.normal(size=(N, K)).astype(np.float32) * 0.05)
    node = make_qweight(w, w_bits=4, a_bits=4, execution="fused", rotate=K, signs=True, a_schedule=sched,
                        lr_a=rng.normal(size=(K, 12)) * 0.1, lr_b=rng.normal(size=(12, N)) * 0.1)
    kw = prepare_weight(node)
    np.testing.assert_array_equal(np.asarray(kw.levels), 2.0 ** (sched - 1) - 1)
    np.testing.assert_array_equal(np.asarray(kw.inv_levels), np.float32(1) / (2.0 ** (sched - 1) - 1).astype(np.float32))
    bias = jnp.asarray(rng.normal(size=(N,)).astype(np.float32))
    x = _x(11).at[1, 2].set(0.0)                    # a zero token: scale 2^-126 here, 1 in the stored node
    run = jax.jit(lambda n, t: fused_linear(x, n, bias, step=t, backend=backend, config=CFG))
    for t in range(len(sched) + 2):
        np.testing.assert_array_equal(np.asarray(run(kw, jnp.int32(t))), np.asarray(run(node, jnp.int32(t))))
    from qdit4sr_jax.quant.kernels.fused import prologue
    ops = prologue(x.reshape(-1, K), node, 4, bw=kw.bw, levels=kw.levels, inv_levels=kw.inv_levels,
                   step=jnp.int32(2), pad_to=16)
    assert not np.asarray(ops.xq[9]).any() and not np.asarray(ops.xq[21:]).any()   # the zero token, padded rows
    assert np.asarray(ops.sx[9]) == np.finfo(np.float32).tiny
    deferred = prologue(x.reshape(-1, K), node, 4, bw=kw.bw, levels=kw.levels, inv_levels=kw.inv_levels,
                        step=jnp.int32(2), pad_to=16, defer_scale=True)     # the GEMM kernel makes the scale
    np.testing.assert_array_equal(np.asarray(deferred.xq), np.asarray(ops.xq))
    np.testing.assert_array_equal(np.asarray(deferred.row_scale()), np.asarray(ops.sx))
    x_rot = np.asarray(transform_input(x.reshape(-1, K), node))                         # x', float32 [21, K]
    np.testing.assert_array_equal(np.asarray(deferred.sx[:21]), np.abs(x_rot).max(-1))  # its rows' max|x'|
    jaxpr = jax.make_jaxpr(lambda v: prologue(v, node, 4, bw=kw.bw, levels=kw.levels, inv_levels=kw.inv_levels,
                                              step=jnp.int32(2)).sx)(x.reshape(-1, K))
    assert not re.search(r":f32\[[0-9,]*\] = select_n", str(jaxpr))   # the scale: a floor after the reduce, no select
    if backend == "xla":
        hlo = run.lower(kw, jnp.int32(0)).compile().as_text()
        assert not re.search(r"= f32\[1?\]\{?0?\}? fusion\(", hlo)          # no scalar fusion left
        assert re.search(r"= f32\[1?\]\{?0?\}? fusion\(", run.lower(node, jnp.int32(0)).compile().as_text())


@pytest.mark.parametrize("backend", ["xla", "interpret"])
def test_fixed_activation_bits_get_a_one_step_level_table(backend):
    """A node with fixed activation bits (W8A8, no VaTMP schedule) is prepared with a one-step level table, so that
    its prologue takes the table's path (no `where(s > 0, s, 1)` select per layer and call: 327 select kernels in
    the 512-px W8A8 step of 2026-12-07 16:05) with the stored node's outputs bit for bit at every step."""
    import re
    rng = np.random.default_rng(12)
    node = make_qweight(jnp.asarray(rng.normal(size=(N, K)).astype(np.float32) * 0.05), w_bits=8, a_bits=8,
                        execution="fused")
    kw = prepare_weight(node)
    assert kw.levels.tolist() == [127.0] and kw.inv_levels.tolist() == [float(np.float32(1) / np.float32(127))]
    bias = jnp.asarray(rng.normal(size=(N,)).astype(np.float32))
    x = _x(12).at[1, 2].set(0.0)
    run = jax.jit(lambda n, t: fused_linear(x, n, bias, step=t, backend=backend, config=CFG))
    for t in (0, 3):
        np.testing.assert_array_equal(np.asarray(run(kw, jnp.int32(t))), np.asarray(run(node, jnp.int32(t))))
    jaxpr = str(jax.make_jaxpr(lambda n, t: fused_linear(x, n, bias, step=t, backend="xla", config=CFG))(
        kw, jnp.int32(0)))
    assert not re.search(r":f32\[[0-9,]*\] = select_n", jaxpr)


def _qkv(seed, ranks=(12, 40, 12)):
    """{to_q, to_k, to_v} of one input (K = 128): rotated with signs, low-rank ranks `ranks` (Rl 16 / 64 / 16) and
    64-wide input blocks (Rb 16), so the members' features need aligning in a shared down-projection."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, r in zip(("to_q", "to_k", "to_v"), ranks):
        w = jnp.asarray(rng.normal(size=(N, K)).astype(np.float32) * 0.05)
        node = make_qweight(w, w_bits=4, a_bits=4, execution="fused", rotate=K, signs=True,
                            lr_a=rng.normal(size=(K, r)) * 0.1, lr_b=rng.normal(size=(r, N)) * 0.1,
                            block_u=rng.normal(size=(N // 32, K // 64, 32)) * 0.2,
                            block_v=rng.normal(size=(N // 32, K // 64, 64)) * 0.2, block=(32, 64))
        out[name] = {"kernel": node, "bias": jnp.asarray(rng.normal(size=(N,)).astype(np.float32))}
    return out


@pytest.mark.parametrize("backend", ["xla", "interpret"])
def test_layers_reading_one_input_share_one_down_projection(backend):
    """prepare(..., down="input") puts the input-space down-projections of to_q / to_k / to_v side by side in one
    `SharedDown` beside them (`SHARED_INPUTS`), each member's columns aligned to its Rl and Rb (the kernel reads
    them in place); with it every member gives what it gives unshared, both backends; without it (a member called
    alone) the member still computes its function (its features from x' with its own factors); the compiled
    step computes the shared features once for the three layers (XLA's CSE of one dot with the same operands)."""
    from qdit4sr_jax.quant.kernels.branch_ops import SharedDown
    from qdit4sr_jax.quant.kernels.prepared import SAMPLER_MODES
    tree = {"attn": _qkv(3)}
    shared = prepare(tree, **SAMPLER_MODES["fast"])["attn"]
    alone = prepare(tree, **SAMPLER_MODES["fast"], share=False)["attn"]
    sd = shared["qkv_down"]
    assert isinstance(sd, SharedDown) and "qkv_down" not in alone
    cols = [shared[n]["kernel"].bw.jd_col for n in ("to_q", "to_k", "to_v")]
    widths = [alone[n]["kernel"].bw.jd.shape[1] for n in ("to_q", "to_k", "to_v")]
    assert widths == [48, 96, 48] and cols == [0, 64, 160] and sd.jd.shape == (K, 208)   # to_k starts on 64
    for n, c, wd in zip(("to_q", "to_k", "to_v"), cols, widths):
        assert shared[n]["kernel"].bw.jd is None
        np.testing.assert_array_equal(np.asarray(sd.jd[:, c:c + wd]), np.asarray(alone[n]["kernel"].bw.jd))
    np.testing.assert_array_equal(np.asarray(sd.jd[:, 48:64]), 0)
    # + the 16 zero columns (bf16) and the members' (one-step) level tables stacked (3 levels + 3 reciprocals, f32)
    assert tree_bytes(shared) == tree_bytes(alone) + K * 16 * 2 + 6 * 4
    x = _x(3)
    for n in ("to_q", "to_k", "to_v"):
        kw, b = shared[n]["kernel"], shared[n]["bias"]
        want = fused_linear(x, alone[n]["kernel"], b, act_bits=4, backend=backend, config=CFG)
        got = fused_linear(x, kw, b, act_bits=4, backend=backend, config=CFG, shared=sd)
        assert rel_err(got, want) <= 2e-6
        assert np.array_equal(np.asarray(linear(x, kw, b, act_bits=4, shared=sd)),
                              np.asarray(fused_linear(x, kw, b, act_bits=4, shared=sd)))
        ref = linear(x, kw.reference_node(), b, act_bits=4, execution="fake")     # W4A4, x' in bf16: ~1.7e-2
        own = fused_linear(x, kw, b, act_bits=4, backend=backend, config=CFG)   # features from x', own factors
        assert rel_err(own, want) <= 5e-3 and rel_err(own, ref) <= 1.05 * rel_err(want, ref)
    with pytest.raises(ValueError, match="shared down-projection"):
        fused_linear(x, shared["to_v"]["kernel"], act_bits=4, shared=SharedDown(sd.jd[:, :160]))
    if backend == "xla":
        import re
        f = jax.jit(lambda t, v: [fused_linear(v, t[n]["kernel"], t[n]["bias"], act_bits=4, shared=t.get("qkv_down"))
                                  for n in ("to_q", "to_k", "to_v")])
        feat = lambda t, w: len(re.findall(rf"\[21,{w}\]\{{1,0\}} dot\(", f.lower(t, x).compile().as_text()))
        assert feat(shared, 208) == 1 and feat(shared, 48) + feat(shared, 96) == 0
        assert feat(alone, 48) == 2 and feat(alone, 96) == 1


@pytest.mark.parametrize("backend", ["xla", "interpret"])
def test_layers_reading_one_input_share_one_row_max(backend):
    """With VaTMP level tables the per-token scale is max(max|x'| / levels, 2^-126) with the max-reduce over x'
    alone (`operands.scale_from_max`), so to_q / to_k / to_v, whose x' is one array, share one reduce in the compiled
    step whatever their schedules (it was three: 1 / levels inside the reduce); the Pallas kernel makes each
    layer's scale from the shared maxima (`Operands.row_scale`). Every member gives its stored node's outputs bit for
    bit at every step."""
    import re
    from qdit4sr_jax.quant.kernels.prepared import SAMPLER_MODES
    tree = {"attn": _qkv(5)}
    for n, sched in zip(("to_q", "to_k", "to_v"), ([4, 3, 8], [4, 4, 4], [6, 3, 5])):
        tree["attn"][n]["kernel"] = tree["attn"][n]["kernel"].replace(a_schedule=jnp.asarray(sched, jnp.int32))
    stored = tree["attn"]
    for kw in (dict(unpack=True), SAMPLER_MODES["fast"]):
        p = prepare(tree, **kw)["attn"]
        x = _x(5)
        f = jax.jit(lambda t, v, s: [fused_linear(v, t[n]["kernel"], t[n]["bias"], step=s, backend=backend,
                                                  config=CFG, shared=t.get("qkv_down"))
                                     for n in ("to_q", "to_k", "to_v")])
        if backend == "xla":
            assert len(re.findall(r" reduce\(", f.lower(p, x, jnp.int32(0)).compile().as_text())) == 1
        if kw.get("xprime", "float32") != "float32":
            continue                                  # "fast" rounds x' to bf16: not the stored node's codes
        for t in range(4):
            for got, want in zip(f(p, x, jnp.int32(t)), f(stored, x, jnp.int32(t))):
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.slow
def test_model_reads_the_shared_down_projections():
    """The tiny DiT4SR under the paper preset's -small form (rotation with signs, H-SVD branches), prepared "fast":
    every attention's to_q / to_k / to_v and add_*_proj get their `SharedDown` (`SHARED_INPUTS`), the model
    passes it to them (`model.mmdit.JointAttention`), and the transformer gives what it gives with the unshared tree."""
    from qdit4sr_jax.quant.config import QuantConfig
    from qdit4sr_jax.quant.kernels.prepared import SAMPLER_MODES, SHARED_INPUTS
    cfg = ModelConfig.preset("tiny")
    params = random_params(param_shapes(cfg))
    qc = QuantConfig.preset("qdit4sr-paper-w4a4-small").replace(vatmp=False, vasmp=False, hsvd_block=(16, 16),
                                                               lowrank_rank=8)       # (no VaSMP: 7 s less)
    q = with_execution(qdit4sr_jax.quantize(params, qc), "fused")
    prep = jax.jit(prepare, static_argnames=("unpack", "down", "xprime", "share"))   # (eager: 8 s per tree)
    shared, alone = prep(q, **SAMPLER_MODES["fast"]), prep(q, **SAMPLER_MODES["fast"], share=False)
    attn = [shared[b][a] for b in shared if b.startswith("transformer_blocks_") for a in shared[b] if "attn" in a]
    assert len(attn) == 4 and all("qkv_down" in a for a in attn)
    assert sum("add_qkv_down" in a for a in attn) == 3 and set(SHARED_INPUTS) == {"qkv_down", "add_qkv_down"}
    assert all(a[n]["kernel"].bw.jd is None for a in attn for n in SHARED_INPUTS["qkv_down"])
    from qdit4sr_jax.model.dit4sr import DiT4SRTransformer
    lat = lambda s, shape: jnp.asarray(np.random.default_rng(s).normal(size=shape), jnp.float32)
    x, lr, ctx, pool = lat(1, (1, 16, 16, 4)), lat(2, (1, 16, 16, 4)), lat(3, (1, 7, 24)), lat(4, (1, 20))
    run = jax.jit(lambda t: DiT4SRTransformer(cfg).apply({"params": t}, x, lr, jnp.full((1,), 500.0), ctx, pool))
    a, b = np.asarray(run(shared)), np.asarray(run(alone))
    assert np.isfinite(a).all() and rel_err(a, b) <= 1e-6
