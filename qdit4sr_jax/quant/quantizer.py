"""Uniform quantizers (2..8 bits), weight/activation granularities, and 4-bit / b-bit packing.

Conventions (shared by every quantizer here, the quantized-weight node and `linear`):
- Integer codes are stored *signed* in an int8 container, whatever the scheme:
  symmetric  (narrow range):  q in [-(2^(b-1)-1), 2^(b-1)-1],   x ~ q * s,        s = max|x| / (2^(b-1)-1)
  asymmetric (signed offset): q in [-2^(b-1), 2^(b-1)-1],        x ~ (q - z) * s,  s = (hi - lo) / (2^b - 1),
      lo = min(min x, 0), hi = max(max x, 0), z = round(-lo / s) - 2^(b-1)  (z an integer code, same range as q).
  The asymmetric form is the usual unsigned [0, 2^b-1] scheme shifted by 2^(b-1) so that 8-bit codes fit int8.
- Rounding is round-half-to-even (`jnp.round`), then clipping to the code range ("RTN with clipping").
  `clip_ratio` < 1 shrinks the range before the scale is computed (values beyond it saturate).
- A range of zero (all-zero group / token) gets scale 1 and codes 0, so dequantization gives back zeros.
- Weights W are [N, K] = (out, in) (the transpose of a Flax kernel). Granularities:
  per output channel (group_size=None: one scale per row), per group of `group_size` consecutive input
  channels (a last, shorter group when group_size does not divide K: the row is zero-padded to a whole
  number of groups before the statistics are taken, which changes nothing since 0 is always inside the
  range), per tensor (`quantize_tensor`), per token for activations (`quantize_per_token`, dynamic).
- `bits` may be a Python int (checked: 2..8) or, for activations, a traced integer scalar (not checked
  inside jit; the caller's schedule must hold values in 2..8).

Packing (`pack_int4` / `unpack_int4`) of codes with <= 4 bits, two per byte along the last axis:
byte j holds element 2j in its low nibble and element 2j+1 in its high nibble, each as a 4-bit
two's-complement value (code & 0xF). An odd last axis is padded with one zero code.

b-bit packing (`pack_codes` / `unpack_codes`, b = 2..8), the storage of `QuantizedWeight` codes: a code
is its b-bit two's-complement pattern u = q & (2^b - 1) (codes must lie in [-2^(b-1), 2^(b-1) - 1]).
  b = 8: int8, unchanged.   b = 4: exactly `pack_int4` ([..., ceil(L/2)] uint8).
  b in {2, 3, 5, 6, 7}: the last axis is zero-padded to a multiple of 8 and every run of 8 codes
  (elements 8i .. 8i+7) becomes b bytes (bytes b*i .. b*i + b - 1 of [..., ceil(L/8) * b] uint8); the
  byte at offset j in the run holds bit j of the codes:
    b > 4: offsets 0..3 are the `pack_int4` bytes of the run's low nibbles (offset j: element 8i+2j in
           the low nibble, 8i+2j+1 in the high one), offsets 4..b-1 are bit-planes: bit t of the byte
           = bit j of u[8i + t];
    b < 4: offsets 0..b-1 are bit-planes (bit t = bit j of u[8i + t]).
  So b bits per code (plus padding of the last run), 8 codes in b consecutive bytes (shardable along the
  axis in whole runs), and the codes come back with shifts / masks / ors that XLA fuses into one pass.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits, what: str = "bits") -> int:
    """Validate a static bit-width; returns it as int. Raises ValueError outside 2..8."""
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer, float, np.floating)):
        raise ValueError(f"{what} must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if float(bits) != int(bits) or not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"unsupported {what}={bits!r}: supported bit-widths are integers "
                         f"{MIN_BITS}..{MAX_BITS} (use None to keep a tensor in float)")
    return int(bits)


def _is_static(bits) -> bool:
    return isinstance(bits, (int, np.integer, float, np.floating)) and not isinstance(bits, bool)


def code_range(bits, symmetric: bool):
    """(qmin, qmax) of the signed codes, as Python ints (static bits) or float32 scalars (traced bits)."""
    if _is_static(bits):
        b = check_bits(bits)
        half = 2 ** (b - 1)
        return (-(half - 1), half - 1) if symmetric else (-half, half - 1)
    # 2^(bits-1) by an integer shift (exact, as exp2 was), not a transcendental: the exp2 chain was a scalar
    # kernel per layer and call (496 in a 512-px W4A4 step on the H100, benchmarks/RESULTS.md 2026-12-06 19:53).
    # XLA still makes 1 / levels a scalar kernel per layer; prepared weights look both up from per-step tables
    # (`kernels.prepared.KernelWeight.levels` / `inv_levels`)
    half = jnp.left_shift(jnp.int32(1), jnp.asarray(bits, jnp.int32) - 1).astype(jnp.float32)
    return ((-(half - 1.0), half - 1.0) if symmetric else (-half, half - 1.0))


def _levels(bits, symmetric: bool):
    """Number of quantization steps spanned by the range: 2^(b-1)-1 (symmetric, half range) or 2^b-1."""
    qmin, qmax = code_range(bits, symmetric)
    return qmax if symmetric else qmax - qmin


def scale_zero(x, bits, symmetric: bool, axis, clip_ratio=1.0):
    """Scale (and zero code) of x reduced over `axis` (kept as size-1 dims). float32.

    Returns (scale, zero); zero is None for symmetric, else a float32 array of integer codes.
    """
    x = x.astype(jnp.float32)
    lev = _levels(bits, symmetric)
    if symmetric:
        amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True) * clip_ratio
        s = amax / lev
        return jnp.where(s > 0, s, 1.0), None
    lo = jnp.minimum(jnp.min(x, axis=axis, keepdims=True), 0.0) * clip_ratio
    hi = jnp.maximum(jnp.max(x, axis=axis, keepdims=True), 0.0) * clip_ratio
    s = (hi - lo) / lev
    s = jnp.where(s > 0, s, 1.0)
    qmin, _ = code_range(bits, symmetric)
    z = jnp.round(-lo / s) + qmin
    return s, z


def quantize_codes(x, scale, zero, bits, symmetric: bool):
    """Integer codes (float32 holding integers) of x given its scale/zero: clip(round(x/s) + z)."""
    qmin, qmax = code_range(bits, symmetric)
    q = jnp.round(x.astype(jnp.float32) / scale)
    if zero is not None:
        q = q + zero
    return jnp.clip(q, qmin, qmax)


def dequantize(q, scale, zero=None):
    """(q - z) * s in float32."""
    q = q.astype(jnp.float32)
    if zero is not None:
        q = q - zero.astype(jnp.float32)
    return q * scale


def fake_quant(x, bits, symmetric: bool = True, axis=-1, clip_ratio=1.0):
    """Quantize-dequantize x with statistics reduced over `axis` (e.g. -1: per token). float32."""
    s, z = scale_zero(x, bits, symmetric, axis, clip_ratio)
    return dequantize(quantize_codes(x, s, z, bits, symmetric), s, z)


def quantize_per_token(x, bits, symmetric: bool = True, clip_ratio=1.0):
    """Dynamic per-token quantization of activations x [..., K].

    Returns (q int8 [..., K], scale f32 [..., 1], zero int32 [..., 1] or None). `bits` may be traced.
    """
    s, z = scale_zero(x, bits, symmetric, -1, clip_ratio)
    q = quantize_codes(x, s, z, bits, symmetric).astype(jnp.int8)
    return q, s, (None if z is None else z.astype(jnp.int32))


def quantize_tensor(x, bits, symmetric: bool = True, clip_ratio=1.0):
    """Static per-tensor quantization: (q int8 like x, scale f32 [], zero int8 [] or None)."""
    bits = check_bits(bits)
    axes = tuple(range(x.ndim))
    s, z = scale_zero(x, bits, symmetric, axes, clip_ratio)
    q = quantize_codes(x, s, z, bits, symmetric).astype(jnp.int8)
    return q, s.reshape(()), (None if z is None else z.reshape(()).astype(jnp.int8))


def num_groups(k: int, group_size: Optional[int]) -> Tuple[int, int]:
    """(G, g): number of groups and group length along K (per-channel: (1, K))."""
    if group_size is None or group_size >= k:
        return 1, k
    if group_size < 1:
        raise ValueError(f"group_size must be a positive integer or None, got {group_size}")
    return -(-k // group_size), group_size


def _grouped(w, group_size):
    n, k = w.shape
    G, g = num_groups(k, group_size)
    if G * g != k:
        w = jnp.pad(w, ((0, 0), (0, G * g - k)))
    return w.reshape(n, G, g)


@partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "clip_search"))
def _quantize_weight(w, bits, group_size, symmetric, clip_ratio, clip_search):
    return _quantize_weight_impl(w, bits, group_size, symmetric, clip_ratio, clip_search)


def _checked_weight(w, fn: str, group_size):
    """w as a jnp array after checking it is a non-empty 2-D [N, K] weight and group_size suits K."""
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"{fn} expects a 2-D weight [N, K], got shape {w.shape}")
    if w.size == 0:
        raise ValueError(f"cannot quantize a zero-size weight of shape {w.shape}")
    num_groups(w.shape[1], group_size)
    return w


def quantize_weight(w, bits, group_size: Optional[int] = None, symmetric: bool = True,
                    clip_ratio=1.0, clip_search: bool = False):
    """Quantize a weight W [N, K] (out, in) per output channel or per group along K.

    Returns (q int8 [N, G, g], scale f32 [N, G], zero int8 [N, G] or None), with (G, g) =
    `num_groups(K, group_size)`; q is zero-padded (with the zero code) past K in the last group.
    clip_search: per group, pick the clip ratio in {1.0, 0.95, ..., 0.5} that minimises the squared
    dequantization error (times `clip_ratio`), a standard RTN refinement (e.g. AWQ's clip search, without data).
    """
    bits = check_bits(bits, "weight bits")
    w = _checked_weight(w, "quantize_weight", group_size)
    return _quantize_weight(w, bits, group_size, bool(symmetric), clip_ratio, bool(clip_search))


def _quantize_weight_impl(w, bits, group_size, symmetric, clip_ratio, clip_search):
    wg = _grouped(w.astype(jnp.float32), group_size)
    if clip_search:
        ratios = jnp.linspace(1.0, 0.5, 11) * clip_ratio

        def err(r):
            s, z = scale_zero(wg, bits, symmetric, -1, r)
            d = dequantize(quantize_codes(wg, s, z, bits, symmetric), s, z) - wg
            return jnp.sum(d * d, axis=-1, keepdims=True)

        errs = jax.vmap(err)(ratios)                      # [R, N, G, 1]
        ratio = ratios[jnp.argmin(errs, axis=0)]          # [N, G, 1]
    else:
        ratio = clip_ratio
    s, z = scale_zero(wg, bits, symmetric, -1, ratio)
    q = quantize_codes(wg, s, z, bits, symmetric)
    k = w.shape[1]
    G, g = wg.shape[1], wg.shape[2]
    if G * g != k:  # padded tail: hold the zero code, so (q - z) = 0 there
        valid = (jnp.arange(G * g) < k).reshape(1, G, g)
        q = jnp.where(valid, q, 0.0 if z is None else z)
    return (q.astype(jnp.int8), s[..., 0],
            None if z is None else z[..., 0].astype(jnp.int8))


def dequantize_weight(q, scale, zero, k: int):
    """Inverse of `quantize_weight`: q [N, G, g], scale/zero [N, G] -> W [N, K] float32."""
    n, G, g = q.shape
    w = dequantize(q, scale[..., None], None if zero is None else zero[..., None])
    return w.reshape(n, G * g)[:, :k]


@jax.jit
def pack_int4(q):
    """Pack int codes in [-8, 7] two per byte along the last axis: [..., L] int8 -> [..., ceil(L/2)] uint8.

    Layout: byte j = (q[2j] & 0xF) | ((q[2j+1] & 0xF) << 4); odd L is padded with a zero code.
    """
    q = jnp.asarray(q)
    if q.shape[-1] % 2:
        q = jnp.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, 1)])
    u = q.astype(jnp.int8).astype(jnp.uint8) & jnp.uint8(0xF)
    return u[..., 0::2] | (u[..., 1::2] << jnp.uint8(4))


def unpack_int4(p, length: int):
    """Inverse of `pack_int4`: [..., ceil(L/2)] uint8 -> [..., L] int8 (sign-extended nibbles)."""
    p = jnp.asarray(p)
    if p.dtype != jnp.uint8:
        raise ValueError(f"unpack_int4 expects uint8 packed data, got {p.dtype}")
    if p.shape[-1] != math.ceil(length / 2):
        raise ValueError(f"packed last axis {p.shape[-1]} does not hold {length} 4-bit values")
    return _unpack_int4(p, int(length))


@partial(jax.jit, static_argnums=1)
def _unpack_int4(p, length):
    s = p.astype(jnp.int8)
    lo = (s << 4) >> 4          # arithmetic shift sign-extends the low nibble
    hi = s >> 4
    out = jnp.stack([lo, hi], axis=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])
    return out[..., :length]


def packed_length(length: int, bits: int) -> int:
    """Last-axis length of `pack_codes` output for `length` codes at `bits` (8: length, 4: ceil(L/2),
    else ceil(L/8) * bits)."""
    bits, length = check_bits(bits, "packing bits"), int(length)
    if bits == 8:
        return length
    if bits == 4:
        return -(-length // 2)
    return -(-length // 8) * bits


def pack_codes(q, bits: int):
    """Pack signed codes at `bits` bits each along the last axis (layout: module docstring).

    q: int [..., L] with values in [-2^(bits-1), 2^(bits-1) - 1] (higher bits are dropped).
    Returns [..., packed_length(L, bits)]: uint8, or int8 unchanged for bits = 8. Traceable.
    """
    bits = check_bits(bits, "packing bits")
    q = jnp.asarray(q)
    if bits == 8:
        return q.astype(jnp.int8)
    if bits == 4:
        return pack_int4(q)
    return _pack_runs(q, bits)


def unpack_codes(p, bits: int, length: int):
    """Inverse of `pack_codes`: [..., packed_length(L, bits)] -> [..., L] int8 (sign-extended codes)."""
    bits = check_bits(bits, "packing bits")
    p = jnp.asarray(p)
    want = (jnp.int8 if bits == 8 else jnp.uint8)
    if p.dtype != want:
        raise ValueError(f"unpack_codes: {bits}-bit codes are stored as {jnp.dtype(want)}, got {p.dtype}")
    if p.shape[-1] != packed_length(length, bits):
        raise ValueError(f"packed last axis {p.shape[-1]} does not hold {length} {bits}-bit values "
                         f"(expected {packed_length(length, bits)})")
    if bits == 8:
        return p
    if bits == 4:
        return _unpack_int4(p, int(length))
    return _unpack_runs(p, bits, int(length))


@partial(jax.jit, static_argnums=1)
def _pack_runs(q, bits):
    lead, n8 = q.shape[:-1], -(-q.shape[-1] // 8)
    q = jnp.pad(q.astype(jnp.int8), [(0, 0)] * len(lead) + [(0, 8 * n8 - q.shape[-1])])
    u = jax.lax.bitcast_convert_type(q, jnp.uint8).reshape(*lead, n8, 8)
    parts = []
    if bits > 4:
        nib = u & jnp.uint8(0xF)
        parts.append(nib[..., 0::2] | (nib[..., 1::2] << jnp.uint8(4)))                   # [..., n8, 4]
    t = jnp.arange(8, dtype=jnp.uint8)
    for j in range(4 if bits > 4 else 0, bits):                                           # bit-plane j
        parts.append(jnp.sum(((u >> jnp.uint8(j)) & jnp.uint8(1)) << t, axis=-1, dtype=jnp.uint8)[..., None])
    return jnp.concatenate(parts, axis=-1).reshape(*lead, n8 * bits)


@partial(jax.jit, static_argnums=(1, 2))
def _unpack_runs(p, bits, length):
    lead, n8 = p.shape[:-1], p.shape[-1] // bits
    r = p.reshape(*lead, n8, bits)
    t = jnp.arange(8, dtype=jnp.uint8)
    if bits > 4:
        nib = r[..., :4]
        u = jnp.stack([nib & jnp.uint8(0xF), nib >> jnp.uint8(4)], axis=-1).reshape(*lead, n8, 8)
    else:
        u = jnp.zeros((*lead, n8, 8), jnp.uint8)
    for j in range(4 if bits > 4 else 0, bits):
        u = u | (((r[..., j:j + 1] >> t) & jnp.uint8(1)) << jnp.uint8(j))
    s = jax.lax.bitcast_convert_type(u << jnp.uint8(8 - bits), jnp.int8) >> jnp.int8(8 - bits)   # sign-extend
    return s.reshape(*lead, 8 * n8)[..., :length]


# ---------------------------------------------------------------------------------------------------------
# Two-level ("int-folded") group scales: W[n, k] ~ s[n] * c[n, g(k)] * q[n, k]

def int_scale_max(bits) -> int:
    """Largest integer group factor c_max = min(16, 127 // qmax) (qmax = 2^(b-1) - 1), so that the folded
    code c * q always fits int8 (4 bits: 16 * 7 = 112; 8 bits: 1, i.e. per channel)."""
    b = check_bits(bits, "weight bits")
    return min(16, 127 // (2 ** (b - 1) - 1))


@partial(jax.jit, static_argnames=("bits", "group_size", "clip_search"))
def _quantize_weight_int_scales(w, bits, group_size, clip_ratio, clip_search):
    wg = _grouped(w.astype(jnp.float32), group_size)                    # [N, G, g]
    qmax = 2 ** (bits - 1) - 1
    cmax = int_scale_max(bits)
    amax = jnp.max(jnp.abs(wg), axis=-1) * clip_ratio                   # [N, G]
    s0 = jnp.max(amax, axis=-1) / (qmax * cmax)                         # [N]
    s0 = jnp.where(s0 > 0, s0, 1.0)
    cands = jnp.arange(1, cmax + 1, dtype=jnp.float32)                  # [C]

    def best_c(s):                                                      # s [N] -> c [N, G], err [N, G]
        def body(carry, c):                                             # candidates in increasing order:
            cb, eb = carry                                              # a strict < keeps the smallest on ties
            sc = (s[:, None] * c)[..., None]
            d = jnp.clip(jnp.round(wg / sc), -qmax, qmax) * sc - wg
            e = jnp.sum(d * d, axis=-1)
            better = e < eb
            return (jnp.where(better, c, cb), jnp.where(better, e, eb)), None
        init = (jnp.ones(amax.shape, jnp.float32), jnp.full(amax.shape, jnp.inf, jnp.float32))
        (c, e), _ = jax.lax.scan(body, init, cands)
        return c, e

    if clip_search:
        ratios = jnp.linspace(1.0, 0.5, 11)
        cs, es = jax.lax.map(lambda r: best_c(s0 * r), ratios)          # [R, N, G] x 2
        i = jnp.argmin(jnp.sum(es, axis=-1), axis=0)                    # [N]
        c = jnp.take_along_axis(cs, i[None, :, None], axis=0)[0]
        s = s0 * ratios[i]
    else:
        s = s0
        c, _ = best_c(s)
    sc = (s[:, None] * c)[..., None]
    q = jnp.clip(jnp.round(wg / sc), -qmax, qmax)                       # padded tail: 0 stays 0
    return q.astype(jnp.int8), s, c.astype(jnp.int8)


def quantize_weight_int_scales(w, bits, group_size: int, clip_ratio=1.0, clip_search: bool = False):
    """Symmetric quantization of W [N, K] with two-level group scales (QServe-style progressive scales):
        W[n, k] ~ s[n] * c[n, G(k)] * q[n, k],   s float32 per output channel, c integer in 1..c_max,
    q the b-bit symmetric codes (narrow range), c_max = `int_scale_max(bits)`, so c * q fits int8 and
    the folded int8 weight c * q runs through per-channel int8 kernels unchanged.

    s[n] = max_G amax[n, G] / (qmax c_max) with amax the group absmax times `clip_ratio`; every group's
    factor c is then chosen by exhaustive search over 1..c_max minimising the group's squared
    dequantization error (the rule ceil(amax / (qmax s)) is one of the candidates, so the search is never
    worse; smaller factors clip the group's largest values when that lowers the error). clip_search:
    additionally search s over {1.0, 0.95, ..., 0.5} x s per row (minimum row squared error).
    Returns (q int8 [N, G, g] (zero-padded past K), s float32 [N], c int8 [N, G]); (G, g) =
    `num_groups(K, group_size)`. A zero row gets s = 1 and codes 0.
    """
    bits = check_bits(bits, "weight bits")
    w = _checked_weight(w, "quantize_weight_int_scales", group_size)
    if group_size is None:
        raise ValueError("two-level integer group scales need a group size (group_size=None is per channel)")
    return _quantize_weight_int_scales(w, bits, int(group_size), clip_ratio, bool(clip_search))


def fold_int_scales(q, c):
    """Folded int8 codes c * q: q int8 [N, G, g], c int8 [N, G] -> int8 [N, G, g] (|c q| <= 127 by c_max)."""
    return q * c[..., None].astype(q.dtype)


def pack_group_factors(c):
    """Integer group factors c in 1..16 -> 4-bit packed storage: `pack_int4(c - 9)` (c - 9 in [-8, 7]);
    int [..., G] -> uint8 [..., ceil(G / 2)]."""
    return pack_int4(jnp.asarray(c).astype(jnp.int8) - jnp.int8(9))


def unpack_group_factors(p, groups: int):
    """Inverse of `pack_group_factors`: uint8 [..., ceil(G / 2)] -> int8 [..., G] in 1..16."""
    return unpack_int4(p, groups) + jnp.int8(9)
