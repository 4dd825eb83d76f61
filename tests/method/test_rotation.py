"""The Hadamard rotation (quant/transforms.py) against a float64 reference: orthonormality, exact inverse,
function preservation, full-dimension blocks m * 2^j (m in 1, 12, 20), random signs folded into the smooth
divisor, and the rotated node through every execution path (fake / int / fused / prepared) and `quantize`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit4sr_jax.quant import transforms as T
from qdit4sr_jax.quant.config import QuantConfig
from qdit4sr_jax.quant.linear import linear
from qdit4sr_jax.quant.plan import layer_spec
from qdit4sr_jax.quant.qweight import make_qweight

BLOCKS = (1, 2, 12, 20, 24, 40, 64, 192, 768, 1536)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _sylvester(p):
    h = np.ones((1, 1))
    while h.shape[0] < p:
        h = np.block([[h, h], [h, -h]])
    return h


@pytest.mark.parametrize("m", [12, 20])
def test_stored_bases_are_symmetric_hadamard(m):
    h = T.hadamard_base(m) * np.sqrt(m)
    assert set(np.unique(h)) == {-1.0, 1.0}
    np.testing.assert_array_equal(h @ h.T, m * np.eye(m))
    np.testing.assert_array_equal(h, h.T)


@pytest.mark.parametrize("block", BLOCKS)
def test_orthonormal_symmetric_and_matches_reference(block):
    m, p = T.hadamard_factors(block)
    ref = np.kron(T.hadamard_base(m), _sylvester(p) / np.sqrt(p))          # float64 reference H_b
    np.testing.assert_allclose(ref @ ref.T, np.eye(block), atol=1e-12)
    np.testing.assert_allclose(ref, ref.T, atol=0)
    k = 2 * block
    x = np.random.default_rng(block).normal(size=(5, k))
    y = np.asarray(T.hadamard_transform(jnp.asarray(x, jnp.float32), block), np.float64)
    want = (x.reshape(5, 2, block) @ ref).reshape(5, k)
    assert _rel(y, want) < 1e-6
    back = np.asarray(T.hadamard_transform(jnp.asarray(y, jnp.float32), block), np.float64)   # H H = I
    assert _rel(back, x) < 1e-6


def test_function_preserved_full_dimension():
    """x W^T == (x H)(W H)^T for the full 1536 = 12 * 128 Hadamard (float64 reference)."""
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(4, 1536)), rng.normal(size=(8, 1536))
    xh = np.asarray(T.hadamard_transform(jnp.asarray(x, jnp.float32), 1536), np.float64)
    wh = np.asarray(T.hadamard_transform(jnp.asarray(w, jnp.float32), 1536), np.float64)
    assert _rel(xh @ wh.T, x @ w.T) < 1e-5


def test_rotation_block_rules():
    assert [T.rotation_block(d) for d in (192, 768, 1536, 6144)] == [64, 256, 512, 2048]          # unchanged
    assert [T.rotation_block(d, "full") for d in (192, 768, 1536, 6144, 1280, 7)] == [192, 768, 1536, 6144, 1280, 1]
    assert T.rotation_block(1536, 256) == 256 and T.rotation_block(192, 256) == 64               # pow2 cap as before
    assert T.rotation_block(6144, 1536) == 1536 and T.rotation_block(192, 1536) == 192           # m * 2^j cap
    with pytest.raises(ValueError, match="rotate_block"):
        T.rotation_block(192, 36)
    with pytest.raises(ValueError, match="m \\* 2\\^j"):
        T.hadamard_transform(jnp.ones((2, 36)), 36)
    for bad in (36, 0, "half"):
        with pytest.raises(ValueError, match="rotate_block"):
            QuantConfig(rotate=True, rotate_block=bad).validate()
    with pytest.raises(ValueError, match="rotate_signs"):
        QuantConfig(rotate_signs=True).validate()
    spec = layer_spec(QuantConfig(rotate=True, rotate_block="full", rotate_signs=True), (192, 64), jnp.float32, 4)
    assert spec.rotate == 192 and spec.rotate_signs


def test_signs_fixed_and_balanced():
    s = T.rotation_signs(1536)
    np.testing.assert_array_equal(s, T.rotation_signs(1536))
    assert set(np.unique(s)) == {-1.0, 1.0} and abs(float(s.mean())) < 0.1


def _rotated_node(execution="fake", k=192, n=48, signs=True, smooth=True, lowrank=True):
    """A W4A4 node rotated over its full input dimension (12 * 16), smoothing and signs in the divisor."""
    from qdit4sr_jax.quant.baselines import quantize_linear
    rng = np.random.default_rng(3)
    w = rng.normal(size=(n, k)).astype(np.float32)
    ch = np.abs(rng.normal(size=k)).astype(np.float32) * 3 + 0.1
    cfg = QuantConfig(method="svdquant", rotate=True, rotate_block="full", rotate_signs=signs, smooth=smooth,
                      lowrank_rank=4 if lowrank else 0, w_bits=4, a_bits=4, execution=execution,
                      branch_dtype="float32")
    spec = layer_spec(cfg, (k, n), jnp.float32, 4)
    node = quantize_linear(jnp.asarray(w), jnp.asarray(ch) if smooth else None, spec=spec)
    return node, w


def test_signs_are_a_static_constant():
    """The signs are the node's static `signs` (no smooth divisor without smoothing), multiplied in x's dtype:
    a bf16 x reaches the rotation as bf16, with the same x' as the float32 path."""
    from qdit4sr_jax.quant.reference import transform_input
    node, w = _rotated_node(smooth=False)
    assert node.rotate == 192 and node.signs and node.smooth is None
    np.testing.assert_array_equal(np.asarray(node.sign_vector()), T.rotation_signs(192))
    xb = jnp.asarray(np.random.default_rng(2).normal(size=(5, 192)), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(transform_input(xb, node)),
                                  np.asarray(transform_input(xb.astype(jnp.float32), node)))
    # the same function as the former layout (signs folded into the float32 smooth divisor)
    old = node.replace(smooth=jnp.asarray(T.rotation_signs(192)), signs=False)
    np.testing.assert_array_equal(np.asarray(transform_input(xb, old)), np.asarray(transform_input(xb, node)))
    smoothed, _ = _rotated_node(smooth=True)
    assert smoothed.signs and smoothed.smooth is not None
    old = smoothed.replace(smooth=smoothed.smooth * jnp.asarray(T.rotation_signs(192)), signs=False)
    xf = xb.astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(transform_input(xf, old)), np.asarray(transform_input(xf, smoothed)))
    np.testing.assert_allclose(np.asarray(old.dequantize()), np.asarray(smoothed.dequantize()), rtol=1e-6, atol=1e-6)
    # weights only (a_bits None path): the node's effective kernel is a 4-bit quantization of W
    eff = np.asarray(node.dequantize())                                    # [K, N]
    assert _rel(eff.T, w) < 0.2


@pytest.mark.parametrize("signs", [False, True])
def test_rotated_node_every_execution_path(signs):
    from qdit4sr_jax.quant.kernels import prepare
    node, w = _rotated_node(signs=signs)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 7, 192)).astype(np.float32))
    ref = linear(x, node, execution="fake")
    yi = linear(x, node, execution="int")
    assert _rel(yi, ref) <= 1e-5                                             # int == fake to float rounding
    yf = linear(x, node.replace(execution="fused"))                          # XLA fallback on CPU
    assert _rel(yf, ref) <= 1e-5
    tree = prepare({"layer": {"kernel": node.replace(execution="fused")}})
    yp = linear(x, tree["layer"]["kernel"])
    assert _rel(yp, ref) <= 1e-5
    # float reference of the function: x W^T within W4A4 error, float64 identity without quantization
    fn = linear(x, node.replace(a_bits=None), execution="fake")
    np.testing.assert_allclose(np.asarray(fn), np.asarray(x) @ np.asarray(node.dequantize()), rtol=1e-4, atol=1e-4)
    assert _rel(ref, np.asarray(x) @ w.T) < 0.35


def test_quantize_carries_full_rotation_and_signs():
    """quantize() on a params tree: baselines and the Q-DiT4SR recipe both store the full block and the signs."""
    import qdit4sr_jax
    from qdit4sr_jax.quant.api import quantized_layers
    rng = np.random.default_rng(1)
    params = {f"transformer_blocks_0": {"a": {"kernel": jnp.asarray(rng.normal(size=(192, 96)), jnp.float32)},
                                        "b": {"kernel": jnp.asarray(rng.normal(size=(768, 192)), jnp.float32)}}}
    x = jnp.asarray(rng.normal(size=(4, 768)).astype(np.float32))
    for cfg in (QuantConfig(method="rotation", rotate=True, rotate_block="full", rotate_signs=True),
                QuantConfig(method="qdit4sr", rotate=True, rotate_block="full", rotate_signs=True, hsvd=True,
                            lowrank_rank=8, hsvd_block=(64, 64), vasmp=True, w_bit_candidates=(3, 4, 5),
                            vasmp_solver="greedy", vasmp_distortion="model")):
        nodes = quantized_layers(qdit4sr_jax.quantize(params, cfg))
        b = nodes["transformer_blocks_0/b"]
        assert nodes["transformer_blocks_0/a"].rotate == 192 and b.rotate == 768
        assert b.signs and b.smooth is None
        np.testing.assert_array_equal(np.asarray(b.sign_vector()), T.rotation_signs(768))
        w = np.asarray(params["transformer_blocks_0"]["b"]["kernel"])
        assert _rel(np.asarray(linear(x, b.replace(a_bits=None))), np.asarray(x) @ w) < 0.2
