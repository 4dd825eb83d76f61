"""The reference execution of a quantized linear: what every faster path must equal.

`quantized_linear(x, w, act_bits=None, step=None, execution=None)`: x [..., K] (float) through a
`QuantizedWeight` node (quant/qweight.py) -> [..., N] in x.dtype, no bias, in one of two modes with one
semantics (see qweight.py for the formula):
- "fake": the float reference. Activations are fake-quantized per token, the weight is dequantized to
  float32, one float32 matmul at HIGHEST precision.
- "int": activations are quantized per token into int8 (any a_bits <= 8, so 4-bit codes are exact), the
  GEMM is `lax.dot_general` int8 x int8 -> int32 contracting the last axis of both operands (weights are
  stored [N, K] / [G, N, g], so no transpose of the weight is needed), then the scales are applied:
  per channel: y = s_x[m] s_w[n] acc[m, n] (also two-level "int" group scales: `codes()` folds the integer
  group factors into the int8 codes, W = s_w[n] (c q)[n, k]); group-wise: one batched GEMM with the group as
  leading batch axis (in chunks of groups to bound the int32 intermediate), y = s_x[m] sum_g s_w[n, g] acc[g, m, n].
  Asymmetric activations and/or weights use the exact integer zero-point correction
  sum (q_x - z_x)(q_w - z_w) = acc - z_x sum q_w - z_w sum q_x + g z_x z_w.
  With a_bits None (weight-only quantization) the int mode dequantizes the weight and runs in float.
Both modes share the activation quantizer, so they agree to float rounding (tests: rel. err <= 1e-6).
The 16-bit branches run in their stored dtype with float32 accumulation, identically in both modes
(int8-stored factors, `QuantConfig.lowrank_bits=8`, first become codes * scale in the branch dtype).

Also the pieces the fused kernels share with it: `resolve_act_bits` (the call's activation bits),
`transform_input` (smoothing divide and Hadamard rotation of x, through `quant.transforms`), `branches`.
Below `quant.kernels` and `quant.linear` (which dispatches here or into the kernels): imports neither.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from qdit4sr_jax.quant import quantizer as qz
from qdit4sr_jax.quant.lowering import target_platform
from qdit4sr_jax.quant.qweight import QuantizedWeight

# Upper bound on elements of the int32 [c, M, N] partial-sum block of the group-wise int GEMM.
GROUP_CHUNK_ELEMENTS = 1 << 26


def resolve_act_bits(w: QuantizedWeight, act_bits=None, step=None):
    """Activation bits for this call: explicit act_bits > a_schedule[step] > w.a_bits (None = float)."""
    if act_bits is not None:
        try:
            value = int(act_bits)           # Python / concrete value: check it
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
            return act_bits                 # traced: the caller guarantees 2..8
        return qz.check_bits(value, "act_bits")
    if w.a_schedule is not None and step is not None:
        t = w.a_schedule.shape[0]
        return w.a_schedule[jnp.clip(jnp.asarray(step, jnp.int32), 0, t - 1)]
    return w.a_bits


def transform_input(x2, w: QuantizedWeight, inner: str = "float32"):
    """x' = hadamard(signs * (x / smooth)) float32 [M, K] for x2 [M, K] (any float dtype: a bf16 x goes into
    the Hadamard as is, whose +-1 products are exact in bf16; the same values as from its float32 upcast).
    The signs multiply in x's dtype (exact), so without smoothing a bf16 x stays bf16 (one exact bf16 GEMM
    per Hadamard stage on a GPU instead of three for a float32 operand: `transforms._pm1_dot`). inner: the
    dtype between the Hadamard's stages (`transforms.hadamard_transform`)."""
    if w.smooth is not None:
        x2 = x2.astype(jnp.float32) / w.smooth.astype(jnp.float32)
    if w.signs:
        x2 = x2 * w.sign_vector().astype(x2.dtype)
    if w.rotate:
        from qdit4sr_jax.quant.transforms import hadamard_transform
        x2 = hadamard_transform(x2, w.rotate, inner=inner)
    return x2.astype(jnp.float32)


def branches(xt, w: QuantizedWeight):
    """16-bit branches on x' [M, K]: (x' lr_a) lr_b + blockwise rank-1, float32 [M, N] or None.
    int8-stored factors (`QuantizedWeight.branch_bits`) are dequantized to the branch dtype first."""
    w = w.float_branches()
    y = None
    if w.lr_a is not None:
        dt = w.lr_a.dtype
        h = jnp.dot(xt.astype(dt), w.lr_a, preferred_element_type=jnp.float32)
        y = jnp.dot(h.astype(dt), w.lr_b, preferred_element_type=jnp.float32)
    if w.block_u is not None:
        dt = w.block_u.dtype
        bo, bi = w.block
        nbo, nbi = w.block_u.shape[:2]
        m = xt.shape[0]
        xp = xt if nbi * bi == w.k else jnp.pad(xt, ((0, 0), (0, nbi * bi - w.k)))
        xb = xp.reshape(m, nbi, bi).astype(dt)
        bv, bu = w.block_v, w.block_u
        if target_platform() == "cpu":       # XLA:CPU has no batched BF16 x BF16 -> F32 dot: widen (exact)
            xb, bv, bu = xb.astype(jnp.float32), bv.astype(jnp.float32), bu.astype(jnp.float32)
        t = jnp.einsum("mjb,ijb->mij", xb, bv, preferred_element_type=jnp.float32)
        yb = jnp.einsum("mij,ijo->mio", t.astype(dt).astype(bu.dtype), bu, preferred_element_type=jnp.float32)
        yb = yb.reshape(m, nbo * bo)[:, : w.n]
        y = yb if y is None else y + yb
    return y


def _fake_main(xt, w: QuantizedWeight, bits):
    if bits is not None:
        s, z = qz.scale_zero(xt, bits, w.a_symmetric, -1)
        xt = qz.dequantize(qz.quantize_codes(xt, s, z, bits, w.a_symmetric), s, z)
    wd = w.dequantize_residual()                                   # [N, K]
    return jax.lax.dot_general(xt, wd, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                               preferred_element_type=jnp.float32)


def _largest_divisor_leq(n: int, cap: int) -> int:
    cap = max(1, min(n, cap))
    for c in range(cap, 0, -1):
        if n % c == 0:
            return c
    return 1


def _int_main(xt, w: QuantizedWeight, bits):
    m = xt.shape[0]
    G, g = w.groups
    if w.layout == "gnk" and G * g != w.k:                         # ("nk" with two-level scales: folded [N, K])
        xt = jnp.pad(xt, ((0, 0), (0, G * g - w.k)))               # zeros quantize to the zero code
    xq, sx, zx = qz.quantize_per_token(xt, bits, w.a_symmetric)    # [M, Kp] int8, [M, 1], [M, 1]|None
    wq = w.codes()                                                 # int8 [N, K] or [G, N, g]
    i32 = jnp.int32
    if w.layout == "nk":
        acc = jax.lax.dot_general(xq, wq, (((1,), (1,)), ((), ())), preferred_element_type=i32)
        acc = _zero_correct(acc, xq, wq, zx, None if w.zero is None else w.zero[:, 0], w.k, -1)
        return acc.astype(jnp.float32) * sx * w.scale[:, 0][None, :]
    # group-wise: x [G, M, g] x w [G, N, g] -> [G, M, N]
    xg = jnp.transpose(xq.reshape(m, G, g), (1, 0, 2))
    zw = None if w.zero is None else jnp.transpose(w.zero)          # [G, N]
    sw = jnp.transpose(w.scale)                                     # [G, N]
    c = _largest_divisor_leq(G, GROUP_CHUNK_ELEMENTS // max(1, m * w.n))

    def chunk(args):
        xc, wc, swc, zwc = args                                     # [c, M, g], [c, N, g], [c, N], [c, N]
        acc = jax.lax.dot_general(xc, wc, (((2,), (2,)), ((0,), (0,))), preferred_element_type=i32)
        acc = _zero_correct(acc, xc, wc, zx, zwc, g, -1)
        return jnp.sum(acc.astype(jnp.float32) * swc[:, None, :], axis=0)

    zw_ = jnp.zeros_like(sw, dtype=jnp.int8) if zw is None else zw
    if c == G:
        y = chunk((xg, wq, sw, None if zw is None else zw_))
    else:
        split = lambda a: a.reshape(G // c, c, *a.shape[1:])
        has_zw = zw is not None

        def body(acc_y, args):
            xc, wc, swc, zwc = args
            return acc_y + chunk((xc, wc, swc, zwc if has_zw else None)), None

        y, _ = jax.lax.scan(body, jnp.zeros((m, w.n), jnp.float32),
                            (split(xg), split(wq), split(sw), split(zw_)))
    return y * sx


def _zero_correct(acc, xq, wq, zx, zw, length, axis):
    """Integer zero-point correction of acc = sum_k q_x q_w (shapes [..., M, N]); zx [M, 1], zw [..., N]."""
    i32 = jnp.int32
    if zx is not None:                                              # - z_x[m] * sum_k q_w[n, k]
        acc = acc - zx * jnp.sum(wq.astype(i32), axis=axis)[..., None, :]
    if zw is not None:                                              # - z_w[n] * sum_k q_x[m, k]
        zw = zw.astype(i32)
        acc = acc - jnp.sum(xq.astype(i32), axis=axis)[..., :, None] * zw[..., None, :]
        if zx is not None:
            acc = acc + length * zx * zw[..., None, :]
    return acc


def quantized_linear(x, w: QuantizedWeight, *, act_bits=None, step=None, execution=None):
    """x [..., K] -> [..., N] in x.dtype (no bias) through a QuantizedWeight node."""
    if x.shape[-1] != w.k:
        raise ValueError(f"linear: input has {x.shape[-1]} features but the quantized weight expects {w.k}")
    mode = execution or w.execution
    if mode not in ("fake", "int"):
        raise ValueError(f"execution must be 'fake' or 'int', got {mode!r}")
    bits = resolve_act_bits(w, act_bits, step)
    if bits is None or isinstance(bits, int):
        return _qlinear(x, w, None, mode=mode, static_bits=bits)
    return _qlinear(x, w, bits, mode=mode, static_bits=None)


@partial(jax.jit, static_argnames=("mode", "static_bits"))
def _qlinear(x, w, traced_bits, *, mode, static_bits):
    bits = static_bits if traced_bits is None else traced_bits
    lead = x.shape[:-1]
    xt = transform_input(x.reshape(-1, w.k), w)
    if mode == "int" and bits is not None:
        y = _int_main(xt, w, bits)
    else:
        y = _fake_main(xt, w, bits)
    b = branches(xt, w)
    if b is not None:
        y = y + b
    return y.reshape(*lead, w.n).astype(x.dtype)


__all__ = ["quantized_linear", "resolve_act_bits", "transform_input", "branches", "GROUP_CHUNK_ELEMENTS"]
