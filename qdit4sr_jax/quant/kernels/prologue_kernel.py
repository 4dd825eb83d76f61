"""The fused linear's prologue as one Pallas kernel (Triton on GPU): stage 1 of `fused.py` in a single pass.

The XLA prologue of a W4A4 Q-DiT4SR layer is several kernels per layer and step (smoothing, the per-token
absmax, the quantization, a bf16 copy of x', the low-rank and block down-projections, the layout of their
features: benchmarks/gpu/layer_kernels.py). This kernel does all of it for a tile of `block_m` rows:

  pass 1, over K in chunks of `block_k` (= b_in with block branches, so that chunk j is input block j):
      x'_c = x_c / smooth_c                              (float32, as `linear.transform_input`)
      amax = max(amax, max|x'_c|)                        per row
      dh  += bf16(x'_c) @ lr_a[c]                        [bm, Rl]   (float32 accumulation)
      t_c  = bf16(bf16(x'_c) @ vt[c])                    [bm, Bo]   t[m, i, c] for every block row i
      dt  += t_c @ E_c                                   [bm, Bo Rb] E_c[i, i Rb + c] = 1: places t[:, i, c]
                                                                    at column i Rb + c (exact: one 1 per column)
  s = amax / lev (1 where 0), lev = 2^(bits-1) - 1; pass 2, over K again: q_c = clip(round(x'_c / s), +-lev)
  (with a VaTMP schedule the kernel reads lev from the prepared per-step table at the traced step, so a layer
  needs no XLA scalar ops for its bits)

Outputs: q int8 [Mp, K], s float32 [Mp], dh [Mp, Rl] and dt [Mp, Bo Rb] in the branch dtype (`branch_ops`
layouts; dt has Bo >= n_bo block rows, the extra ones zero, because Triton tiles are powers of 2). The
codes and scales are those of the XLA prologue bit for bit (the same float32 operations per element; an
all-zero row gets scale 1 here, 2^-126 from the XLA prologue with level tables, zero codes in both);
dh / dt are the same sums accumulated per chunk, so they may differ from XLA's in the last bf16 bit.

Rotated layers (the online Hadamard, with or without QuaRot's signs) take `prologue_rotated.kernel_rotated`:
the rotation inside the same single pass (opt-in; its module docstring has the measurements).

Covered: symmetric per-token activations (the fused path), K a multiple of `block_k`, natural code order
(`KernelConfig.unpack="xla"`, the default), rotation runs c >= 16 with b_in a multiple of min(c, b_in) and
bm * K <= `ROT_TILE`. Otherwise `fits` is False and the XLA prologue runs. `interpret=True` runs the kernel in
the Pallas interpreter (tests on CPU).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qdit4sr_jax.quant import quantizer as qz
from qdit4sr_jax.quant.kernels.branch_ops import BranchWeights, is_tile
from qdit4sr_jax.quant.kernels.operands import Operands
from qdit4sr_jax.quant.kernels.prologue_ops import (codes, dot as _dot, level, placement, round_half_even,  # noqa: F401
                                                    store_scale, unpack_refs)
from qdit4sr_jax.quant.kernels.prologue_rotated import ROT_TILE, kernel_rotated, rotation_operands, rotation_unit
from qdit4sr_jax.quant.qweight import QuantizedWeight

BLOCK_M = 16          # rows per program: keeps the [bm, Bo Rb] float32 dt accumulator in registers
BLOCK_K = 256         # K chunk without block branches


def chunk_size(w: QuantizedWeight, bw: Optional[BranchWeights]) -> int:
    """K chunk of the kernel: the input block b_in with block branches, else min(BLOCK_K, K)."""
    if bw is not None and bw.has_blocks:
        return bw.block[1]
    return min(BLOCK_K, w.k)


def fits(w: QuantizedWeight, bw: Optional[BranchWeights], chunk: int, block_m: int = BLOCK_M) -> bool:
    """Whether the kernel covers this layer with `block_m` rows per program (else the XLA prologue runs)."""
    c = chunk_size(w, bw)
    if chunk or not w.a_symmetric or not is_tile(c) or w.k % c:
        return False
    if bw is not None and bw.lr_block:            # a blocked low-rank branch (merged layers): the XLA prologue
        return False
    if w.layout == "gnk" and w.groups[0] * w.groups[1] != w.k:
        return False
    if w.signs and not w.rotate:
        return False
    if w.rotate:
        e = rotation_unit(w, bw)
        if not is_tile(e) or block_m * w.k > ROT_TILE or w.k % e or (bw is not None and bw.has_blocks
                                                                    and bw.block[1] % e):
            return False
    return True


def _kernel(*refs, n_chunks, bk, lev_static, lev_steps, has_smooth, has_lowrank, has_blocks, rb, upcast):
    r = unpack_refs(refs, has_smooth=has_smooth, has_rotation=False, lev_static=lev_static, lev_steps=lev_steps,
                    has_lowrank=has_lowrank, has_blocks=has_blocks)
    x_ref, sm_ref, la_ref, vt_ref = r.x, r.sm, r.la, r.vt
    bm = x_ref.shape[0]
    f32 = jnp.float32
    dot = functools.partial(_dot, upcast=upcast)

    def xprime(c):
        xc = x_ref[:, pl.ds(c * bk, bk)].astype(f32)
        if has_smooth:
            xc = xc / sm_ref[pl.ds(c * bk, bk)][None, :]
        return xc

    carry = [jnp.zeros((bm,), f32)]
    if has_lowrank:
        carry.append(jnp.zeros((bm, la_ref.shape[1]), f32))
    if has_blocks:
        bo_pad = vt_ref.shape[2]
        carry.append(jnp.zeros((bm, bo_pad * rb), f32))

    def pass1(c, carry):
        carry = list(carry)
        xc = xprime(c)
        out = [jnp.maximum(carry.pop(0), jnp.max(jnp.abs(xc), axis=1))]
        if has_lowrank or has_blocks:
            dtype = (la_ref if has_lowrank else vt_ref).dtype
            xb = xc.astype(dtype)
        if has_lowrank:
            out.append(carry.pop(0) + dot(xb, la_ref[pl.ds(c * bk, bk), :]))
        if has_blocks:
            t = dot(xb, vt_ref[c, :, :]).astype(vt_ref.dtype)                       # [bm, Bo]
            out.append(carry.pop(0) + dot(t, placement(bo_pad, rb, c, vt_ref.dtype)))
        return tuple(out)

    res = list(jax.lax.fori_loop(0, n_chunks, pass1, tuple(carry)))
    amax = res.pop(0)
    if has_lowrank:
        r.dh[...] = res.pop(0).astype(r.dh.dtype)
    if has_blocks:
        r.dt[...] = res.pop(0).astype(r.dt.dtype)
    lev = level(lev_static, lev_steps, r.lev, r.step)
    s = store_scale(amax, lev, r.s)

    def pass2(c, _):
        r.q[:, pl.ds(c * bk, bk)] = codes(xprime(c), s, lev)
        return 0

    jax.lax.fori_loop(0, n_chunks, pass2, 0)


def level_table(a_schedule):
    """Per-step code levels 2^(bits - 1) - 1 (float32 [T]) of a VaTMP schedule int32 [T]: what the kernel
    looks up at the traced step instead of per-layer scalar ops (`prepared.prepare_weight` stores it)."""
    return qz.code_range(jnp.asarray(a_schedule, jnp.int32), True)[1].astype(jnp.float32)


def pallas_prologue(x2, w: QuantizedWeight, bw: Optional[BranchWeights], bits, *, pad_to: int,
                    interpret: bool = False, block_m: int = BLOCK_M, num_warps: int = 4, levels=None, step=None):
    """x2 [M, K] -> `operands.Operands` through the kernel (rows padded to a multiple of lcm(pad_to, block_m)).
    bits: int or traced int32 scalar; or levels (`level_table` [T]) with step (traced int32 scalar), looked up
    inside the kernel (bits is then ignored). The caller checks `fits(w, bw, 0)`."""
    m, k = x2.shape
    bk = chunk_size(w, bw)
    rows = max(pad_to, block_m)
    if rows % pad_to or rows % block_m:
        raise ValueError(f"prologue kernel: row tiles {block_m} and {pad_to} must divide one another")
    mp = -(-m // rows) * rows
    x = x2 if mp == m else jnp.pad(x2, ((0, mp - m), (0, 0)))
    has_lowrank = bw is not None and bw.has_lowrank
    has_blocks = bw is not None and bw.has_blocks
    args = [x]
    specs = [pl.BlockSpec((block_m, k), lambda i: (i, 0))]
    if w.smooth is not None:
        args.append(w.smooth.astype(jnp.float32))
        specs.append(pl.BlockSpec((k,), lambda i: (0,)))
    rot = None
    if w.rotate:
        rot, hs = rotation_operands(w, bw, x.dtype)
        args.append(hs)
        specs.append(pl.BlockSpec(hs.shape, lambda i: (0, 0)))
    lev_static, lev_steps = None, 0
    if levels is not None:
        if step is None:
            raise ValueError("prologue kernel: a level table needs the step")
        lev_steps = int(levels.shape[0])
        args += [levels.astype(jnp.float32), jnp.reshape(jnp.asarray(step, jnp.int32), (1,))]
        specs += [pl.BlockSpec((lev_steps,), lambda i: (0,)), pl.BlockSpec((1,), lambda i: (0,))]
    elif qz._is_static(bits):
        lev_static = float(qz.code_range(bits, True)[1])
    else:
        args.append(jnp.reshape(qz.code_range(bits, True)[1], (1,)).astype(jnp.float32))
        specs.append(pl.BlockSpec((1,), lambda i: (0,)))
    out_shape = [jax.ShapeDtypeStruct((mp, k), jnp.int8), jax.ShapeDtypeStruct((mp,), jnp.float32)]
    out_specs = [pl.BlockSpec((block_m, k), lambda i: (i, 0)), pl.BlockSpec((block_m,), lambda i: (i,))]
    rb = 0
    if has_lowrank:
        rl = bw.lr_a.shape[1]
        args.append(bw.lr_a)
        specs.append(pl.BlockSpec((k, rl), lambda i: (0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((mp, rl), bw.lr_a.dtype))
        out_specs.append(pl.BlockSpec((block_m, rl), lambda i: (i, 0)))
    if has_blocks:
        nbi, bi, bo_pad = bw.vt.shape
        rb = bw.rb
        args.append(bw.vt)
        specs.append(pl.BlockSpec((nbi, bi, bo_pad), lambda i: (0, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((mp, bo_pad * rb), bw.vt.dtype))
        out_specs.append(pl.BlockSpec((block_m, bo_pad * rb), lambda i: (i, 0)))
    flags = dict(lev_static=lev_static, lev_steps=lev_steps, has_smooth=w.smooth is not None,
                 has_lowrank=has_lowrank, has_blocks=has_blocks, rb=rb, upcast=interpret)
    if rot is None:
        kernel = functools.partial(_kernel, n_chunks=k // bk, bk=bk, **flags)
    else:
        kernel = functools.partial(kernel_rotated, k=k, bk_in=bw.block[1] if has_blocks else k, **rot, **flags)
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        params = dict(compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1))
    outs = list(pl.pallas_call(kernel, grid=(mp // block_m,), in_specs=specs, out_specs=out_specs,
                               out_shape=out_shape, interpret=interpret, name="qlinear_prologue",
                               **params)(*args))
    q, s = outs.pop(0), outs.pop(0)
    dh = outs.pop(0) if has_lowrank else None
    dt = outs.pop(0) if has_blocks else None
    return Operands(q, s, dh, dt, bw, m, 0)


__all__ = ["pallas_prologue", "fits", "chunk_size", "level_table", "round_half_even", "ROT_TILE", "BLOCK_M", "BLOCK_K"]
