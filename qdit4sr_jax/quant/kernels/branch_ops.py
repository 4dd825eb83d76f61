"""The 16-bit branches of a fused quantized linear in kernel layout: weight operands, features, epilogue.

A node's branches (quant/qweight.py: global low-rank lr_a [K, r] / lr_b [r, N], H-SVD block rank-1 factors
block_u [n_bo, n_bi, b_out] / block_v [n_bo, n_bi, b_in]) become, with every padding zero (so exact):

weight side, `branch_weights(w)` (weight-only: `kernels.prepare` computes it once per run):
  lr_a [K, Rl], lr_b [Rl, N]    the global factors, rank padded to Rl (a power of 2 >= 16)
  vt   [n_bi, b_in, Bo]         block down-projection per input block j: vt[j, :, i] = v_ij (Bo = pow2 >= 16)
  ub   [Rb, N]                  block up-projection: ub[j, n] = u_{i(n), j}[n - i(n) b_out], i(n) = n // b_out
                                (Rb = pow2(n_bi) >= 16)
activation side, `branch_features(xt, bw)` (XLA; `prologue_kernel.py` computes the same in one kernel):
  dh [M, Rl]                    h = x' lr_a, rounded to the branch dtype (as the reference)
  dt [M, n_bo Rb]               t[m, i, j] = <v_ij, x'_j> at column i Rb + j, rounded to the branch dtype
joint down-projection (optional, `branch_weights(..., joint=True)`: `kernels.prepare(..., down="joint")`):
  jd   [K, dt_col + n_bo Rb]    [lr_a | V_d], V_d[j b_in + c, dt_col + i Rb + j] = vt[j, c, i] (zero elsewhere; dt_col
                                = Rl, or max(Rl, Rb) with kernel tiles): dh and dt from one GEMM x' jd (the zeros
                                add nothing: the same sums, another order), which the GEMM kernel reads in place
                                (`joint_features`: no copy of the dh / dt slices)
  with jd_input (`input_space_down`, `kernels.prepare(..., down="input")`): jd_in = T jd with x' = x T (T =
                                diag(signs / smooth) H_b, the node's input transform), so [dh | dt] = x jd_in reads
                                the layer's own input x and not x': the down GEMM no longer waits for the rotation
                                nor needs a bf16 copy of x'. The same function; the rounding differs (x, not
                                bf16(x'), enters it, and jd_in is rounded to the branch dtype)
shared down-projection (`share_down`, `kernels.prepare(..., down="input")` on to_q / to_k / to_v): layers that read
one input put their input-space jd side by side in one `SharedDown` [K, sum W_i] held once beside them; one GEMM
                                x jd_shared gives every member's [dh | dt], member i's from column `jd_col`
                                (a multiple of its Rl and Rb: its GEMM kernel reads them in place)
blocked low-rank (`lr_block` > 0, from a node with lr_groups = g: layers reading one input merged, `merged.py`):
  lr_a [K, g Rl], lr_b [Rl, N]  block i's factors side by side in lr_a and along N in lr_b (its diagonal block of the
                                node's lr_b), so output column n reads dh[m, i(n) Rl : (i(n) + 1) Rl], i(n) =
                                n // lr_block, as the H-SVD blocks are read per block row: the epilogue's rank stays
                                Rl, not g Rl (the zeros of a block-diagonal lr_b are never multiplied)
epilogue, `branch_epilogue` (XLA) or the Pallas GEMM kernel per output tile:
  y[m, n] += dh[m] . lr_b[:, n] + dt[m, i(n) Rb : (i(n) + 1) Rb] . ub[:, n]     (float32 accumulation)
so an output tile inside one block row reads one [bm, Rb] slice of dt. The same quantities as
`quant.reference.branches` (the fake-quant reference), summed in another order.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import jax.scipy.linalg  # noqa: F401 (block_diag)

from qdit4sr_jax.quant.lowering import lowering_for, target_platform, widen_on_cpu  # noqa: F401 (re-exported)
from qdit4sr_jax.quant.qweight import QuantizedWeight


def next_pow2(n: int, least: int = 16) -> int:
    p = least
    while p < n:
        p *= 2
    return p


def is_tile(v: int) -> bool:
    """Whether v can be a Triton tile dimension of the kernels: a power of 2, at least 16."""
    return v >= 16 and not (v & (v - 1))


@dataclasses.dataclass(frozen=True)
class BranchWeights:
    """Weight-side branch operands (module docstring); absent parts are None; `block` = (b_out, b_in)."""
    lr_a: Any = None
    lr_b: Any = None
    vt: Any = None
    ub: Any = None
    block: Optional[tuple] = None
    jd: Any = None                # [K, Rl + n_bo Rb] joint down-projection [lr_a | V_d], or None
    jd_input: bool = False        # jd maps the layer's input x (not x') to [dh | dt] (`input_space_down`)
    jd_col: Optional[int] = None  # jd moved into a `SharedDown`: the first column of this layer's [dh | dt] there
    lr_block: int = 0             # > 0: output columns per low-rank block (module docstring), 0: one block for all

    @property
    def has_lowrank(self) -> bool:
        return self.lr_a is not None

    @property
    def has_blocks(self) -> bool:
        return self.vt is not None

    @property
    def n_bo(self) -> int:
        return 0 if self.vt is None else -(-self.ub.shape[1] // self.block[0])

    @property
    def rb(self) -> int:
        return 0 if self.ub is None else self.ub.shape[0]

    @property
    def dt_col(self) -> int:
        """The first column of dt in jd and in the joint features [dh | dt]: Rl, rounded up to a multiple of Rb
        when both are kernel tiles (then max(Rl, Rb)), so that the GEMM kernel reads dt in place, in Rb-wide
        blocks, and no slice of the joint features is ever copied (`joint_features`)."""
        if not self.has_lowrank:
            return 0
        rl = self.lr_a.shape[1]                     # g Rl with a blocked low-rank, else Rl
        if self.has_blocks and is_tile(self.lr_b.shape[0]) and is_tile(self.rb):
            return -(-rl // self.rb) * self.rb
        return rl


    @property
    def joint_width(self) -> int:
        """Columns of the joint features [dh | dt]: dt_col + n_bo Rb with blocks, else Rl."""
        return self.dt_col + self.n_bo * self.rb if self.has_blocks else self.lr_a.shape[1]

    @property
    def joint_align(self) -> int:
        """The column alignment the GEMM kernel needs to read [dh | dt] in place: max(Rl, Rb) (powers of 2)."""
        return max(self.lr_b.shape[0] if self.has_lowrank else 1, self.rb if self.has_blocks else 1)


jax.tree_util.register_dataclass(BranchWeights, data_fields=["lr_a", "lr_b", "vt", "ub", "jd"],
                                 meta_fields=["block", "jd_input", "jd_col", "lr_block"])


@dataclasses.dataclass(frozen=True)
class SharedDown:
    """The input-space joint down-projections of layers that read one input, side by side (`share_down`):
    jd [K, W] in the branch dtype; member i's [dh | dt] are columns [jd_col_i, jd_col_i + W_i) of x jd (zero
    columns between members keep every jd_col_i aligned). levels / inv_levels: the members' VaTMP level tables
    stacked, float32 [n, T] (`prepared.share_inputs`, when every member has one of length T), in the order of
    `members`, their jd_col: the kernels that make all members' codes in one pass read them
    (`prologue_mosaic.py`)."""
    jd: Any
    levels: Any = None
    inv_levels: Any = None
    members: tuple = ()

    def member(self, jd_col: int) -> int:
        """The index in `levels` of the member whose features start at jd_col."""
        return self.members.index(jd_col)


jax.tree_util.register_dataclass(SharedDown, data_fields=["jd", "levels", "inv_levels"], meta_fields=["members"])


def can_share_down(bws) -> bool:
    """Whether these layers' (their `BranchWeights`) input-space down-projections can be one `SharedDown`: all
    have an input-space jd of one dtype and K, and tile sizes the GEMM kernel can offset by (powers of 2)."""
    if len(bws) < 2 or any(b is None or b.jd is None or not b.jd_input or b.jd_col is not None for b in bws):
        return False
    parts = [b.lr_a.shape[1] for b in bws if b.has_lowrank] + [b.rb for b in bws if b.has_blocks]
    if any(b.lr_block for b in bws):                  # a merged layer reads its own features (one per group)
        return False
    return (len({b.jd.dtype for b in bws}) == 1 and len({b.jd.shape[0] for b in bws}) == 1
            and all(is_tile(v) for v in parts))


def share_down(bws):
    """Input-space `BranchWeights` of layers reading one input (`can_share_down`) -> (SharedDown, the same
    BranchWeights with jd moved out: jd None, jd_col their first column in it). Member i starts at the first
    multiple of its `joint_align` after member i - 1 (zero columns between: exact)."""
    if not can_share_down(bws):
        raise ValueError("share_down needs >= 2 input-space joint down-projections of one dtype and K, "
                         "with power-of-2 ranks")
    parts, out, col = [], [], 0
    for b in bws:
        start = -(-col // b.joint_align) * b.joint_align
        if start > col:
            parts.append(jnp.zeros((b.jd.shape[0], start - col), b.jd.dtype))
        parts.append(b.jd)
        out.append(dataclasses.replace(b, jd=None, jd_col=start))
        col = start + b.jd.shape[1]
    return SharedDown(jnp.concatenate(parts, axis=1)), out


def down_features(x, jd):
    """x [M, K] @ a joint down-projection jd [K, W] (a layer's `BranchWeights.jd` or a `SharedDown.jd`) -> [M, W]
    in jd's dtype (float32 accumulation): the joint features [dh | dt] of every layer whose columns jd holds."""
    return jnp.dot(x.astype(jd.dtype), jd, preferred_element_type=jnp.float32).astype(jd.dtype)


def branch_weights(w: QuantizedWeight, pad: bool = True, joint: bool = False) -> Optional[BranchWeights]:
    """The node's branches in kernel layout (None without branches). int8-stored factors are dequantized
    to the branch dtype first (`QuantizedWeight.float_branches`), as every execution path does.
    pad=False leaves Rl = r, Bo = n_bo, Rb = n_bi (no zero padding: the XLA path, which needs no tiles).
    joint=True also builds `jd` (`joint_down`) when the branch factors share one dtype."""
    w = w.float_branches()
    if w.lr_a is None and w.block_u is None:
        return None
    size = next_pow2 if pad else (lambda v: v)
    kw = {}
    if w.lr_a is not None and w.lr_groups > 1:      # block-diagonal lr_b: each block's factors, read per block
        g, r = w.lr_groups, w.lr_a.shape[1]
        if r % g or w.n % g:
            raise ValueError(f"lr_groups={g} does not divide the rank {r} and N={w.n}")
        re, nb = r // g, w.n // g
        rl = size(re)
        lr_a = jnp.pad(w.lr_a.reshape(w.k, g, re), ((0, 0), (0, 0), (0, rl - re))).reshape(w.k, g * rl)
        lr_b = jnp.concatenate([w.lr_b[i * re:(i + 1) * re, i * nb:(i + 1) * nb] for i in range(g)], axis=1)
        kw.update(lr_a=lr_a, lr_b=jnp.pad(lr_b, ((0, rl - re), (0, 0))), lr_block=nb)
    elif w.lr_a is not None:
        r = w.lr_a.shape[1]
        rl = size(r)
        kw.update(lr_a=jnp.pad(w.lr_a, ((0, 0), (0, rl - r))), lr_b=jnp.pad(w.lr_b, ((0, rl - r), (0, 0))))
    if w.block_u is not None:
        nbo, nbi, bo = w.block_u.shape
        bo_pad, rb = size(nbo), size(nbi)
        vt = jnp.transpose(w.block_v, (1, 2, 0))                                         # [n_bi, b_in, n_bo]
        ub = jnp.transpose(w.block_u, (1, 0, 2)).reshape(nbi, nbo * bo)[:, : w.n]        # [n_bi, N]
        kw.update(vt=jnp.pad(vt, ((0, 0), (0, 0), (0, bo_pad - nbo))),
                  ub=jnp.pad(ub, ((0, rb - nbi), (0, 0))).astype(w.block_u.dtype), block=tuple(w.block))
    bw = BranchWeights(**kw)
    if joint:
        bw = dataclasses.replace(bw, jd=joint_down(bw, w.k))
    return bw


def joint_down(bw: BranchWeights, k: int):
    """[lr_a | V_d] [K, dt_col + n_bo Rb] in the branch dtype (module docstring; V_d starts at `dt_col`, zero
    columns between), or None when the low-rank and block factors differ in dtype. x' jd = [dh | dt] before the
    bf16 rounding (columns i Rb + j, j >= n_bi, are zero)."""
    parts = []
    if bw.has_lowrank:
        parts.append(jnp.pad(bw.lr_a, ((0, 0), (0, bw.dt_col - bw.lr_a.shape[1]))))
    if bw.has_blocks:
        nbi, bi, _ = bw.vt.shape
        nbo, rb = bw.n_bo, bw.rb
        vt = bw.vt[:, :, :nbo]                                               # [n_bi, b_in, n_bo]
        eye = jnp.eye(nbi, rb, dtype=vt.dtype)                               # [n_bi, Rb]: column j of input block j
        vd = vt[:, :, :, None] * eye[:, None, None, :]                       # [n_bi, b_in, n_bo, Rb] (exact: x 1 / 0)
        parts.append(vd.reshape(nbi * bi, nbo * rb)[:k])
    if not parts or len({p.dtype for p in parts}) > 1:
        return None
    return jnp.concatenate(parts, axis=1)


def input_space_down(bw: BranchWeights, w: QuantizedWeight) -> BranchWeights:
    """bw (with its joint `jd`) -> the same with jd_in = T jd [K, Rl + n_bo Rb] (module docstring), T = diag(signs
    / smooth) H_b the node's input transform (x' = x T, `reference.transform_input`); computed in float32 and
    rounded once to the branch dtype. Nodes without a transform keep jd (x' = x)."""
    if bw is None or bw.jd is None:
        raise ValueError("input-space down-projection needs the joint down-projection (branch_weights(joint=True))")
    if w.smooth is None and not w.signs and not w.rotate:
        return bw
    from qdit4sr_jax.quant.transforms import hadamard_transform
    t = bw.jd.astype(jnp.float32).T                                  # [R, K]; H_b symmetric: H jd = (jd^T H)^T
    if w.rotate:
        t = hadamard_transform(t, w.rotate)
    scale = jnp.ones((w.k,), jnp.float32)
    if w.signs:
        scale = scale * w.sign_vector()
    if w.smooth is not None:
        scale = scale / w.smooth.astype(jnp.float32)
    return dataclasses.replace(bw, jd=(t.T * scale[:, None]).astype(bw.jd.dtype), jd_input=True)


def node_factors(bw: Optional[BranchWeights], n: int) -> dict:
    """The float branch factors {lr_a, lr_b, block_u, block_v} of a `QuantizedWeight` that `bw` was made
    from, rebuilt from bw (None when absent): rank and block padding stay, as zeros, so the branch is the
    same function exactly (zero terms add nothing). Lets a prepared weight hold its factors once."""
    out = dict(lr_a=None, lr_b=None, block_u=None, block_v=None)
    if bw is None:
        return out
    if bw.has_lowrank and bw.lr_block:              # the node's block-diagonal lr_b [g Rl, N] (lr_groups = g)
        lb = bw.lr_block
        out.update(lr_a=bw.lr_a, lr_b=jax.scipy.linalg.block_diag(
            *[bw.lr_b[:, i * lb:(i + 1) * lb] for i in range(bw.lr_b.shape[1] // lb)]).astype(bw.lr_b.dtype))
    elif bw.has_lowrank:
        out.update(lr_a=bw.lr_a, lr_b=bw.lr_b)
    if bw.has_blocks:
        nbi, _, _ = bw.vt.shape
        nbo, bo = bw.n_bo, bw.block[0]
        ub = jnp.pad(bw.ub[:nbi], ((0, 0), (0, nbo * bo - n))).reshape(nbi, nbo, bo)
        out.update(block_u=jnp.transpose(ub, (1, 0, 2)), block_v=jnp.transpose(bw.vt[:, :, :nbo], (2, 0, 1)))
    return out


def joint_features(xt, bw: BranchWeights, x_in=None):
    """[dh | dt] [M, dt_col + n_bo Rb] (branch dtype) from one GEMM with the joint down-projection `bw.jd`:
    x' jd, or x_in jd for an input-space jd (`bw.jd_input`; x_in [M, K] the layer's input before its transform).
    dh is columns [0, Rl), dt columns [dt_col, end) (`BranchWeights.dt_col`)."""
    src = xt
    if bw.jd_input:
        if x_in is None:
            raise ValueError("an input-space down-projection (jd_input) needs the layer's input x_in")
        src = x_in
    return down_features(src, bw.jd)


def branch_features(xt, bw: Optional[BranchWeights], x_in=None):
    """x' [M, K] (float32) -> (dh [M, Rl] | None, dt [M, n_bo Rb] | None) in the branch dtype (XLA ops).
    x_in [M, K]: the layer's input before its transform, which an input-space jd (`bw.jd_input`) reads."""
    if bw is None:
        return None, None
    m, k = xt.shape
    dh = dt = None
    if bw.jd is not None:                      # one GEMM for both (`joint_down`)
        d = joint_features(xt, bw, x_in)
        rl = bw.lr_a.shape[1] if bw.has_lowrank else 0
        return (d[:, :rl] if bw.has_lowrank else None), (d[:, bw.dt_col:] if bw.has_blocks else None)
    if bw.has_lowrank:
        dtype = bw.lr_a.dtype
        dh = jnp.dot(xt.astype(dtype), bw.lr_a, preferred_element_type=jnp.float32).astype(dtype)
    if bw.has_blocks:
        nbi, bi, _ = bw.vt.shape
        nbo, rb, dtype = bw.n_bo, bw.rb, bw.vt.dtype
        xp = xt if nbi * bi == k else jnp.pad(xt, ((0, 0), (0, nbi * bi - k)))
        xb, vt = widen_on_cpu(xp.reshape(m, nbi, bi).astype(dtype), bw.vt[:, :, :nbo])
        t = jnp.einsum("mjb,jbi->mij", xb, vt, preferred_element_type=jnp.float32).astype(dtype)  # [M, n_bo, n_bi]
        dt = jnp.pad(t, ((0, 0), (0, 0), (0, rb - nbi))).reshape(m, nbo * rb)
    return dh, dt


def branch_epilogue(y, dh, dt, bw: BranchWeights):
    """y [M, N] float32 + the branches of (dh, dt) -> [M, N] float32 (XLA ops)."""
    m, n = y.shape
    if dh is not None and bw.lr_block:  # block i(n) = n // lr_block reads its Rl features
        rl, lb = bw.lr_b.shape[0], bw.lr_block
        g = bw.lr_b.shape[1] // lb
        d, u = widen_on_cpu(dh[:, : g * rl].reshape(m, g, rl), bw.lr_b.reshape(rl, g, lb))
        y = y + jnp.einsum("mgr,rgn->mgn", d, u, preferred_element_type=jnp.float32).reshape(m, g * lb)[:, :n]
    elif dh is not None:                # (a plain 2-D dot: XLA:CPU has bf16 x bf16 -> f32 for it)
        y = y + jnp.dot(dh, bw.lr_b, preferred_element_type=jnp.float32)
    if dt is not None:
        bo = bw.block[0]
        nbo, rb = bw.n_bo, bw.rb
        ub = jnp.pad(bw.ub, ((0, 0), (0, nbo * bo - n))).reshape(rb, nbo, bo)
        d, u = widen_on_cpu(dt[:, : nbo * rb].reshape(m, nbo, rb), ub)     # (a kernel's dt may have more rows)
        yb = jnp.einsum("mir,rio->mio", d, u, preferred_element_type=jnp.float32)
        y = y + yb.reshape(m, nbo * bo)[:, :n]
    return y


__all__ = ["BranchWeights", "SharedDown", "can_share_down", "share_down", "down_features", "branch_weights",
           "joint_down", "input_space_down", "branch_features", "joint_features", "branch_epilogue", "node_factors",
           "next_pow2", "is_tile", "widen_on_cpu", "lowering_for", "target_platform"]
