"""The Pallas kernel of the fused quantized linear (stages 2-3 of `fused.py`), lowered by Triton on GPU.

Grid (Mp / block_m, N / block_n); each program owns one [block_m, block_n] output tile and loops over K:
  per channel ("nk"): int32 acc += q_x[:, k-step] . q_w[n-tile, k-step]^T, scaled once at the end;
  group-wise ("gnk", group g): one dot per group, y += float(acc_g) * s_w[g, n-tile] (exact per group);
  two-level "int" group scales arrive as folded int8 codes c * q with per-channel scales: the "nk" loop;
  packed 4-bit weights with unpack="kernel" (else they arrive unpacked as int8): bytes are loaded as int8
  and split in registers, low nibble (p << 4) >> 4 and
  high nibble p >> 4 (arithmetic shifts sign-extend), multiplied with the [even | odd] halves of the
  prologue's activation run: two int8 dots of half the K step each.
Epilogue: y * s_x (* s_w) + dh[m-tile] @ lr_b[:, n-tile] + dt[m-tile, block row] @ ub[:, n-tile] (branch
dtype, float32 accumulation; `branch_ops`; dh and dt read in place from one joint array when `Operands.joint`)
+ bias, stored in the output dtype; s_x made here from the rows' max|x'| and the step's 1 / levels when the
prologue defers it (`operands.Operands.row_scale`). With `interpret=True` the same kernel runs in the Pallas
interpreter on any backend (the CPU tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qdit4sr_jax.quant.kernels.operands import scale_from_level, unpacks_in_kernel
from qdit4sr_jax.quant.qweight import QuantizedWeight


def _dot_nt(a, b, acc_type):
    """a [m, k] . b [n, k]^T -> [m, n] in acc_type."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=acc_type)


def _nibbles(p):
    """int8 bytes -> (low, high) sign-extended 4-bit values as int8."""
    return jnp.right_shift(jnp.left_shift(p, 4), 4), jnp.right_shift(p, 4)


def _kernel(*refs, layout, packed, n_steps, step, lev_steps, has_lowrank, has_blocks, has_bias, out_dtype, upcast):
    xq_ref, sx_ref, w_ref, sw_ref = refs[:4]
    rest = list(refs[4:])
    dh_ref = lb_ref = dt_ref = ub_ref = b_ref = None
    sx = sx_ref[...]
    if lev_steps:                  # sx holds the rows' max|x'|: the scale from the step's 1 / levels
        inv_ref, step_ref = rest.pop(0), rest.pop(0)
        sx = scale_from_level(sx, inv_ref[jnp.clip(step_ref[0], 0, lev_steps - 1)])
    if has_lowrank:
        dh_ref, lb_ref = rest.pop(0), rest.pop(0)
    if has_blocks:
        dt_ref, ub_ref = rest.pop(0), rest.pop(0)
    if has_bias:
        b_ref = rest.pop(0)
    (o_ref,) = rest
    bm, bn = o_ref.shape
    run = 2 * step if packed else step                     # input channels consumed per iteration

    def partial_dot(kk, w_tile):
        if packed:
            lo, hi = _nibbles(w_tile)
            xe = xq_ref[:, pl.ds(kk * run, step)]
            xo = xq_ref[:, pl.ds(kk * run + step, step)]
            return _dot_nt(xe, lo, jnp.int32) + _dot_nt(xo, hi, jnp.int32)
        return _dot_nt(xq_ref[:, pl.ds(kk * run, step)], w_tile, jnp.int32)

    if layout == "gnk":
        def body(gi, y):
            a = partial_dot(gi, w_ref[gi, :, :])
            return y + a.astype(jnp.float32) * sw_ref[gi, :][None, :]
        y = jax.lax.fori_loop(0, n_steps, body, jnp.zeros((bm, bn), jnp.float32))
        y = y * sx[:, None]
    else:
        def body(kk, acc):
            return acc + partial_dot(kk, w_ref[:, pl.ds(kk * step, step)])
        acc = jax.lax.fori_loop(0, n_steps, body, jnp.zeros((bm, bn), jnp.int32))
        y = acc.astype(jnp.float32) * (sx[:, None] * sw_ref[...][None, :])
    for d_ref, u_ref in ((dh_ref, lb_ref), (dt_ref, ub_ref)):
        if d_ref is None:
            continue
        d, u = d_ref[...], u_ref[...]
        if upcast:          # interpreter on CPU: XLA:CPU has no bf16 x bf16 -> f32 dot; products are exact in f32
            d, u = d.astype(jnp.float32), u.astype(jnp.float32)
        y = y + jnp.dot(d, u, preferred_element_type=jnp.float32)
    if has_bias:
        y = y + b_ref[...][None, :]
    o_ref[...] = y.astype(out_dtype)


def pallas_gemm_epilogue(ops, w: QuantizedWeight, bias, out_dtype, cfg, *, interpret: bool = False):
    """Stages 2-3 through the Pallas kernel. ops: `operands.Operands` from `prologue(..., pad_to=block_m,
    chunk=...)`; returns [M, N] in out_dtype."""
    mp, kp = ops.xq.shape
    bm, bn = cfg.block_m, cfg.block_n
    n = w.n
    if mp % bm or n % bn:
        raise ValueError(f"pallas kernel: rows {mp} / columns {n} are not multiples of the tile {bm}x{bn}")
    packed = unpacks_in_kernel(w, cfg)
    if packed:
        wq = jax.lax.bitcast_convert_type(w.qvalue, jnp.int8)
    else:
        wq = w.codes()                          # int8; packed storage is unpacked (and two-level group
                                                # factors folded, c * q) here, outside the kernel
    if w.layout == "gnk":
        G, g = w.groups
        n_steps, step = G, (g // 2 if packed else g)
        sw = jnp.transpose(w.scale)                                          # [G, N]
        w_spec = pl.BlockSpec((G, bn, wq.shape[2]), lambda i, j: (0, j, 0))
        sw_spec = pl.BlockSpec((G, bn), lambda i, j: (0, j))
    else:
        step = cfg.block_k // 2 if packed else cfg.block_k
        run = 2 * step if packed else step
        if kp % run or (packed and ops.chunk != run):
            raise ValueError(f"pallas kernel: K={kp} / packed run {ops.chunk} do not match block_k={cfg.block_k}")
        n_steps = kp // run
        sw = w.scale[:, 0]                                                   # [N]
        w_spec = pl.BlockSpec((bn, wq.shape[1]), lambda i, j: (j, 0))
        sw_spec = pl.BlockSpec((bn,), lambda i, j: (j,))
    args = [ops.xq, ops.sx_rows, wq, sw]
    specs = [pl.BlockSpec((bm, kp), lambda i, j: (i, 0)), pl.BlockSpec((bm,), lambda i, j: (i,)),
             w_spec, sw_spec]
    lev_steps = 0
    if ops.sx_inv is not None:                  # the scale made here from the rows' max|x'| (`Operands.row_scale`)
        lev_steps = int(ops.sx_inv.shape[0])
        args += [ops.sx_inv.astype(jnp.float32), ops.sx_step]
        specs += [pl.BlockSpec((lev_steps,), lambda i, j: (0,)), pl.BlockSpec((1,), lambda i, j: (0,))]
    bw = ops.bw
    if ops.dh is not None:                      # global low-rank: every output tile reads the same dh rows
                                                # (joint features: their first Rl columns)
        rl, lb = bw.lr_b.shape[0], bw.lr_block      # (blocked low-rank: the tile's block i(n) = n // lr_block)
        c0 = ops.col // rl if ops.joint else 0      # (shared features: this layer's start, a multiple of Rl)
        args += [ops.dh, bw.lr_b]
        specs += [pl.BlockSpec((bm, rl), lambda i, j: (i, c0 + ((j * bn) // lb if lb else 0))),
                  pl.BlockSpec((rl, bn), lambda i, j: (0, j))]
    if ops.dt is not None:                      # blocks: the dt slice of the tile's block row i(n) = n // b_out
        rb, bo = bw.rb, bw.block[0]
        off = (ops.col + bw.dt_col) // rb if ops.joint else 0   # joint features: dt from column col + dt_col
        args += [ops.dt, bw.ub]
        specs += [pl.BlockSpec((bm, rb), lambda i, j: (i, off + (j * bn) // bo)),
                  pl.BlockSpec((rb, bn), lambda i, j: (0, j))]
    if bias is not None:
        args.append(bias.astype(jnp.float32))
        specs.append(pl.BlockSpec((bn,), lambda i, j: (j,)))
    kernel = functools.partial(_kernel, layout=w.layout, packed=packed, n_steps=n_steps, step=step,
                               lev_steps=lev_steps, has_lowrank=ops.dh is not None, has_blocks=ops.dt is not None,
                               has_bias=bias is not None, out_dtype=out_dtype,
                               upcast=interpret)
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        params = dict(compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    y = pl.pallas_call(
        kernel, grid=(mp // bm, n // bn), in_specs=specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype), interpret=interpret,
        name=f"qlinear_{w.layout}_{'w4p' if packed else 'w8'}", **params)(*args)
    return y[: ops.m]


__all__ = ["pallas_gemm_epilogue"]
