"""Fused quantized linear (quant/kernels): the Pallas kernel (interpreter on CPU) and the XLA fallback
against the fake-quant reference `quant.linear.linear`, for per-channel / group-wise, 8-bit / packed
4-bit weights, global and block branches, smoothing, traced bits and schedules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from qdit4sr_jax.quant.kernels import KernelConfig, fused_linear, tiles_ok, with_execution
from qdit4sr_jax.quant.kernels.fused import prologue
from qdit4sr_jax.quant.linear import linear
from qdit4sr_jax.quant.qweight import make_qweight

N, K = 64, 128
CFG = KernelConfig(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=2)
CFG_K = KernelConfig(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=2, unpack="kernel")
CONFIGS = {"interpret": CFG, "interpret-unpack-in-kernel": CFG_K, "xla": CFG}


def _node(seed, *, w_bits=4, gs=None, lowrank=0, block=None, smooth=False, a_bits=4, dtype=jnp.float32,
          a_schedule=None):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(N, K)).astype(np.float32) * 0.05)
    kw = {}
    if lowrank:
        kw.update(lr_a=rng.normal(size=(K, lowrank)) * 0.1, lr_b=rng.normal(size=(lowrank, N)) * 0.1)
    if block:
        bo, bi = block
        nbo, nbi = -(-N // bo), -(-K // bi)
        kw.update(block_u=rng.normal(size=(nbo, nbi, bo)) * 0.2, block_v=rng.normal(size=(nbo, nbi, bi)) * 0.2,
                  block=block)
    if smooth:
        kw["smooth"] = np.exp(rng.normal(size=(K,)) * 0.3).astype(np.float32)
    return make_qweight(w, w_bits=w_bits, group_size=gs, a_bits=a_bits, a_schedule=a_schedule,
                        dtype=str(jnp.dtype(dtype)), **kw)


def _x(seed, shape=(2, 9), dtype=jnp.float32):
    rng = np.random.default_rng(100 + seed)
    x = rng.standard_t(5, size=shape + (K,)).astype(np.float32)
    x[..., 5] *= 10.0                                             # an outlier channel
    return jnp.asarray(x, dtype)


CASES = [  # (w_bits, group size, low-rank rank, block)
    (8, None, 0, None), (4, None, 0, None), (4, 64, 0, None), (4, 32, 16, (32, 64)),
    (8, 64, 8, (32, 32)), (3, None, 16, (32, 64)), (4, None, 0, (64, 128)), (6, 32, 0, None),
]


# the in-kernel unpack differs only for packed (<= 4-bit) weights
PARAMS = [(m,) + c for c in CASES for m in CONFIGS if not (m == "interpret-unpack-in-kernel" and c[0] > 4)]


@pytest.mark.parametrize("mode,w_bits,gs,rank,block", PARAMS)
def test_fused_matches_fake_reference(mode, w_bits, gs, rank, block):
    backend, cfg = mode.split("-")[0], CONFIGS[mode]
    node = _node(w_bits * 7 + (gs or 0), w_bits=w_bits, gs=gs, lowrank=rank, block=block)
    bias = jnp.asarray(np.random.default_rng(3).normal(size=(N,)).astype(np.float32))
    assert tiles_ok(node, cfg)
    x = _x(w_bits)
    for a_bits in (4, 8):
        ref = linear(x, node, bias, act_bits=a_bits, execution="fake")
        out = fused_linear(x, node, bias, act_bits=a_bits, backend=backend, config=cfg)
        assert out.shape == ref.shape == (2, 9, N) and out.dtype == ref.dtype
        assert rel_err(out, ref) <= 2e-6, (a_bits, rel_err(out, ref))


def test_fused_bf16_and_smoothing_traced_schedule():
    sched = np.array([8, 4, 3, 6], np.int32)
    node = _node(11, w_bits=4, gs=64, lowrank=16, block=(32, 64), smooth=True, a_schedule=sched)
    x = _x(1, dtype=jnp.bfloat16)

    @jax.jit
    def both(x, s):
        return (linear(x, node, None, step=s, execution="fake"),
                fused_linear(x, node, None, step=s, backend="interpret", config=CFG_K))

    for s in range(4):
        ref, out = both(x, jnp.int32(s))
        assert out.dtype == jnp.bfloat16
        # both end in one bf16 rounding of (almost) the same float32 value
        assert rel_err(out, ref) <= 4e-3, (s, rel_err(out, ref))
    e = [rel_err(both(x, jnp.int32(s))[1], linear(x, node.replace(a_bits=None, a_schedule=None), None))
         for s in (0, 2)]
    assert e[0] < e[1]                                              # 8 bits beat 3 bits: the schedule is used


def test_packed_split_is_a_permutation_within_runs():
    node = _node(2, w_bits=4)
    x = _x(2).reshape(-1, K)
    plain = prologue(x, node, 4)
    split = prologue(x, node, 4, pad_to=16, chunk=64)
    assert split.xq.shape == (32, K) and split.chunk == 64 and plain.chunk == 0
    q = np.asarray(plain.xq)
    expect = q.reshape(18, 2, 32, 2).transpose(0, 1, 3, 2).reshape(18, K)
    np.testing.assert_array_equal(np.asarray(split.xq)[:18], expect)
    np.testing.assert_array_equal(np.asarray(split.xq)[18:], 0)    # padded rows: zero codes


def test_fallbacks_and_errors():
    node = _node(5, w_bits=4)
    x = _x(5)
    # asymmetric activations / float activations: the reference int path, still equal to fake
    asym = node.replace(a_symmetric=False)
    assert rel_err(fused_linear(x, asym, act_bits=4), linear(x, asym, act_bits=4, execution="fake")) <= 1e-6
    wonly = node.replace(a_bits=None)
    assert rel_err(fused_linear(x, wonly), linear(x, wonly)) <= 1e-6
    # on CPU "auto" is the XLA path; a non-tiling shape is refused by the kernel backends only
    assert rel_err(fused_linear(x, node, backend="auto"), linear(x, node, execution="fake")) <= 2e-6
    with pytest.raises(ValueError, match="cannot tile"):
        fused_linear(x, node, backend="interpret", config=KernelConfig(block_n=48))
    with pytest.raises(ValueError, match="unpack"):
        fused_linear(x, node, backend="interpret", config=KernelConfig(block_m=16, block_n=32, unpack="gpu"))
    # execution="fused" on a node dispatches through quant.linear.linear
    fused_node = with_execution({"k": node}, "fused")["k"]
    assert fused_node.execution == "fused"
    assert rel_err(linear(x, fused_node, None), linear(x, node, None, execution="fake")) <= 2e-6
    with pytest.raises(ValueError, match="backend"):
        fused_linear(x, node, backend="cuda")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a GPU"):
            fused_linear(x, node, backend="pallas", config=CFG)
    with pytest.raises(ValueError, match="features"):
        fused_linear(x[..., :-1], node)
    with pytest.raises(TypeError, match="QuantizedWeight"):
        fused_linear(x, jnp.zeros((K, N)))
