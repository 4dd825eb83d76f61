"""The online Hadamard as dense +-1 matmuls (`transforms.hadamard_transform`'s default since 2026-12-05) against a
float64 reference (orthonormal, exact inverse, equal to the butterflies of before), the exact three-part bf16 split
the GPU formulation uses, and the joint branch down-projection of `kernels.prepare(..., down="joint")` against the
split one and the fake-quant reference, on fresh random inputs."""
import jax.numpy as jnp
import numpy as np
import pytest

from qdit4sr_jax.quant import transforms as T
from qdit4sr_jax.quant.kernels import fused_linear, prepare, prepare_weight
from qdit4sr_jax.quant.linear import linear
from qdit4sr_jax.quant.qweight import make_qweight

IMPLS = ("dense", "dense-sum", "dense-wide", "wide-sum", "full", "butterfly")


def _ref64(x, block):
    h = T.hadamard_matrix(block)
    m, k = x.shape
    return (x.reshape(m, k // block, block) @ h).reshape(m, k)


def _maxrel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("block,k", [(12, 24), (20, 40), (64, 128), (192, 192), (512, 1536), (1536, 1536),
                                     (6144, 6144)])
@pytest.mark.parametrize("impl", IMPLS)
def test_every_implementation_equals_float64(block, k, impl):
    rng = np.random.default_rng(block + k + len(impl))
    x = rng.normal(size=(3, k)) * np.exp(rng.normal(size=(1, k)))
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
    for exact in (False, True):                       # True: the GPU formulation (exact bf16 GEMMs), run on the CPU
        # exact: 3 x K exact products summed in float32 in the order of the CPU's GEMM kernel, which depends on the
        # machine (up to 2.5e-6 / 7.9e-6 back on an AMD EPYC on 2026-12-07, < 1e-6 / 2e-6 before); a part missing
        # from the split would cost ~2^-16 of every element
        tol, tol_back = (5e-6, 2e-5) if exact else (1e-6, 2e-6)
        y = T.hadamard_transform(jnp.asarray(x, jnp.float32), block, impl=impl, exact_bf16=exact)
        assert y.dtype == jnp.float32
        assert _maxrel(y, _ref64(x, block)) < tol
        yb = T.hadamard_transform(jnp.asarray(xb, jnp.bfloat16), block, impl=impl, exact_bf16=exact)   # bf16 in
        assert _maxrel(yb, _ref64(xb, block)) < 1e-6
        back = T.hadamard_transform(y, block, impl=impl, exact_bf16=exact)        # H H = I
        assert _maxrel(back, x) < tol_back
    old = T.hadamard_transform(jnp.asarray(x, jnp.float32), block, impl="butterfly")
    assert _maxrel(T.hadamard_transform(jnp.asarray(x, jnp.float32), block, impl=impl), old) < 1e-6


def test_bf16_split_is_exact():
    rng = np.random.default_rng(1)
    y = jnp.asarray(rng.normal(size=(257,)) * np.exp(3 * rng.normal(size=(257,))), jnp.float32)
    hi, mid, lo = T.split_bf16(y)
    s = hi.astype(jnp.float32) + mid.astype(jnp.float32) + lo.astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(y))


def test_default_and_choice():
    prev = T.set_hadamard_impl("butterfly")
    try:
        assert T.set_hadamard_impl("dense") == "butterfly"
        with pytest.raises(ValueError, match="implementation"):
            T.set_hadamard_impl("fft")
        with pytest.raises(ValueError, match="implementation"):
            T.hadamard_transform(jnp.ones((1, 12)), 12, impl="fft")
    finally:
        T.set_hadamard_impl(prev)
    assert prev == "auto"


@pytest.mark.parametrize("k,n,rank,block,rot", [(128, 64, 8, 32, 0), (96, 192, 6, 32, 96), (192, 96, 5, 64, 192)])
def test_joint_down_projection_equals_split_and_reference(k, n, rank, block, rot):
    rng = np.random.default_rng(k + n)
    nbo, nbi = -(-n // block), -(-k // block)
    q = make_qweight(jnp.asarray(rng.normal(size=(n, k)) / k ** 0.5, jnp.float32), w_bits=4, a_bits=4,
                     execution="fused", lr_a=rng.normal(size=(k, rank)) / k ** 0.5, lr_b=rng.normal(size=(rank, n)),
                     block_u=rng.normal(size=(nbo, nbi, block)), block_v=rng.normal(size=(nbo, nbi, block)) / block,
                     block=(block, block), dtype="bfloat16", rotate=rot)
    x = jnp.asarray(rng.normal(size=(2, 5, k)), jnp.bfloat16)
    ref = linear(x, q.replace(execution="fake")).astype(jnp.float32)
    joint, split = prepare_weight(q), prepare_weight(q, down="split")
    assert joint.bw.jd is not None and split.bw.jd is None
    assert joint.bw.jd.shape == (k, joint.bw.lr_a.shape[1] + joint.bw.n_bo * joint.bw.rb)
    yj = fused_linear(x, joint).astype(jnp.float32)
    ys = fused_linear(x, split).astype(jnp.float32)
    assert _maxrel(yj, ys) < 1e-2                     # bf16 output; the same sums in another order
    assert float(jnp.linalg.norm(yj - ref) / jnp.linalg.norm(ref)) < 1e-2
    tree = prepare({"l": {"kernel": q, "bias": None}})
    assert tree["l"]["kernel"].bw.jd is not None      # prepare's default is the joint GEMM
    with pytest.raises(ValueError, match="down"):
        prepare_weight(q, down="both")


def test_auto_picks_the_measured_fastest():
    """"auto" = one +-1 GEMM per block up to FULL_CAP on a GPU (measured fastest on an H100), "dense" above it and
    off GPU; every choice computes the same H to float rounding."""
    assert T.auto_impl(1536, "gpu") == "full" and T.auto_impl(512, "gpu") == "full"
    assert T.auto_impl(6144, "gpu") == "dense" and T.auto_impl(T.FULL_CAP * 2, "gpu") == "dense"
    assert T.auto_impl(1536, "cpu") == "dense" and T.auto_impl(1536, "tpu") == "dense"
    x = jnp.asarray(np.random.default_rng(7).normal(size=(4, 1536)), jnp.bfloat16)
    ref = _ref64(np.asarray(x.astype(jnp.float32), np.float64), 1536)
    for impl in ("auto", "full"):
        assert _maxrel(T.hadamard_transform(x, 1536, impl=impl, exact_bf16=True), ref) < 1e-6


@pytest.mark.parametrize("block", [1536, 6144])
def test_bf16_inner_stage_for_callers_that_round_to_bf16(block):
    """inner="bfloat16" (`prepare(..., xprime="bfloat16")`): the GPU formulation of a two-stage "dense" block rounds
    its first stage's output once to bf16, so the second stage is one bf16 GEMM (no three-part split: no
    concatenation in the lowered code); x' stays within a bf16 rounding of float64; elsewhere nothing changes."""
    import jax
    rng = np.random.default_rng(block)
    x = jnp.asarray(rng.normal(size=(5, block)) * np.exp(rng.normal(size=(1, block))), jnp.bfloat16)
    ref = _ref64(np.asarray(x.astype(jnp.float32), np.float64), block)
    exact = T.hadamard_transform(x, block, impl="dense", exact_bf16=True)
    inner = T.hadamard_transform(x, block, impl="dense", exact_bf16=True, inner="bfloat16")
    assert _maxrel(exact, ref) < 1e-6
    assert 0 < _maxrel(inner, ref) < 2 ** -8
    rel = np.linalg.norm(np.asarray(inner, np.float64) - ref) / np.linalg.norm(ref)
    assert rel < 2 ** -9                                              # about one bf16 rounding
    off = T.hadamard_transform(x, block, impl="dense", exact_bf16=False, inner="bfloat16")  # CPU formulation
    np.testing.assert_array_equal(np.asarray(off), np.asarray(T.hadamard_transform(x, block, impl="dense",
                                                                                   exact_bf16=False)))
    text = lambda **kw: jax.jit(lambda v: T.hadamard_transform(v, block, impl="dense", exact_bf16=True, **kw)).lower(
        x).as_text()
    assert "concatenate" in text() and "concatenate" not in text(inner="bfloat16")
    with pytest.raises(ValueError, match="inner"):
        T.hadamard_transform(x, block, inner="float16")


def test_process_wide_gpu_formulation():
    """`set_exact_bf16(True)` runs the GPU formulation where exact_bf16 is left None (a CPU study of its numerics):
    the same as passing exact_bf16=True; None restores the backend's choice; anything else is refused."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(4, 1536)), jnp.bfloat16)
    want = T.hadamard_transform(x, 1536, impl="dense", exact_bf16=True, inner="bfloat16")
    prev = T.set_exact_bf16(True)
    try:
        got = T.hadamard_transform(x, 1536, impl="dense", inner="bfloat16")
    finally:
        assert T.set_exact_bf16(prev) is True
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    import jax
    if jax.default_backend() != "gpu":                                         # backend's choice: no rounding on CPU
        cpu = T.hadamard_transform(x, 1536, impl="dense", inner="bfloat16")
        assert not np.array_equal(np.asarray(cpu), np.asarray(want))
    with pytest.raises(ValueError, match="exact_bf16"):
        T.set_exact_bf16("yes")
