"""The prologue kernel with the rotation inside (quant/kernels/prologue_kernel.py, `_kernel_rotated`): the signs,
the Hadamard in its Kronecker form, the per-token codes and the branch features of a rotated layer in one
kernel, against the XLA prologue and the fake-quant reference (Pallas interpreter on CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from qdit4sr_jax.quant.kernels import KernelConfig, fused_linear, prepare_weight
from qdit4sr_jax.quant.kernels import prologue_kernel as pk
from qdit4sr_jax.quant.kernels.fused import prologue
from qdit4sr_jax.quant.linear import linear
from qdit4sr_jax.quant.qweight import make_qweight

CFG = KernelConfig(block_m=16, block_n=16, block_k=64, num_warps=4, num_stages=2)

# name -> (K, N, make_qweight kwargs, branches (b_out, b_in) or None, low-rank rank or 0)
LAYERS = {
    # DiT4SR's full rotation in small: 192 = H_12 (x) S_16, runs of 16 mixed by G = H_12, the paper preset's form
    "full 12 x 16, signs, low-rank + blocks": (192, 48, dict(rotate=192, signs=True), (16, 64), 6),
    # block-diagonal Hadamard 32 with smoothing: x' is float32 (three bf16 parts per dot)
    "block 32, smoothing, blocks": (128, 32, dict(rotate=32, smooth=True), (16, 32), 0),
    # one Sylvester block of 128, signs, low-rank only
    "block 128, signs, low-rank": (128, 32, dict(rotate=128, signs=True), None, 5),
}


def _layer(name, seed=0):
    k, n, kw, blocks, rank = LAYERS[name]
    rng = np.random.default_rng(seed)
    kw = dict(kw)
    extra = {}
    if kw.pop("smooth", False):
        extra["smooth"] = np.exp(rng.normal(size=(k,)) * 0.3).astype(np.float32)
    if rank:
        extra.update(lr_a=rng.normal(size=(k, rank)) * 0.1, lr_b=rng.normal(size=(rank, n)) * 0.1)
    if blocks:
        bo, bi = blocks
        extra.update(block_u=rng.normal(size=(n // bo, k // bi, bo)) * 0.2,
                     block_v=rng.normal(size=(n // bo, k // bi, bi)) * 0.2, block=blocks)
    w = jnp.asarray(rng.normal(size=(n, k)).astype(np.float32) * 0.05)
    return make_qweight(w, w_bits=4, a_bits=4, execution="fused", **kw, **extra)


def _x(k, rows, seed, dtype=jnp.float32):
    x = np.random.default_rng(50 + seed).standard_t(5, size=(rows, k)).astype(np.float32)
    x[:, 5] *= 8.0                                                  # an outlier channel, as after GELU / LN
    return jnp.asarray(x, dtype)


def _assert_codes_close(got, want):
    """The kernel's and XLA's sums differ in order (float32 rounding): a code may move by one where x' / s lies
    within that rounding of a half-integer, nowhere by more, and almost nowhere at all."""
    d = np.abs(np.asarray(got, np.int32) - np.asarray(want, np.int32))
    assert d.max() <= 1 and d.mean() < 2e-3, (d.max(), d.mean())


@pytest.mark.parametrize("name", list(LAYERS))
def test_rotating_prologue_matches_xla_prologue(name):
    node = _layer(name)
    kw = prepare_weight(node, prologue="pallas")
    assert pk.fits(kw.node, kw.bw, 0)
    for dtype, bits in ((jnp.float32, 4), (jnp.bfloat16, jnp.int32(6))):   # x' float32 (3 parts) / bf16 x as is
        x = _x(node.k, 37, 1, dtype)                               # 37 rows: padded to the row tile
        a = prologue(x, kw.node, bits, pad_to=16, bw=kw.bw)
        b = pk.pallas_prologue(x, kw.node, kw.bw, bits, pad_to=16, interpret=True)
        assert b.m == a.m == 37 and b.xq.shape == a.xq.shape == (48, node.k)
        _assert_codes_close(b.xq, a.xq)
        np.testing.assert_allclose(np.asarray(b.sx), np.asarray(a.sx), rtol=1e-6)
        for got, want in ((b.dh, a.dh), (b.dt, a.dt)):
            assert (got is None) == (want is None)
            if got is not None:                # per-run sums, t and dt each rounded to bf16: two roundings
                got = np.asarray(got, np.float32)[:, : want.shape[1]]
                np.testing.assert_allclose(got, np.asarray(want, np.float32), rtol=2 ** -6, atol=1e-5)


def test_rotated_tile_is_the_hadamard_of_the_signed_input():
    """x' inside the kernel (dumped through the codes at 8 bits with a known scale) is x diag(signs) H_192 to
    float32 rounding: the Kronecker form, the signs and 1/sqrt(b) are the reference's."""
    from qdit4sr_jax.quant.transforms import hadamard_matrix, rotation_signs
    node = _layer("full 12 x 16, signs, low-rank + blocks")
    kw = prepare_weight(node, prologue="pallas")
    x = _x(192, 16, 3)
    ops = pk.pallas_prologue(x, kw.node, kw.bw, 8, pad_to=16, interpret=True)
    xp = np.asarray(x, np.float64) * rotation_signs(192)[None, :] @ hadamard_matrix(192)
    s = np.abs(xp).max(axis=1) / 127.0
    np.testing.assert_allclose(np.asarray(ops.sx), s, rtol=1e-6)
    want = np.clip(np.round(xp / s[:, None]), -127, 127)
    d = np.abs(np.asarray(ops.xq, np.int32) - want)
    assert d.max() <= 1 and d.mean() < 2e-3


@pytest.mark.parametrize("name", list(LAYERS))
def test_rotating_prologue_end_to_end(name):
    """fused_linear with the kernel equals the fake-quant reference at every step of a VaTMP schedule."""
    node = _layer(name, seed=2).replace(a_schedule=jnp.asarray([4, 3, 8], jnp.int32))
    kw = prepare_weight(node, prologue="pallas")
    bias = jnp.asarray(np.random.default_rng(2).normal(size=(node.n,)).astype(np.float32))
    x = _x(node.k, 21, 4).reshape(3, 7, node.k)
    run = jax.jit(lambda x, t: fused_linear(x, kw, bias, step=t, backend="interpret", config=CFG))
    for t in range(3):
        ref = linear(x, node, bias, step=t, execution="fake")
        assert rel_err(run(x, jnp.int32(t)), ref) <= 2e-3, (t, rel_err(run(x, jnp.int32(t)), ref))


def test_rotations_the_kernel_does_not_cover_take_the_xla_prologue():
    node = _layer("block 128, signs, low-rank")
    small = prepare_weight(node.replace(rotate=8), prologue="pallas")     # runs of 8: below a Triton tile
    assert not pk.fits(small.node, small.bw, 0)
    kw = prepare_weight(node, prologue="pallas")
    assert pk.fits(kw.node, kw.bw, 0, block_m=16)
    assert not pk.fits(kw.node, kw.bw, 0, block_m=pk.ROT_TILE // 64)   # bm * K over the register budget
    bias = jnp.zeros((node.n,), jnp.float32)
    x = _x(node.k, 21, 5)
    ref = linear(x, node.replace(rotate=8), bias, act_bits=4, execution="fake")
    assert rel_err(fused_linear(x, small, bias, act_bits=4, backend="interpret", config=CFG), ref) <= 2e-6


def test_set_prologue_tiles_overrides_the_default_config():
    from qdit4sr_jax.quant.kernels import operands
    node = _layer("block 128, signs, low-rank")
    base = operands.default_config(node)
    prev = operands.set_prologue_tiles(prologue_block_m=32, prologue_rot_warps=16)
    try:
        cfg = operands.default_config(node)
        assert (cfg.prologue_block_m, cfg.prologue_warps, cfg.prologue_rot_warps) == (32, base.prologue_warps, 16)
        assert cfg.block_m == base.block_m
        with pytest.raises(ValueError, match="set_prologue_tiles"):
            operands.set_prologue_tiles(prologue_warps=0)
        with pytest.raises(ValueError, match="set_prologue_tiles"):
            operands.set_prologue_tiles(block_n=64)
    finally:
        operands.set_prologue_tiles(**prev)
    assert operands.default_config(node) == base


@pytest.mark.parametrize("name", list(LAYERS))
def test_input_space_down_projection(name):
    """prepare(down="input"): [dh | dt] = x jd_in with jd_in = diag(signs / smooth) H jd, the layer's own input
    instead of x'. The same function as down="joint" up to the branch's bf16 rounding; jd_in itself is T jd to
    one bf16 rounding (float64 check)."""
    from qdit4sr_jax.quant.transforms import hadamard_matrix, rotation_signs
    node = _layer(name, seed=3)
    joint, inp = prepare_weight(node, down="joint"), prepare_weight(node, down="input")
    assert inp.bw.jd_input and not joint.bw.jd_input
    t = np.kron(np.eye(node.k // node.rotate), hadamard_matrix(node.rotate))
    scale = np.ones(node.k)
    if node.signs:
        scale = scale * rotation_signs(node.k)
    if node.smooth is not None:
        scale = scale / np.asarray(node.smooth, np.float64)
    want = scale[:, None] * (t @ np.asarray(joint.bw.jd, np.float64))
    np.testing.assert_allclose(np.asarray(inp.bw.jd, np.float64), want, rtol=2 ** -8, atol=1e-6)
    from qdit4sr_jax.quant.reference import branches, transform_input
    bias = jnp.asarray(np.random.default_rng(3).normal(size=(node.n,)).astype(np.float32))
    x = _x(node.k, 21, 6)
    xp = np.asarray(transform_input(x, node), np.float64)            # the exact branch, float64
    f = node.float_branches()
    exact = xp @ np.asarray(f.lr_a, np.float64) @ np.asarray(f.lr_b, np.float64) if f.lr_a is not None else 0.0
    if f.block_u is not None:
        bo, bi = f.block
        v, u = np.asarray(f.block_v, np.float64), np.asarray(f.block_u, np.float64)   # [n_bo, n_bi, b]
        t = np.einsum("mjb,ijb->mij", xp.reshape(len(xp), -1, bi), v)
        exact = exact + np.einsum("mij,ijo->mio", t, u).reshape(len(xp), -1)[:, : node.n]
    branch = np.asarray(branches(transform_input(x, node), node), np.float64)          # the reference's rounding
    no_branch = linear(x, node.replace(lr_a=None, lr_b=None, block_u=None, block_v=None), bias, act_bits=4,
                       execution="fake")
    ref = linear(x, node, bias, act_bits=4, execution="fake")
    a = fused_linear(x, joint, bias, act_bits=4, backend="xla")
    b = fused_linear(x, inp, bias, act_bits=4, backend="xla")
    assert rel_err(a, ref) <= 1e-5
    err_ref = np.linalg.norm(branch - exact)                          # bf16(x') lr_a: the reference's own error
    err_in = np.linalg.norm(np.asarray(b, np.float64) - np.asarray(no_branch, np.float64) - exact)
    assert err_in <= 2.0 * err_ref + 1e-6 * np.linalg.norm(exact), (err_in, err_ref)   # as close as the reference
    with pytest.raises(ValueError, match="x_in"):
        from qdit4sr_jax.quant.kernels.branch_ops import branch_features
        branch_features(x, inp.bw)


def _primitives(jaxpr):
    """Every primitive name in a jaxpr, nested jaxprs (pjit, custom_jvp, ...) included."""
    names = []
    for e in jaxpr.eqns:
        names.append(e.primitive.name)
        for v in e.params.values():
            for j in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(j, "jaxpr", j)
                if hasattr(inner, "eqns"):
                    names += _primitives(inner)
    return names


@pytest.mark.parametrize("down", ["joint", "input"])
def test_rows_are_padded_once_on_the_input(down):
    """The XLA prologue pads the rows of the layer's input once (one pad shared by x' and the down GEMM's x), not
    its codes, scales and features one by one (on the H100 XLA fused none of those pads: 379 kernels per 512-px
    step, RESULTS 2026-12-06 22:16); padded rows come out as zero codes and features with scale 1."""
    node = _layer("full 12 x 16, signs, low-rank + blocks", seed=6)
    kw = prepare_weight(node, down=down, xprime="bfloat16")
    x = _x(node.k, 21, 8, jnp.bfloat16)
    ops = lambda o: (o.xq, o.sx, o.dh, o.dt)
    jaxpr = jax.make_jaxpr(lambda v: ops(prologue(v, node, 4, bw=kw.bw, xprime="bfloat16", pad_to=16)))(x).jaxpr
    assert _primitives(jaxpr).count("pad") == 1
    padded, plain = prologue(x, node, 4, bw=kw.bw, xprime="bfloat16", pad_to=16), prologue(x, node, 4, bw=kw.bw,
                                                                                          xprime="bfloat16")
    assert padded.xq.shape[0] == 32 and padded.m == 21
    np.testing.assert_array_equal(np.asarray(padded.xq[:21]), np.asarray(plain.xq))
    np.testing.assert_array_equal(np.asarray(padded.sx[:21]), np.asarray(plain.sx))
    assert not np.asarray(padded.xq[21:]).any() and (np.asarray(padded.sx[21:]) == 1.0).all()
    for f in ("dh", "dt"):
        np.testing.assert_array_equal(np.asarray(getattr(padded, f)[:21], np.float32),
                                      np.asarray(getattr(plain, f), np.float32))
        assert not np.asarray(getattr(padded, f)[21:], np.float32).any()


@pytest.mark.parametrize("name", list(LAYERS))
def test_bf16_xprime_quantizes_the_rounded_rotation(name):
    """prepare(xprime="bfloat16"): the XLA prologue of a rotated layer quantizes bf16(x'): its codes, scales and
    branch features are those of the same layer without a transform fed bf16(x') itself."""
    from qdit4sr_jax.quant.kernels.fused import prologue
    from qdit4sr_jax.quant.reference import transform_input
    node = _layer(name, seed=4)
    kw = prepare_weight(node, xprime="bfloat16")
    assert kw.xprime == "bfloat16" and prepare_weight(node).xprime == "float32"
    plain = node.replace(rotate=0, signs=False, smooth=None)
    x = _x(node.k, 21, 7, jnp.bfloat16)
    a = prologue(x, kw.node, 4, pad_to=16, bw=kw.bw, xprime="bfloat16")
    b = prologue(transform_input(x, node).astype(jnp.bfloat16), plain, 4, pad_to=16, bw=kw.bw)
    for f in ("xq", "sx", "dh", "dt"):
        got, want = getattr(a, f), getattr(b, f)
        assert (got is None) == (want is None)
        if got is not None:
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32), err_msg=f)
    f32 = prologue(x, kw.node, 4, pad_to=16, bw=kw.bw)              # the reference's codes: a few move by one
    d = np.abs(np.asarray(a.xq, np.int32) - np.asarray(f32.xq, np.int32))
    assert d.max() <= 1 and d.mean() < 0.02, (d.max(), d.mean())
    ref = linear(x, node, None, act_bits=4, execution="fake")
    y = fused_linear(x, kw, None, act_bits=4, backend="xla")
    assert rel_err(y, ref) <= 0.03                                  # measured 1.2-2.1 % (a code step per flip)
    with pytest.raises(ValueError, match="xprime"):
        prepare_weight(node, xprime="float16")
