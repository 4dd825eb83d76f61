"""Quantizers vs an independent float64 numpy reference; packing; bit-width checks."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from qdit4sr_jax.quant import quantizer as qz


def ref_quant(x, bits, symmetric, axis, clip=1.0):
    """float64 reference: returns (codes, scale, zero) with the conventions of quantizer.py."""
    x = np.asarray(x, np.float64)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = np.max(np.abs(x), axis=axis, keepdims=True) * clip / qmax
        s = np.where(s > 0, s, 1.0)
        return np.clip(np.round(x / s), -qmax, qmax), s, None
    lo = np.minimum(x.min(axis=axis, keepdims=True), 0) * clip
    hi = np.maximum(x.max(axis=axis, keepdims=True), 0) * clip
    s = (hi - lo) / (2 ** bits - 1)
    s = np.where(s > 0, s, 1.0)
    z = np.round(-lo / s) - 2 ** (bits - 1)
    return np.clip(np.round(x / s) + z, -2 ** (bits - 1), 2 ** (bits - 1) - 1), s, z


def check_codes(q, s, z, ref):
    """Codes equal the reference except where x/s sits within 1e-4 of a rounding tie (float32 vs 64)."""
    rq, rs, rz = ref
    np.testing.assert_allclose(np.asarray(s, np.float64), rs, rtol=2e-6)
    if rz is not None:
        np.testing.assert_array_equal(np.asarray(z, np.float64), rz)
    diff = np.asarray(q, np.float64) != rq
    assert np.abs(np.asarray(q, np.float64) - rq).max() <= 1
    assert diff.mean() < 1e-3


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_granularities_vs_reference(bits, symmetric):
    rng = np.random.default_rng(bits * 2 + symmetric)
    w = (rng.standard_t(4, size=(24, 256)) * 0.05).astype(np.float32)
    for gs in (None, 64, 128, 100):           # per channel, groups 64/128, 100 does not divide 256
        q, s, z = qz.quantize_weight(jnp.asarray(w), bits, gs, symmetric)
        G, g = qz.num_groups(256, gs)
        wp = np.pad(w, ((0, 0), (0, G * g - 256))).reshape(24, G, g)
        rq, rs, rz = ref_quant(wp, bits, symmetric, -1)
        if G * g != 256:  # padded tail holds the zero code
            rq[:, -1, 256 - (G - 1) * g:] = 0 if rz is None else rz[:, -1, :]
        check_codes(q, s[..., None], None if z is None else z[..., None], (rq, rs, rz))
        deq = np.asarray(qz.dequantize_weight(q, s, z, 256))
        rdeq = ((rq - (0 if rz is None else rz)) * rs).reshape(24, G * g)[:, :256]
        assert np.abs(deq - rdeq).max() <= 1.01 * rs.max()  # at most one level off at a tie
        assert np.mean(np.abs(deq - rdeq) > 1e-6 * np.abs(rdeq).max()) < 1e-3


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_token_and_per_tensor_vs_reference(bits, symmetric):
    rng = np.random.default_rng(100 + bits)
    x = rng.normal(size=(3, 5, 96)).astype(np.float32)
    x[0, 0] = 0.0                                  # an all-zero token: scale 1, codes zero-code
    q, s, z = qz.quantize_per_token(jnp.asarray(x), bits, symmetric)
    assert q.dtype == jnp.int8 and s.shape == (3, 5, 1)
    check_codes(q, s, z, ref_quant(x, bits, symmetric, -1))
    q, s, z = qz.quantize_tensor(jnp.asarray(x), bits, symmetric)
    rq, rs, rz = ref_quant(x, bits, symmetric, (0, 1, 2))
    check_codes(q, s.reshape(1, 1, 1), None if z is None else z.reshape(1, 1, 1), (rq, rs, rz))
    # traced bits give the same codes as static bits
    qt, st, zt = jax.jit(lambda x, b: qz.quantize_per_token(x, b, symmetric))(jnp.asarray(x), jnp.int32(bits))
    q2, s2, _ = qz.quantize_per_token(jnp.asarray(x), bits, symmetric)
    np.testing.assert_array_equal(np.asarray(qt), np.asarray(q2))
    np.testing.assert_array_equal(np.asarray(st), np.asarray(s2))


def test_clip_ratio_and_clip_search():
    rng = np.random.default_rng(7)
    w = rng.standard_t(3, size=(32, 128)).astype(np.float32)
    q, s, z = qz.quantize_weight(jnp.asarray(w), 4, 64, True, clip_ratio=0.8)
    rq, rs, _ = ref_quant(w.reshape(32, 2, 64), 4, True, -1, clip=0.8)
    check_codes(q, s[..., None], None, (rq, rs, None))
    assert np.abs(rq).max() == 7                    # clipped values saturate
    plain = np.asarray(qz.dequantize_weight(*qz.quantize_weight(jnp.asarray(w), 4, 64), 128))
    searched = np.asarray(qz.dequantize_weight(*qz.quantize_weight(jnp.asarray(w), 4, 64, clip_search=True), 128))
    assert np.sum((searched - w) ** 2) < np.sum((plain - w) ** 2)


@pytest.mark.parametrize("length", [1, 2, 7, 64, 129])
def test_pack_unpack_roundtrip(length):
    rng = np.random.default_rng(length)
    for bits in (2, 3, 4):
        lo, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
        q = rng.integers(lo, hi + 1, size=(3, length)).astype(np.int8)
        p = qz.pack_int4(jnp.asarray(q))
        assert p.dtype == jnp.uint8 and p.shape == (3, (length + 1) // 2)
        np.testing.assert_array_equal(np.asarray(qz.unpack_int4(p, length)), q)


def test_pack_layout_documented():
    # byte j = low nibble element 2j, high nibble element 2j+1 (two's complement)
    p = np.asarray(qz.pack_int4(jnp.asarray([[1, -2, 7, -8]], jnp.int8)))
    assert p.tolist() == [[0x1 | (0xE << 4), 0x7 | (0x8 << 4)]]


@pytest.mark.parametrize("bad", [1, 9, 0, 16, 4.5, "4", None, True])
def test_unsupported_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        qz.check_bits(bad)
    with pytest.raises(ValueError, match="bits"):
        qz.quantize_weight(jnp.ones((4, 8)), bad)


def test_zero_size_weight():
    with pytest.raises(ValueError, match="zero-size"):
        qz.quantize_weight(jnp.ones((0, 8)), 4)
