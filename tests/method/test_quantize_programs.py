"""Compiled-program count of the Q-DiT4SR quantize (one pass-1 and one pass-2 program per layer shape,
whatever the number of layers and the weight bits VaSMP picks), bit-exactness of the bits-as-data
pass 2 against `make_qweight` at static bits, chunking and the opt-in compilation cache."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit4sr_jax.config import ModelConfig, QuantConfig
from qdit4sr_jax.model.dit4sr import param_shapes
from qdit4sr_jax.quant import qdit4sr as Q
from qdit4sr_jax.quant import rules
from qdit4sr_jax.quant.api import balanced_chunks, enable_compilation_cache
from qdit4sr_jax.quant.qweight import ARRAY_FIELDS, STATIC_FIELDS, make_qweight

T = 3
# two layer shapes ([32, 32] and [128, 32]); 2 + 1 (dual attention) + 1 layers per block
INCLUDE = (r"transformer_blocks_\d+/attn2?/to_q$", r"transformer_blocks_\d+/ff/net_2$")


def _setup(num_layers, seed=0):
    cfg = ModelConfig.preset("tiny").replace(num_layers=num_layers, dual_attention_layers=(0,))
    rng = np.random.default_rng(seed)
    # every tensor its own scale, so that VaSMP picks several widths
    params = jax.tree_util.tree_map(
        lambda s: (rng.normal(size=s.shape) * np.exp(rng.normal(0.0, 1.5)) * 0.2).astype(np.float32),
        param_shapes(cfg))
    qcfg = QuantConfig.preset("qdit4sr-w4a4").replace(include=INCLUDE, w_group_size=16, hsvd_block=(16, 16),
                                                       lowrank_rank=8, hsvd_block_solver="svd",
                                                       w_bit_candidates=(3, 5), a_bit_candidates=(4, 6))
    calib = {}
    for path in rules.select_linears(params, qcfg.include, qcfg.exclude):
        k = rules_kernel(params, path).shape[0]
        calib[rules.path_str(path)] = {"var": rng.uniform(0.5, 2.0, T).astype(np.float32),
                                       "ch_absmax": rng.uniform(0.5, 3.0, (T, k)).astype(np.float32)}
    return params, qcfg, calib


def rules_kernel(params, path):
    for key in path:
        params = params[key]
    return params["kernel"]


class _Count:
    def __init__(self):
        self.n = 0

    def __call__(self, event, duration, **kw):
        self.n += event == "/jax/core/compile/backend_compile_duration"


def _count_compiles(fn):
    from jax._src import monitoring
    jax.clear_caches()
    c = _Count()
    jax.monitoring.register_event_duration_secs_listener(c)
    try:
        out = fn()
        jax.block_until_ready(jax.tree_util.tree_leaves(out))
    finally:
        monitoring.unregister_event_duration_listener(c)
    return c.n, out


@pytest.fixture(scope="module")
def runs():
    out = {}
    for nl in (3, 6):
        params, qcfg, calib = _setup(nl)
        n, (q, info) = _count_compiles(lambda: Q.quantize_qdit4sr(params, qcfg, calib, chunk=4, return_info=True))
        out[nl] = dict(params=params, qcfg=qcfg, calib=calib, q=q, info=info, compiles=n)
    return out


def test_program_count_does_not_grow_with_depth(runs):
    for nl, r in runs.items():
        shapes = {tuple(rules_kernel(r["params"], p).shape)
                  for p in rules.select_linears(r["params"], r["qcfg"].include, ())}
        assert len(shapes) == 2
        # layers per shape: 3 blocks -> 4 and 3 (one chunk each); 6 blocks -> 7 and 6 (two chunks of 4 / 3)
        assert r["compiles"] == 2 * len(shapes), (nl, r["compiles"])
    bits = set(runs[6]["info"]["w_bits"].values())
    assert len(bits) >= 2, f"VaSMP chose one width only ({bits}): the test would not exercise bits as data"


def test_bits_as_data_matches_static_bits(runs):
    """Pass 2 with the width as data (lax.switch over all widths used, in one program) gives bit-identical
    nodes to the same program at one static width; and `quantize_qdit4sr` returned exactly those nodes."""
    import dataclasses
    from qdit4sr_jax.quant.api import layer_spec
    r = runs[6]
    qcfg, w_bits = r["qcfg"], r["info"]["w_bits"]
    paths = [p for p in rules.select_linears(r["params"], qcfg.include, ())
             if rules_kernel(r["params"], p).shape == (32, 32)]
    names = [rules.path_str(p) for p in paths]
    bits = tuple(sorted({w_bits[n] for n in names}))
    assert len(bits) >= 2, bits
    kern = [jnp.asarray(rules_kernel(r["params"], p)) for p in paths]
    nodes = [rules_kernel(r["q"], p) for p in paths]
    ws, chs = tuple(kern), tuple(jnp.max(jnp.asarray(r["calib"][n]["ch_absmax"]), axis=0) for n in names)
    facs = tuple({f: getattr(nd, f) for f in ("lr_a", "lr_b", "block_u", "block_v")} for nd in nodes)
    spec = dataclasses.replace(layer_spec(qcfg, (32, 32), "float32", 8), a_bits=4)
    bspec = Q.branch_spec(qcfg, (32, 32), spec, measured=True)
    idx = np.array([bits.index(w_bits[n]) for n in names], np.int32)
    mixed = Q._residual_program(ws, chs, facs, idx, spec, bspec, bits)
    for b in bits:
        single = Q._residual_program(ws, chs, facs, np.zeros(len(ws), np.int32), spec, bspec, (b,))
        for j, n in enumerate(names):
            if w_bits[n] != b:
                continue
            for key, want in single[j].items():
                np.testing.assert_array_equal(np.asarray(mixed[j][key]), np.asarray(want), err_msg=f"{n} {key}")
            node = nodes[j]
            assert node.w_bits == b and node.packed == (b < 8)
            np.testing.assert_array_equal(np.asarray(node.qvalue),
                                          np.asarray(single[j][f"qvalue_packed_{b}" if b < 8 else "qvalue"]))
            for f in ("scale", "smooth", "lr_a", "block_v"):
                np.testing.assert_array_equal(np.asarray(getattr(node, f)), np.asarray(single[j][f]))
            np.testing.assert_array_equal(node.a_schedule, r["info"]["a_schedule"][n])
    # and the static fields are make_qweight's at that width (packing included)
    nd = nodes[0]
    res = jnp.zeros((32, 32), jnp.float32)
    want = jax.eval_shape(lambda x: make_qweight(x, w_bits=nd.w_bits, group_size=qcfg.w_group_size, a_bits=4,
                                                 pack=True, smooth=nd.smooth, lr_a=nd.lr_a, lr_b=nd.lr_b,
                                                 block_u=nd.block_u, block_v=nd.block_v, block=nd.block,
                                                 rotate=nd.rotate, signs=nd.signs, a_schedule=nd.a_schedule), res)
    for f in STATIC_FIELDS:
        assert getattr(nd, f) == getattr(want, f), f
    for f in ARRAY_FIELDS:
        a, b = getattr(nd, f), getattr(want, f)
        assert (a is None) == (b is None) and (a is None or (a.shape, a.dtype) == (b.shape, b.dtype)), f


def test_balanced_chunks():
    assert balanced_chunks([], 8) == []
    assert balanced_chunks([1, 2, 3], 8) == [[1, 2, 3]]
    parts = balanced_chunks(list(range(34)), 8)
    assert [len(p) for p in parts] == [7] * 5 and parts[-1][-1] == parts[-1][-2] == 33
    assert sum(parts, [])[:34] == list(range(34))
    assert [len(p) for p in balanced_chunks(list(range(16)), 8)] == [8, 8]
    with pytest.raises(ValueError, match="chunk"):
        balanced_chunks([1], 0)


def test_enable_compilation_cache(tmp_path):
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    try:
        d = enable_compilation_cache(str(tmp_path / "cache"))
        assert os.path.isdir(d) and jax.config.jax_compilation_cache_dir == d
        jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.25)(jnp.arange(7.0)).block_until_ready()
        assert any(files for _, _, files in os.walk(d)), "nothing written to the cache"
        with pytest.raises(ValueError, match="directory"):
            enable_compilation_cache("")
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
        from jax.experimental.compilation_cache import compilation_cache
        compilation_cache.reset_cache()


@pytest.mark.parametrize("cmd", [["quantize", "--out", "q"], ["demo"], ["upscale", "i.png", "o.png"],
                                 ["evaluate", "--hr", "x"]])
def test_cli_commands_have_compile_cache_flag(cmd):
    """Every subcommand that compiles takes --compile-cache DIR (opt-in; `cli._compile_cache` sets it first)."""
    from qdit4sr_jax import cli
    a = cli.build_parser().parse_args(cmd + ["--compile-cache", "/tmp/c"])
    assert a.compile_cache == "/tmp/c" and a.fn.__name__.startswith("cmd_")
    assert cli.build_parser().parse_args(cmd).compile_cache is None
