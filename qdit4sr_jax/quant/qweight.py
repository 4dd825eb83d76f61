"""`QuantizedWeight`: the pytree node that replaces a linear layer's `kernel` in the params tree.

The node sits exactly where the float kernel [K, N] (= [d_in, d_out], Flax layout) was, so tree paths
do not change; `qdit4sr_jax.quant.linear.linear` dispatches on it. Arrays are pytree children, every
configuration value is static aux data (hashable), so the node passes through `jax.jit` and a change of
bits/layout recompiles while new array values do not.

Semantics. With x [M, K] the layer input, the layer computes
    x' = hadamard_b(signs * (x / smooth))             (each step only if present; b = `rotate`; signs =
                                                       `transforms.rotation_signs(K)` when `signs`)
    y  = Q_a(x') @ W_q^T + (x' @ lr_a) @ lr_b + blockwise(x') + bias
where W_q = dequantized codes [N, K], Q_a the per-token activation fake-quantizer (identity when
activations stay in float), and every factor acts in the transformed input space x'.

Array children (None when absent):
  qvalue:  integer codes of the (residual) weight, in `layout`:
           "nk"  [N, K]      per-output-channel scales (one group spanning K);
           "gnk" [G, N, g]   group-wise scales, group-major so that the int8 GEMM contracts the last axis
                             of both operands with the group as a leading batch axis (no transpose).
           int8, or, when `packed` (every w_bits < 8; `packs`), stored at w_bits bits per code along the
           last axis as `quantizer.pack_codes` (uint8 [..., packed_length(L, w_bits)], L = K or g):
           4 bits: `pack_int4` (two per byte, low nibble = even index; `nibbles`); 5..7 bits: per run of
           8 codes 4 nibble bytes + (w_bits - 4) bit-plane bytes; 2..3 bits: w_bits bit-plane bytes.
           `codes()` unpacks to the same int8 codes whatever the width.
  scale:   float32 [N, G]            (G = 1 for "nk")
  gscale:  uint8 [N, ceil(G/2)]      two-level ("int") group scales, layout "nk" only: the integer group
           factors c[n, G] in 1..c_max (c_max = `quantizer.int_scale_max(w_bits)`, 16 at <= 4 bits) stored
           4-bit packed as `quantizer.pack_group_factors` (pack_int4 of c - 9). Then W_q[n, k] =
           scale[n, 0] * c[n, k // group_size] * q[n, k]; `codes()` returns the folded int8 codes c * q
           (|c q| <= 127), so every per-channel ("nk") int8 path runs such a node unchanged.
  zero:    int8 [N, G]               asymmetric weights only (codes, see quantizer.py)
  smooth:  float32 [K]               SmoothQuant-style per-input-channel divisor of the activation
  lr_a, lr_b: [K, r], [r, N]         16-bit global low-rank branch (SVDQuant / H-SVD global part)
  block_u, block_v: [n_bo, n_bi, b_out], [n_bo, n_bi, b_in]   16-bit block-wise rank-1 branch (H-SVD):
           block (i, j) of the branch weight [N, K] (rows i*b_out.., cols j*b_in..) is u_ij v_ij^T; ragged
           edge blocks are zero-padded past N / K.
  a_schedule: int32 [T]              activation bits per sampling step (VaTMP), indexed by `step`.
  lr_a_scale, lr_b_scale, block_u_scale, block_v_scale: int8 branch factors (`make_qweight(lowrank_bits=8)`):
           the factor is stored as int8 codes of its shape and this scale, in the branch dtype, holds one
           value per vector of the factor along `FACTOR_AXIS` (the factor's shape with that axis kept as 1):
           lr_a [K, 1] (per input channel), lr_b [1, N] (per output channel), block_u / block_v
           [n_bo, n_bi, 1] (per block vector). Every path uses the factor `factor(name)` =
           codes.astype(scale.dtype) * scale (`dequantize_factor`), so all execution modes see the same
           branch. None when the factors are stored in float (`branch_bits` None).

Static fields: shape (K, N) of the original kernel, dtype of the original kernel, w_bits, group_size
(None = per channel; with `gscale` the group length of the integer factors while layout is "nk"), layout, packed, w_symmetric, a_bits (int, or None = float activations; the bits
used when no `step` / `act_bits` is given), a_symmetric, rotate (Hadamard block size, 0 = none),
block ((b_out, b_in) or None), execution ("fake" | "int" | "fused"), signs (QuaRot's random signs before the
Hadamard: `transforms.rotation_signs(K)`, a constant of K rebuilt at trace time, so the multiply is exact in any
float dtype and a bf16 x stays bf16 on its way into the rotation; nodes made before 2026-12-06 carry the signs
folded into `smooth` instead, and run unchanged), lr_groups (1, or g > 1: lr_b is block diagonal, g blocks of
[r / g, N / g] on its diagonal and zeros elsewhere, as `kernels.merged.merge_nodes` makes it for layers that read
one input merged into one; the kernels then read each block's r / g features for its N / g columns instead of all
r for every column: `kernels.branch_ops.branch_weights`; every reference path reads the dense lr_b).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from qdit4sr_jax.quant import quantizer as qz

LAYOUTS = ("nk", "gnk")
EXECUTIONS = ("fake", "int", "fused")   # "fused": quant/kernels (same semantics as "int")
ARRAY_FIELDS = ("qvalue", "scale", "zero", "smooth", "lr_a", "lr_b", "block_u", "block_v", "a_schedule", "gscale",
                "lr_a_scale", "lr_b_scale", "block_u_scale", "block_v_scale")
BRANCH_FACTORS = ("lr_a", "lr_b", "block_u", "block_v")
# axis of each branch factor along which one scale is shared: lr_a [K, r] per input channel (row k, over the
# rank), lr_b [r, N] per output channel (column n), block_u [n_bo, n_bi, b_out] / block_v [n_bo, n_bi, b_in]
# per block vector. Smoothing makes the input channels of W' (rows of lr_a) differ in range; on the demo
# model's H-SVD factors this cuts the branch error of one scale per rank component by 40% (rel. 0.0078 vs
# 0.0131) for (K + N) bf16 scales per layer (~0.005 GB on the full DiT4SR). The scales also fold into the
# activations / outputs (x diag(s_a) q_a, (h q_b) diag(s_b)), should a kernel keep the factors in int8.
FACTOR_AXIS = {"lr_a": 1, "lr_b": 0, "block_u": 2, "block_v": 2}
LOWRANK_BITS = (8,)                 # make_qweight(lowrank_bits=...): None (float factors) or one of these
GROUP_SCALES = ("float", "int")     # make_qweight(group_scale=...): float32 [N, G] scales, or s[n] * int c[n, G]
STATIC_FIELDS = ("shape", "dtype", "w_bits", "group_size", "layout", "packed", "w_symmetric",
                 "a_bits", "a_symmetric", "rotate", "block", "execution", "signs", "lr_groups")
# static fields added after version 3: value when a stored node lacks them
OPTIONAL_STATIC = {"signs": False, "lr_groups": 1}


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    qvalue: Any
    scale: Any
    zero: Any = None
    smooth: Any = None
    lr_a: Any = None
    lr_b: Any = None
    block_u: Any = None
    block_v: Any = None
    a_schedule: Any = None
    gscale: Any = None
    lr_a_scale: Any = None
    lr_b_scale: Any = None
    block_u_scale: Any = None
    block_v_scale: Any = None
    # static
    shape: Tuple[int, int] = (0, 0)
    dtype: str = "float32"
    w_bits: int = 8
    group_size: Optional[int] = None
    layout: str = "nk"
    packed: bool = False
    w_symmetric: bool = True
    a_bits: Optional[int] = None
    a_symmetric: bool = True
    rotate: int = 0
    block: Optional[Tuple[int, int]] = None
    execution: str = "fake"
    signs: bool = False
    lr_groups: int = 1

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self.shape[0]

    @property
    def n(self) -> int:
        return self.shape[1]

    @property
    def groups(self) -> Tuple[int, int]:
        """(G, g) as in `quantizer.num_groups`."""
        return qz.num_groups(self.k, self.group_size)

    @property
    def nibbles(self) -> bool:
        """Whether `qvalue` is `quantizer.pack_int4` nibbles (packed 4-bit codes), the layout the fused
        kernel can split itself (`kernels.fused.unpacks_in_kernel`)."""
        return bool(self.packed and self.w_bits == 4)

    def codes(self):
        """Unpacked int8 codes in `layout` ([N, K] or [G, N, g]); with `gscale`, the folded codes c * q [N, K]."""
        q = self.qvalue
        if self.packed:
            last = self.k if self.layout == "nk" else self.groups[1]
            q = qz.unpack_codes(q, self.w_bits, last)
        if self.gscale is None:
            return q
        G, g = self.groups
        qg = q if G * g == self.k else jnp.pad(q, ((0, 0), (0, G * g - self.k)))
        folded = qz.fold_int_scales(qg.reshape(self.n, G, g), self.group_factors())
        return folded.reshape(self.n, G * g)[:, : self.k]

    def unpacked(self) -> "QuantizedWeight":
        """This node with int8 codes (`codes`: packed=False) and, for two-level scales, the integer group factors
        folded into them (gscale None, per-channel "nk"); `self` when already so. The same function."""
        if not self.packed and self.gscale is None:
            return self
        folded = self.gscale is not None                    # folded codes c * q are per-channel int8 codes
        return dataclasses.replace(self, qvalue=self.codes(), packed=False, gscale=None,
                                   group_size=None if folded else self.group_size)

    def group_factors(self):
        """Integer group factors c int8 [N, G] of two-level scales (None for float group scales)."""
        if self.gscale is None:
            return None
        return qz.unpack_group_factors(self.gscale, self.groups[0])

    def codes_nk(self):
        """int8 codes as [N, G, g] (zero-padded groups)."""
        q = self.codes()
        if self.layout == "nk":
            return q[:, None, :]
        return jnp.transpose(q, (1, 0, 2))

    def dequantize_residual(self):
        """Dequantized quantized part W_q [N, K] float32 (in the transformed input space); with two-level
        scales scale[n] * (c q)[n, k], the folded codes times the per-channel scale."""
        return qz.dequantize_weight(self.codes_nk(), self.scale, self.zero, self.k)

    @property
    def branch_bits(self) -> Optional[int]:
        """Bits of the stored branch factors' codes (8), or None when they are stored in float."""
        return 8 if any(getattr(self, f + "_scale") is not None for f in BRANCH_FACTORS) else None

    def factor(self, name: str):
        """Branch factor `name` ("lr_a", "lr_b", "block_u", "block_v") as used by every execution path:
        the stored float array, or int8 codes dequantized to the scale's dtype (`dequantize_factor`); None
        when absent."""
        a, s = getattr(self, name), getattr(self, name + "_scale")
        return a if a is None or s is None else dequantize_factor(a, s)

    def float_branches(self) -> "QuantizedWeight":
        """This node with its branch factors in float (`factor`) and no factor scales; `self` when the
        factors are already float. The consumers (linear.branches, kernels.branch_ops.branch_weights) call it,
        so the int8 -> float conversion sits next to (and fuses into) the branch matmuls."""
        if self.branch_bits is None:
            return self
        return dataclasses.replace(self, **{f: self.factor(f) for f in BRANCH_FACTORS},
                                   **{f + "_scale": None for f in BRANCH_FACTORS})

    def branch_weight(self):
        """Dense [N, K] float32 of the 16-bit (or int8-stored) branches (zeros when there are none)."""
        return branches_dense(self.factor("lr_a"), self.factor("lr_b"), self.factor("block_u"),
                              self.factor("block_v"), self.block, self.n, self.k)

    def dequantize(self):
        """Effective float kernel [K, N] in the original input space (weights only, no activation
        quantization): x @ dequantize() == linear(x, node) with a_bits=None, up to float rounding."""
        from qdit4sr_jax.quant.transforms import hadamard_transform
        w = self.dequantize_residual() + self.branch_weight()        # [N, K], acts on x'
        if self.rotate:
            w = hadamard_transform(w, self.rotate)                   # (x H) W^T = x (W H)^T, H symmetric
        if self.signs:
            w = w * self.sign_vector()[None, :]
        if self.smooth is not None:
            w = w / self.smooth[None, :]
        return w.T

    def nbytes(self) -> int:
        """Bytes held by the node's arrays."""
        return int(sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape))
                       for a in (getattr(self, f) for f in ARRAY_FIELDS) if a is not None))

    def sign_vector(self):
        """The +-1 float32 [K] of `signs` (a trace-time constant), or None."""
        if not self.signs:
            return None
        from qdit4sr_jax.quant.transforms import rotation_signs
        return jnp.asarray(rotation_signs(self.k))

    def static_dict(self) -> dict:
        d = {f: getattr(self, f) for f in STATIC_FIELDS}
        d["shape"] = list(d["shape"])
        d["block"] = None if d["block"] is None else list(d["block"])
        return d

    def replace(self, **kw) -> "QuantizedWeight":
        return dataclasses.replace(self, **kw)


jax.tree_util.register_dataclass(QuantizedWeight, data_fields=list(ARRAY_FIELDS),
                                 meta_fields=list(STATIC_FIELDS))


def branches_dense(lr_a, lr_b, block_u, block_v, block, n: int, k: int):
    """Dense [N, K] float32 of float branch factors (lr_a [K, r], lr_b [r, N]; block_u [n_bo, n_bi, b_out],
    block_v [n_bo, n_bi, b_in] with block = (b_out, b_in)); absent factors (None) contribute zeros."""
    w = jnp.zeros((n, k), jnp.float32)
    if lr_a is not None:
        w = w + (lr_a.astype(jnp.float32) @ lr_b.astype(jnp.float32)).T
    if block_u is not None:
        bo, bi = block
        nbo, nbi = block_u.shape[:2]
        blk = jnp.einsum("ijo,ijb->iojb", block_u.astype(jnp.float32), block_v.astype(jnp.float32))
        w = w + blk.reshape(nbo * bo, nbi * bi)[:n, :k]
    return w


def quantize_factor(f, axis: int, bits: int = 8, dtype="bfloat16"):
    """Symmetric absmax quantization of a branch factor f [...] (float) with one scale per vector along
    `axis`. Returns (codes int8, f's shape, in [-(2^(bits-1) - 1), 2^(bits-1) - 1]; scale `dtype`, f's
    shape with `axis` of size 1). The scale is rounded to `dtype` before the codes are chosen, so
    `dequantize_factor(codes, scale)` is the factor every path uses (all-zero vectors get scale 1)."""
    if bits not in LOWRANK_BITS:
        raise ValueError(f"branch factor bits must be one of {LOWRANK_BITS}, got {bits!r}")
    f32 = jnp.asarray(f).astype(jnp.float32)
    qmax = 2 ** (bits - 1) - 1
    amax = jnp.max(jnp.abs(f32), axis=axis, keepdims=True)
    s = (amax / qmax).astype(jnp.dtype(dtype))
    s = jnp.where(s > 0, s, jnp.ones_like(s))
    q = jnp.clip(jnp.round(f32 / s.astype(jnp.float32)), -qmax, qmax).astype(jnp.int8)
    return q, s


def dequantize_factor(q, s):
    """int8 codes q [...] times their scale s (broadcast; s.dtype, the branch dtype) -> float in s.dtype:
    the float32 product (exact: 8-bit code times a <= 24-bit scale) rounded once to s.dtype. The rounding
    is an explicit `lax.reduce_precision`, so XLA cannot skip it when it widens the branch operand to
    float32 (excess precision, e.g. the block einsums on CPU): every program sees the same factor."""
    y = q.astype(jnp.float32) * s.astype(jnp.float32)
    fi = jnp.finfo(s.dtype)
    if fi.bits < 32:
        y = jax.lax.reduce_precision(y, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)
    return y.astype(s.dtype)


def is_qweight(x) -> bool:
    return isinstance(x, QuantizedWeight)


def packs(w_bits: int, pack: bool = True) -> bool:
    """Whether a node at `w_bits` stores its codes packed (`QuantizedWeight.packed`) when packing is
    asked for: every width below 8 (8-bit codes stay int8)."""
    return bool(pack and int(w_bits) < 8)


def make_qweight(w_nk, *, w_bits: int, group_size: Optional[int] = None, w_symmetric: bool = True,
                 a_bits: Optional[int] = None, a_symmetric: bool = True, clip_ratio: float = 1.0,
                 clip_search: bool = False, pack: bool = True, execution: str = "fake",
                 dtype: str = "float32", smooth=None, lr_a=None, lr_b=None, block_u=None, block_v=None,
                 block: Optional[Tuple[int, int]] = None, rotate: int = 0, a_schedule=None,
                 branch_dtype: str = "bfloat16", group_scale: str = "float",
                 lowrank_bits: Optional[int] = None, signs: bool = False) -> QuantizedWeight:
    """Quantize the (already transformed: smoothed / rotated / residual) weight W [N, K] into a node.

    w_nk: float [N, K] = (out, in), the part that goes to integers; every extra is given in the same
    transformed input space (see module docstring). Branch factors are cast to `branch_dtype`.
    group_scale: "float" (float32 [N, G] group scales, layout "gnk") or "int" (two-level scales, layout
    "nk" + `gscale`: `quantizer.quantize_weight_int_scales`; symmetric weights only). "int" falls back to
    plain per-channel scales where the factors cannot help: one group (group_size None or >= K), or
    c_max = 1 (8-bit weights).
    signs: the input is multiplied by `transforms.rotation_signs(K)` before the rotation (needs rotate > 0;
    w_nk already carries them: W' = H(diag(signs) W)).
    lowrank_bits: None keeps the branch factors in `branch_dtype`; 8 stores each factor as int8 codes with
    one `branch_dtype` scale per vector (`quantize_factor`, `FACTOR_AXIS`) and quantizes the residual
    W' - branch_q instead of the given w_nk = W' - branch: w_nk + branch - branch_q (float32), so
    dequantize() = residual_q + branch_q stays a quantization of W' with the branch rounding absorbed.
    Returns a QuantizedWeight whose `shape` is the Flax kernel shape (K, N). Traceable (jit-safe).
    """
    w_bits = qz.check_bits(w_bits, "weight bits")
    if a_bits is not None:
        a_bits = qz.check_bits(a_bits, "activation bits")
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    if group_scale not in GROUP_SCALES:
        raise ValueError(f"group_scale must be one of {GROUP_SCALES}, got {group_scale!r}")
    n, k = w_nk.shape
    bdt = jnp.dtype(branch_dtype)
    cast = lambda a: None if a is None else jnp.asarray(a).astype(bdt)
    if (lr_a is None) != (lr_b is None):
        raise ValueError("low-rank branch needs both lr_a [K, r] and lr_b [r, N]")
    if lr_a is not None and (lr_a.shape[0] != k or lr_b.shape[1] != n or lr_a.shape[1] != lr_b.shape[0]):
        raise ValueError(f"low-rank factors {lr_a.shape} / {lr_b.shape} do not fit a [{k}, {n}] kernel")
    if (block_u is None) != (block_v is None) or ((block_u is not None) and block is None):
        raise ValueError("block branch needs block_u, block_v and block=(b_out, b_in)")
    if block_u is not None:
        bo, bi = block
        nbo, nbi = -(-n // bo), -(-k // bi)
        if block_u.shape != (nbo, nbi, bo) or block_v.shape != (nbo, nbi, bi):
            raise ValueError(f"block factors {block_u.shape} / {block_v.shape} do not match blocks {block} "
                             f"of a [{n}, {k}] weight: expected {(nbo, nbi, bo)} / {(nbo, nbi, bi)}")
        block = (int(bo), int(bi))
    scales = {}
    if lowrank_bits is not None:
        if lowrank_bits not in LOWRANK_BITS:
            raise ValueError(f"lowrank_bits={lowrank_bits!r} is unsupported: None keeps the branch factors in "
                             f"{branch_dtype}, {' / '.join(map(str, LOWRANK_BITS))} stores them as int8 codes "
                             f"with per-vector scales")
        fl = dict(lr_a=cast(lr_a), lr_b=cast(lr_b), block_u=cast(block_u), block_v=cast(block_v))
        if any(v is not None for v in fl.values()):
            before = branches_dense(*fl.values(), block, n, k)
            for f, v in fl.items():
                if v is not None:
                    fl[f], scales[f + "_scale"] = quantize_factor(v, FACTOR_AXIS[f], lowrank_bits, bdt)
            after = branches_dense(*(fl[f] if fl[f] is None else dequantize_factor(fl[f], scales[f + "_scale"])
                                     for f in BRANCH_FACTORS), block, n, k)
            w_nk = jnp.asarray(w_nk).astype(jnp.float32) + (before - after)
            lr_a, lr_b, block_u, block_v = (fl[f] for f in BRANCH_FACTORS)
            cast = lambda a: a
    G, g = qz.num_groups(k, group_size)
    gscale = None
    if group_scale == "int" and not w_symmetric:
        raise ValueError("two-level integer group scales (group_scale='int') need symmetric weights "
                         "(w_symmetric=True): a per-group zero point cannot be folded into the int8 codes")
    if group_scale == "int" and (G == 1 or qz.int_scale_max(w_bits) == 1):
        group_size, G = None, 1                                     # nothing to gain: per channel
    if group_scale == "int" and G > 1:
        q, s, c = qz.quantize_weight_int_scales(w_nk, w_bits, group_size, clip_ratio, clip_search)
        q, s, z = q.reshape(n, G * g)[:, None, :k], s[:, None], None
        gscale = qz.pack_group_factors(c)
    else:
        q, s, z = qz.quantize_weight(w_nk, w_bits, group_size, w_symmetric, clip_ratio, clip_search)
    if G == 1 or gscale is not None:
        layout, q = "nk", q[:, 0, :]
        group_size = group_size if gscale is not None else None
    else:
        layout, q = "gnk", jnp.transpose(q, (1, 0, 2))
    packed = packs(w_bits, pack)
    if packed:
        q = qz.pack_codes(q, w_bits)
    if smooth is not None:
        smooth = jnp.asarray(smooth, jnp.float32)
        if smooth.shape != (k,):
            raise ValueError(f"smoothing scale must be [{k}], got {smooth.shape}")
    if signs and not rotate:
        raise ValueError("signs=True (QuaRot's randomised Hadamard) needs a rotation (rotate > 0)")
    if a_schedule is not None:
        if a_bits is None:
            raise ValueError("an activation-bit schedule needs a default a_bits (used when no step is given)")
        a_schedule = jnp.asarray(a_schedule, jnp.int32)
    return QuantizedWeight(
        qvalue=q, scale=s, zero=z, gscale=gscale, smooth=smooth, lr_a=cast(lr_a), lr_b=cast(lr_b),
        block_u=cast(block_u), block_v=cast(block_v), a_schedule=a_schedule, **scales,
        shape=(int(k), int(n)), dtype=str(jnp.dtype(dtype)), w_bits=w_bits, group_size=group_size,
        layout=layout, packed=packed, w_symmetric=bool(w_symmetric), a_bits=a_bits,
        a_symmetric=bool(a_symmetric), rotate=int(rotate), block=block, execution=execution,
        signs=bool(signs))
