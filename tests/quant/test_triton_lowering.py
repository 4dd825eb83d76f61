"""The Pallas kernels lower to Triton for CUDA on any machine: `lower(lowering_platforms=("cuda",))` runs
Pallas' Triton lowering (no GPU needed, nothing compiled), so a primitive the lowering lacks or a tile shape
it refuses fails here, in CI on the CPU, instead of on the GPU. Full DiT4SR layer shapes, abstract weights
(`jax.eval_shape`): the prologue kernel and the GEMM kernel of a prepared Q-DiT4SR W4A4 layer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit4sr_jax.quant.kernels import (DEFAULT_CONFIG, GROUPED_CONFIG, KernelConfig, fused_linear, lowering_for,
                                       prepare_weight)
from qdit4sr_jax.quant.kernels import prologue_kernel as pk
from qdit4sr_jax.quant.linear import linear
from qdit4sr_jax.quant.qweight import make_qweight


def _abstract_layer(k, n, rank=26, block=256):
    nbo, nbi = -(-n // block), -(-k // block)

    def build(w):
        return prepare_weight(make_qweight(
            w, w_bits=4, group_size=64, group_scale="int", a_bits=4, execution="fused",
            smooth=jnp.ones((k,)), lr_a=jnp.zeros((k, rank)), lr_b=jnp.zeros((rank, n)),
            block_u=jnp.zeros((nbo, nbi, block)), block_v=jnp.zeros((nbo, nbi, block)), block=(block, block),
            lowrank_bits=8, a_schedule=np.array([4, 5, 3], np.int32)), prologue="pallas")

    return jax.eval_shape(build, jax.ShapeDtypeStruct((n, k), jnp.float32))


@pytest.mark.parametrize("k,n", [(1536, 1536), (1536, 6144), (6144, 1536)])
def test_prologue_and_gemm_kernels_lower_to_triton(k, n):
    kw = _abstract_layer(k, n)
    assert pk.fits(kw.node, kw.bw, 0)

    def layer(kw, x, step):                  # through the dispatch: "auto" picks the kernels for a GPU
        return linear(x, kw, None, step=step)

    x = jax.ShapeDtypeStruct((2 * 1024 + 7, k), jnp.bfloat16)
    with lowering_for("gpu"):
        text = jax.jit(layer).trace(kw, x, jax.ShapeDtypeStruct((), jnp.int32)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2            # one prologue kernel, one GEMM kernel
    assert "qlinear_prologue" in text and "qlinear_nk" in text


@pytest.mark.parametrize("cfg", [DEFAULT_CONFIG, GROUPED_CONFIG,
                                 KernelConfig(unpack="kernel"), KernelConfig(num_warps=4, unpack="kernel")])
@pytest.mark.parametrize("group_size", [None, 64])
def test_stored_node_gemm_kernel_lowers_to_triton(cfg, group_size):
    """The GEMM kernel of stored (unprepared) nodes: per-channel and group-wise, unpacked outside or inside."""
    def build(w):
        return make_qweight(w, w_bits=4, group_size=group_size, a_bits=4, execution="fused",
                            lr_a=jnp.zeros((1536, 32)), lr_b=jnp.zeros((32, 1536)))

    node = jax.eval_shape(build, jax.ShapeDtypeStruct((1536, 1536), jnp.float32))
    x = jax.ShapeDtypeStruct((2048, 1536), jnp.bfloat16)
    with lowering_for("gpu"):
        text = jax.jit(lambda node, x: fused_linear(x, node, None, config=cfg)).trace(node, x).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1


def test_round_half_even_matches_jnp_round():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, -0.49999997, 126.5, 127.49999, -126.5, 3.0, 0.0,
                  -0.0, 1e-30, 0.5000001], np.float32)
    v = np.concatenate([v, np.random.default_rng(0).uniform(-130, 130, 10000).astype(np.float32),
                        np.round(np.random.default_rng(1).uniform(-130, 130, 1000)).astype(np.float32) + 0.5])
    np.testing.assert_array_equal(np.asarray(pk.round_half_even(jnp.asarray(v))), np.asarray(jnp.round(v)))


@pytest.mark.parametrize("k,smooth", [(1536, False), (1536, True), (6144, False)])
def test_rotating_prologue_lowers_to_triton(k, smooth):
    """The paper preset's layer (signs, the full Hadamard 1536 = H_12 (x) S_128, H-SVD branches; the rotation
    inside the prologue kernel) lowers to the same two Triton kernels; with smoothing too (three bf16 parts per
    dot). K = 6144 is over the kernel's register budget (`ROT_TILE`) and keeps the XLA prologue: one kernel."""
    n, rank, block = 1536, 32, 256

    def build(w):
        return prepare_weight(make_qweight(
            w, w_bits=4, group_size=64, group_scale="int", a_bits=4, execution="fused", rotate=k, signs=True,
            smooth=jnp.ones((k,)) if smooth else None, lr_a=jnp.zeros((k, rank)), lr_b=jnp.zeros((rank, n)),
            block_u=jnp.zeros((n // block, k // block, block)), block_v=jnp.zeros((n // block, k // block, block)),
            block=(block, block), lowrank_bits=8), prologue="pallas")

    kw = jax.eval_shape(build, jax.ShapeDtypeStruct((n, k), jnp.float32))
    assert pk.fits(kw.node, kw.bw, 0) == (k <= 2048)
    x = jax.ShapeDtypeStruct((8192, k), jnp.bfloat16)
    with lowering_for("gpu"):
        text = jax.jit(lambda kw, x: linear(x, kw, None, act_bits=4)).trace(kw, x).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == (2 if k <= 2048 else 1)


@pytest.mark.parametrize("down", ["joint", "input"])
def test_joint_branch_features_reach_the_gemm_kernel_unsliced(down):
    """A prepared layer on the XLA prologue (`prepare(down="joint" | "input")`): the joint down-projection's
    features go into the GEMM kernel as one array (read in place: `Operands.joint`), so the lowered step has
    no slice op at all (before: two copies per layer and call, ~1,000 slice kernels in a 512-px W4A4 step)."""
    k = n = 1536

    def build(w):
        return prepare_weight(make_qweight(
            w, w_bits=4, group_size=64, group_scale="int", a_bits=4, execution="fused", rotate=k, signs=True,
            lr_a=jnp.zeros((k, 26)), lr_b=jnp.zeros((26, n)), block_u=jnp.zeros((6, 6, 256)),
            block_v=jnp.zeros((6, 6, 256)), block=(256, 256)), down=down, xprime="bfloat16")

    kw = jax.eval_shape(build, jax.ShapeDtypeStruct((n, k), jnp.float32))
    assert kw.bw.dt_col == 32 and kw.bw.rb == 16
    x = jax.ShapeDtypeStruct((2048, k), jnp.bfloat16)
    with lowering_for("gpu"):
        text = jax.jit(lambda kw, x: linear(x, kw, None, act_bits=4)).trace(kw, x).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "stablehlo.slice" not in text


def test_gemm_kernel_makes_the_scale_from_the_level_table():
    """A prepared layer with a VaTMP schedule (40 steps, the full sampler's) on the XLA prologue: the GEMM kernel
    receives the rows' max|x'|, the layer's 1 / levels table and the step and makes the scale itself
    (`Operands.row_scale`), so the lowered step passes no per-layer scale array: one Triton kernel, reading the
    float32 [40] table."""
    k = n = 1536
    sched = np.tile(np.array([4, 5, 3, 4], np.int32), 10)

    def build(w):
        return prepare_weight(make_qweight(
            w, w_bits=4, a_bits=4, execution="fused", rotate=k, signs=True, a_schedule=sched,
            lr_a=jnp.zeros((k, 32)), lr_b=jnp.zeros((32, n))), down="input", xprime="bfloat16")

    kw = jax.eval_shape(build, jax.ShapeDtypeStruct((n, k), jnp.float32))
    assert kw.inv_levels.shape == (40,)
    x = jax.ShapeDtypeStruct((2048, k), jnp.bfloat16)
    with lowering_for("gpu"):
        text = jax.jit(lambda kw, x, t: linear(x, kw, None, step=t)).trace(
            kw, x, jax.ShapeDtypeStruct((), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    call = next(line for line in text.splitlines() if "__gpu$xla.gpu.triton" in line)
    assert "tensor<40xf32>" in call and "tensor<1xi32>" in call
