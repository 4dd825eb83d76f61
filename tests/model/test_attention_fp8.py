"""FP8 attention (qdit4sr_jax.model.attention): the jnp reference quantizes for real, scales are robust,
impl names are validated, and the tiny DiT4SR runs with attention_impl="fp8-ref" close to float."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit4sr_jax.config import ATTENTION_IMPLS, ModelConfig
from qdit4sr_jax.model import attention as A
from qdit4sr_jax.model.dit4sr import DiT4SRTransformer, param_shapes

# one compile per configuration (eager dispatch of the reference compiles every op kernel separately)
REF = jax.jit(A.fp8_attention_reference, static_argnames=("p_mode", "query_chunk"))


def _qkv(B=2, T=40, S=None, H=3, D=16, seed=0, scale=1.0):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    S = S or T
    return (jax.random.normal(k[0], (B, T, H, D)) * scale, jax.random.normal(k[1], (B, S, H, D)) * scale,
            jax.random.normal(k[2], (B, S, H, D)) * scale)


def _rel(a, b):
    return float(jnp.linalg.norm(jnp.asarray(a, jnp.float32) - b) / jnp.linalg.norm(b))


def test_quantize_fp8_scales_zeros_and_large_values():
    x = jnp.array([[0.0, 1.0, -3.0, 1e30]], jnp.float32)
    x8, d = A.quantize_fp8(x)
    assert x8.dtype == jnp.float8_e4m3fn and d.dtype == jnp.float32
    y = x8.astype(jnp.float32) * d
    assert np.isfinite(np.asarray(y)).all() and float(y[0, 3]) == pytest.approx(1e30, rel=1e-6)
    z8, dz = A.quantize_fp8(jnp.zeros((3, 4), jnp.bfloat16))      # all zero: scale 1/448, no NaN
    assert float(dz) == pytest.approx(1 / 448) and not np.any(np.asarray(z8.astype(jnp.float32)))
    # within the e4m3 grid: relative error <= 2^-4 for values in the normal range
    r = jax.random.normal(jax.random.PRNGKey(1), (1000,))
    r8, dr = A.quantize_fp8(r)
    big = jnp.abs(r) > float(dr) * 2.0 ** -6 * 4
    err = jnp.abs(r8.astype(jnp.float32) * dr - r) / jnp.abs(r)
    assert float(jnp.max(jnp.where(big, err, 0))) <= 2.0 ** -4 + 1e-6
    assert float(jnp.max(jnp.abs(r8.astype(jnp.float32)))) == 448.0


def test_fp8_reference_quantizes_bounded_error_and_chunking():
    q, k, v = _qkv(S=56)
    ref = jax.jit(A.float_attention_reference, static_argnames="query_chunk")(q, k, v, query_chunk=16)
    np.testing.assert_allclose(ref, jax.nn.dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
    for mode in A.P_MODES:
        out = REF(q, k, v, p_mode=mode)
        assert out.shape == ref.shape and out.dtype == q.dtype
        e = _rel(out, ref)
        assert 5e-3 < e < 0.12, (mode, e)          # it really quantizes, and stays bounded (measured ~0.07)
    base = out = REF(q, k, v, p_mode="flash")
    np.testing.assert_array_equal(REF(q, k, v, p_mode="flash", query_chunk=16), base)   # 3 chunks, last padded
    # a subsample of queries with the full tensor's amax gives the same rows
    idx = jnp.array([0, 5, 33])
    np.testing.assert_array_equal(REF(q[:, idx], k, v, p_mode="flash", amax_q=A.amax(q)), base[:, idx])
    # large and tiny magnitudes (same scores, v scaled): the per-tensor scales give the same result
    for s in (2.0 ** -20, 2.0 ** 20):
        np.testing.assert_allclose(REF(q * s, k / s, v * s, p_mode="flash") / s, base, rtol=1e-6, atol=1e-7)
    # all-zero v gives zeros, not NaN
    assert not np.any(np.asarray(REF(q, k, jnp.zeros_like(v), p_mode="flash")))


def test_attention_dispatch_and_validation():
    q, k, v = _qkv(S=56)
    att = jax.jit(A.attention, static_argnums=3)
    np.testing.assert_allclose(att(q, k, v, "xla"), att(q, k, v, None), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(att(q, k, v, "fp8-ref"), REF(q, k, v, p_mode="flash"))
    if jax.default_backend() != "gpu":              # "fp8" falls back to the reference off GPU
        A._warn_fallback.cache_clear()
        with pytest.warns(UserWarning, match="fp8-ref"):
            np.testing.assert_array_equal(att(q, k, v, "fp8"), REF(q, k, v, p_mode="flash"))
    with pytest.raises(ValueError, match="attention_impl 'flash8'"):
        A.attention(q, k, v, "flash8")
    with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
        A.attention(q[0], k[0], v[0], "fp8-ref")
    with pytest.raises(ValueError, match="incompatible"):
        A.attention(q, k[..., :8], v, "fp8-ref")
    with pytest.raises(ValueError, match="p_mode"):
        A.fp8_attention_reference(q, k, v, p_mode="exact")
    with pytest.raises(ValueError, match="attention_impl 'fp16'"):
        ModelConfig.preset("tiny").replace(attention_impl="fp16")
    assert set(ATTENTION_IMPLS) == {None, "xla", "cudnn", "fp8", "fp8-ref"}
    with pytest.raises(ValueError, match="head dim"):
        A.fp8_attention_cudnn(*_qkv(T=8, D=24))


def test_per_example_under_vmap_matches_one_call_per_example():
    """The vmap rule of the cuDNN FP8 path (exercised here with the reference as the inner function):
    each example keeps its own per-tensor scales, unbatched arguments are broadcast."""
    q, k, v = _qkv(B=1, T=12, H=2, D=16)
    qs = jnp.stack([q, q * 10.0, q * 0.1])
    vs = jnp.stack([v, v * 3.0, -v])
    f = A.per_example_under_vmap(lambda q_, k_, v_: A.fp8_attention_reference(q_, k_, v_, p_mode="flash"))
    out = jax.jit(jax.vmap(f, in_axes=(0, None, 0)))(qs, k, vs)
    for i in range(3):
        np.testing.assert_allclose(out[i], REF(qs[i], k, vs[i], p_mode="flash"), rtol=1e-5, atol=1e-6)


def test_cudnn_fp8_path_traces_to_the_fp8_primitive(monkeypatch):
    """Tracing only (nothing runs): shapes and dtypes through JAX's FP8 attention primitive, plain and under
    vmap. Off GPU, JAX's cuDNN version probe raises before tracing, so it is given a version here."""
    try:
        fa = A.cudnn_fp8_api()
    except RuntimeError:
        pytest.skip("this JAX has no private cuDNN FP8 attention")
    if jax.default_backend() != "gpu":
        monkeypatch.setattr(fa, "check_cudnn_version", lambda: 90800)
    S = jax.ShapeDtypeStruct
    q = S((2, 37, 3, 64), jnp.bfloat16)
    assert jax.eval_shape(A.fp8_attention_cudnn, q, q, q) == S(q.shape, jnp.bfloat16)
    o, amax_s, amax_o = jax.eval_shape(lambda *a: A.fp8_attention_cudnn(*a, return_stats=True), q, q, q)
    assert o == S(q.shape, jnp.bfloat16) and amax_s.shape == amax_o.shape == (1, 1, 1, 1)
    qb = S((4,) + q.shape, jnp.float32)
    assert jax.eval_shape(jax.vmap(A.fp8_attention_cudnn, in_axes=(0, None, 0)), qb, q, qb) == qb
    jaxpr = str(jax.make_jaxpr(lambda *a: A.fp8_attention_cudnn(*a, return_stats=True))(
        *(jnp.zeros((1, 16, 2, 64), jnp.bfloat16),) * 3))
    assert "f8_e4m3fn[1,16,2,64]" in jaxpr and "dot_product_attention_fp8" in jaxpr


def test_cudnn_api_detection_is_clear():
    """On any backend the private-API probe either finds what fp8 needs or names the JAX version."""
    try:
        fa = A.cudnn_fp8_api()
    except RuntimeError as e:
        assert jax.__version__ in str(e) and "fp8-ref" in str(e)
    else:
        assert {"descale_q", "scale_s", "scale_o"} <= set(fa.fp8_params_keys)


def test_tiny_dit4sr_fp8_ref_close_to_float():
    cfg = ModelConfig.preset("tiny")
    r = np.random.default_rng(1)
    scale = lambda x: 1 / np.sqrt(x.shape[0] if x.ndim == 2 else (9 if x.ndim == 4 else 25))
    p = jax.tree_util.tree_map(lambda x: jnp.asarray(r.standard_normal(x.shape) * scale(x), x.dtype),
                               param_shapes(cfg))
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    args = (jax.random.normal(k[0], (2, 8, 6, 4)), jax.random.normal(k[1], (2, 8, 6, 4)),
            jnp.array([300.0, 800.0]), jax.random.normal(k[3], (2, 7, cfg.joint_attention_dim)),
            jax.random.normal(k[4], (2, cfg.pooled_projection_dim)))
    # both models in one jit (one compile; cheaper on CPU than eager dispatch of two forwards)
    ref, out = jax.jit(lambda p, *a: tuple(DiT4SRTransformer(cfg.replace(attention_impl=i)).apply({"params": p}, *a)
                                           for i in (None, "fp8-ref")))(p, *args)
    assert out.shape == ref.shape and np.isfinite(np.asarray(out)).all()
    e = _rel(out, ref)
    assert 1e-4 < e < 0.03, e                       # measured 0.0061 (tiny random model)
