"""The online Hadamard rotation as a Mosaic GPU kernel of two small tensor-core products per row (Hopper).

x' = x D H_K (D the QuaRot signs, H_K the orthonormal Hadamard of the whole input, K = g c) is, per row,

  X = x_row reshaped [g, c] (run j = columns j c .. (j + 1) c),  H_K sqrt(K) = G (x) S_c  (`transforms.kronecker_plan`)
  x'_row = (G^T (X o D) S_c) / sqrt(K), reshaped back to [K]                     (G, S_c: +-1, symmetric)

so a row costs g^2 c + g c^2 multiply-adds instead of the K^2 of one dense +-1 GEMM: 1536 = 24 x 64 runs, 6144 = 48 x
128 (`hadamard_plan`), 4.7x / 10x fewer. The kernel puts r = 64 // g rows of x into one 64-row tile (g rows each) and
runs, per tile, on one warpgroup:

  1. the signs: the tile (TMA-loaded, rows past r g are the next rows' or zeros) times D's tile, in shared memory;
  2. Z = (I_r (x) G, zero-padded to 64 x 64) @ tile: one bf16 wgmma, float32 accumulation (the +-1 products exact);
  3. x' sqrt(K) = Z S_c: Z split into `parts` bf16 terms (3: exact, each product exact in float32), one wgmma each;
  4. x' = that / sqrt(K) in float32, rounded once to bf16 (what the XLA path gives with xprime="bfloat16", up to the
     order of the float32 sums), written by TMA, with each (row, run)'s max|x'| (the per-token scale's maxima:
     max over a row's g runs, `hadamard_reference`);
  5. or, instead of x' (`mosaic_hadamard_codes`): each row's max from its runs' (the tile holds whole rows) and, for
     each of up to 4 layers reading x, the codes clip(round(x' * (1 / s)), +-level) with that layer's level at this
     step (one division per row; per element it cost as much as the rotation):
     x' never leaves the kernel and no XLA pass quantizes it (`codes_reference`).

Persistent: each warpgroup (`wgs` per SM) walks its tiles with the next tiles' TMA loads in flight. H100 2026-12-07:
33.1 us at 4096 x 1536 (XLA today: 70.3), 78.8 us at 4096 x 6144 (143.2), x' within one bf16 ulp of XLA's. GPU
only (no interpreter for wgmma): tests lower it for CUDA on the CPU; benchmarks/gpu/rotation_gemm.py checks it on
the GPU.
"""
from __future__ import annotations

import functools
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

ROWS = 64                  # rows of a tile (one wgmma M)


# The run length c for a K where it should not be the plan's first fit (64 before 128: 24 runs of 64 at K = 1536, 48
# of 128 at K = 6144). `hadamard_plan(k)` reads it, so the sampler's kernels, their XLA forms and `fits` follow one
# setting; the kernel's `run` argument overrides it per call (`benchmarks/gpu/rotation_gemm.py --hadamard-configs
# w2p1o1c128`: 4 rows of x per tile at K = 1536 instead of 2, half the tiles).
RUN_LENGTH: dict = {}


def hadamard_plan(k: int, run: int | None = None):
    """K (a Hadamard block, `transforms.is_hadamard_block`) -> (g, c, r, G): c the Sylvester run (a power of 2, 64
    or 128, dividing K's power-of-2 part, K / c <= 64; `run`, else `RUN_LENGTH[K]`, else the first that fits), g =
    K / c runs, r = 64 // g rows of x per tile (r g a multiple of 8), G = H_m (x) S_{p / c} (+-1 float32 [g, g],
    symmetric). None where K has no such plan (or none with that run length)."""
    return _plan(int(k), run or RUN_LENGTH.get(int(k)))


@lru_cache(maxsize=None)
def _plan(k: int, run):
    from qdit4sr_jax.quant.transforms import hadamard_factors, is_hadamard_block, kronecker_plan
    if not is_hadamard_block(k):
        return None
    _, p = hadamard_factors(k)
    for c in ((run,) if run else (64, 128)):
        if c in (64, 128) and p % c == 0 and k // c <= ROWS:
            cc, g, gmat = kronecker_plan(k, c)
            r = ROWS // g
            while r > 1 and (r * g) % 8:
                r -= 1
            if (r * g) % 8 == 0:
                return g, cc, r, gmat
    return None


def plan_operands(k: int, signs: bool, run: int | None = None):
    """The kernel's constant operands for K (and `run`, as `hadamard_plan`): gbd bf16 [64, 64] (I_r (x) G^T,
    zero-padded), s bf16 [c, c] (S_c), dt bf16 [64, c] (the tile's signs: row q g + j holds D's run j; zero past
    r g)."""
    from qdit4sr_jax.quant.transforms import rotation_signs, sylvester
    g, c, r, gmat = hadamard_plan(k, run)
    gbd = np.zeros((ROWS, ROWS), np.float32)
    gbd[: r * g, : r * g] = np.kron(np.eye(r), gmat.T)
    d = rotation_signs(k) if signs else np.ones(k, np.float32)
    dt = np.zeros((ROWS, c), np.float32)
    dt[: r * g] = np.tile(d.reshape(g, c), (r, 1))
    return (jnp.asarray(gbd, jnp.bfloat16), jnp.asarray(sylvester(c), jnp.bfloat16), jnp.asarray(dt, jnp.bfloat16))


def fits(m: int, k: int, run: int | None = None) -> bool:
    """Whether `mosaic_hadamard_rowmax` takes x [m, k]: K has a plan (`hadamard_plan(k, run)`) and m is a multiple
    of its r."""
    plan = hadamard_plan(k, run)
    return plan is not None and m % plan[2] == 0


def hadamard_reference(x, signs: bool = True, run: int | None = None):
    """`mosaic_hadamard_rowmax` with XLA ops (float32 sums, the kernel's factorisation for `run`): (x' bf16 [M, K],
    run maxima float32 [M, g])."""
    from qdit4sr_jax.quant.transforms import rotation_signs, sylvester
    m, k = x.shape
    g, c, _, gmat = hadamard_plan(k, run)
    xs = x.astype(jnp.float32) * (jnp.asarray(rotation_signs(k)) if signs else 1.0)
    z = jnp.einsum("mja,ji->mia", xs.reshape(m, g, c), jnp.asarray(gmat), precision="highest")
    y = jnp.einsum("mia,ab->mib", z, jnp.asarray(sylvester(c)), precision="highest")
    y = (y * np.float32(1.0 / np.sqrt(k))).astype(jnp.bfloat16)
    return y.reshape(m, k), jnp.max(jnp.abs(y.astype(jnp.float32)), axis=2)


def codes_reference(x, levels, inv_levels, step, signs: bool = True, run: int | None = None):
    """`mosaic_hadamard_codes` with XLA ops: (codes: n int8 [M, K] arrays, run maxima float32 [M, g]) from the
    kernel's x' (`hadamard_reference`), the members' level tables levels / inv_levels float32 [n, T] and the step."""
    from qdit4sr_jax.quant.kernels.operands import codes_from_inverse, scale_from_level
    y, run_max = hadamard_reference(x, signs, run)
    amax = jnp.max(run_max, axis=1, keepdims=True)
    yf = y.astype(jnp.float32)
    i = _table_index(levels, step)
    return tuple(codes_from_inverse(yf, 1.0 / scale_from_level(amax, inv_levels[j, i]), levels[j, i])
                 for j in range(levels.shape[0])), run_max


def _table_index(levels, step):
    """The column of the [n, T] level tables at `step` (int32 scalar or [1]): clip(step, 0, T - 1)."""
    return jnp.clip(jnp.reshape(jnp.asarray(step, jnp.int32), ()), 0, levels.shape[1] - 1)


def mosaic_hadamard_codes(x, levels, inv_levels, step, **tuning):
    """x bf16 [M, K], levels / inv_levels float32 [n, T] (per member: its VaTMP table of code levels 2^(bits-1) - 1
    and their reciprocals), step int32 scalar or [1] -> (codes: n int8 [M, K] arrays, run maxima float32 [M, g]):
    the per-token codes, at column clip(step, 0, T - 1) of the tables (looked up in the kernel, so no XLA op
    gathers them per call), of x' = bf16(x D H_K)
    for each member, clip(round(x' * (1 / s)), +-level) (`operands.codes_from_inverse`: one division per row) with
    s = max(max_row |x'| * (1 / level), 2^-126) (`operands.scale_from_level`, the scale the GEMM kernel makes from
    max(run maxima)),
    made in the kernel, which holds whole
    rows of x' in each tile: x' itself is never written and no XLA codes pass runs. `mosaic_hadamard_rowmax`'s
    tuning arguments."""
    return _hadamard(x, levels=(levels, inv_levels, step), **tuning)


def mosaic_hadamard_rowmax(x, **tuning):
    """x bf16 [M, K] -> (x' = bf16(x D H_K) [M, K], run maxima float32 [M, g]: max over run j's c columns of |x'|);
    arguments: `_hadamard`."""
    return _hadamard(x, **tuning)


def _hadamard(x, *, signs: bool = True, parts: int = 3, wgs: int = 2, prefetch: int = 1, out_slots: int = 1,
              num_sms: int | None = None, levels=None, codes_swizzle: int | None = None, run: int | None = None):
    """x bf16 [M, K] -> (x' = bf16(x D H_K) [M, K], or with levels n codes [M, K] (`mosaic_hadamard_codes`);
    run maxima float32 [M, g]: max over run j's c columns of |x'|), D the signs of `transforms.rotation_signs(K)`
    (signs=True) or I. K must have a `hadamard_plan`, M be a multiple
    of its r (`fits`). parts: bf16 terms of Z in stage 3 (3: exact products; 2: Z to 16 bits, ~2^-17 relative).
    Tuning (benchmarks/gpu/rotation_gemm.py --hadamard-configs): wgs warpgroups per SM (1-4, each walking its own
    tiles), prefetch tiles whose TMA loads are in flight ahead of the one computed (1-3), out_slots output buffers
    per warpgroup (1: a tile's stores are read out before the next tile writes; 2: they overlap it); codes_swizzle
    the shared-memory swizzle (bytes) of the int8 codes tiles (default the run length; `rotation_gemm.py --shapes 0`
    compares 64 and 32 at K = 1536; `prologue_mosaic.CODES_IN_KERNEL`); run the run length c (64 / 128, default
    `hadamard_plan(k)`'s: a tile holds 64 // (K / c) rows of x, the run maxima are [M, K / c]).
    The shared memory (wgs (prefetch + 1 + out_slots) 64 c bf16 + the constants) must fit; lowering reports it if
    not."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from qdit4sr_jax.quant.kernels.mosaic_gemm import _num_sms, shared_call
    from qdit4sr_jax.quant.kernels.operands import codes_from_inverse, scale_from_level
    m, k = x.shape
    if not (1 <= wgs <= 4 and 1 <= prefetch <= 3 and out_slots in (1, 2)):
        raise ValueError(f"mosaic_hadamard_rowmax: wgs 1-4, prefetch 1-3 and out_slots 1-2, got {wgs}, {prefetch}, "
                         f"{out_slots}")
    if x.dtype != jnp.bfloat16 or not fits(m, k, run) or parts not in (1, 2, 3):
        raise ValueError(f"mosaic_hadamard_rowmax: needs bf16 x [M, K] with K a Hadamard block of 64- or 128-wide "
                         f"runs (at most 64 of them) and M a multiple of its rows per tile, parts 1-3; got "
                         f"{x.dtype}{tuple(x.shape)}, parts={parts}, run={run}")
    n_codes, tables = 0, []
    if levels is not None:
        lev, inv_lev, step = levels
        if lev.ndim != 2 or inv_lev.shape != lev.shape or not 1 <= lev.shape[0] <= 4:
            raise ValueError(f"mosaic_hadamard_codes: levels and inv_levels must be float32 [n, T] (a level table "
                             f"per member, n 1-4), got {tuple(lev.shape)} and {tuple(inv_lev.shape)}")
        n_codes, n_steps = lev.shape
        tables = [lev.astype(jnp.float32), inv_lev.astype(jnp.float32),
                  jnp.reshape(jnp.asarray(step, jnp.int32), (1,))]
    g, c, r, _ = hadamard_plan(k, run)
    rg = r * g                                  # valid rows of a tile
    tiles = m // r
    x2 = x.reshape(m * g, c)                    # row (m, j): run j of x-row m; a tile is rows t rg .. t rg + 63
    swz = plgpu.SwizzleTransform(128)
    tr_c = (plgpu.TilingTransform((8, 64)), swz)
    sw = codes_swizzle or c                     # int8 codes: c bytes per row, in shared memory tiles of sw bytes
    if sw not in (32, 64, 128) or sw > c:
        raise ValueError(f"mosaic_hadamard_codes: codes_swizzle must be 32, 64 or 128 and at most the run length {c}, "
                         f"got {codes_swizzle}")
    tr_q = (plgpu.TilingTransform((8, sw)), plgpu.SwizzleTransform(sw))
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    per_tile = 1 + max(n_codes, 1)                                          # TMA stores per tile
    programs = wgs * min(num_sms or _num_sms(), -(-tiles // wgs))
    slots = prefetch + 1
    inv = float(np.float32(1.0 / np.sqrt(k)))

    def body(x_g, gbd_g, s_g, dt_g, *refs):
        lev_g, inv_g, step_g = refs[:3] if n_codes else (None, None, None)
        y_gs, rmax_g = refs[-1 - max(n_codes, 1):-1], refs[-1]          # x', or one codes array per member

        def scope(x_s, out_s, g_s, s_s, rmax_s, bars, cbar):
            wg = jax.lax.axis_index("wg")
            p = jax.lax.axis_index("sm") * wgs + wg        # this warpgroup's program
            mine = (tiles - p + programs - 1) // programs  # its tiles: p, p + programs, ...
            plgpu.copy_gmem_to_smem(gbd_g, g_s.at[wg], cbar.at[wg * 2])
            plgpu.copy_gmem_to_smem(s_g, s_s.at[wg], cbar.at[wg * 2 + 1])
            signs_v = plgpu.load(dt_g, (), layout=plgpu.Layout.WGMMA, optimized=False)

            def fetch(i):
                t = p + i * programs
                plgpu.copy_gmem_to_smem(x_g.at[pl.ds(t * rg, ROWS), :], x_s.at[wg, i % slots],
                                        bars.at[wg * slots + i % slots])

            for i0 in range(prefetch):
                pl.when(i0 < mine)(functools.partial(fetch, i0))

            plgpu.barrier_wait(cbar.at[wg * 2])
            plgpu.barrier_wait(cbar.at[wg * 2 + 1])

            def tile(i, carry):
                slot, o = i % slots, i % out_slots
                t = p + i * programs

                @pl.when(i + prefetch < mine)
                def _():
                    fetch(i + prefetch)

                plgpu.barrier_wait(bars.at[wg * slots + slot])
                xt = x_s.at[wg, slot]
                xt[...] = plgpu.load(xt, (), layout=plgpu.Layout.WGMMA) * signs_v     # 1. the signs
                plgpu.commit_smem()

                def stage1(acc):
                    plgpu.wgmma(acc, g_s.at[wg], xt)                                   # 2. Z = G^T (X o D)
                    plgpu.wgmma_wait(0)
                    return acc[...]

                z = pl.run_scoped(stage1, plgpu.ACC((ROWS, c), jnp.float32))
                terms = []
                for _ in range(parts):                                                  # 3. Z as bf16 terms
                    h = z.astype(jnp.bfloat16)
                    terms.append(h)
                    z = z - h.astype(jnp.float32)

                def stage3(acc):
                    for h in terms:
                        plgpu.wgmma(acc, h, s_s.at[wg])
                    plgpu.wgmma_wait(0)
                    return acc[...]

                y = (pl.run_scoped(stage3, plgpu.ACC((ROWS, c), jnp.float32)) * inv).astype(jnp.bfloat16)
                yf = y.astype(jnp.float32)
                run_max = jnp.max(jnp.abs(yf), axis=1)                                  # [64], one per run
                plgpu.wait_smem_to_gmem(per_tile * (out_slots - 1), wait_read_only=True)  # 4. out by TMA
                rmax_s[wg, o] = run_max
                if n_codes:                     # 5. the codes: the tile holds r whole rows, their maxima are here
                    # Each row's max from its g run maxima, read back from shared memory as scalars: a reduction of
                    # the [64] vector across its warps would go through one scratch area of the CTA that the other
                    # warpgroup uses at the same time (Pallas' reduction scratch is not per thread): the codes at
                    # K = 1536 came out wrong that way on an H100 (2026-12-07).
                    plgpu.commit_smem()
                    row = plgpu.broadcasted_iota(jnp.int32, (ROWS,), 0, layout=row_layout) // g
                    amax = jnp.zeros((ROWS,), jnp.float32)
                    for q in range(r):
                        m_q = rmax_s[wg, o, q * g]
                        for j in range(1, g):
                            m_q = jnp.maximum(m_q, rmax_s[wg, o, q * g + j])
                        amax = jnp.where(row == q, m_q, amax)
                    col = jnp.clip(step_g[0], 0, n_steps - 1)
                    for l_ in range(n_codes):
                        lev, inv_lev = lev_g[l_, col], inv_g[l_, col]
                        inv_s = 1.0 / scale_from_level(amax, inv_lev)          # [64]: one division per row
                        out_s[wg, o, l_] = codes_from_inverse(yf, jax.lax.broadcast_in_dim(inv_s, (ROWS, c), [0]), lev)
                else:
                    out_s[wg, o] = y
                plgpu.commit_smem()
                if n_codes:
                    for l_ in range(n_codes):
                        plgpu.copy_smem_to_gmem(out_s.at[wg, o, l_, pl.ds(0, rg)], y_gs[l_].at[pl.ds(t * rg, rg), :])
                else:
                    plgpu.copy_smem_to_gmem(out_s.at[wg, o, pl.ds(0, rg)], y_gs[0].at[pl.ds(t * rg, rg), :])
                plgpu.copy_smem_to_gmem(rmax_s.at[wg, o, pl.ds(0, rg)], rmax_g.at[pl.ds(t * rg, rg)])
                return carry

            jax.lax.fori_loop(0, mine, tile, 0)
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(scope,
                      plgpu.SMEM((wgs, slots, ROWS, c), jnp.bfloat16, transforms=tr_c),
                      plgpu.SMEM((wgs, out_slots, n_codes, ROWS, c), jnp.int8, transforms=tr_q) if n_codes else
                      plgpu.SMEM((wgs, out_slots, ROWS, c), jnp.bfloat16, transforms=tr_c),
                      plgpu.SMEM((wgs, ROWS, ROWS), jnp.bfloat16, transforms=(plgpu.TilingTransform((8, 64)), swz)),
                      plgpu.SMEM((wgs, c, c), jnp.bfloat16, transforms=tr_c),
                      plgpu.SMEM((wgs, out_slots, ROWS), jnp.float32),
                      plgpu.Barrier(num_barriers=wgs * slots), plgpu.Barrier(num_barriers=2 * wgs),
                      collective_axes="wg")

    # one output array per member (not [n, M, K]: a member's slice of that would be a copy before its GEMM)
    outs = ([jax.ShapeDtypeStruct((m * g, c), jnp.int8)] * n_codes if n_codes else
            [jax.ShapeDtypeStruct((m * g, c), jnp.bfloat16)])
    body.__name__ = "mosaic_hadamard_codes" if n_codes else "mosaic_hadamard"      # its name in profiles
    kernel = plgpu.kernel(body, out_type=(*outs, jax.ShapeDtypeStruct((m * g,), jnp.float32)),
                          grid=(programs // wgs,), grid_names=("sm",), num_threads=wgs, thread_name="wg")

    def with_constants(x2, *tabs):      # the constant operands made inside the shared function: once per kernel
        return kernel(x2, *plan_operands(k, signs, c), *tabs)

    config = ("hadamard", m, k, bool(signs), parts, wgs, prefetch, out_slots, programs, n_codes, sw, c)
    *ys, rmax = shared_call(with_constants, [x2, *tables], config)
    ys = [y.reshape(m, k) for y in ys]
    return (tuple(ys) if n_codes else ys[0]), rmax.reshape(m, g)


__all__ = ["RUN_LENGTH", "hadamard_plan", "plan_operands", "fits", "hadamard_reference", "codes_reference",
           "mosaic_hadamard_rowmax", "mosaic_hadamard_codes"]
