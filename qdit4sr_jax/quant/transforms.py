"""Input-dimension transforms of a quantized linear, applied to the weight once and mirrored online on the
activation: the Hadamard rotation (QuaRot-style) and the SmoothQuant migration scale.

Both keep the layer's function: x W^T = (x diag(1/s)) (W diag(s))^T and x W^T = (x H)(W H)^T for H
orthonormal (H H^T = I). Floor 2 of the package (docs/ARCHITECTURE.md): imports nothing of the project.

Hadamard blocks. A block of size b = m * 2^j with m in `HADAMARD_BASES` = (1, 12, 20) uses
H_b = H_m (x) H_{2^j} (Kronecker product, orthonormal): H_{2^j} the Sylvester (Walsh-Hadamard) matrix,
applied with the fast butterflies, H_12 / H_20 stored symmetric Paley type-II matrices (Paley 1933,
q = 5 and q = 9), applied as a small matmul on the m axis. Every H_b here is symmetric, so H_b H_b = I
(the transform is its own inverse). That covers the full input dimension of DiT4SR's linears
(1536 = 12 * 128, 6144 = 12 * 512) and of the demo model's (192 = 12 * 16, 768 = 12 * 64).

Random signs (QuaRot's randomised Hadamard H' = diag(signs) H): `rotation_signs(k)` gives the fixed +-1
vector; the recipes fold it into the weight (`sign_weight`) and mark the node (`QuantizedWeight.signs`), whose
execution multiplies x by it in x's own dtype (exact; before 2026-12-06 the signs rode in the float32 `smooth`
divisor, which made every rotated input float32).
"""
from __future__ import annotations

import contextlib
from functools import lru_cache, partial
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

HADAMARD_BASES = (1, 12, 20)        # m of a block m * 2^j (stored H_m for m > 1)
SIGN_SEED = 20240125                # fixed seed of `rotation_signs` (deterministic quantization)


def largest_pow2_divisor(d: int, cap: Optional[int] = None) -> int:
    """Largest power of 2 dividing d (and <= cap)."""
    b = d & -d
    if cap is not None:
        while b > cap:
            b //= 2
    return b


def _paley2(q: int, chi) -> np.ndarray:
    """Symmetric Hadamard matrix of order 2 (q + 1) (Paley construction II, q = 1 mod 4) from the
    quadratic character chi(a, b) = chi(a - b) of GF(q) given as a q x q matrix; entries +-1, float64."""
    c = np.zeros((q + 1, q + 1))
    c[0, 1:] = c[1:, 0] = 1.0
    c[1:, 1:] = chi
    h = np.kron(c, np.array([[1.0, -1.0], [-1.0, -1.0]])) + np.kron(np.eye(q + 1), np.array([[1.0, 1.0], [1.0, -1.0]]))
    return h


def _jacobsthal_prime(p: int) -> np.ndarray:
    squares = {(x * x) % p for x in range(1, p)}
    chi = lambda a: 0.0 if a % p == 0 else (1.0 if a % p in squares else -1.0)
    return np.array([[chi(a - b) for b in range(p)] for a in range(p)])


def _jacobsthal_gf9() -> np.ndarray:
    """GF(9) = GF(3)[i] / (i^2 + 1): elements a + b i, index 3 a + b."""
    els = [(a, b) for a in range(3) for b in range(3)]
    mul = lambda x, y: ((x[0] * y[0] - x[1] * y[1]) % 3, (x[0] * y[1] + x[1] * y[0]) % 3)
    squares = {mul(x, x) for x in els if x != (0, 0)}
    chi = lambda x: 0.0 if x == (0, 0) else (1.0 if x in squares else -1.0)
    sub = lambda x, y: ((x[0] - y[0]) % 3, (x[1] - y[1]) % 3)
    return np.array([[chi(sub(x, y)) for y in els] for x in els])


@lru_cache(maxsize=None)
def hadamard_base(m: int) -> np.ndarray:
    """The stored orthonormal, symmetric H_m (m in HADAMARD_BASES), float64 [m, m]; checked on build."""
    if m == 1:
        h = np.ones((1, 1))
    elif m == 12:
        h = _paley2(5, _jacobsthal_prime(5))
    elif m == 20:
        h = _paley2(9, _jacobsthal_gf9())
    else:
        raise ValueError(f"no stored Hadamard matrix of order {m}; stored: {HADAMARD_BASES}")
    if not (np.allclose(h @ h.T, m * np.eye(m)) and np.array_equal(h, h.T)):   # pragma: no cover
        raise AssertionError(f"stored H_{m} is not a symmetric Hadamard matrix")
    return h / np.sqrt(m)


def hadamard_factors(block: int) -> Tuple[int, int]:
    """block = m * p with m in HADAMARD_BASES and p a power of 2 -> (m, p); ValueError otherwise.
    The largest m that fits is taken (e.g. 24 -> (12, 2); 64 -> (1, 64))."""
    block = int(block)
    for m in sorted(HADAMARD_BASES, reverse=True):
        if block >= m and block % m == 0:
            p = block // m
            if p & (p - 1) == 0:
                return m, p
    raise ValueError(f"Hadamard block {block} is not of the form m * 2^j with m in {HADAMARD_BASES}")


def is_hadamard_block(block) -> bool:
    try:
        hadamard_factors(block)
        return int(block) >= 1
    except (ValueError, TypeError):
        return False


def hadamard_matrix(block: int) -> np.ndarray:
    """Dense orthonormal H_b [b, b] float64 (the reference `hadamard_transform` computes x @ blockdiag(H_b))."""
    m, p = hadamard_factors(block)
    hp = np.ones((1, 1))
    while hp.shape[0] < p:
        hp = np.block([[hp, hp], [hp, -hp]])
    return np.kron(hadamard_base(m), hp / np.sqrt(p))


def rotation_block(d_in: int, setting: Union[None, int, str] = None) -> int:
    """Hadamard block for an input dimension d_in under `QuantConfig.rotate_block`:
    None: the largest power of 2 dividing d_in (block-diagonal Hadamard, e.g. 512 for 1536);
    "full": the largest block m * 2^j (m in HADAMARD_BASES) dividing d_in (d_in itself when it has that
    form: 1536 = 12 * 128, 6144 = 12 * 512, 192 = 12 * 16);
    an int b = m * 2^j: a cap with b's base: m * (largest power of 2 <= 2^j dividing d_in / m) when m
    divides d_in, else the largest power of 2 <= b dividing d_in (so a power-of-2 b is the old cap).
    Returns 1 when no rotation fits (d_in odd)."""
    d_in = int(d_in)
    if setting is None:
        return largest_pow2_divisor(d_in)
    if setting == "full":
        best = 1
        for m in HADAMARD_BASES:
            if d_in % m == 0:
                best = max(best, m * largest_pow2_divisor(d_in // m))
        return best
    if isinstance(setting, bool) or not isinstance(setting, (int, np.integer)) or not is_hadamard_block(setting):
        raise ValueError(f"rotate_block must be None, 'full' or an int m * 2^j (m in {HADAMARD_BASES}), got {setting!r}")
    m, p = hadamard_factors(setting)
    if m > 1 and d_in % m == 0:
        return m * largest_pow2_divisor(d_in // m, p)
    return largest_pow2_divisor(d_in, int(setting))


def rotation_signs(k: int, seed: int = SIGN_SEED) -> np.ndarray:
    """Fixed random signs float32 [k] in {-1, +1} (QuaRot's randomised Hadamard diag(signs) H); the same
    vector for every layer of input dimension k."""
    rng = np.random.default_rng([int(seed), int(k)])
    return np.where(rng.random(int(k)) < 0.5, -1.0, 1.0).astype(np.float32)


def sign_weight(w_nk):
    """W [N, K] float32 -> W diag(rotation_signs(K)): the weight side of a node with `signs` (x -> signs * x)."""
    return w_nk * jnp.asarray(rotation_signs(w_nk.shape[-1]))[None, :]


HADAMARD_IMPLS = ("auto", "dense", "dense-sum", "dense-wide", "wide-sum", "full", "butterfly")
DENSE_CAP = 128                     # the 2^j factor applied as one dense matmul (the rest joins H_m)
_IMPL = ["auto"]                    # process-wide choice (`set_hadamard_impl`); "auto": `auto_impl`
_EXACT = [None]                     # process-wide exact_bf16 default (`set_exact_bf16`); None: on a GPU only
FULL_CAP = 2048                     # the largest block "full" runs as one +-1 GEMM (else "dense")


def auto_impl(block: int, backend: Optional[str] = None) -> str:
    """What "auto" runs for a block: on a GPU "full" up to `FULL_CAP` (one +-1 GEMM at cuBLAS speed: 53.9 us at
    8192 x 1536 vs 288.1 for "dense", 148.9 "dense-sum", 336.2 the butterflies; the paper preset's 1024-px step
    0.62x vs 0.51x of bf16; H100, benchmarks/RESULTS.md 2026-12-06 02:26) and "dense" above it (8192 x 6144,
    block 6144: 520.0 us vs 635.1 dense-sum, 1561.3 butterflies); elsewhere "dense" (unmeasured off GPU; the
    CPU figures of this project were made with it)."""
    backend = jax.default_backend() if backend is None else backend
    return "full" if backend == "gpu" and int(block) <= FULL_CAP else "dense"


def set_exact_bf16(value: Optional[bool]) -> Optional[bool]:
    """The process-wide default of `hadamard_transform(exact_bf16=None)`: None (on a GPU backend only), True (the
    GPU formulation everywhere: to study its numerics on a CPU) or False; returns the previous value. Read when a
    function is traced (clear jit caches after a change)."""
    if value not in (None, True, False):
        raise ValueError(f"exact_bf16 default must be None, True or False, got {value!r}")
    prev, _EXACT[0] = _EXACT[0], value
    return prev


@contextlib.contextmanager
def hadamard_impl(impl: str):
    """`set_hadamard_impl(impl)` for the duration of a with block (what is traced inside uses it)."""
    prev = set_hadamard_impl(impl)
    try:
        yield
    finally:
        set_hadamard_impl(prev)


def set_hadamard_impl(impl: str) -> str:
    """Choose how `hadamard_transform` runs (the same H; the previous choice is returned):
    "auto" (the default): per block and backend, `auto_impl`.
    "dense": x [.., g, c] -> (G (x) S_c) as two matmuls: S_c (the Sylvester +-1 matrix of
        the 2^j factor, c <= `DENSE_CAP`) on the last axis, then G = H_m (x) S_{2^j / c} (+-1, size <= 48 on
        DiT4SR) on the g axis; on a GPU each as a bf16 tensor-core GEMM with float32 accumulation that is exact:
        the +-1 entries are exact in bf16, and a float32 operand is split into three bf16 parts (hi + mid + lo,
        by bit truncation) whose products are exact, so only the float32 sums round (as the butterflies' do);
        off GPU, float32 matmuls at HIGHEST precision.
    "dense-sum": the same first matmul, G applied as an unrolled sum of +-rows (one elementwise XLA fusion).
    "dense-wide": "dense" with the whole 2^j factor (up to `FULL_CAP`) in the first matmul, so G = H_m alone
        (6144 = 12 x 512: one K = 512 GEMM, then H_12; "dense" runs K = 128, then H_12 (x) S_4). Not yet timed.
    "wide-sum": "full" up to `FULL_CAP`; above it the whole 2^j factor (up to `FULL_CAP`) as one +-1 GEMM on x
        as it comes (bf16 stays bf16: exact, no three-part split), then the rest of G (H_m alone on DiT4SR:
        6144 = 12 x 512) as m-term float32 sums (one elementwise XLA fusion that fuses into its consumers: no
        split, concatenation or transpose of the float32 intermediate, as "dense" needs for its second GEMM).
    "full": one +-1 matmul of the whole block (b <= `FULL_CAP`, else "dense"); exact on a GPU as "dense" is.
    "butterfly": the 2^j-point butterflies (one XLA fusion per stage on a GPU: 3.7-4.9x the cost of the whole
        W4A4 layer on an H100, benchmarks/gpu_notes.md), then H_m: the implementation before 2026-12-05."""
    if impl not in HADAMARD_IMPLS:
        raise ValueError(f"Hadamard implementation must be one of {HADAMARD_IMPLS}, got {impl!r}")
    prev, _IMPL[0] = _IMPL[0], impl
    return prev


def hadamard_transform(x, block: int, impl: Optional[str] = None, exact_bf16: Optional[bool] = None,
                       inner: str = "float32"):
    """x [..., K] -> x @ blockdiag(H_b, ..., H_b) (float32), H_b = H_m (x) H_{2^j} the orthonormal symmetric
    Hadamard matrix of size b = `block` = m * 2^j (m in HADAMARD_BASES), b dividing K. H_b H_b = I.
    x may be bf16 / f16 (used as is: exact +-1 products) or float32. impl: one of HADAMARD_IMPLS (None: the
    process-wide `set_hadamard_impl` choice); exact_bf16: run the matmuls as exact bf16 tensor-core GEMMs
    (None: on a GPU backend only; True on a CPU runs the GPU formulation, for tests). inner="bfloat16": in the GPU
    formulation (exact_bf16) of a two-stage "dense" block, the first stage's float32 output is rounded once to bf16
    so that the second stage is one bf16 GEMM instead of three on a three-part split (for callers that round x' to
    bf16 anyway: `prepare(..., xprime="bfloat16")`; the DiT4SR 6144 blocks); elsewhere ignored."""
    k = x.shape[-1]
    if not is_hadamard_block(block) or k % int(block):
        raise ValueError(f"Hadamard block {block} must be m * 2^j (a power of 2 times m in {HADAMARD_BASES}) "
                         f"dividing d_in={k}")
    if inner not in ("float32", "bfloat16"):
        raise ValueError(f"Hadamard inner dtype must be 'float32' or 'bfloat16', got {inner!r}")
    impl = _IMPL[0] if impl is None else impl
    if impl not in HADAMARD_IMPLS:
        raise ValueError(f"Hadamard implementation must be one of {HADAMARD_IMPLS}, got {impl!r}")
    if impl == "butterfly":
        return _hadamard(x.astype(jnp.float32), int(block))
    if exact_bf16 is None:
        exact_bf16 = _EXACT[0] if _EXACT[0] is not None else jax.default_backend() == "gpu"
    if impl == "auto":
        impl = auto_impl(block)
    if impl == "full" and int(block) > FULL_CAP:
        impl = "dense"
    if impl == "wide-sum" and int(block) <= FULL_CAP:
        impl = "full"
    return _hadamard_dense(x, int(block), impl, bool(exact_bf16), inner == "bfloat16" and bool(exact_bf16))


@lru_cache(maxsize=None)
def _pm1(n_or_block: int, kind: str) -> np.ndarray:
    """+-1 matrices (float32): kind "s" the Sylvester S_n; "full" the whole H_b * sqrt(b) (H_m (x) S_p for the
    b = m * p of `hadamard_factors`)."""
    if kind == "s":
        h = np.ones((1, 1))
        while h.shape[0] < n_or_block:
            h = np.block([[h, h], [h, -h]])
        return h.astype(np.float32)
    return np.rint(hadamard_matrix(n_or_block) * np.sqrt(n_or_block)).astype(np.float32)


def kronecker_plan(block: int, cap: int = DENSE_CAP) -> Tuple[int, int, np.ndarray]:
    """The "dense" form of H_b (b = m * p, `hadamard_factors`): (c, g, G) with c = min(p, cap) the Sylvester
    factor S_c applied to each run of c inputs, g = b / c and G = H_m (x) S_{p / c} (+-1, float32 [g, g],
    symmetric) mixing the g runs: H_b sqrt(b) = G (x) S_c, so x H_b = ((x_runs S_c) G) / sqrt(b)."""
    m, p = hadamard_factors(block)
    c = min(p, int(cap))
    return c, int(block) // c, np.kron(_pm1(m, "full"), _pm1(p // c, "s"))


def sylvester(n: int) -> np.ndarray:
    """The Sylvester +-1 matrix S_n (float32 [n, n], n a power of 2; S_n / sqrt(n) = H_n, symmetric)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester matrix order must be a power of 2, got {n}")
    return _pm1(int(n), "s")


def split_bf16(y):
    """float32 y -> (hi, mid, lo) bf16 with hi + mid + lo == y exactly (normal range): each part is the top 8
    significant bits left, by truncation of the float32 bit pattern (no rounding step that XLA's excess-precision
    rewrites could remove)."""
    def top(v):
        return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(v, jnp.uint32) & jnp.uint32(0xFFFF0000),
                                            jnp.float32)
    y = y.astype(jnp.float32)
    hi = top(y)
    r = y - hi
    mid = top(r)
    lo = r - mid
    return hi.astype(jnp.bfloat16), mid.astype(jnp.bfloat16), lo.astype(jnp.bfloat16)


def _pm1_dot(y, mat: np.ndarray, axis: int, exact_bf16: bool):
    """sum_a y[.., a, ..] mat[a, b] along `axis` (mat +-1, float32 [n, n]) -> float32 with b at `axis`.
    exact_bf16: bf16 operands (y as is when bf16 / f16, else its three-part split), float32 accumulation."""
    nd = y.ndim
    axis = axis % nd
    if not exact_bf16:
        parts, m = [y.astype(jnp.float32)], jnp.asarray(mat, jnp.float32)
        prec = jax.lax.Precision.HIGHEST
    elif y.dtype in (jnp.bfloat16, jnp.float16):
        parts, m, prec = [y], jnp.asarray(mat, y.dtype), None
    else:
        parts, m, prec = list(split_bf16(y)), jnp.asarray(mat, jnp.bfloat16), None
    if axis == nd - 1:                       # a plain 2-D GEMM [rows, n] x [n, n]
        lead = y.shape[:-1]
        n = y.shape[-1]
        lhs = jnp.concatenate([p.reshape(-1, n) for p in parts], axis=1) if len(parts) > 1 else parts[0].reshape(-1, n)
        rhs = jnp.concatenate([m] * len(parts), axis=0) if len(parts) > 1 else m
        out = jnp.dot(lhs, rhs, preferred_element_type=jnp.float32, precision=prec)
        return out.reshape(*lead, n)
    stacked = jnp.stack(parts, axis=axis) if len(parts) > 1 else jnp.expand_dims(parts[0], axis)
    rhs = jnp.stack([m] * len(parts), axis=0)                       # [s, a, b]
    out = jax.lax.dot_general(stacked, rhs, (((axis, axis + 1), (0, 1)), ((), ())), precision=prec,
                              preferred_element_type=jnp.float32)   # [.. (without s, a) .., b]
    return jnp.moveaxis(out, -1, axis)


def _pm1_sum(y, m: int, r: int):
    """y [rows, g, c] float32 (g = m r) -> y with G = H_m (x) S_r (+-1, r a power of 2) applied on axis 1 as
    unrolled elementwise sums (one XLA loop fusion, fusable into its consumers), factor by factor: S_r by r-point
    butterflies, then H_m by m-term sums, so each element costs m + log2 r additions instead of g (48 -> 14 on
    DiT4SR's 6144)."""
    rows, g, c = y.shape
    z = y.reshape(rows, m, r, c)
    h = 1
    while h < r:                                                   # S_r on axis 2 (Sylvester butterflies)
        z = z.reshape(rows, m, r // (2 * h), 2, h, c)
        u, v = z[:, :, :, 0], z[:, :, :, 1]
        z = jnp.stack([u + v, u - v], axis=3).reshape(rows, m, r, c)
        h *= 2
    if m > 1:                                                      # H_m on axis 1 (symmetric +-1)
        hm = _pm1(m, "full")
        z = jnp.stack([sum(float(hm[a, b]) * z[:, a] for a in range(m)) for b in range(m)], axis=1)
    return z.reshape(rows, g, c)


@partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _hadamard_dense(x, block: int, impl: str, exact_bf16: bool, inner_bf16: bool = False):
    m, p = hadamard_factors(block)
    k = x.shape[-1]
    lead = x.shape[:-1]
    if x.dtype not in (jnp.bfloat16, jnp.float16):
        x = x.astype(jnp.float32)
    if impl == "full":
        y = _pm1_dot(x.reshape(-1, block), _pm1(block, "full"), -1, exact_bf16)
    else:
        c, g, gmat = kronecker_plan(block, FULL_CAP if impl in ("dense-wide", "wide-sum") else DENSE_CAP)
        y = _pm1_dot(x.reshape(-1, g, c), _pm1(c, "s"), -1, exact_bf16)  # [rows, g, c] float32
        if g > 1:
            if impl in ("dense-sum", "wide-sum"):
                y = _pm1_sum(y, m, p // c)
            elif inner_bf16:                                         # one rounding: no three-part split
                y = _pm1_dot(y.astype(jnp.bfloat16), gmat, 1, exact_bf16)
            else:                                                    # G = H_m (x) S_{p / c}, +-1
                y = _pm1_dot(y, gmat, 1, exact_bf16)
    return (y * np.float32(1.0 / np.sqrt(block))).reshape(*lead, k)


@partial(jax.jit, static_argnums=1)
def _hadamard(x, block: int):
    m, p = hadamard_factors(block)
    k = x.shape[-1]
    lead = x.shape[:-1]
    nb = k // block
    y = x.astype(jnp.float32).reshape(*lead, nb, m, p)
    h = 1
    while h < p:
        y = y.reshape(*lead, nb, m, p // (2 * h), 2, h)
        a, c = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + c, a - c], axis=-2)
        h *= 2
    y = y.reshape(*lead, nb, m, p) * (1.0 / np.sqrt(np.float32(p))).astype(np.float32)
    if m > 1:                                # H_m symmetric: y[.., a', :] = sum_a H_m[a', a] y[.., a, :]
        hm = jnp.asarray(hadamard_base(m), jnp.float32)
        y = jnp.einsum("...ap,ca->...cp", y, hm, precision=jax.lax.Precision.HIGHEST)
    return y.reshape(*lead, k)


def smooth_scale(ch_absmax, w_nk, alpha: float, eps: float = 1e-5):
    """SmoothQuant migration scale s [K] = max|X_j|^alpha / max_n|W_nj|^(1-alpha) (float32).
    Channels never active (max|X_j| = 0) or with an all-zero weight column get s = 1."""
    xa = jnp.asarray(ch_absmax, jnp.float32)
    wa = jnp.max(jnp.abs(w_nk.astype(jnp.float32)), axis=0)
    s = jnp.power(jnp.maximum(xa, eps), alpha) / jnp.power(jnp.maximum(wa, eps), 1.0 - alpha)
    ok = (xa > 0) & (wa > 0) & jnp.isfinite(s)
    return jnp.where(ok, jnp.maximum(s, eps), 1.0)
