"""The Mosaic GPU int8 GEMM (quant/kernels/mosaic_gemm.py) lowers for CUDA on any machine: `lower(
lowering_platforms=("cuda",))` runs Pallas' Mosaic GPU lowering (wgmma operand checks, layouts, the TMA
pipeline) without a GPU, so a refused operand layout or epilogue op fails here in CI instead of on the GPU.
Its numbers are checked against `mosaic_gemm.reference` on the GPU only (benchmarks/gpu/mosaic_gemm.py): wgmma
has no interpreter. At DiT4SR's layer shapes and a small one; with and without bias / addend."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit4sr_jax.quant.kernels import mosaic_gemm as mg

S = jax.ShapeDtypeStruct
# Pallas Mosaic GPU changes from release to release; the kernel is written against JAX 0.10-0.11 (CI and the GPU)
OLD_JAX = tuple(int(p) for p in jax.__version__.split(".")[:2]) < (0, 10)
lowering = pytest.mark.skipif(OLD_JAX, reason=f"Mosaic GPU kernel written for JAX >= 0.10, have {jax.__version__}")


def _lower(m, k, n, bias, addend, **tiles):
    args = [S((m, k), jnp.int8), S((n, k), jnp.int8), S((m,), jnp.float32), S((n,), jnp.float32),
            S((n,), jnp.float32) if bias else None, S((m, n), jnp.bfloat16) if addend else None]
    f = lambda x, w, sx, sw, b, a: mg.mosaic_int8_gemm(x, w, sx, sw, b, a, **tiles)  # noqa: E731
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@lowering
@pytest.mark.parametrize("m,k,n,bias,addend", [(256, 256, 128, False, False), (2048, 1536, 1536, True, False),
                                               (2048, 6144, 1536, True, True), (2048, 1536, 6144, False, True)])
def test_mosaic_gemm_lowers_for_cuda(m, k, n, bias, addend):
    text = _lower(m, k, n, bias, addend)
    assert "mosaic_gpu" in text


@lowering
def test_mosaic_gemm_tile_variants_lower():
    assert "mosaic_gpu" in _lower(256, 256, 256, True, False, tile_m=64, tile_n=128, stages=2)
    assert "mosaic_gpu" in _lower(256, 256, 256, True, False, tile_n=64, stages=3)


def test_mosaic_gemm_rejects_bad_operands():
    x, w = jnp.zeros((256, 256), jnp.int8), jnp.zeros((128, 256), jnp.int8)
    sx, sw = jnp.ones((256,)), jnp.ones((128,))
    with pytest.raises(TypeError, match="int8 operands"):
        mg.mosaic_int8_gemm(x.astype(jnp.int32), w, sx, sw)
    with pytest.raises(ValueError, match="disagree on K"):
        mg.mosaic_int8_gemm(x, jnp.zeros((128, 128), jnp.int8), sx, sw)
    with pytest.raises(ValueError, match="does not tile"):
        mg.mosaic_int8_gemm(x[:200], w, sx[:200], sw)
    with pytest.raises(ValueError, match="addend"):
        mg.mosaic_int8_gemm(x, w, sx, sw, None, jnp.zeros((128, 128)))


def test_reference_is_the_scaled_integer_product():
    rng = np.random.default_rng(0)
    x = rng.integers(-127, 128, (64, 96)).astype(np.int8)
    w = rng.integers(-127, 128, (32, 96)).astype(np.int8)
    sx, sw, b = rng.uniform(0.1, 1, 64), rng.uniform(0.1, 1, 32), rng.normal(size=32)
    a = rng.normal(size=(64, 32))
    want = (x.astype(np.float64) @ w.T.astype(np.float64)) * sx[:, None] * sw[None, :] + b + a
    got = mg.reference(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sx, jnp.float32), jnp.asarray(sw, jnp.float32),
                       jnp.asarray(b, jnp.float32), jnp.asarray(a, jnp.float32), out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-3)


def _lower_ws(m, k, n, bias, addend, out_dtype=jnp.bfloat16, **tiles):
    args = [S((m, k), jnp.int8), S((n, k), jnp.int8), S((m,), jnp.float32), S((n,), jnp.float32),
            S((n,), jnp.float32) if bias else None, S((m, n), jnp.bfloat16) if addend else None]
    f = lambda x, w, sx, sw, b, a: mg.mosaic_int8_gemm_ws(x, w, sx, sw, b, a, out_dtype=out_dtype,  # noqa: E731
                                                          **tiles)
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@lowering
@pytest.mark.parametrize("m,k,n,bias,addend,tiles", [
    (4096, 1536, 1536, True, False, {}),
    (2048, 6144, 1536, True, True, {"wg_dim": "n"}),
    (4096, 1536, 6144, False, False, {"tile_m": 64, "tile_n": 256, "grid_minor": 0, "grid_width": 4}),
    (512, 256, 256, False, True, {"tile_m": 64, "tile_n": 128, "wg_dim": "n", "stages": 2, "in_flight": 0})])
def test_warp_specialized_gemm_lowers_for_cuda(m, k, n, bias, addend, tiles):
    """The persistent warp-specialized kernel (memory warpgroup + two compute warpgroups, TMA-store epilogue)
    lowers through Mosaic GPU, shared-memory budget included, at the step's shapes."""
    assert "mosaic_gpu" in _lower_ws(m, k, n, bias, addend, **tiles)


@lowering
def test_warp_specialized_gemm_reports_what_does_not_fit():
    # float32 epilogue tiles + 4 stages of 256 x 128 + 128 x 128 int8 exceed the 227 KiB of shared memory: the
    # lowering says so (the benchmark checks float32 outputs at 3 stages)
    with pytest.raises(ValueError, match="shared memory"):
        _lower_ws(512, 1536, 256, True, False, out_dtype=jnp.float32)
    assert "mosaic_gpu" in _lower_ws(512, 1536, 256, True, False, out_dtype=jnp.float32, stages=3)


def test_warp_specialized_gemm_rejects_bad_tiles():
    x, w = jnp.zeros((256, 256), jnp.int8), jnp.zeros((128, 256), jnp.int8)
    sx, sw = jnp.ones((256,)), jnp.ones((128,))
    with pytest.raises(ValueError, match="does not tile"):          # two 128 x 128 warpgroup tiles along N > 128
        mg.mosaic_int8_gemm_ws(x, w, sx, sw, wg_dim="n")
    with pytest.raises(ValueError, match="does not tile"):
        mg.mosaic_int8_gemm_ws(x, w, sx, sw, wg_dim="k")
    with pytest.raises(ValueError, match="in_flight"):
        mg.mosaic_int8_gemm_ws(x, w, sx, sw, stages=2, in_flight=2)
    with pytest.raises(TypeError, match="int8 operands"):
        mg.mosaic_int8_gemm_ws(x.astype(jnp.float32), w, sx, sw)
    assert mg.ws_tiles_ok(4096, 1536, 1536) and not mg.ws_tiles_ok(4096, 1536, 1536, tile_n=256)


def _prepared_paper_layer(k, n, gemm):
    """Abstract prepared W4A4 layer as the "fast" sampler mode makes it, with the given GEMM kernel."""
    from conftest import prepared_paper_layer
    return prepared_paper_layer(k, n, down="input", xprime="bfloat16", gemm=gemm)


@lowering
@pytest.mark.parametrize("k,n", [(1536, 1536), (1536, 6144), (6144, 1536)])
def test_prepared_layer_runs_its_gemm_on_the_warp_specialized_kernel(k, n):
    """prepare(..., gemm="mosaic"): the fused linear's GEMM + epilogue (scale from the level table, low-rank and
    block branches, bias) is one Mosaic GPU kernel and no Triton kernel is left (the prologue is XLA's);
    gemm="triton" keeps the Triton kernel."""
    from qdit4sr_jax.quant.kernels import lowering_for
    from qdit4sr_jax.quant.linear import linear
    x, t, b = S((2 * 1024 + 7, k), jnp.bfloat16), S((), jnp.int32), S((n,), jnp.float32)
    texts = {}
    for gemm in ("mosaic", "triton"):
        kw = _prepared_paper_layer(k, n, gemm)
        with lowering_for("gpu"):
            texts[gemm] = jax.jit(lambda kw, x, t, b: linear(x, kw, b, step=t)).trace(kw, x, t, b).lower(
                lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in texts["mosaic"] and "__gpu$xla.gpu.triton" not in texts["mosaic"]
    assert "mosaic_gpu" not in texts["triton"] and texts["triton"].count("__gpu$xla.gpu.triton") == 1


def test_fits_names_what_the_warp_specialized_kernel_takes():
    """`mosaic_gemm.fits`: per-channel int8 codes whose rows, columns and K tile, 16-bit branches."""
    from qdit4sr_jax.quant.kernels.fused import prologue
    from qdit4sr_jax.quant.kernels import prepare_weight
    from qdit4sr_jax.quant.qweight import make_qweight
    rng = np.random.default_rng(0)
    k, n = 256, 512
    w = jnp.asarray(rng.normal(size=(n, k)), jnp.float32)
    extra = dict(lr_a=jnp.asarray(rng.normal(size=(k, 16)), jnp.float32),
                 lr_b=jnp.asarray(rng.normal(size=(16, n)), jnp.float32))
    x = jnp.asarray(rng.normal(size=(128, k)), jnp.bfloat16)
    kw = prepare_weight(make_qweight(w, w_bits=4, a_bits=4, execution="fused", **extra), gemm="mosaic")
    kw = kw.__class__(kw.node, kw.bw.__class__(**{**vars(kw.bw), "lr_b": kw.bw.lr_b.astype(jnp.bfloat16)}),
                      gemm="mosaic")
    ops = prologue(x, kw.node, 4, pad_to=128, bw=kw.bw, pad_branches=True, joint=True)
    ops = ops.__class__(**{**vars(ops), "dh": ops.dh.astype(jnp.bfloat16)})
    assert mg.fits(ops, kw.node)
    assert not mg.fits(ops.__class__(**{**vars(ops), "dh": ops.dh.astype(jnp.float32)}), kw.node)  # mixed dtypes
    assert not mg.fits(ops, kw.node, {"tile_n": 512})                 # N = 512 is no pair of 512-wide tiles
    packed = make_qweight(w, w_bits=4, a_bits=4, execution="fused")
    assert packed.packed and not mg.fits(prologue(x, packed, 4, pad_to=128), packed)
    with pytest.raises(ValueError, match="gemm must be one of"):
        prepare_weight(packed, gemm="cublas")


@lowering
def test_fused_tiles_override_reaches_the_kernel():
    """`set_fused_tiles` (step_latency.py --mosaic-tiles): 128 x 128 warpgroup tiles along M with one 64 x 32
    epilogue buffer each fit shared memory beside the branches' up-projections (two 64 x 64 buffers do not); the
    override is read when tracing and restored afterwards."""
    from qdit4sr_jax.quant.kernels import lowering_for
    from qdit4sr_jax.quant.linear import linear
    kw = _prepared_paper_layer(1536, 6144, "mosaic")
    x, t = S((4096, 1536), jnp.bfloat16), S((), jnp.int32)

    def lower():
        with lowering_for("gpu"):
            return jax.jit(lambda kw, x, t: linear(x, kw, None, step=t)).trace(kw, x, t).lower(
                lowering_platforms=("cuda",)).as_text()

    prev = mg.set_fused_tiles(**mg.parse_tiles("tile_m=128,wg_dim=m,epi_n=32,out_slots=1"))
    try:
        assert "mosaic_gpu" in lower()
        mg.set_fused_tiles(tile_m=128, wg_dim="m")
        with pytest.raises(ValueError, match="shared memory"):
            lower()
    finally:
        mg.set_fused_tiles(**prev)
    assert mg.set_fused_tiles() == {}


def test_parse_tiles_names_bad_fields():
    assert mg.parse_tiles("tile_m=128,wg_dim=m,") == {"tile_m": 128, "wg_dim": "m"}
    assert mg.parse_tiles("") == {}
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        mg.parse_tiles("tile_q=3")
    with pytest.raises(ValueError, match="wrong types"):
        mg.set_fused_tiles(tile_m="128")
    with pytest.raises(ValueError, match="out_slots"):
        mg.mosaic_int8_gemm_ws(jnp.zeros((256, 128), jnp.int8), jnp.zeros((256, 128), jnp.int8), jnp.ones(256),
                               jnp.ones(256), out_slots=3)


@lowering
@pytest.mark.parametrize("k,n,g", [(1536, 1536, 64), (6144, 1536, 64), (1536, 6144, 128)])
def test_group_wise_weights_run_on_the_warp_specialized_kernel(k, n, g):
    """Float group scales (the plain paper preset's "gnk" layout): each pipeline step is one group of K, its int32
    product scaled by the group's scales in float32 (`mosaic_int8_gemm_ws` with wq [G, N, g]); the prepared layer
    lowers to one Mosaic kernel and no Triton kernel."""
    from qdit4sr_jax.quant.kernels import lowering_for, prepare_weight
    from qdit4sr_jax.quant.linear import linear
    from qdit4sr_jax.quant.qweight import make_qweight
    nbo, nbi = -(-n // 256), -(-k // 256)

    def build(w):
        return prepare_weight(make_qweight(
            w, w_bits=4, group_size=g, a_bits=4, execution="fused", rotate=k, signs=True, lr_a=jnp.zeros((k, 32)),
            lr_b=jnp.zeros((32, n)), block_u=jnp.zeros((nbo, nbi, 256)), block_v=jnp.zeros((nbo, nbi, 256)),
            block=(256, 256), a_schedule=np.array([4, 5, 3], np.int32)), down="input", xprime="bfloat16",
            gemm="mosaic")

    kw = jax.eval_shape(build, S((n, k), jnp.float32))
    assert kw.node.layout == "gnk" and kw.node.groups == (k // g, g)
    x, t = S((4096, k), jnp.bfloat16), S((), jnp.int32)
    with lowering_for("gpu"):
        text = jax.jit(lambda kw, x, t: linear(x, kw, None, step=t)).trace(kw, x, t).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "__gpu$xla.gpu.triton" not in text


def test_group_wise_weights_must_fit():
    x = jnp.zeros((256, 256), jnp.int8)
    with pytest.raises(ValueError, match="group-wise weights"):          # groups of 32: no 32-byte K step
        mg.mosaic_int8_gemm_ws(x, jnp.zeros((8, 256, 32), jnp.int8), jnp.ones(256), jnp.ones((8, 256)))
    with pytest.raises(ValueError, match="group-wise weights"):          # scales [N, G] instead of [G, N]
        mg.mosaic_int8_gemm_ws(x, jnp.zeros((4, 256, 64), jnp.int8), jnp.ones(256), jnp.ones((256, 4)))


@lowering
@pytest.mark.parametrize("m,k,n,tiles", [(4096, 1536, 2048, {}), (2048, 1536, 1792, {}),
                                         (4096, 1536, 1536, {"tile_m": 128, "wg_dim": "m", "out_slots": 1})])
def test_rotation_gemm_with_row_maxima_lowers_for_cuda(m, k, n, tiles):
    """The prologue's rotation kernel (x [(D H)^T | jd^T]^T in bf16 with each tile's row max |x'| from its
    epilogue) lowers at the step's shapes: [x' | features] for a q/k/v group (1536 + 384 feature columns, padded to
    the column tiles) and the 2048-row layers."""
    f = lambda x, b: mg.mosaic_bf16_gemm_rowmax(x, b, **tiles)  # noqa: E731
    text = jax.jit(f).trace(S((m, k), jnp.bfloat16), S((n, k), jnp.bfloat16)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_rotation_gemm_checks_and_reference():
    with pytest.raises(ValueError, match="does not tile"):
        mg.mosaic_bf16_gemm_rowmax(jnp.zeros((256, 1536), jnp.bfloat16), jnp.zeros((1920, 1536), jnp.bfloat16))
    with pytest.raises(ValueError, match="needs bf16"):
        mg.mosaic_bf16_gemm_rowmax(jnp.zeros((256, 128), jnp.float32), jnp.zeros((256, 128), jnp.bfloat16))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 96)), jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=(256, 96)), jnp.bfloat16)
    y, amax = mg.rowmax_reference(x, b)
    want = (np.asarray(x, np.float64) @ np.asarray(b, np.float64).T)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-2, atol=1e-2)
    yf = np.abs(np.asarray(y, np.float32))
    np.testing.assert_array_equal(np.asarray(amax), np.stack([yf[:, :128].max(1), yf[:, 128:].max(1)]))


@lowering
@pytest.mark.parametrize("k,g", [(1536, 24), (6144, 48)])
def test_warp_specialized_gemm_takes_run_maxima(k, g):
    """With a level table, sx may be the Hadamard kernel's run maxima [M, g]: the epilogue takes each row's max (no
    reduce kernel per layer; one [64, 48] block, or [64, 16] blocks for 24). Lowers at the step's shapes with the
    fused tiles; g must be >= 16, a multiple of 8, and the table present, else named."""
    m, n = 4096, 1536
    f = lambda x, w, sx, sw, il, t: mg.mosaic_int8_gemm_ws(x, w, sx, sw, inv_levels=il, step=t,  # noqa: E731
                                                            **mg.FUSED_TILES)
    text = jax.jit(f).trace(S((m, k), jnp.int8), S((n, k), jnp.int8), S((m, g), jnp.float32), S((n,), jnp.float32),
                            S((40,), jnp.float32), S((1,), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    x, w, sw = jnp.zeros((256, 256), jnp.int8), jnp.zeros((128, 256), jnp.int8), jnp.ones((128,))
    with pytest.raises(ValueError, match="run maxima"):
        mg.mosaic_int8_gemm_ws(x, w, jnp.ones((256, 12)), sw, inv_levels=jnp.ones((4,)), step=jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="run maxima"):
        mg.mosaic_int8_gemm_ws(x, w, jnp.ones((256, 8)), sw, inv_levels=jnp.ones((4,)), step=jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="run maxima"):
        mg.mosaic_int8_gemm_ws(x, w, jnp.ones((256, 16)), sw)


def _reductions(jaxpr):
    """Every reduce_* equation of a jaxpr and its sub-jaxprs (the Pallas kernel bodies inside): [(name, shape, axes)]."""
    out = []
    for e in jaxpr.eqns:
        if e.primitive.name.startswith("reduce_"):
            out.append((e.primitive.name, tuple(e.invars[0].aval.shape), tuple(e.params.get("axes", ()))))
        for p in e.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _reductions(inner)
    return out


@lowering
def test_multi_warpgroup_kernels_never_reduce_across_rows():
    """Our Mosaic kernels run two or more warpgroups per CTA. A reduction over the rows of a WGMMA-layout array (axis
    0: across the warpgroup's warps) goes through Pallas' reduction scratch in shared memory, at one offset for the
    whole CTA, so concurrent warpgroups race on it: the Hadamard kernel's in-kernel codes at K = 1536 came out wrong
    and run-to-run different on an H100 that way (2026-12-07). Every reduction in the kernels' bodies is along axis 1
    (within a warp)."""
    from qdit4sr_jax.quant.kernels import mosaic_hadamard as mh
    kernels = [
        (lambda x, lv, il, t: mh.mosaic_hadamard_codes(x, lv, il, t),
         (S((4096, 1536), jnp.bfloat16), S((3, 40), jnp.float32), S((3, 40), jnp.float32), S((), jnp.int32))),
        (lambda x, lv, il, t: mh.mosaic_hadamard_codes(x, lv, il, t),
         (S((4096, 6144), jnp.bfloat16), S((1, 40), jnp.float32), S((1, 40), jnp.float32), S((), jnp.int32))),
        (lambda x: mh.mosaic_hadamard_rowmax(x), (S((4096, 1536), jnp.bfloat16),)),
        (lambda x, w, sx, sw, il, t: mg.mosaic_int8_gemm_ws(x, w, sx, sw, inv_levels=il, step=t, **mg.FUSED_TILES),
         (S((2048, 1536), jnp.int8), S((1536, 1536), jnp.int8), S((2048, 24), jnp.float32), S((1536,), jnp.float32),
          S((40,), jnp.float32), S((1,), jnp.int32))),
        (lambda x, b, b2: mg.mosaic_bf16_gemm_rowmax(x, b, b2, layout="kn", tile_m=64, tile_n=128, wg_dim="m"),
         (S((2048, 1536), jnp.bfloat16), S((1536, 1536), jnp.bfloat16), S((1536, 384), jnp.bfloat16))),
    ]
    for fn, args in kernels:
        reds = _reductions(jax.make_jaxpr(fn)(*args).jaxpr)
        assert reds and all(0 not in axes and len(shape) == 2 for _, shape, axes in reds), reds
