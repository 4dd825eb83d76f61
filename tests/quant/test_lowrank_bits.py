"""int8 storage of the low-rank / H-SVD branch factors (`QuantConfig.lowrank_bits=8`): per-vector
factor quantization, the residual absorbing the branch rounding, every execution path against the
fake-quant reference, stored bytes, checkpoints and bad values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
import qdit4sr_jax
from qdit4sr_jax import report
from qdit4sr_jax.quant.api import quantized_layers
from qdit4sr_jax.quant.config import QuantConfig
from qdit4sr_jax.quant.kernels import KernelConfig, fused_linear
from qdit4sr_jax.quant.linear import linear
from qdit4sr_jax.quant.qweight import (BRANCH_FACTORS, FACTOR_AXIS, dequantize_factor, make_qweight,
                                       quantize_factor)

N, K = 64, 128
CFG = KernelConfig(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=2)


def _factors(seed, rank=8, block=(32, 64)):
    """Branch factors with SVD-like per-component ranges (sqrt of decaying singular values) and input /
    output channels of different ranges (as smoothing gives W' = W diag(s))."""
    rng = np.random.default_rng(seed)
    sv = np.sqrt(np.geomspace(4.0, 0.05, rank))
    ch_in, ch_out = np.exp(rng.normal(size=(K, 1)) * 0.7), np.exp(rng.normal(size=(1, N)) * 0.3)
    bo, bi = block
    nbo, nbi = -(-N // bo), -(-K // bi)
    return dict(lr_a=rng.normal(size=(K, rank)) * sv[None, :] * ch_in * 0.1,
                lr_b=rng.normal(size=(rank, N)) * sv[:, None] * ch_out * 0.1,
                block_u=rng.normal(size=(nbo, nbi, bo)) * 0.2, block_v=rng.normal(size=(nbo, nbi, bi)) * 0.2,
                block=block)


def _make(w, f=None, smooth=None, **kw):
    """make_qweight(w, **f, **kw) as one jitted program (faster than op-by-op here); f: _factors(...)."""
    f = dict(f or {})
    block = f.pop("block", None)
    f = {k: jnp.asarray(v, jnp.float32) for k, v in f.items()}
    s = None if smooth is None else jnp.asarray(smooth, jnp.float32)
    return jax.jit(lambda w, f, s: make_qweight(w, block=block, smooth=s, **f, **kw))(w, f, s)


def _w(seed):
    return jnp.asarray(np.random.default_rng(50 + seed).normal(size=(N, K)).astype(np.float32) * 0.05)


def _x(seed, shape=(2, 9)):
    x = np.random.default_rng(100 + seed).standard_t(5, size=shape + (K,)).astype(np.float32)
    x[..., 5] *= 10.0
    return jnp.asarray(x)


def test_factor_roundtrip_error_bound():
    """|f - q s| <= s / 2 per element up to the bf16 rounding of q s (s = the vector's absmax / 127 rounded
    to bf16), codes in [-127, 127], zero vectors exact, per-vector scales far better than one per factor."""
    f = _factors(0)
    roundtrip = jax.jit(lambda a, axis: (lambda q, s: (q, s, dequantize_factor(q, s)))(*quantize_factor(a, axis)),
                        static_argnums=1)
    for name in BRANCH_FACTORS:
        a = np.array(jnp.asarray(f[name], jnp.float32).astype(jnp.bfloat16))
        if name == "lr_a":
            a[3, :] = 0                                                # an all-zero vector (input channel)
        q, s, d = roundtrip(jnp.asarray(a), FACTOR_AXIS[name])
        assert q.dtype == jnp.int8 and s.dtype == d.dtype == jnp.bfloat16 and q.shape == a.shape
        assert s.shape == tuple(1 if i == FACTOR_AXIS[name] else n for i, n in enumerate(a.shape))
        assert int(np.max(np.abs(np.asarray(q, np.int32)))) <= 127
        d, a64, s64 = (np.asarray(v, np.float64) for v in (d, a, s))
        amax = np.max(np.abs(a64), axis=FACTOR_AXIS[name], keepdims=True)
        assert np.all(np.abs(d - a64) <= s64 * 0.5 + np.abs(a64) * 2.0 ** -8 + 1e-30), name
        assert np.all(np.abs(d - a64) <= amax * (1 / 254 + 2.0 ** -8) + 1e-30), name
        assert rel_err(d, a64) < 1e-2, (name, rel_err(d, a64))     # ~ step / sqrt(12) of Gaussian vectors
        if name == "lr_a":
            assert np.all(d[3, :] == 0)
            # one scale for the whole factor: the weak input channels lose most of their precision
            dt = np.asarray(roundtrip(jnp.asarray(a.reshape(-1, 1)), 0)[2], np.float64).reshape(a.shape)
            worst = lambda d: max(rel_err(d[i], a64[i]) for i in range(a.shape[0]) if i != 3)
            assert worst(d) < 0.3 * worst(dt), (worst(d), worst(dt))
            assert rel_err(d, a64) < rel_err(dt, a64)


def test_node_stores_int8_factors_and_absorbs_rounding():
    """make_qweight(lowrank_bits=8): int8 factors, per-vector scales, the branch bytes about halve, and the
    node's dequantize() = residual_q + branch_q approximates W' as well as the bf16 node (the residual is
    W' - branch_q, so the int8 branch error is not added on top of the 4-bit error)."""
    f, w = _factors(1), _w(1)
    full = w + jnp.asarray(_dense(f))                                  # W' = residual + branches
    ref = _make(w, f, w_bits=4, group_size=64, a_bits=4)
    node = _make(w, f, w_bits=4, group_size=64, a_bits=4, lowrank_bits=8)
    assert ref.branch_bits is None and node.branch_bits == 8
    for name in BRANCH_FACTORS:
        assert getattr(node, name).dtype == jnp.int8 and getattr(ref, name + "_scale") is None
    fb = lambda n: sum(getattr(n, a).nbytes for a in BRANCH_FACTORS + tuple(x + "_scale" for x in BRANCH_FACTORS)
                       if getattr(n, a) is not None)
    elems = sum(getattr(node, a).size for a in BRANCH_FACTORS)
    scales = sum(getattr(node, a + "_scale").size for a in BRANCH_FACTORS)
    assert fb(ref) == 2 * elems and fb(node) == elems + 2 * scales    # int8 codes + bf16 scales
    assert scales == K + N + 2 * 2 * 2 and fb(node) / fb(ref) < 0.62  # rank 8 here; 0.53 at full size
    assert node.nbytes() < ref.nbytes()
    e_ref = rel_err(ref.dequantize().T, full)
    e_q = rel_err(node.dequantize().T, full)
    assert e_q < 1.02 * e_ref, (e_q, e_ref)
    # the branch itself is close to the bf16 branch, and the residual differs by exactly that rounding
    assert rel_err(node.branch_weight(), ref.branch_weight()) < 1.5e-2     # two factors at ~0.6% each
    plain = _make(w + ref.branch_weight() - node.branch_weight(), w_bits=4, group_size=64, a_bits=4)
    np.testing.assert_array_equal(np.asarray(node.codes()), np.asarray(plain.codes()))
    np.testing.assert_allclose(np.asarray(node.scale), np.asarray(plain.scale), rtol=1e-6)   # summation order
    fl = node.float_branches()
    assert fl.branch_bits is None and fl.lr_a.dtype == jnp.bfloat16
    assert node.float_branches() is not node and ref.float_branches() is ref


def _dense(f):
    from qdit4sr_jax.quant.qweight import branches_dense
    cast = lambda a: jnp.asarray(a, jnp.float32).astype(jnp.bfloat16)
    return branches_dense(cast(f["lr_a"]), cast(f["lr_b"]), cast(f["block_u"]), cast(f["block_v"]), f["block"], N, K)


@pytest.fixture(scope="module")
def node8():
    rng = np.random.default_rng(3)
    node = _make(_w(2), _factors(2), smooth=np.exp(rng.normal(size=(K,)) * 0.3), w_bits=4, group_size=32,
                 a_bits=4, lowrank_bits=8)
    return node, jnp.asarray(rng.normal(size=(N,)).astype(np.float32))


@pytest.mark.parametrize("backend", ["int", "xla", "interpret"])
def test_paths_match_fake_reference(backend, node8):
    """The int, fused-XLA and Pallas (interpreter) paths of an int8-branch node agree with its fake-quant
    reference (which uses the same dequantized factors) to the existing tests' tolerance."""
    node, bias = node8
    for seed in range(2):
        x = _x(seed)
        ref = linear(x, node, bias, execution="fake")
        if backend == "int":
            y = linear(x, node, bias, execution="int")
        else:
            y = fused_linear(x, node, bias, backend=backend, config=CFG)
        assert y.shape == ref.shape and rel_err(y, ref) <= 2e-6, rel_err(y, ref)
    if backend != "int":
        return
    # the reference is the same as running the float-branch node (the int8 factors are only storage)
    x = _x(5)
    np.testing.assert_allclose(np.asarray(linear(x, node.float_branches(), bias)), np.asarray(linear(x, node, bias)),
                               rtol=0, atol=0)


@pytest.fixture(scope="module")
def toy_calib(toy):
    model, params, x = toy
    return qdit4sr_jax.calibrate(model, params, x)


@pytest.fixture(scope="module")
def toy_small(toy, toy_calib):
    model, params, x = toy
    calib = toy_calib
    # the attention linears only: one layer shape, so one program per pass to compile (test time)
    cfg = QuantConfig.preset("qdit4sr-w4a4-small").replace(hsvd_block=(32, 32), w_group_size=32,
                                                            w_bit_candidates=(4, 6), lowrank_rank=16,
                                                            include=(r"transformer_blocks_\d+/attn/",))
    return cfg, qdit4sr_jax.quantize(params, cfg, calib)


def test_toy_model_qdit4sr_small(toy, toy_small):
    """Q-DiT4SR (H-SVD, VaSMP, VaTMP) with int8 branches on the toy model: int8 factors in every node,
    about half the bytes of the same factors in bf16 (plus K + N scales per layer), and the int / fused model outputs match the
    fake-quant reference."""
    model, params, x = toy
    cfg, qs = toy_small
    ns = quantized_layers(qs)
    fields = BRANCH_FACTORS + tuple(f + "_scale" for f in BRANCH_FACTORS)
    stored = sum(getattr(n, f).nbytes for n in ns.values() for f in fields if getattr(n, f) is not None)
    bf16 = sum(2 * getattr(n, f).size for n in ns.values() for f in BRANCH_FACTORS)
    assert len(ns) == 6
    for nm, n in ns.items():
        assert n.block_u is not None and n.lr_a.dtype == n.block_v.dtype == jnp.int8, nm
        assert n.branch_bits == 8 and n.a_schedule is not None, nm
    assert stored / bf16 < 0.62, stored / bf16                          # int8 + (K + N + blocks) bf16 scales
    # size as stored ("mission" convention): the int8 factors at 8 bits, their scales in scale_bits, the
    # same from the tree and from the config (VaSMP aside: the tree's per-layer bits enter size_M)
    lin = [report.LinearInfo(nm, n.shape[0], n.shape[1], False, 16) for nm, n in ns.items()]
    inv = (lin, [], 0)
    r = report.size_ops(report.ModelConfig.preset("tiny"), qparams=qs, inventory=inv, convention="mission",
                        guidance=False)
    branch_values = sum(getattr(n, f).size for n in ns.values() for f in BRANCH_FACTORS)
    codes = sum(n.w_bits * n.shape[0] * n.shape[1] for n in ns.values())
    assert r["size_M"] * 32e6 == pytest.approx(codes + 8 * branch_values)
    scales = sum(8 * getattr(n, f + "_scale").nbytes for n in ns.values() for f in BRANCH_FACTORS)
    assert r["scale_bits"] == pytest.approx(scales + sum(8 * (n.scale.nbytes + (0 if n.gscale is None else
                                                                               n.gscale.nbytes)) for n in ns.values()))
    r_cfg = report.size_ops(report.ModelConfig.preset("tiny"), cfg, inventory=inv, convention="mission",
                            guidance=False)
    assert r_cfg["scale_bits"] == pytest.approx(r["scale_bits"])
    assert [p["branch_params"] for p in r_cfg["per_layer"]] == [p["branch_params"] for p in r["per_layer"]]
    f = jax.jit(lambda p, x, mode: model.apply({"params": _mode(p, mode)}, x, step=1), static_argnums=2)
    ref = np.asarray(f(qs, x, "fake"))
    for mode in ("int", "fused"):
        # per token: float32-rounding drift (~1e-7) between the modes can flip a 4-bit activation code at
        # a rounding tie of a later layer (one token of 32 at most here); the others agree to float rounding
        y = np.asarray(f(qs, x, mode))
        tok = np.linalg.norm(y - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
        assert np.sum(tok > 1e-5) <= 2 and np.median(tok) < 1e-6, (mode, np.sort(tok.ravel())[-3:])
    fp = np.asarray(model.apply({"params": params}, x))
    assert rel_err(ref, fp) < 0.3                                     # still a working W4A4 model


def _mode(q, mode):
    from qdit4sr_jax.quant.qweight import QuantizedWeight
    return jax.tree_util.tree_map(lambda n: n.replace(execution=mode) if isinstance(n, QuantizedWeight) else n,
                                  q, is_leaf=lambda n: isinstance(n, QuantizedWeight))


def test_checkpoint_roundtrip(toy_small, tmp_path):
    """int8 factors and their scales survive save / load bit-exactly (format version 3); a file without
    them stays version 2; a missing scale is reported."""
    import json
    from qdit4sr_jax import checkpoint
    cfg, qs = toy_small
    qdit4sr_jax.save(tmp_path / "s", qs, cfg)
    back, cfg2 = qdit4sr_jax.load(tmp_path / "s")
    assert cfg2 == cfg and cfg2.lowrank_bits == 8
    a, b = quantized_layers(qs), quantized_layers(back)
    want = checkpoint.SIGNS_VERSION if any(n.signs for n in a.values()) else 3     # (a rotating preset: version 4)
    assert json.load(open(tmp_path / "s" / checkpoint.META))["version"] == want
    for nm, n in a.items():
        for fld in BRANCH_FACTORS + tuple(f + "_scale" for f in BRANCH_FACTORS):
            assert getattr(b[nm], fld).dtype == getattr(n, fld).dtype, (nm, fld)
            np.testing.assert_array_equal(np.asarray(getattr(b[nm], fld)), np.asarray(getattr(n, fld)))
    nm = next(iter(a))
    plain = {"layer": {"kernel": a[nm].float_branches().replace(signs=False)}}   # bf16 factors, no signs: version 2
    qdit4sr_jax.save(tmp_path / "b", plain, cfg.replace(lowrank_bits=None))
    assert json.load(open(tmp_path / "b" / checkpoint.META))["version"] == 2
    back, _ = qdit4sr_jax.load(tmp_path / "b")
    assert back["layer"]["kernel"].branch_bits is None
    # a node whose int8 factor lost its scale
    with pytest.raises(ValueError, match="without its scale"):
        checkpoint._rebuild_node(nm, a[nm].static_dict() | {"arrays": []},
                                 {"qvalue": np.asarray(a[nm].qvalue), "scale": np.asarray(a[nm].scale),
                                  "lr_a": np.asarray(a[nm].lr_a), "lr_b": np.asarray(a[nm].lr_b)})


def test_bad_values():
    for bits in (3, 16, 4, True):
        with pytest.raises(ValueError, match="lowrank_bits"):
            QuantConfig(lowrank_bits=bits).validate()
    with pytest.raises(ValueError, match="lowrank_bits=16"):
        make_qweight(_w(0), w_bits=4, a_bits=4, lowrank_bits=16, **_factors(0))
    with pytest.raises(ValueError, match="-small"):
        QuantConfig.preset("rtn-w4a4-small")
    cfg = QuantConfig.preset("qdit4sr-w4a4-small")
    assert cfg.lowrank_bits == 8 and cfg == QuantConfig.preset("qdit4sr-w4a4-fast").replace(lowrank_bits=8)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    old = QuantConfig.preset("qdit4sr-w4a4-fast").to_dict()
    del old["lowrank_bits"]                                            # a config written before the field
    assert QuantConfig.from_dict(old).lowrank_bits is None


def test_svdquant_small_preset(toy, toy_calib):
    """The baseline path (api.quantize -> baselines.quantize_linear) stores int8 factors too, and its
    nodes run like their fake reference through the int path."""
    model, params, x = toy
    calib = toy_calib
    cfg = QuantConfig.preset("svdquant-w4a4-small").replace(lowrank_rank=8, w_group_size=32,
                                                             include=(r"transformer_blocks_0/attn/to_q",))
    (nm, n), = quantized_layers(qdit4sr_jax.quantize(params, cfg, calib)).items()
    assert n.lr_a.dtype == n.lr_b.dtype == jnp.int8 and n.lr_a_scale.shape == (64, 1) and n.block_u is None
    xi = jnp.asarray(np.random.default_rng(0).normal(size=(5, n.k)).astype(np.float32))
    assert rel_err(linear(xi, n, execution="int"), linear(xi, n)) < 2e-6
