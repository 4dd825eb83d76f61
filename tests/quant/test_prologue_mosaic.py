"""The rotation prologue on Mosaic kernels (quant/kernels/prologue_mosaic.py, `prepare(..., prologue="mosaic" |
"mosaic-gemm")`) and the Hadamard kernel (quant/kernels/mosaic_hadamard.py).

The kernels have no interpreter: here their XLA forms (`mosaic_hadamard.hadamard_reference`,
`mosaic_gemm.rowmax_reference`) stand in for them, so the wiring is checked on the CPU (codes, row maxima, the
features read in place, through the Triton GEMM's interpreter), and the prepared layers are lowered for CUDA to
count their kernels. benchmarks/gpu/rotation_gemm.py checks the kernels' numbers on the GPU."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from qdit4sr_jax.quant.kernels import KernelConfig, prepare, prepare_weight
from qdit4sr_jax.quant.kernels import mosaic_gemm as mg
from qdit4sr_jax.quant.kernels import mosaic_hadamard as mh
from qdit4sr_jax.quant.kernels import prologue_mosaic as pm
from qdit4sr_jax.quant.kernels.fused import prologue
from qdit4sr_jax.quant.kernels.pallas_gpu import pallas_gemm_epilogue
from qdit4sr_jax.quant.kernels.prepared import SAMPLER_MODES
from qdit4sr_jax.quant.qweight import make_qweight

N, K = 256, 256
CFG = KernelConfig(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=2)
S = jax.ShapeDtypeStruct
OLD_JAX = tuple(int(p) for p in jax.__version__.split(".")[:2]) < (0, 10)


def _layer(rng, r, sched, **kw):
    w = jnp.asarray(rng.normal(size=(N, K)).astype(np.float32) * 0.05)
    return make_qweight(w, w_bits=4, a_bits=4, execution="fused", rotate=K, signs=True, a_schedule=sched,
                        lr_a=rng.normal(size=(K, r)) * 0.1, lr_b=rng.normal(size=(r, N)) * 0.1,
                        block_u=rng.normal(size=(N // 128, K // 128, 128)) * 0.2,
                        block_v=rng.normal(size=(N // 128, K // 128, 128)) * 0.2, block=(128, 128), **kw)


def _qkv(seed):
    rng = np.random.default_rng(seed)
    scheds = ([4, 3, 8], [4, 4, 4], [6, 3, 5])
    return {n: {"kernel": _layer(rng, r, jnp.asarray(s, jnp.int32)),
                "bias": jnp.asarray(rng.normal(size=(N,)).astype(np.float32))}
            for n, r, s in zip(("to_q", "to_k", "to_v"), (12, 40, 12), scheds)}


def _x(seed, m=37):
    x = np.random.default_rng(100 + seed).standard_t(5, size=(m, K)).astype(np.float32)
    x[:, 3] *= 10.0
    return jnp.asarray(x, jnp.bfloat16)


ROUTES = {"hadamard": ("mosaic", mh.codes_reference), "gemm": ("mosaic-gemm", mg.rowmax_reference)}


@pytest.mark.parametrize("level", [7.0, 15.0, 3.0, 127.0])
def test_codes_from_inverse_differs_only_at_rounding_boundaries(level):
    """The Hadamard kernel's codes x' * (1 / s) (one division per row) equal the XLA prologue's x' / s wherever x' / s
    is not within float32 rounding of a .5 boundary, and differ there by one code at most."""
    from qdit4sr_jax.quant.kernels.operands import codes_from_inverse, codes_from_scale, scale_from_level
    x = jnp.asarray(np.random.default_rng(int(level)).standard_t(4, size=(4096, 256)).astype(np.float32))
    s = scale_from_level(jnp.max(jnp.abs(x), axis=1, keepdims=True), jnp.float32(1.0 / level))
    a = np.asarray(codes_from_scale(x, s, level), np.int32)
    b = np.asarray(codes_from_inverse(x, 1.0 / s, level), np.int32)
    ratio = np.asarray(x / s, np.float64)
    near = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-5 * np.maximum(1.0, np.abs(ratio))
    assert np.abs(a - b).max() <= 1 and np.array_equal(a[~near], b[~near])
    assert np.abs(b).max() == level


@pytest.fixture(params=["xla-codes", "kernel-codes"])
def codes_where(request, monkeypatch):
    """The "hadamard" route's two forms at K = 256 (run length 64): the codes made in the kernel (what every run
    length takes since the 2026-12-07 16:05 GPU check: `prologue_mosaic.CODES_IN_KERNEL`), and the Hadamard
    kernel's x' with XLA codes (run lengths left out of it; forced here so that its wiring stays checked)."""
    if request.param == "xla-codes":
        monkeypatch.setattr(pm, "CODES_IN_KERNEL", (128,))
    return request.param


@pytest.mark.parametrize("route", list(ROUTES))
def test_rotation_prologue_gives_the_xla_prologue_operands(route, codes_where):
    """With the kernel's XLA form, the rotation prologue of each of to_q / to_k / to_v (one shared down-projection,
    different level schedules) gives the XLA prologue's codes, row maxima and features (x' and the maxima from one
    GEMM on the "gemm" route, the features from its columns K..), and the Triton GEMM reading those features in
    place gives the XLA prologue's outputs."""
    prologue_kind, kernel = ROUTES[route]
    tree = prepare({"attn": _qkv(1)}, **SAMPLER_MODES["fast"], prologue=prologue_kind)["attn"]
    sd = tree["qkv_down"]
    assert sd.levels.shape == sd.inv_levels.shape == (3, 3)          # the members' level tables, stacked
    assert sd.members == tuple(tree[n]["kernel"].bw.jd_col for n in ("to_q", "to_k", "to_v"))
    x = _x(1)
    for n in ("to_q", "to_k", "to_v"):
        kw, bias = tree[n]["kernel"], tree[n]["bias"]
        assert kw.prologue == prologue_kind and pm.fits(x, kw.node, kw.bw, sd, kw.levels, 128, route)
        for t in (0, 2, 7):
            step = jnp.int32(t)
            tables = dict(levels=kw.levels, inv_levels=kw.inv_levels, step=step)
            want = prologue(x, kw.node, 4, pad_to=16, chunk=0, bw=kw.bw, pad_branches=True, xprime="bfloat16",
                            joint=True, shared=sd, defer_scale=True, **tables)
            got = pm.mosaic_prologue(x, kw.node, kw.bw, pad_to=128, shared=sd, route=route, kernel=kernel,
                                     rowmax_kernel=mh.hadamard_reference,
                                     gemm=mg.rowmax_reference, **tables)
            m = x.shape[0]
            assert got.xq.shape == (128, K) and got.joint
            assert got.col == (K if route == "gemm" else 0) + kw.bw.jd_col
            diff = np.asarray(got.xq[:m], np.int32) - np.asarray(want.xq[:m], np.int32)
            assert np.abs(diff).max() <= 1 and np.mean(diff != 0) <= 1e-3   # float32 sums in another order
            np.testing.assert_allclose(np.asarray(got.sx_rows[:m]), np.asarray(want.sx[:m]), rtol=2 ** -7)
            assert not np.asarray(got.xq[m:]).any() and not np.asarray(got.sx_rows[m:]).any()   # padded rows
            w = kw.bw.joint_width
            np.testing.assert_array_equal(np.asarray(got.dh[:m, got.col:got.col + w], np.float32),
                                          np.asarray(want.dh[:m, want.col:want.col + w], np.float32))
            y_got = pallas_gemm_epilogue(got, kw.node, bias, jnp.float32, CFG, interpret=True)
            y_want = pallas_gemm_epilogue(want, kw.node, bias, jnp.float32, CFG, interpret=True)
            assert y_got.shape == (m, N) and rel_err(y_got, y_want) <= 2e-3
            cols = [b.col0 for b in mg._branches(got)]                 # what the Mosaic GEMM kernel would read
            assert cols == [got.col, got.col + kw.bw.dt_col]


@pytest.mark.parametrize("route", list(ROUTES))
def test_rotation_prologue_without_sharing(route, codes_where):
    """An unshared layer (its own input-space jd: Rl 16 + 2 block rows x Rb 16 = 48 columns, padded to 128 by zero
    columns for the Mosaic GEMM's column tiles, once by `prepare`) gets the same operands from the rotation prologue
    as from the XLA prologue."""
    prologue_kind, kernel = ROUTES[route]
    layer = _layer(np.random.default_rng(4), 12, jnp.asarray([4, 5], jnp.int32))
    kw = prepare_weight(layer, **SAMPLER_MODES["fast"], prologue=prologue_kind)
    plain = prepare_weight(layer, **SAMPLER_MODES["fast"])
    assert (plain.bw.jd.shape[1], kw.bw.jd.shape[1]) == (48, 128)
    np.testing.assert_array_equal(np.asarray(kw.bw.jd[:, :48]), np.asarray(plain.bw.jd))
    assert not np.asarray(kw.bw.jd[:, 48:]).any()
    x, tables = _x(4, 130), dict(levels=kw.levels, inv_levels=kw.inv_levels, step=jnp.int32(1))
    want = prologue(x, kw.node, 4, pad_to=16, chunk=0, bw=kw.bw, pad_branches=True, xprime="bfloat16", joint=True,
                    defer_scale=True, **tables)
    got = pm.mosaic_prologue(x, kw.node, kw.bw, pad_to=128, route=route, kernel=kernel,
                             rowmax_kernel=mh.hadamard_reference,
                                     gemm=mg.rowmax_reference, **tables)
    assert got.xq.shape == (256, K)
    assert (got.dh.shape, got.col) == (((256, K + 128), K) if route == "gemm" else ((256, 128), 0))
    bias = jnp.zeros((N,), jnp.float32)
    assert rel_err(pallas_gemm_epilogue(got, kw.node, bias, jnp.float32, CFG, interpret=True),
                   pallas_gemm_epilogue(want, kw.node, bias, jnp.float32, CFG, interpret=True)) <= 2e-3


def test_fits_names_the_layers_it_takes():
    rng = np.random.default_rng(5)
    sched = jnp.asarray([4, 4], jnp.int32)
    kw = prepare_weight(_layer(rng, 16, sched), **SAMPLER_MODES["fast"], prologue="mosaic")
    x = _x(5)
    assert pm.fits(x, kw.node, kw.bw, None, kw.levels, 128) and pm.fits(x, kw.node, kw.bw, None, kw.levels, 128, "gemm")
    assert not pm.fits(x, kw.node, kw.bw, None, kw.levels, 128, "other")
    assert not pm.fits(x.astype(jnp.float32), kw.node, kw.bw, None, kw.levels, 128)     # bf16 input only
    assert not pm.fits(x, kw.node, kw.bw, None, None, 128)                            # a level table
    assert not pm.fits(x, kw.node, kw.bw, None, kw.levels, 48, "gemm")                # rows tile by 128
    assert not pm.fits(x[:5], kw.node, kw.bw, None, kw.levels, 5)                     # ... by 16 (K = 256: g = 4)
    half = prepare_weight(_layer(rng, 16, sched, ).replace(rotate=K // 2), **SAMPLER_MODES["fast"])
    assert not pm.fits(x, half.node, half.bw, None, half.levels, 128)                  # block < K
    joint = prepare_weight(_layer(rng, 16, sched), unpack=True, prologue="mosaic")     # features from x'
    assert not pm.fits(x, joint.node, joint.bw, None, joint.levels, 128)
    smooth = _layer(rng, 16, sched, smooth=np.ones(K, np.float32))
    assert not pm.fits(x, smooth, None, None, kw.levels, 128)


@pytest.mark.skipif(OLD_JAX, reason="Mosaic GPU kernels written for JAX >= 0.10")
@pytest.mark.parametrize("k,n,prologue_kind,kernels,run", [(1536, 1536, "mosaic", 3, None),
                                                            (6144, 1536, "mosaic", 3, None),
                                                            (1536, 6144, "mosaic-gemm", 2, None),
                                                            (6144, 1536, "mosaic-gemm", 1, None),
                                                            (1536, 1536, "mosaic", 3, 128)])
def test_prepared_rotated_layer_runs_on_mosaic_kernels(k, n, prologue_kind, kernels, run, monkeypatch):
    """A paper layer prepared "fast" with gemm="mosaic" lowers for CUDA to Mosaic kernels and no Triton kernel:
    with prologue="mosaic" the Hadamard codes kernel (1536 and 6144 inputs; at 1536 also with runs of 128,
    `mosaic_hadamard.RUN_LENGTH`), the features GEMM and the int8 GEMM with the whole epilogue; with
    prologue="mosaic-gemm" the rotation GEMM with row maxima and the features where the Hadamard is one +-1 GEMM
    (1536), the XLA prologue where it is not (6144), and the int8 GEMM."""
    if run:
        monkeypatch.setitem(mh.RUN_LENGTH, k, run)
    from conftest import prepared_paper_layer
    from qdit4sr_jax.quant.kernels import lowering_for
    from qdit4sr_jax.quant.linear import linear
    kw = prepared_paper_layer(k, n, **SAMPLER_MODES["fast"], prologue=prologue_kind, gemm="mosaic")
    x, t, b = S((2 * 1024 + 7, k), jnp.bfloat16), S((), jnp.int32), S((n,), jnp.float32)
    with lowering_for("gpu"):
        text = jax.jit(lambda kw, x, t, b: linear(x, kw, b, step=t)).trace(kw, x, t, b).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == kernels and "__gpu$xla.gpu.triton" not in text
    assert len(text) < 2_000_000           # no [K, K] rotation matrix captured as a constant (4.7 MB at K = 1536)
    if prologue_kind == "mosaic":           # the codes kernel's int8 output: [rows x runs, run length]
        g, c = mh.hadamard_plan(k)[:2]
        assert c == (run or c) and f"x{c}xi8>" in text and f"{(2 * 1024 + 128) * g}x{c}xi8>" in text


@pytest.mark.parametrize("k,run", [(1536, None), (1536, 128), (6144, None), (256, None)])
def test_hadamard_factorisation_is_the_rotation(k, run):
    """The Hadamard kernel's plan (runs of 64 / 128, at most 64 of them; `run` picks one) and its XLA form: x D H_K
    to bf16 rounding of float64 (the sums in another order than the dense GEMM: a few elements one bf16 ulp apart),
    and the run maxima of its own x'."""
    from qdit4sr_jax.quant.transforms import hadamard_matrix, rotation_signs
    g, c, r, gmat = mh.hadamard_plan(k, run)
    assert g * c == k and g <= 64 and c in (64, 128) and (r * g) % 8 == 0 and r * g <= 64 and c == (run or c)
    x = jnp.asarray(np.random.default_rng(k).standard_t(5, size=(2 * r, k)), jnp.bfloat16)
    y, run_max = mh.hadamard_reference(x, run=run)
    want = (np.asarray(x, np.float64) * rotation_signs(k)) @ hadamard_matrix(k)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=2 ** -8, atol=1e-6 * np.abs(want).max())
    yf = np.abs(np.asarray(y, np.float32)).reshape(2 * r, g, c)
    np.testing.assert_array_equal(np.asarray(run_max), yf.max(axis=2))
    assert mh.hadamard_plan(192) is None                     # 12 x 16: runs narrower than 64
    assert mh.fits(7 * r, k, run) and (r == 1 or not mh.fits(7 * r + 1, k, run))   # rows: whole tiles of r


def test_run_length_setting_moves_every_default(monkeypatch):
    """`RUN_LENGTH[K]` is the run length that the kernels, their XLA forms and `fits` take by default: at K = 1536
    runs of 128 (12 runs, 4 rows of x per tile) give the x' of runs of 64 (24 runs, 2 rows per tile) to one bf16 ulp
    and the same row maxima; no run length of 64 exists at K = 6144 (96 runs)."""
    x = jnp.asarray(np.random.default_rng(3).standard_t(5, size=(8, 1536)), jnp.bfloat16)
    y64, m64 = mh.hadamard_reference(x)
    assert mh.hadamard_plan(1536)[:3] == (24, 64, 2) and m64.shape == (8, 24)
    monkeypatch.setitem(mh.RUN_LENGTH, 1536, 128)
    assert mh.hadamard_plan(1536)[:3] == (12, 128, 4) and not mh.fits(6, 1536) and mh.fits(8, 1536)
    y128, m128 = mh.hadamard_reference(x)
    assert m128.shape == (8, 12)
    a, b = np.asarray(y64, np.float32), np.asarray(y128, np.float32)
    assert np.all(np.abs(a - b) <= 2.0 ** -7 * np.abs(a)), np.abs(a - b).max()
    np.testing.assert_allclose(np.asarray(m128).max(axis=1), np.asarray(m64).max(axis=1), rtol=2 ** -7)
    lv = jnp.asarray([[7.0]], jnp.float32)
    q = mh.codes_reference(x, lv, 1.0 / lv, 0)[0][0]
    assert q.shape == (8, 1536) and int(jnp.max(jnp.abs(q.astype(jnp.int32)))) == 7
    assert mh.hadamard_plan(6144, 64) is None and mh.hadamard_plan(6144)[1] == 128


@pytest.mark.skipif(OLD_JAX, reason="Mosaic GPU kernels written for JAX >= 0.10")
@pytest.mark.parametrize("m,k,kw", [(4096, 1536, dict(parts=3)), (2048, 6144, dict(parts=2)), (64, 256, dict(parts=1)),
                                    (4096, 1536, dict(wgs=3, prefetch=2, out_slots=2)),
                                    (4096, 6144, dict(wgs=1, prefetch=3, out_slots=2)), (2048, 1536, dict(run=128))])
def test_hadamard_kernel_lowers_for_cuda(m, k, kw):
    """The Hadamard kernel lowers for CUDA (Mosaic GPU: wgmma operand layouts, TMA, shared memory within the limit)
    at the step's shapes and tunings; bad operands and tunings are named, shared memory overflow is reported."""
    text = jax.jit(lambda x: mh.mosaic_hadamard_rowmax(x, **kw)).trace(S((m, k), jnp.bfloat16)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1
    codes = jax.jit(lambda x, lv, il, t: mh.mosaic_hadamard_codes(x, lv, il, t, **kw)).trace(
        S((m, k), jnp.bfloat16), S((3, 40), jnp.float32), S((3, 40), jnp.float32), S((), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    g, c = mh.hadamard_plan(k, kw.get("run"))[:2]
    assert codes.count("custom_call @mosaic_gpu") == 1
    assert f"-> (tensor<{m * g}x{c}xi8>, tensor<{m * g}x{c}xi8>, tensor<{m * g}x{c}xi8>, tensor<{m * g}xf32>)" in codes
    if k == 1536:                                            # the codes' swizzle variant the GPU check compares
        jax.jit(lambda x, lv, il, t: mh.mosaic_hadamard_codes(x, lv, il, t, codes_swizzle=32, **kw)).trace(
            S((m, k), jnp.bfloat16), S((3, 40), jnp.float32), S((3, 40), jnp.float32), S((), jnp.int32)).lower(
            lowering_platforms=("cuda",))
        with pytest.raises(ValueError, match="codes_swizzle"):
            mh.mosaic_hadamard_codes(jnp.zeros((m, k), jnp.bfloat16), jnp.ones((1, 2)), jnp.ones((1, 2)), 0,
                                     codes_swizzle=128)
    with pytest.raises(ValueError, match="levels must be"):
        mh.mosaic_hadamard_codes(jnp.zeros((64, 1536), jnp.bfloat16), jnp.zeros((3,), jnp.float32),
                                 jnp.zeros((3,), jnp.float32), 0)
    with pytest.raises(ValueError, match="shared memory"):
        jax.jit(lambda x: mh.mosaic_hadamard_rowmax(x, wgs=3)).trace(S((64, 6144), jnp.bfloat16)).lower(
            lowering_platforms=("cuda",))
    with pytest.raises(ValueError, match="wgs 1-4"):
        mh.mosaic_hadamard_rowmax(jnp.zeros((64, 1536), jnp.bfloat16), wgs=5)
    with pytest.raises(ValueError, match="Hadamard block"):
        mh.mosaic_hadamard_rowmax(jnp.zeros((64, 192), jnp.bfloat16))
    with pytest.raises(ValueError, match="Hadamard block"):
        mh.mosaic_hadamard_rowmax(jnp.zeros((64, 1536), jnp.float32))


def test_mosaic_kernels_only_where_wgmma_is():
    """The Mosaic kernels need Hopper's wgmma: `has_wgmma` is False on the CPU backend, True while lowering for a GPU
    on a machine without one (the lowering tests), and a real GPU answers from its compute capability."""
    from qdit4sr_jax.quant.lowering import has_wgmma, lowering_for
    assert not has_wgmma()
    with lowering_for("gpu"):
        assert has_wgmma()
    with lowering_for("tpu"):
        assert not has_wgmma()


@pytest.mark.skipif(OLD_JAX, reason="Mosaic GPU kernels written for JAX >= 0.10")
def test_repeated_kernels_are_one_function_in_the_module():
    """Layers with the same shapes call one lowered function per distinct Mosaic kernel (`mosaic_gemm.shared_call`):
    four such layers lower to 12 kernel calls but 3 kernels' modules (was 12: 228 MB of text for the 512-px step),
    and layers of other shapes get kernels of their own."""
    from conftest import prepared_paper_layer
    from qdit4sr_jax.quant.kernels import lowering_for
    from qdit4sr_jax.quant.linear import linear
    kw = prepared_paper_layer(1536, 1536, **SAMPLER_MODES["fast"], prologue="mosaic", gemm="mosaic")
    wide = prepared_paper_layer(1536, 6144, **SAMPLER_MODES["fast"], prologue="mosaic", gemm="mosaic")
    x, t = S((2048, 1536), jnp.bfloat16), S((), jnp.int32)

    def lower(f, *args):
        with lowering_for("gpu"):
            return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    one = lower(lambda kw, x, t: linear(x, kw, step=t), kw, x, t)
    four = lower(lambda kw, x, t: [linear(x + i, kw, step=t) for i in range(4)], kw, x, t)
    assert (mg.mosaic_call_sites(one), one.count("custom_call @mosaic_gpu")) == (3, 3)
    assert (mg.mosaic_call_sites(four), four.count("custom_call @mosaic_gpu")) == (12, 3)
    assert len(four) < 1.5 * len(one)
    both = lower(lambda a, b, x, t: [linear(x, a, step=t), linear(x, b, step=t)], kw, wide, x, t)
    assert (mg.mosaic_call_sites(both), both.count("custom_call @mosaic_gpu")) == (6, 5)   # one Hadamard kernel


def test_run_maxima_reach_the_gemm_unreduced_at_dit4sr_widths(monkeypatch):
    """At K = 1536 (24 runs of 64 per row) the Hadamard route's codes mode can hand the int8 GEMM the run maxima
    [Mp, 24], whose row max the Mosaic GEMM takes in its epilogue (no reduce kernel per layer): with the codes made in
    the kernel at run length 64 (`CODES_IN_KERNEL`) and `RUN_TILE` 8 `fits` takes them,
    their row max equals the XLA prologue's row max of x', and the Triton GEMM (reading `sx_rows`) gives the XLA
    prologue's outputs. With the default `RUN_TILE` (16: 24 runs were wrong in the GPU epilogue's one block) and at
    K = 256 (4 runs) the prologue reduces them itself."""
    k, n, m = 1536, 256, 200
    rng = np.random.default_rng(9)
    w = make_qweight(jnp.asarray(rng.normal(size=(n, k)).astype(np.float32) * 0.03), w_bits=4, a_bits=4,
                     execution="fused", rotate=k, signs=True, a_schedule=jnp.asarray([4, 5], jnp.int32),
                     lr_a=rng.normal(size=(k, 16)) * 0.05, lr_b=rng.normal(size=(16, n)) * 0.05)
    kw = prepare_weight(w, **SAMPLER_MODES["fast-mosaic-separate"])
    x = jnp.asarray(rng.standard_t(5, size=(m, k)).astype(np.float32), jnp.bfloat16)
    tables = dict(levels=kw.levels, inv_levels=kw.inv_levels, step=jnp.int32(1))
    assert pm.fits(x, kw.node, kw.bw, None, kw.levels, 128)
    run = lambda: pm.mosaic_prologue(x, kw.node, kw.bw, pad_to=128, kernel=mh.codes_reference,  # noqa: E731
                                     gemm=mg.rowmax_reference, rowmax_kernel=mh.hadamard_reference, **tables)
    assert pm.RUN_TILE == 16 and pm.CODES_IN_KERNEL == (64, 128) and run().sx.shape == (256,)
    monkeypatch.setattr(pm, "CODES_IN_KERNEL", (128,))               # run length 64 with XLA codes: reduced too
    assert run().sx.shape == (256,)
    monkeypatch.setattr(pm, "CODES_IN_KERNEL", (64, 128))
    monkeypatch.setattr(pm, "RUN_TILE", 8)
    got = run()
    want = prologue(x, kw.node, 4, pad_to=128, chunk=0, bw=kw.bw, pad_branches=True, xprime="bfloat16", joint=True,
                    defer_scale=True, **tables)
    assert got.sx.shape == (256, 24) and want.sx.shape == (256,)
    assert mg.fits(got, kw.node) and not mg.fits(dataclasses.replace(got, sx_inv=None), kw.node)
    np.testing.assert_allclose(np.asarray(got.sx_rows), np.asarray(want.sx), rtol=2 ** -7)
    np.testing.assert_array_equal(np.asarray(got.row_scale()), np.asarray(
        dataclasses.replace(got, sx=got.sx_rows).row_scale()))
    bias = jnp.zeros((n,), jnp.float32)
    assert rel_err(pallas_gemm_epilogue(got, kw.node, bias, jnp.float32, CFG, interpret=True),
                   pallas_gemm_epilogue(want, kw.node, bias, jnp.float32, CFG, interpret=True)) <= 2e-3
    small = prepare_weight(_layer(rng, 12, jnp.asarray([4, 5], jnp.int32)), **SAMPLER_MODES["fast-mosaic-separate"])
    ops = pm.mosaic_prologue(_x(2, 64), small.node, small.bw, pad_to=128, kernel=mh.codes_reference,
                             gemm=mg.rowmax_reference, rowmax_kernel=mh.hadamard_reference, levels=small.levels, inv_levels=small.inv_levels,
                             step=jnp.int32(0))
    assert ops.sx.shape == (128,)                                           # K = 256: 4 runs, reduced here
