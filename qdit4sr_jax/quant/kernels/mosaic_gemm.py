"""int8 GEMMs with the fused linear's epilogue as Pallas Mosaic GPU kernels (Hopper wgmma + TMA).

Hopper's 8-bit wgmma needs both operands K-major: activations [M, K] and weights [N, K] (the stored "nk" layout) are.

  y[m, n] = float(acc[m, n]) * sx[m] * sw[n] (+ sum_b feats_b[m] @ up_b[:, n]) (+ bias[n]) (+ addend[m, n])

- `mosaic_int8_gemm`: one program per output tile, a `plgpu.emit_pipeline` of TMA copies, one warpgroup.
  H200 2026-12-05: exact, 0.95-1.45x of cuBLAS bf16 (cuBLASLt's int8 rate only at K = 6144). Kept for comparison.
- `mosaic_int8_gemm_ws`: persistent and warp-specialized (a memory warpgroup, two compute warpgroups), TMA-store
  epilogue, the fused linear's whole epilogue (the per-token scale from the VaTMP level table, the low-rank and
  H-SVD block branches as bf16 wgmmas). H200 2026-12-07: 1.46-1.86x of cuBLAS bf16 at the 512-px step's shapes,
  1.2-1.5x faster than the Triton kernel of `pallas_gpu.py` (benchmarks/RESULTS.md). `fused_linear` runs it for
  prepared weights with gemm="mosaic" (`mosaic_gemm_epilogue`, where the layer `fits`).
GPU only (Hopper or newer); there is no interpreter for wgmma, so off the GPU the tests check that they lower
(tests/quant/test_mosaic_lowering.py); benchmarks/gpu/ws_gemm.py and mosaic_fused_check.py check the numbers on the GPU.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qdit4sr_jax.quant.kernels.operands import scale_from_level

SWIZZLE = 128          # bytes: one int8 K step of 128 is one 128-byte swizzle span


def tiles_ok(m: int, n: int, k: int, tile_m: int = 128, tile_n: int = 128, tile_k: int = 128) -> bool:
    """Whether an [m, k] x [n, k] problem tiles exactly (rows are padded by the caller)."""
    return m % tile_m == 0 and n % tile_n == 0 and k % tile_k == 0 and tile_k == SWIZZLE and tile_m % 64 == 0


def _check(xq, wq, sx, sw, bias, addend, tile_m, tile_n, tile_k):
    m, k = xq.shape
    n = wq.shape[0]
    if xq.dtype != jnp.int8 or wq.dtype != jnp.int8:
        raise TypeError(f"mosaic_int8_gemm needs int8 operands, got {xq.dtype} x {wq.dtype}")
    if wq.shape[1] != k:
        raise ValueError(f"mosaic_int8_gemm: activations [{m}, {k}] and weights {tuple(wq.shape)} disagree on K")
    if sx.shape != (m,) or sw.shape != (n,):
        raise ValueError(f"mosaic_int8_gemm: scales {tuple(sx.shape)} / {tuple(sw.shape)} must be [{m}] / [{n}]")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"mosaic_int8_gemm: bias {tuple(bias.shape)} must be [{n}]")
    if addend is not None and addend.shape != (m, n):
        raise ValueError(f"mosaic_int8_gemm: addend {tuple(addend.shape)} must be [{m}, {n}]")
    if not tiles_ok(m, n, k, tile_m, tile_n, tile_k):
        raise ValueError(f"mosaic_int8_gemm: [{m}, {k}] x [{n}, {k}] does not tile by {tile_m}x{tile_n}x{tile_k} "
                         f"(tile_k must be {SWIZZLE}, tile_m a multiple of 64)")
    return m, n, k


def mosaic_int8_gemm(xq, wq, sx, sw, bias=None, addend=None, *, out_dtype=jnp.bfloat16, tile_m: int = 128,
                     tile_n: int = 128, tile_k: int = 128, stages: int = 4):
    """xq int8 [M, K], wq int8 [N, K], sx f32 [M], sw f32 [N], bias f32 [N] | None, addend [M, N] | None
    -> [M, N] out_dtype (see the module docstring). M, N, K must tile exactly (`tiles_ok`)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    m, n, k = _check(xq, wq, sx, sw, bias, addend, tile_m, tile_n, tile_k)
    steps = k // tile_k
    transforms = (plgpu.TilingTransform((8, SWIZZLE)), plgpu.SwizzleTransform(SWIZZLE))
    row = plgpu.Layout.WGMMA.reduce(1)
    col = plgpu.Layout.WGMMA.reduce(0)
    has_bias, has_add = bias is not None, addend is not None

    def body(x_g, w_g, sx_g, sw_g, *rest):
        rest = list(rest)
        b_g = rest.pop(0) if has_bias else None
        a_g = rest.pop(0) if has_add else None
        (o_g,) = rest
        mi = jax.lax.axis_index("m")
        ni = jax.lax.axis_index("n")
        rows, cols = pl.ds(mi * tile_m, tile_m), pl.ds(ni * tile_n, tile_n)

        def gemm(acc):
            def step(_, x_s, w_s):
                plgpu.wgmma(acc, x_s, plgpu.transpose_ref(w_s, (1, 0)))
                plgpu.wgmma_wait(1)            # keep one MMA in flight; its inputs stay until the next step

            plgpu.emit_pipeline(
                step, grid=(steps,),
                in_specs=[plgpu.BlockSpec((tile_m, tile_k), lambda kk: (mi, kk), transforms=transforms,
                                          delay_release=1),
                          plgpu.BlockSpec((tile_n, tile_k), lambda kk: (ni, kk), transforms=transforms,
                                          delay_release=1)],
                max_concurrent_steps=stages)(x_g, w_g)
            plgpu.wgmma_wait(0)
            return acc[...]

        acc = pl.run_scoped(gemm, plgpu.ACC((tile_m, tile_n), jnp.int32))
        shape = (tile_m, tile_n)
        s_x = plgpu.load(sx_g.at[rows], (), layout=row, optimized=False)
        s_w = plgpu.load(sw_g.at[cols], (), layout=col, optimized=False)
        y = acc.astype(jnp.float32) * jax.lax.broadcast_in_dim(s_x, shape, [0])
        y = y * jax.lax.broadcast_in_dim(s_w, shape, [1])
        if has_bias:
            y = y + jax.lax.broadcast_in_dim(plgpu.load(b_g.at[cols], (), layout=col, optimized=False), shape, [1])
        if has_add:
            y = y + plgpu.load(a_g.at[rows, cols], (), layout=plgpu.Layout.WGMMA, optimized=False).astype(jnp.float32)
        o_g[rows, cols] = y.astype(out_dtype)

    args = [xq, wq, sx.astype(jnp.float32), sw.astype(jnp.float32)]
    if has_bias:
        args.append(bias.astype(jnp.float32))
    if has_add:
        args.append(addend)
    body.__name__ = "mosaic_int8_gemm"             # the kernel's name in profiles
    kernel = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((m, n), out_dtype), grid=(m // tile_m, n // tile_n),
                          grid_names=("m", "n"))
    return kernel(*args)


_SHARED: dict = {}
_RECORDERS: list = []


@contextlib.contextmanager
def recording_calls():
    """Within the block, every `shared_call` (each Mosaic kernel call as traced, before XLA's CSE of identical
    calls) is counted in the yielded Counter by (kernel kind, operand shapes): the census of a traced step's kernels
    (`benchmarks/gpu/lower_check.py --census`)."""
    calls = collections.Counter()
    _RECORDERS.append(calls)
    try:
        yield calls
    finally:
        _RECORDERS.remove(calls)


def shared_call(kernel, args, config):
    """kernel(*args) through one jitted function per distinct kernel. config (hashable) must hold every Python value
    the kernel's body depends on besides its operands' shapes and dtypes (they join the key). A step's lowered
    module then carries each distinct kernel once, as a function its call sites call, instead of the kernel's
    serialized module at every call site (the 512-px W4A4 step: 992 Mosaic calls of 21 distinct kernels, 228 MB of
    lowered text)."""
    key = (config, tuple((tuple(a.shape), str(a.dtype)) for a in args))
    for calls in _RECORDERS:
        calls[(config[0], tuple(tuple(a.shape) for a in args))] += 1
    fn = _SHARED.get(key)
    if fn is None:
        def call(*operands):
            return kernel(*operands)
        call.__name__ = f"mosaic_{config[0]}"             # the lowered function: `mosaic_call_sites` counts calls
        fn = _SHARED[key] = jax.jit(call)
    return fn(*args)


def mosaic_call_sites(text: str) -> int:
    """Calls of the kernels that `shared_call` made in a lowered module's text (each distinct kernel appears once
    as a custom call inside its function)."""
    import re
    return len(re.findall(r"(?<!custom_)call @mosaic_(?:int8_ws|bf16_rowmax|hadamard)\w*\(", text))


def _num_sms(default: int = 132) -> int:
    """Streaming multiprocessors of the default device (132 on an H100 SXM / H200; the default off the GPU,
    where the kernel is only lowered)."""
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or default) if dev.platform == "gpu" else default


def _cta(tile_m: int, tile_n: int, wg_dim: str):
    """The CTA tile (rows, columns) of two [tile_m, tile_n] warpgroup tiles side by side along wg_dim."""
    return tile_m * (2 if wg_dim == "m" else 1), tile_n * (2 if wg_dim == "n" else 1)


def ws_tiles_ok(m: int, n: int, k: int, tile_m: int = 128, tile_n: int = 128, wg_dim: str = "m",
                epi: int = 64, epi_n: int | None = None) -> bool:
    """Whether [m, k] x [n, k] tiles for `mosaic_int8_gemm_ws` (two warpgroups side by side along `wg_dim`)."""
    cta_m, cta_n = _cta(tile_m, tile_n, wg_dim)
    return (wg_dim in ("m", "n") and m % cta_m == 0 and n % cta_n == 0 and k % SWIZZLE == 0 and tile_m % 64 == 0
            and tile_n % (epi_n or epi) == 0 and tile_m % epi == 0 and tile_m * tile_n <= 128 * 128)


@dataclasses.dataclass(frozen=True)
class Branch:
    """A 16-bit branch added in the epilogue: y[m, n] += feats[m, col(n) : col(n) + r] @ up[:, n], with
    col(n) = col0 + (n // block_out) * r (block_out 0: col0 for every n). feats bf16 [M, C], up bf16 [r, N]
    (r a multiple of 16). The low-rank branch is (dh, col0, lr_b); the H-SVD blocks' rank-1 features are
    (dt, dt_col0, ub) with block_out = b_out: each output tile reads its block row's r features."""
    feats: Any
    up: Any
    col0: int = 0
    block_out: int = 0


def _tile_coords(plgpu, info, wg, m_iters, n_iters, tile_m, tile_n, wg_dim, grid_minor, grid_width):
    """Persistent-loop step -> (mi, ni) of the CTA tile (snake order), the warpgroup's first row r0 and column c0,
    and its slices of the CTA's row / column blocks in shared memory."""
    (lin,) = info.index if hasattr(info, "index") else info          # (JAX 0.10 / 0.11 loop info)
    mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), grid_minor, grid_width)
    cta_m, cta_n = _cta(tile_m, tile_n, wg_dim)
    r0 = mi * cta_m + (wg * tile_m if wg_dim == "m" else 0)
    c0 = ni * cta_n + (wg * tile_n if wg_dim == "n" else 0)
    wg_rows = pl.ds(wg * tile_m, tile_m) if wg_dim == "m" else slice(None)
    wg_cols = pl.ds(wg * tile_n, tile_n) if wg_dim == "n" else slice(None)
    return mi, ni, r0, c0, wg_rows, wg_cols


def _store_tiles(plgpu, y, smem, o_g, r0, c0, epi, epi_n):
    """A warpgroup's output tile y [tile_m, tile_n] (registers) -> o_g[r0:, c0:] through its shared-memory
    buffers smem [slots, epi, epi_n] and TMA stores, one [epi, epi_n] piece at a time (the stores of the previous
    piece in a slot are waited for; the last ones overlap what follows)."""
    slots = smem.shape[0]
    tile_m, tile_n = y.shape
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for i in range(tile_m // epi):
        for j in range(tile_n // epi_n):
            slot = (i * (tile_n // epi_n) + j) % slots
            plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
            smem[slot] = y[i * epi:(i + 1) * epi, j * epi_n:(j + 1) * epi_n]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(smem.at[slot], o_g.at[pl.ds(r0 + i * epi, epi), pl.ds(c0 + j * epi_n, epi_n)])


def takes_run_maxima(g: int) -> bool:
    """Whether `mosaic_int8_gemm_ws` reads g run maxima per row (sx [M, g]) and takes their max itself: its epilogue
    loads [tile_m, 16] blocks (or one [tile_m, g] where g is a multiple of 16), so g >= 16, a multiple of 8."""
    return g >= 16 and g % 8 == 0


def mosaic_int8_gemm_ws(xq, wq, sx, sw, bias=None, addend=None, *, out_dtype=jnp.bfloat16, tile_m: int = 128,
                        tile_n: int = 128, wg_dim: str = "m", stages: int = 4, epi: int = 64,
                        epi_n: int | None = None, out_slots: int = 2, grid_minor: int = 1,
                        grid_width: int = 8, in_flight: int = 1, num_sms: int | None = None,
                        inv_levels=None, step=None, branches: Sequence[Branch] = ()):
    """The same GEMM and epilogue as `mosaic_int8_gemm`, structured the way Hopper GEMMs reach the tensor cores'
    rate: persistent (one program per SM walking the output tiles in a snake of `grid_width` tiles along
    dimension `grid_minor`, 0 = M, 1 = N), warp-specialized (a memory warpgroup issues the TMA copies of K steps
    `stages` ahead; two compute warpgroups each own a [tile_m, tile_n] int32 accumulator, side by side along
    `wg_dim`, and keep `in_flight` wgmma groups outstanding), and an epilogue that goes through shared memory in
    [epi, epi_n] tiles (epi_n: epi by default) through `out_slots` (1 or 2) buffers per warpgroup and leaves by
    TMA stores, overlapping the next tile's main loop.

    xq int8 [M, K], wq int8 [N, K], sx f32 [M], sw f32 [N], bias f32 [N] | None, addend [M, N] | None
    -> [M, N] out_dtype. M, N, K must tile (`ws_tiles_ok`). Group-wise weights: wq int8 [G, N, g] (the "gnk"
    layout, K = G g, g 64 or 128) with sw f32 [G, N]: each K step is one group, its int32 product scaled by the
    group's sw as it leaves the tensor cores and summed in float32 (y = s_x * sum_g acc_g * sw_g, as the Triton
    kernel; no wgmma stays in flight across steps).
    With inv_levels (f32 [T]) and step (int32 [1]), sx holds each row's max|x'| and the kernel makes the scale
    max(sx * inv_levels[clip(step, 0, T - 1)], 2^-126) (`operands.scale_from_max`); sx may then also be run
    maxima f32 [M, g] (g >= 16, a multiple of 8: the Mosaic Hadamard kernel's), the row's max taken in the epilogue
    from one [tile_m, g] block where g is a multiple of 16 ([64, 48] checked right on an H100), else from
    overlapping [tile_m, 16] blocks (unchecked on a GPU; `prologue_mosaic.RUN_TILE`). branches: `Branch`es whose
    products the epilogue adds (bf16 wgmmas into a float32 accumulator started from the scaled int32 one):
    y = acc * s_x * s_w + sum_b feats_b @ up_b + bias (+ addend)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    runs = sx.shape[1] if sx.ndim == 2 else 0          # sx as run maxima [M, g]: the row max taken here
    if runs and (inv_levels is None or not takes_run_maxima(runs) or sx.shape[0] != xq.shape[0]):
        raise ValueError(f"mosaic_int8_gemm_ws: sx [M, g] (run maxima) needs a level table and g >= 16, a multiple "
                         f"of 8, got {tuple(sx.shape)} for activations {tuple(xq.shape)}")
    sx_rows = jax.ShapeDtypeStruct(sx.shape[:1], sx.dtype)
    grouped = wq.ndim == 3
    if grouped:
        n_groups, _, gsize = wq.shape
        if gsize not in (64, 128) or n_groups * gsize != xq.shape[1] or sw.shape != (n_groups, wq.shape[1]):
            raise ValueError(f"mosaic_int8_gemm_ws: group-wise weights {tuple(wq.shape)} with scales {tuple(sw.shape)} "
                             f"do not fit activations {tuple(xq.shape)} (need [G, N, g], g 64 or 128, G g = K, "
                             f"scales [G, N])")
        m, n, k = _check(xq, jax.ShapeDtypeStruct((wq.shape[1], n_groups * gsize), wq.dtype), sx_rows, sw[0],
                         bias, addend, 64, 64, SWIZZLE)
        in_flight = 0
    else:
        m, n, k = _check(xq, wq, sx_rows, sw, bias, addend, 64, 64, SWIZZLE)
    step_k = gsize if grouped else SWIZZLE              # K per pipeline step (one swizzle span of int8 codes)
    epi_n = epi_n or epi
    if out_slots not in (1, 2):
        raise ValueError(f"mosaic_int8_gemm_ws: out_slots must be 1 or 2, got {out_slots}")
    if not ws_tiles_ok(m, n, k, tile_m, tile_n, wg_dim, epi, epi_n):
        raise ValueError(f"mosaic_int8_gemm_ws: [{m}, {k}] x [{n}, {k}] does not tile by two {tile_m}x{tile_n} "
                         f"warpgroup tiles along {wg_dim!r} (K a multiple of {SWIZZLE}, epilogue tiles {epi}x{epi_n})")
    if not 0 <= in_flight < stages:
        raise ValueError(f"mosaic_int8_gemm_ws: in_flight={in_flight} needs 0 <= in_flight < stages={stages}")
    if (inv_levels is None) != (step is None):
        raise ValueError("mosaic_int8_gemm_ws: inv_levels and step come together")
    branches = tuple(branches)
    for b in branches:
        r = b.up.shape[0]
        if b.feats.shape[0] != m or b.up.shape[1] != n or r % 16 or b.feats.dtype != b.up.dtype:
            raise ValueError(f"mosaic_int8_gemm_ws: branch features {tuple(b.feats.shape)} {b.feats.dtype} / up "
                             f"{tuple(b.up.shape)} {b.up.dtype} do not fit [{m}, C] x [r, {n}] (r a multiple of 16)")
        if b.block_out and b.block_out % tile_n:
            raise ValueError(f"mosaic_int8_gemm_ws: block_out {b.block_out} is not a multiple of tile_n {tile_n}")
    cta_m, cta_n = _cta(tile_m, tile_n, wg_dim)
    m_iters, n_iters, k_iters = m // cta_m, n // cta_n, k // step_k
    transforms = (plgpu.TilingTransform((8, step_k)), plgpu.SwizzleTransform(step_k))
    out_bytes = jnp.dtype(out_dtype).itemsize
    out_swizzle = plgpu.find_swizzle(epi_n * out_bytes * 8)
    out_transforms = (plgpu.TilingTransform((8, out_swizzle // out_bytes)), plgpu.SwizzleTransform(out_swizzle))
    row, col, acc_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0), plgpu.Layout.WGMMA
    has_bias, has_add, table = bias is not None, addend is not None, inv_levels is not None
    n_lev = int(inv_levels.shape[0]) if table else 0

    def up_smem(b):
        bb = jnp.dtype(b.up.dtype).itemsize      # wgmma steps K by one swizzle span: r (16, 32, 48 ...) sets it
        sw_ = max(s_ for s_ in (32, 64, 128) if b.up.shape[0] % (s_ // bb) == 0)
        return plgpu.SMEM((2, b.up.shape[0], tile_n), b.up.dtype,
                          transforms=(plgpu.TilingTransform((8, sw_ // bb)), plgpu.SwizzleTransform(sw_)))

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
            max_concurrent_steps=stages, compute_context=context,
            in_specs=[plgpu.BlockSpec((cta_m, step_k), lambda kk: (0, kk), transforms=transforms,
                                      delay_release=in_flight),
                      plgpu.BlockSpec((pl.squeezed, cta_n, step_k), lambda kk: (kk, 0, 0), transforms=transforms)
                      if grouped else
                      plgpu.BlockSpec((cta_n, step_k), lambda kk: (0, kk), transforms=transforms,
                                      delay_release=in_flight)])

    def body(x_g, w_g, sx_g, sw_g, *rest):
        rest = list(rest)
        inv_g, step_g = (rest.pop(0), rest.pop(0)) if table else (None, None)
        b_g = rest.pop(0) if has_bias else None
        a_g = rest.pop(0) if has_add else None
        br_g = [(rest.pop(0), rest.pop(0)) for _ in branches]
        (o_g,) = rest
        ignore = lambda *_, **__: None  # noqa: E731 - the allocations do not depend on the bodies

        def scope(allocs, out_smem, up_s, up_bar):
            wg = jax.lax.axis_index("wg")

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def _tile(info):
                mi, ni, r0, c0, wg_rows, wg_cols = _tile_coords(plgpu, info, wg, m_iters, n_iters, tile_m, tile_n,
                                                                wg_dim, grid_minor, grid_width)

                def context(run):
                    for i, (_, up_g) in enumerate(br_g):     # the up-projection columns, while the main loop runs
                        plgpu.copy_gmem_to_smem(up_g.at[:, pl.ds(c0, tile_n)], up_s[i].at[wg], up_bar[i].at[wg])

                    shape = (tile_m, tile_n)

                    def row_scale():
                        if runs:             # the row's max of its run maxima (what a reduce kernel per layer did)
                            s_x = None       # one block where g is a multiple of 16 (checked on an H100), else
                            starts = [0] if runs % 16 == 0 else sorted({*range(0, runs - 15, 16), runs - 16})
                            width = runs if runs % 16 == 0 else 16     # 16-column blocks overlapping at the end
                            for c_ in starts:
                                blk = jnp.max(plgpu.load(sx_g.at[pl.ds(r0, tile_m), pl.ds(c_, width)], (),
                                                         layout=acc_layout, optimized=False), axis=1)
                                s_x = blk if s_x is None else jnp.maximum(s_x, blk)
                        else:
                            s_x = plgpu.load(sx_g.at[pl.ds(r0, tile_m)], (), layout=row, optimized=False)
                        if table:
                            s_x = scale_from_level(s_x, inv_g[jnp.clip(step_g[0], 0, n_lev - 1)])
                        return jax.lax.broadcast_in_dim(s_x, shape, [0])

                    def with_acc(acc_ref):
                        run(acc_ref)
                        s_w = plgpu.load(sw_g.at[pl.ds(c0, tile_n)], (), layout=col, optimized=False)
                        scale = row_scale() * jax.lax.broadcast_in_dim(s_w, shape, [1])
                        return acc_ref[...].astype(jnp.float32) * scale      # acc * (s_x s_w), as the Triton kernel

                    if grouped:                  # the float32 sum over groups is the pipeline's carry
                        y = run(plgpu.layout_cast(jnp.zeros(shape, jnp.float32), acc_layout)) * row_scale()
                    else:
                        y = pl.run_scoped(with_acc, plgpu.ACC((tile_m, tile_n), jnp.int32))
                    if branches:
                        def add_branches(acc_ref):
                            for i, (b, (f_g, _)) in enumerate(zip(branches, br_g)):
                                r = b.up.shape[0]
                                c = b.col0 + (c0 // b.block_out) * r if b.block_out else b.col0
                                feats = plgpu.load(f_g.at[pl.ds(r0, tile_m), pl.ds(c, r)], (), layout=acc_layout,
                                                   optimized=False)
                                plgpu.barrier_wait(up_bar[i].at[wg])
                                plgpu.wgmma(acc_ref, feats, up_s[i].at[wg])
                            plgpu.wgmma_wait(0)
                        y = pl.run_state(add_branches)(plgpu.ACC.init(y))
                    if has_bias:
                        bvec = plgpu.load(b_g.at[pl.ds(c0, tile_n)], (), layout=col, optimized=False)
                        y = y + jax.lax.broadcast_in_dim(bvec, (tile_m, tile_n), [1])
                    if has_add:
                        y = y + plgpu.load(a_g.at[pl.ds(r0, tile_m), pl.ds(c0, tile_n)], (),
                                           layout=acc_layout, optimized=False).astype(jnp.float32)
                    _store_tiles(plgpu, y.astype(out_dtype), out_smem.at[wg], o_g, r0, c0, epi, epi_n)

                def mma(idx, x_s, w_s, carry):
                    if not grouped:
                        plgpu.wgmma(carry, x_s.at[wg_rows], plgpu.transpose_ref(w_s.at[wg_cols], (1, 0)))
                        plgpu.wgmma_wait(in_flight)
                        return carry

                    def group_product(acc_ref):
                        plgpu.wgmma(acc_ref, x_s.at[wg_rows], plgpu.transpose_ref(w_s.at[wg_cols], (1, 0)))
                        plgpu.wgmma_wait(0)
                        return acc_ref[...]

                    acc = pl.run_scoped(group_product, plgpu.ACC((tile_m, tile_n), jnp.int32))
                    s_w = plgpu.load(sw_g.at[idx[0], pl.ds(c0, tile_n)], (), layout=col, optimized=False)
                    return carry + acc.astype(jnp.float32) * jax.lax.broadcast_in_dim(s_w, (tile_m, tile_n), [1])

                cols = pl.ds(ni * cta_n, cta_n)          # the CTA's output columns: N is axis 1 of grouped [G, N, g]
                pipeline(mma, context)(x_g.at[pl.ds(mi * cta_m, cta_m), :],
                                       w_g.at[:, cols, :] if grouped else w_g.at[cols, :], allocations=allocs)

        pl.run_scoped(scope, pipeline(ignore, ignore).get_allocations(x_g, w_g),
                      plgpu.SMEM((2, out_slots, epi, epi_n), out_dtype, transforms=out_transforms),
                      [up_smem(b) for b in branches],
                      [plgpu.Barrier(num_barriers=2) for _ in branches], collective_axes="wg")
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    args = [xq, wq, sx.astype(jnp.float32), sw.astype(jnp.float32)]
    if table:
        args += [inv_levels.astype(jnp.float32), jnp.asarray(step, jnp.int32).reshape(1)]
    if has_bias:
        args.append(bias.astype(jnp.float32))
    if has_add:
        args.append(addend)
    for b in branches:
        args += [b.feats, b.up]
    grid = min(num_sms or _num_sms(), m_iters * n_iters)
    body.__name__ = "mosaic_int8_gemm_ws"          # the kernel's name in profiles (step_profile.py)
    kernel = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((m, n), out_dtype), grid=(grid,), grid_names=("sm",),
                          num_threads=3, thread_name="wg")
    config = ("int8_ws", str(jnp.dtype(out_dtype)), tile_m, tile_n, wg_dim, stages, epi, epi_n, out_slots, grid_minor,
              grid_width, in_flight, grid, grouped, has_bias, has_add, table, n_lev, runs,
              tuple((b.col0, b.block_out) for b in branches))
    return shared_call(kernel, args, config)


def mosaic_bf16_gemm_rowmax(x, b, b2=None, *, layout: str = "nk", b_scale: float = 1.0, tile_m: int = 64,
                            tile_n: int = 128, wg_dim: str = "n", stages: int = 4, in_flight: int = 1, epi: int = 64,
                            epi_n: int | None = None, out_slots: int = 2, grid_minor: int = 1, grid_width: int = 8,
                            num_sms: int | None = None, rowmax: bool = True):
    """x bf16 [M, K], b bf16 [N, K] (layout "nk", K-major) or [K, N] ("kn"), b2 None or a second operand [N2, K] /
    [K, N2] in the same layout -> (y bf16 [M, N + N2] = x [b | b2] with b's columns times b_scale (float32, before
    the rounding to bf16), amax f32 [N / tile_n, M], None with rowmax=False: a plain GEMM) with amax[j, m] = max over
    the j-th tile_n columns of b's part of |y[m, :]| (of y as rounded to bf16).

    The prologue's rotation (`prologue_mosaic.py`, prologue="mosaic-gemm"): with b = D H_b sqrt(b)
    (the +-1 Hadamard, exact in bf16; b_scale = 1 / sqrt(b)) and b2 the branch down-projection jd it writes the
    rotated x' = x D H in bf16 and the branch features x jd in one GEMM, and the row maxima that the per-token
    scales need come out of its epilogue (max over the K / tile_n rows of amax) instead of a reduce pass over x'.
    Each output tile reads b or b2 (two pipelines, one per operand: no concatenation of a constant and a weight).
    With rowmax=False it is the branch features' GEMM of prologue="mosaic" (x jd, instead of XLA's split-K GEMM).
    Same structure as `mosaic_int8_gemm_ws` (persistent, warp-specialized, TMA-store epilogue), bf16 wgmmas into
    float32 accumulators, K in steps of 64. M, N, N2, K must tile (`ws_tiles_ok`, K a multiple of 64)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    if layout not in ("nk", "kn"):
        raise ValueError(f"mosaic_bf16_gemm_rowmax: layout must be 'nk' or 'kn', got {layout!r}")
    nk = layout == "nk"
    m, k = x.shape
    ops = [b] if b2 is None else [b, b2]
    widths = [o.shape[0 if nk else 1] for o in ops]
    if x.dtype != jnp.bfloat16 or any(o.dtype != jnp.bfloat16 or o.ndim != 2 or o.shape[1 if nk else 0] != k
                                      for o in ops):
        want = "[N, K]" if nk else "[K, N]"
        raise ValueError(f"mosaic_bf16_gemm_rowmax: needs bf16 x [M, K] and b (b2) {want}, got {x.dtype}"
                         f"{tuple(x.shape)} and {[f'{o.dtype}{tuple(o.shape)}' for o in ops]}")
    epi_n = epi_n or epi
    step_k = SWIZZLE // 2                                  # 64 bf16 = one 128-byte swizzle span
    if not (all(ws_tiles_ok(m, w, SWIZZLE, tile_m, tile_n, wg_dim, epi, epi_n) for w in widths)
            and k % step_k == 0) or out_slots not in (1, 2) or not 0 <= in_flight < stages:
        raise ValueError(f"mosaic_bf16_gemm_rowmax: [{m}, {k}] x {widths} columns does not tile by two "
                         f"{tile_m}x{tile_n} warpgroup tiles along {wg_dim!r} (K a multiple of {step_k}; out_slots "
                         f"1 or 2; 0 <= in_flight < stages)")
    cta_m, cta_n = _cta(tile_m, tile_n, wg_dim)
    n = sum(widths)
    m_iters, n_iters, k_iters, n1_iters = m // cta_m, n // cta_n, k // step_k, widths[0] // cta_n
    transforms = (plgpu.TilingTransform((8, step_k)), plgpu.SwizzleTransform(SWIZZLE))
    out_swizzle = plgpu.find_swizzle(epi_n * 2 * 8)
    out_transforms = (plgpu.TilingTransform((8, out_swizzle // 2)), plgpu.SwizzleTransform(out_swizzle))
    b_spec = (plgpu.BlockSpec((cta_n, step_k), lambda kk: (0, kk), transforms=transforms, delay_release=in_flight)
              if nk else
              plgpu.BlockSpec((step_k, cta_n), lambda kk: (kk, 0), transforms=transforms, delay_release=in_flight))

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
            max_concurrent_steps=stages, compute_context=context,
            in_specs=[plgpu.BlockSpec((cta_m, step_k), lambda kk: (0, kk), transforms=transforms,
                                      delay_release=in_flight), b_spec])

    def body(x_g, *refs):
        n_out = 2 if rowmax else 1
        b_gs, (y_g, amax_g) = refs[:-n_out], (refs[-n_out:] if rowmax else (refs[-1], None))
        ignore = lambda *_, **__: None  # noqa: E731 - the allocations do not depend on the bodies

        def scope(allocs, out_smem, amax_smem):
            wg = jax.lax.axis_index("wg")

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def _tile(info):
                mi, ni, r0, c0, wg_rows, wg_cols = _tile_coords(plgpu, info, wg, m_iters, n_iters, tile_m, tile_n,
                                                                wg_dim, grid_minor, grid_width)

                def mma(_, x_s, b_s, acc_ref):
                    b_wg = plgpu.transpose_ref(b_s.at[wg_cols], (1, 0)) if nk else b_s.at[:, wg_cols]
                    plgpu.wgmma(acc_ref, x_s.at[wg_rows], b_wg)
                    plgpu.wgmma_wait(in_flight)
                    return acc_ref

                def part(b_g, first, scale, with_amax):
                    """This tile from operand b_g, whose columns start at output tile column `first`."""
                    def context(run):
                        def with_acc(acc_ref):
                            run(acc_ref)
                            return acc_ref[...]

                        acc = pl.run_scoped(with_acc, plgpu.ACC((tile_m, tile_n), jnp.float32))
                        y = (acc if scale == 1.0 else acc * scale).astype(jnp.bfloat16)
                        _store_tiles(plgpu, y, out_smem.at[wg], y_g, r0, c0, epi, epi_n)
                        if with_amax:
                            amax_smem[wg] = jnp.max(jnp.abs(y.astype(jnp.float32)), axis=1)
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(amax_smem.at[wg], amax_g.at[c0 // tile_n, pl.ds(r0, tile_m)])

                    cols = pl.ds((ni - first) * cta_n, cta_n)
                    pipeline(mma, context)(x_g.at[pl.ds(mi * cta_m, cta_m), :], b_g.at[cols, :] if nk else
                                           b_g.at[:, cols], allocations=allocs)

                if len(b_gs) == 1:
                    part(b_gs[0], 0, b_scale, rowmax)
                else:
                    pl.when(ni < n1_iters)(lambda: part(b_gs[0], 0, b_scale, rowmax))
                    pl.when(ni >= n1_iters)(lambda: part(b_gs[1], n1_iters, 1.0, False))

        pl.run_scoped(scope, pipeline(ignore, ignore).get_allocations(x_g, b_gs[0]),
                      plgpu.SMEM((2, out_slots, epi, epi_n), jnp.bfloat16, transforms=out_transforms),
                      plgpu.SMEM((2, tile_m), jnp.float32), collective_axes="wg")
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    grid = min(num_sms or _num_sms(), m_iters * n_iters)
    outs = (jax.ShapeDtypeStruct((m, n), jnp.bfloat16),) + (
        (jax.ShapeDtypeStruct((widths[0] // tile_n, m), jnp.float32),) if rowmax else ())
    body.__name__ = "mosaic_bf16_gemm_rowmax" if rowmax else "mosaic_bf16_gemm"      # its name in profiles
    kernel = plgpu.kernel(body, out_type=outs, grid=(grid,), grid_names=("sm",), num_threads=3, thread_name="wg")
    config = ("bf16_rowmax", layout, float(b_scale), tile_m, tile_n, wg_dim, stages, in_flight, epi, epi_n, out_slots,
              grid_minor, grid_width, grid, rowmax)
    res = shared_call(kernel, [x, *ops], config)
    return (res[0], res[1]) if rowmax else (res[0], None)


def rowmax_reference(x, b, b2=None, *, layout: str = "nk", b_scale: float = 1.0, tile_n: int = 128, **_tiles):
    """`mosaic_bf16_gemm_rowmax` with XLA ops: y = bf16([x b * b_scale | x b2]) (float32 accumulation), amax per
    tile_n columns of b's part (the kernel's other tiling arguments are accepted and do not matter)."""
    dims = (((1,), (1,)), ((), ())) if layout == "nk" else (((1,), (0,)), ((), ()))
    y = (jax.lax.dot_general(x, b, dims, preferred_element_type=jnp.float32) * jnp.float32(b_scale)
         ).astype(jnp.bfloat16)
    m, n = y.shape
    amax = jnp.max(jnp.abs(y.astype(jnp.float32)).reshape(m, n // tile_n, tile_n), axis=2).T
    if b2 is not None:
        y = jnp.concatenate([y, jax.lax.dot_general(x, b2, dims, preferred_element_type=jnp.float32
                                                    ).astype(jnp.bfloat16)], axis=1)
    return y, amax


def reference(xq, wq, sx, sw, bias=None, addend=None, *, out_dtype=jnp.bfloat16):
    """The same function with XLA ops (int8 dot_general -> int32, scales in float32): the check. sx f32 [M] (the
    row scales)."""
    acc = jax.lax.dot_general(xq, wq, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    y = acc.astype(jnp.float32) * sx.astype(jnp.float32)[:, None] * sw.astype(jnp.float32)[None, :]
    if bias is not None:
        y = y + bias.astype(jnp.float32)[None, :]
    if addend is not None:
        y = y + addend.astype(jnp.float32)
    return y.astype(out_dtype)


# The warp-specialized kernel's tiles inside `fused_linear` (prepared weights with gemm="mosaic"): two 64 x 128
# warpgroup tiles side by side along N. With the branches' up-projection columns in shared memory this is the
# fastest of the H200 sweep that fits (benchmarks/RESULTS.md, 2026-12-07: 28.8 us at 4096 x 1536 x 1536, 1.57x of
# cuBLAS bf16, Triton 1.14x); 128 x 128 along M (faster at N = 6144 and M = 2048) needs 254 KiB with them.
FUSED_TILES = dict(tile_m=64, tile_n=128, wg_dim="n", stages=4, in_flight=1, grid_minor=1, grid_width=8)
_TILE_FIELDS = {"tile_m": int, "tile_n": int, "wg_dim": str, "stages": int, "in_flight": int, "grid_minor": int,
                "grid_width": int, "epi": int, "epi_n": int, "out_slots": int}
_FUSED_OVERRIDE: dict = {}


def set_fused_tiles(**fields) -> dict:
    """Process-wide override of `FUSED_TILES` for the fused path (benchmarks compare tilings in whole steps), e.g.
    set_fused_tiles(tile_m=128, wg_dim="m", epi_n=32, out_slots=1): 128 x 128 along M with the branches, which
    fits shared memory with one 64 x 32 epilogue buffer per warpgroup. No arguments restore the defaults.
    Returns the previous override."""
    bad = {k: v for k, v in fields.items() if k not in _TILE_FIELDS or not isinstance(v, _TILE_FIELDS[k])}
    if bad:
        raise ValueError(f"set_fused_tiles: unknown fields or wrong types {bad} (fields: {sorted(_TILE_FIELDS)})")
    prev = dict(_FUSED_OVERRIDE)
    _FUSED_OVERRIDE.clear()
    _FUSED_OVERRIDE.update(fields)
    return prev


def _fused_tiles(tiles=None) -> dict:
    """The fused path's tiles: `FUSED_TILES`, the `set_fused_tiles` override, then `tiles`."""
    return {**FUSED_TILES, **_FUSED_OVERRIDE, **(tiles or {})}


def parse_tiles(text: str) -> dict:
    """"tile_m=128,wg_dim=m,epi_n=32" -> {"tile_m": 128, "wg_dim": "m", "epi_n": 32} (`set_fused_tiles`' fields)."""
    out = {}
    for part in filter(None, text.split(",")):
        key, _, val = part.partition("=")
        if key not in _TILE_FIELDS or not val:
            raise ValueError(f"mosaic tiles: {part!r} is not FIELD=VALUE with FIELD in {sorted(_TILE_FIELDS)}")
        out[key] = _TILE_FIELDS[key](val)
    return out


def _branches(ops):
    """The prologue's branch features as `Branch`es (the same columns the Triton kernel reads)."""
    bw, out = ops.bw, []
    if ops.dh is not None:                       # (blocked low-rank: block i(n) = n // lr_block reads its Rl)
        out.append(Branch(ops.dh, bw.lr_b, ops.col if ops.joint else 0, bw.lr_block))
    if ops.dt is not None:
        rb = bw.rb
        off = (ops.col + bw.dt_col) // rb if ops.joint else 0
        out.append(Branch(ops.dt, bw.ub, off * rb, bw.block[0]))
    return out


def fits(ops, w, tiles=None) -> bool:
    """Whether `mosaic_gemm_epilogue` runs this layer: int8 codes (unpacked, not split into [even | odd] runs),
    per channel ("nk") or in float-scaled groups of 64 / 128 ("gnk"); rows / columns / K that tile; branch
    features and up-projections in one 16-bit dtype with ranks a multiple of 16 and blocks a multiple of tile_n."""
    t = _fused_tiles(tiles)
    mp, kp = ops.xq.shape
    if w.layout not in ("nk", "gnk") or ops.chunk or w.packed or ops.xq.dtype != jnp.int8 or w.k != kp:
        return False
    if ops.sx.ndim == 2 and (ops.sx_inv is None or not takes_run_maxima(ops.sx.shape[1])):
        return False
    if w.layout == "gnk" and (w.groups[1] not in (64, 128) or w.groups[0] * w.groups[1] != kp or
                              w.gscale is not None):
        return False
    if not ws_tiles_ok(mp, w.n, kp, t["tile_m"], t["tile_n"], t["wg_dim"], t.get("epi", 64), t.get("epi_n")):
        return False
    for b in _branches(ops):
        r = b.up.shape[0]
        if (b.feats.dtype != b.up.dtype or jnp.dtype(b.up.dtype).itemsize != 2 or r % 16 or b.up.shape[1] != w.n
                or (b.block_out and b.block_out % t["tile_n"])):
            return False
    return True


def mosaic_gemm_epilogue(ops, w, bias, out_dtype, tiles=None):
    """Stages 2-3 of `fused_linear` through `mosaic_int8_gemm_ws` (GPU, Hopper): ops from the XLA prologue
    (`fused.prologue(..., pad_to=..., joint=True, defer_scale=True)`), w the QuantizedWeight with int8 codes
    ("nk" per channel or "gnk" group-wise); returns [M, N] in out_dtype. The same function as
    `pallas_gpu.pallas_gemm_epilogue` (equal up to float32 rounding in the epilogue). Layers that do not `fits`
    are the caller's to route elsewhere."""
    t = _fused_tiles(tiles)
    table = dict(inv_levels=ops.sx_inv, step=ops.sx_step) if ops.sx_inv is not None else {}
    sw = jnp.transpose(w.scale) if w.layout == "gnk" else w.scale[:, 0]      # [G, N] group-wise, else [N]
    y = mosaic_int8_gemm_ws(ops.xq, w.codes(), ops.sx, sw, bias, out_dtype=out_dtype,
                            branches=_branches(ops), **table, **t)
    return y[: ops.m]


__all__ = ["Branch", "FUSED_TILES", "fits", "parse_tiles", "set_fused_tiles", "shared_call", "mosaic_call_sites",
           "mosaic_gemm_epilogue", "mosaic_int8_gemm", "mosaic_int8_gemm_ws", "mosaic_bf16_gemm_rowmax",
           "rowmax_reference", "reference", "takes_run_maxima", "tiles_ok", "ws_tiles_ok", "SWIZZLE"]
