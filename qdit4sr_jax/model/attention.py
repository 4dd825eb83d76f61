"""The model's one attention call, `attention(q, k, v, impl)`, and FP8 (e4m3) attention.

impl (`ModelConfig.attention_impl`):
  None / "xla"  jax.nn.dot_product_attention through XLA (materialises [B, H, T, T] scores)
  "cudnn"       jax.nn.dot_product_attention(implementation="cudnn"): cuDNN flash attention (GPU, bf16/fp16)
  "fp8"         FP8 e4m3 attention executed by cuDNN's FP8 flash attention (inference forward, Hopper+),
                through JAX's private `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention(
                use_fp8=True)`. On a non-GPU backend it falls back to "fp8-ref" (same arithmetic, plain jnp),
                with one warning; on a GPU whose JAX lacks that private API it raises, naming the version.
  "fp8-ref"     the same quantization arithmetic in plain jnp (float32 math on fp8-rounded values): the
                reference, and the CPU / TPU path. Differentiable (rounding passes gradients straight through).

FP8 arithmetic (what cuDNN's SDPA-FP8 graph computes, cudnn-frontend `SDPAFP8Node`):
  q8 = e4m3(q * 448 / amax|q|), descale_q = amax|q| / 448; the same for k and v (dynamic per-tensor
       scales, one per call over the whole [B, T, H, D] tensor; an all-zero tensor gets scale 1)
  S  = (q8 @ k8^T) * (1/sqrt(D)) * descale_q * descale_k                    (float32)
  P8 = e4m3(P * SCALE_S) with P the softmax probabilities, SCALE_S = 448 (P <= 1, so no overflow)
  O  = (P8 @ v8) * (1 / SCALE_S) * descale_v                                (float32)
  o8 = e4m3(O * scale_o), scale_o = 448 * O_HEADROOM / amax|v| (|O| <= amax|v|: O is a convex
       combination of rows of v), returned dequantized: o8 / scale_o in q.dtype.
Which P the kernel quantizes is not fixed by the graph: a flash kernel does not know the row sum when
it quantizes, so it rounds the un-normalised exp(S - rowmax) and divides by the row sum (of the
unrounded values) at the end ("flash", the default of the reference); the graph as written rounds the
normalised softmax ("normalized"). `fp8_attention_reference(p_mode=...)` computes either;
benchmarks/attention_latency.py measures which one cuDNN matches.
"""
from __future__ import annotations

import functools
import inspect
import math
import warnings
from typing import Optional

import jax
import jax.numpy as jnp

from qdit4sr_jax.config import ATTENTION_IMPLS

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0           # largest finite e4m3fn value
SCALE_S = 448.0           # fixed scale of the probabilities P (<= 1) before rounding to e4m3
O_HEADROOM = 0.5          # o8 uses half the e4m3 range: rounding of P can push |O| slightly above amax|v|
P_MODES = ("flash", "normalized")
SCORE_BUDGET = 1 << 25    # reference: float32 score elements per query chunk (B * H * chunk * T_k)


def check_impl(impl: Optional[str]) -> Optional[str]:
    """Validate an attention implementation name (see module docstring); returns it unchanged."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {impl!r} not in {ATTENTION_IMPLS}")
    return impl


def _check_qkv(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: q, k, v must be [B, T, H, D], got shapes {q.shape}, {k.shape}, {v.shape}")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention: incompatible shapes q {q.shape}, k {k.shape}, v {v.shape} "
                         "(need q [B, T, H, D], k [B, S, H, D], v [B, S, H, Dv])")


def attention(q, k, v, impl: Optional[str] = None):
    """Softmax attention, scale 1/sqrt(D), no mask. q [B, T, H, D], k [B, S, H, D], v [B, S, H, Dv]
    -> [B, T, H, Dv] in q.dtype. `impl` as in the module docstring."""
    check_impl(impl)
    _check_qkv(q, k, v)
    if impl in (None, "xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, implementation=impl)
    if impl == "fp8-ref":
        return fp8_attention_reference(q, k, v)
    if jax.default_backend() != "gpu":
        _warn_fallback(jax.default_backend())
        return fp8_attention_reference(q, k, v)
    return fp8_attention_cudnn(q, k, v)


@functools.lru_cache(maxsize=None)
def _warn_fallback(backend: str):
    warnings.warn(f"attention_impl='fp8' runs cuDNN on GPUs only; on {backend!r} it uses 'fp8-ref' "
                  "(the same FP8 arithmetic in jnp)", stacklevel=3)


def amax(x):
    """max |x| over the whole array as a float32 scalar."""
    return jnp.max(jnp.abs(x)).astype(jnp.float32)


def quantize_fp8(x, x_amax=None):
    """Per-tensor e4m3 quantization: x [...] -> (x8 [...] float8_e4m3fn, descale float32 scalar) with
    x ~= x8 * descale and descale = amax|x| / 448 (1/448 when x is all zero). `x_amax` overrides the
    amax (e.g. that of the full tensor when x is a slice of it)."""
    a = amax(x) if x_amax is None else jnp.asarray(x_amax, jnp.float32)
    a = jnp.where(a > 0, a, 1.0)
    scaled = jnp.clip(x.astype(jnp.float32) * (FP8_MAX / a), -FP8_MAX, FP8_MAX)
    return scaled.astype(FP8_DTYPE), a / FP8_MAX


def _round_fp8(x):
    """float32 -> nearest e4m3 value (saturating at +-448), as float32."""
    return jnp.clip(x, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE).astype(jnp.float32)


def _output_scale(descale_v):
    """scale_o for the e4m3 output: O_HEADROOM * 448 / amax|v| (amax|v| = 448 * descale_v)."""
    return O_HEADROOM / descale_v


def _map_query_chunks(fn, q, chunk: int):
    """fn(q_chunk [B, c, H, D]) -> [B, c, H, Dv], applied over query chunks of `chunk` rows with
    lax.map (queries are independent); q is zero-padded to a multiple of chunk and cut back."""
    B, T = q.shape[:2]
    if chunk >= T:
        return fn(q)
    n = -(-T // chunk)
    qp = jnp.pad(q, ((0, 0), (0, n * chunk - T), (0, 0), (0, 0)))
    qc = jnp.swapaxes(qp.reshape((B, n, chunk) + q.shape[2:]), 0, 1)
    out = jax.lax.map(fn, qc)                                       # [n, B, chunk, H, Dv]
    out = jnp.swapaxes(out, 0, 1)
    return out.reshape((B, n * chunk) + out.shape[3:])[:, :T]


def _default_chunk(q, k, query_chunk):
    if query_chunk is not None:
        if query_chunk < 1:
            raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
        return int(query_chunk)
    B, _, H, _ = q.shape
    return max(1, SCORE_BUDGET // (B * H * k.shape[1]))


def fp8_attention_reference(q, k, v, *, p_mode: str = "flash", amax_q=None, query_chunk: Optional[int] = None):
    """FP8 e4m3 attention in plain jnp (module docstring). q [B, T, H, D], k [B, S, H, D], v [B, S, H, Dv]
    -> [B, T, H, Dv] in q.dtype. `amax_q` replaces amax|q| (to evaluate a subsample of the queries with
    the scale of the full q). Scores are formed for `query_chunk` queries at a time (default: about
    SCORE_BUDGET float32 elements per chunk)."""
    if p_mode not in P_MODES:
        raise ValueError(f"p_mode {p_mode!r} not in {P_MODES}")
    _check_qkv(q, k, v)
    q8, dq = quantize_fp8(q, amax_q)
    k8, dk = quantize_fp8(k)
    v8, dv = quantize_fp8(v)
    k8, v8 = k8.astype(jnp.float32), v8.astype(jnp.float32)
    s_scale = (1.0 / math.sqrt(q.shape[-1])) * dq * dk
    o_scale = (1.0 / SCALE_S) * dv
    scale_o = _output_scale(dv)

    def rows(qc):                                                     # [B, c, H, D] fp8 -> [B, c, H, Dv]
        s = jnp.einsum("bqhd,bkhd->bhqk", qc.astype(jnp.float32), k8,
                       precision=jax.lax.Precision.HIGHEST) * s_scale
        p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
        l = jnp.sum(p, axis=-1, keepdims=True)
        if p_mode == "normalized":
            p, l = p / l, jnp.ones_like(l)
        p8 = _round_fp8(p * SCALE_S)
        o = jnp.einsum("bhqk,bkhd->bhqd", p8, v8, precision=jax.lax.Precision.HIGHEST) * (o_scale / l)
        o8 = _round_fp8(o * scale_o)
        return jnp.swapaxes(o8, 1, 2)

    o8 = _map_query_chunks(rows, q8, _default_chunk(q, k, query_chunk))
    return (o8 / scale_o).astype(q.dtype)


def float_attention_reference(q, k, v, *, query_chunk: Optional[int] = None):
    """Plain softmax attention in float32 (HIGHEST precision), chunked over queries like the FP8
    reference. q [B, T, H, D], k [B, S, H, D], v [B, S, H, Dv] -> [B, T, H, Dv] float32."""
    _check_qkv(q, k, v)
    k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
    scale = 1.0 / math.sqrt(q.shape[-1])

    def rows(qc):
        s = jnp.einsum("bqhd,bkhd->bhqk", qc.astype(jnp.float32), k32, precision=jax.lax.Precision.HIGHEST)
        p = jax.nn.softmax(s * scale, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v32, precision=jax.lax.Precision.HIGHEST)

    return _map_query_chunks(rows, q, _default_chunk(q, k, query_chunk))


@functools.lru_cache(maxsize=None)
def cudnn_fp8_api():
    """JAX's private cuDNN FP8 attention module, checked for what this code uses; raises RuntimeError
    naming the JAX version when it is missing or changed."""
    why = None
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except Exception as e:                    # private module: may move between JAX versions
        fa, why = None, f"import failed: {e!r}"
    if fa is not None:
        fn = getattr(fa, "dot_product_attention", None)
        keys = getattr(fa, "fp8_params_keys", None)
        mask = getattr(fa, "MaskType", None)
        try:
            sig = inspect.signature(fn).parameters if fn is not None else {}
        except (TypeError, ValueError):
            sig = {}
        need = ("fp8_params", "use_fp8", "scale", "mask_type", "qkv_layout")
        if fn is None or keys is None or mask is None or not hasattr(mask, "NO_MASK"):
            why = "dot_product_attention / fp8_params_keys / MaskType.NO_MASK not found"
        elif any(n not in sig for n in need):
            why = f"dot_product_attention lacks arguments {[n for n in need if n not in sig]}"
        elif not {"descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"} <= set(keys):
            why = f"fp8_params_keys changed: {list(keys)}"
    if why is not None:
        raise RuntimeError(f"attention_impl='fp8' needs JAX's private cuDNN FP8 attention "
                           f"(jax._src.cudnn.fused_attention_stablehlo.dot_product_attention(use_fp8=True)); "
                           f"in jax {jax.__version__}: {why}. Use attention_impl='fp8-ref' or 'cudnn'.")
    return fa


def fp8_attention_cudnn(q, k, v, *, return_stats: bool = False):
    """FP8 e4m3 attention by cuDNN (inference forward; GPU with compute capability >= 9.0, head dim
    <= 256 and a multiple of 16). q [B, T, H, D], k [B, S, H, D], v [B, S, H, D] -> [B, T, H, D] in
    q.dtype; with `return_stats`, also cuDNN's (amax_s, amax_o) float32 [1, 1, 1, 1]. Includes the
    per-tensor quantization of q, k, v (module docstring)."""
    _check_qkv(q, k, v)
    D = q.shape[-1]
    if D > 256 or D % 16 or v.shape[-1] != D:
        raise ValueError(f"cuDNN FP8 attention needs head dim <= 256, a multiple of 16, equal for q/k/v; "
                         f"got q/k {D}, v {v.shape[-1]}")
    cudnn_fp8_api()
    if return_stats:
        return _fp8_cudnn(q, k, v, True)
    return _fp8_cudnn_per_example(q, k, v)


def _fp8_cudnn(q, k, v, return_stats=False):
    (q8, dq), (k8, dk), (v8, dv) = quantize_fp8(q), quantize_fp8(k), quantize_fp8(v)
    return cudnn_fp8_quantized(q8, k8, v8, dq, dk, dv, q.dtype, return_stats=return_stats)


def per_example_under_vmap(fn):
    """fn(q, k, v) -> array, made to run once per example under `jax.vmap` (lax.map over the vmapped
    axis) instead of being batched. cuDNN's FP8 attention takes one scale per tensor: JAX cannot batch
    per-example scales (0.11 raises, older versions mishandle them), and per-example scales are what an
    un-vmapped call computes. Not differentiable (inference only)."""
    f = jax.custom_batching.custom_vmap(fn)

    @f.def_vmap
    def _rule(axis_size, in_batched, *args):
        args = tuple(x if b else jnp.broadcast_to(x, (axis_size,) + x.shape) for x, b in zip(args, in_batched))
        return jax.lax.map(lambda a: f(*a), args), True

    return f


_fp8_cudnn_per_example = per_example_under_vmap(lambda q, k, v: _fp8_cudnn(q, k, v))


def cudnn_fp8_quantized(q8, k8, v8, descale_q, descale_k, descale_v, out_dtype, *, return_stats: bool = False):
    """cuDNN FP8 attention on already quantized inputs: q8/k8/v8 float8_e4m3fn [B, T|S, H, D] with
    float32 scalar descales (x ~= x8 * descale) -> [B, T, H, D] in out_dtype (dequantized e4m3 output)."""
    fa = cudnn_fp8_api()
    scale_o = _output_scale(descale_v)
    s11 = lambda x: jnp.reshape(jnp.asarray(x, jnp.float32), (1, 1, 1, 1))
    params = {name: s11(1.0) for name in fa.fp8_params_keys}     # backward-only entries stay 1
    params.update(descale_q=s11(descale_q), descale_k=s11(descale_k), descale_v=s11(descale_v),
                  descale_s=s11(1.0 / SCALE_S), scale_s=s11(SCALE_S), scale_o=s11(scale_o),
                  descale_o=s11(1.0 / scale_o))
    out = fa.dot_product_attention(q8, k8, v8, fp8_params=params, scale=1.0 / math.sqrt(q8.shape[-1]),
                                   mask_type=fa.MaskType.NO_MASK, qkv_layout="BTNH", use_fp8=True)
    o8, amax_s, amax_o = out[0], out[1], out[2]
    o = (o8.astype(jnp.float32) / scale_o).astype(out_dtype)
    return (o, amax_s, amax_o) if return_stats else o
