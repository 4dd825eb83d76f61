"""The small types and rules every fused-kernel module shares (a leaf of `quant.kernels`): the kernels' tile
configuration `KernelConfig` and its defaults, which layers they tile (`tiles_ok`), whether packed codes are
split inside the kernel (`unpacks_in_kernel`), and the prologue's output `Operands` that the GEMM kernels read.
Imports only the weight node and `branch_ops` (for `BranchWeights`, `is_tile`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from qdit4sr_jax.quant.kernels.branch_ops import BranchWeights, is_tile
from qdit4sr_jax.quant.qweight import QuantizedWeight


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of the Pallas kernel. block_k is the K step per loop iteration for per-channel weights
    (group-wise weights step one group at a time). num_warps / num_stages go to Triton."""
    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    num_warps: int = 8
    num_stages: int = 3
    unpack: str = "xla"           # packed 4-bit weights: "xla" (unpacked to int8 per call, outside the
                                  # kernel) or "kernel" (nibbles split in registers inside the K loop)
    prologue_block_m: int = 16    # rows per program of the prologue kernel (prepared weights, prologue="pallas")
    prologue_warps: int = 4
    prologue_rot_warps: int = 8   # the same for rotated layers (the rotation inside the kernel): H100, 8192 x 1536
                                  # paper layer 179.8 us at 8 warps vs 256.2 at 4 (RESULTS.md 2026-12-06 04:40)

    @property
    def packed_in_kernel(self) -> bool:
        if self.unpack not in ("xla", "kernel"):
            raise ValueError(f"KernelConfig.unpack must be 'xla' or 'kernel', got {self.unpack!r}")
        return self.unpack == "kernel"


DEFAULT_CONFIG = KernelConfig()                  # per-channel weights ("nk")
# group-wise weights ("gnk"): 4 warps; H100 sweep (RESULTS.md, 08:18 run) at M=8525: 0.89 vs 1.49 ms
# (K=1536, N=6144), 1.09 vs 1.67 ms (K=6144, N=1536) for 4 vs 8 warps with 128x128 tiles.
GROUPED_CONFIG = KernelConfig(num_warps=4)


_PROLOGUE = {}                                   # process-wide prologue tile override (`set_prologue_tiles`)


def default_config(w: QuantizedWeight) -> KernelConfig:
    """Tile sizes used when `fused_linear` gets no config: by weight layout (with `set_prologue_tiles`' choice)."""
    cfg = GROUPED_CONFIG if w.layout == "gnk" else DEFAULT_CONFIG
    return dataclasses.replace(cfg, **_PROLOGUE) if _PROLOGUE else cfg


def set_prologue_tiles(**fields) -> dict:
    """Process-wide prologue kernel tiles for calls without a config (benchmarks sweep them in whole steps):
    prologue_block_m / prologue_warps / prologue_rot_warps as ints; no arguments restores the defaults.
    Returns the previous override."""
    bad = set(fields) - {"prologue_block_m", "prologue_warps", "prologue_rot_warps"}
    if bad or any(not isinstance(v, int) or v < 1 for v in fields.values()):
        raise ValueError(f"set_prologue_tiles takes positive ints for prologue_block_m / prologue_warps / "
                         f"prologue_rot_warps, got {fields}")
    prev = dict(_PROLOGUE)
    _PROLOGUE.clear()
    _PROLOGUE.update(fields)
    return prev


def supports_fused(w: QuantizedWeight, bits) -> bool:
    """True when the fused path covers this node at these activation bits (else the reference int path)."""
    return bits is not None and w.a_symmetric and w.zero is None


def unpacks_in_kernel(w: QuantizedWeight, cfg: KernelConfig) -> bool:
    """Whether the kernel gets packed 4-bit bytes and splits the nibbles itself (unpack="kernel").
    Codes packed at other widths (2, 3, 5..7 bits: `quantizer.pack_codes`) are always unpacked to int8
    outside the kernel, like unpack="xla".
    Two-level ("int") group scales always arrive as folded int8 codes c * q (`QuantizedWeight.codes()`,
    once per call outside the kernel): with them unpack="kernel" falls back to unpack="xla"."""
    return bool(w.nibbles and cfg.packed_in_kernel and w.gscale is None)


def packed_run(w: QuantizedWeight, cfg: KernelConfig) -> int:
    """Input-channel run over which packed codes are split [even | odd] (one kernel K step)."""
    if not unpacks_in_kernel(w, cfg):
        return 0
    if w.layout == "gnk":
        return w.groups[1]
    return min(cfg.block_k, w.k)


def block_rows(w: QuantizedWeight) -> int:
    """b_out of the block branch (output columns sharing one D slice); N when there is none."""
    return w.block[0] if w.block_u is not None else w.n


def tiles_ok(w: QuantizedWeight, cfg: KernelConfig) -> bool:
    """Whether the Pallas kernel tiles this layer: power-of-2 tiles dividing N, K steps dividing K,
    packed runs of even length, output tiles inside one block row of the block branch (and of a blocked low-rank
    branch)."""
    bn, bk = cfg.block_n, cfg.block_k
    packed = unpacks_in_kernel(w, cfg)
    if not (is_tile(cfg.block_m) and is_tile(bn) and w.n % bn == 0):
        return False
    if w.block_u is not None and block_rows(w) % bn:
        return False
    if w.lr_a is not None and w.lr_groups > 1 and (w.n // w.lr_groups) % bn:    # tiles inside one low-rank block
        return False
    if w.layout == "gnk":
        G, g = w.groups
        step = g // 2 if packed else g
        return is_tile(step) and G * g == w.k
    step = bk // 2 if packed else bk
    return is_tile(step) and w.k % bk == 0


@dataclasses.dataclass(frozen=True)
class Operands:
    """Prologue output. xq int8 [Mp, Kp] (packed: [even|odd] per chunk), sx f32 [Mp], branch features dh
    [Mp, Rl] / dt [Mp, n_bo Rb] (branch dtype) or None and their weights bw (`branch_ops.BranchWeights`, None
    without branches), m the unpadded rows, chunk the [even | odd] run length of packed codes (0: not split).
    joint: dh and dt are both (where present) the joint features [dh | dt] [Mp, dt_col + n_bo Rb] of one GEMM
    (`branch_ops.joint_features`), which the GEMM kernel reads in place: dh in columns [0, Rl), dt from
    `bw.dt_col` (a multiple of Rb); col: the first column of this layer's [dh | dt] in them (a `SharedDown`'s
    features, `bw.jd_col`: a multiple of Rl and Rb), else 0. sx_inv / sx_step: with a VaTMP level table, sx
    may hold each row's max|x'| instead of its scale, which is then max(sx * sx_inv[clip(step, 0, T - 1)],
    2^-126) (`row_scale`), computed by the GEMM kernel: sx_inv the layer's 1 / levels float32 [T], sx_step the
    traced step int32 [1]. The max-reduce then does not depend on the layer's levels and is one for the
    layers reading one x' (to_q / to_k / to_v: XLA's common-subexpression elimination), and the scale is no
    array of its own (a kernel per layer when the Pallas kernel reads it). With the table, sx may also be the run
    maxima float32 [Mp, g] of the Mosaic Hadamard kernel (`prologue_mosaic`), whose max over axis 1 is the row's:
    the Mosaic GEMM takes it in its epilogue (no reduce kernel per layer), other consumers read `sx_rows`."""
    xq: jax.Array
    sx: jax.Array
    dh: Optional[jax.Array]
    dt: Optional[jax.Array]
    bw: Optional[BranchWeights]
    m: int
    chunk: int
    joint: bool = False
    col: int = 0
    sx_inv: Optional[jax.Array] = None
    sx_step: Optional[jax.Array] = None

    @property
    def sx_rows(self):
        """sx per row, float32 [Mp]: sx itself, or the max of its run maxima [Mp, g]."""
        return self.sx if self.sx.ndim == 1 else jnp.max(self.sx, axis=1)

    def row_scale(self):
        """The per-row scale s_x, float32 [Mp] (sx itself, or computed from the row maxima and the table)."""
        if self.sx_inv is None:
            return self.sx
        return scale_from_max(self.sx_rows, self.sx_inv, self.sx_step)


SCALE_FLOOR = 2.0 ** -126         # the smallest normal float32: the scale of an all-zero row under a level table


def scale_from_max(amax, inv_levels, step):
    """Per-row scale max(amax * inv_levels[clip(step, 0, T - 1)], 2^-126), float32 of amax's shape (amax
    float32 [...], inv_levels float32 [T], step int32 scalar or [1]): the value of max(max_k |x'_k| / levels,
    2^-126), since rounding is monotone. Shared by the XLA prologue, the GEMM kernel and `Operands.row_scale`,
    so that the codes and the epilogue use one scale to the bit."""
    t = inv_levels.shape[0]
    i = jnp.clip(jnp.reshape(jnp.asarray(step, jnp.int32), (-1,))[0], 0, t - 1)
    return scale_from_level(amax, inv_levels[i])


def scale_from_level(amax, inv_level):
    """max(amax * inv_level, 2^-126): `scale_from_max` once the step's 1 / levels is looked up (the form the GEMM
    kernels use, which index their table refs themselves)."""
    return jnp.maximum(amax * inv_level, SCALE_FLOOR)


def codes_from_scale(xf, scale, level):
    """int8 codes clip(round(x' / s), +-level) of float32 x' (scale broadcastable to it): the one formula of the
    XLA prologue, the Mosaic prologues and the Hadamard kernel, so that their codes agree to the bit on one x'."""
    return jnp.clip(jnp.round(xf / scale), -level, level).astype(jnp.int8)


def codes_from_inverse(xf, inv_scale, level):
    """int8 codes clip(round(x' * (1 / s)), +-level) of float32 x', inv_scale = 1 / s broadcastable to it: the
    Mosaic Hadamard kernel's form (one division per row instead of one per element; with the per-element division,
    the likely main cost, its codes epilogue cost as much as the rotation: 36.8 vs 17.4 us at 4096 x 1536 with
    three members, H200 2026-12-07). It can differ
    from `codes_from_scale` by one code where x' / s lies within a float32 ulp of a rounding boundary."""
    return jnp.clip(jnp.round(xf * inv_scale), -level, level).astype(jnp.int8)


__all__ = ["KernelConfig", "DEFAULT_CONFIG", "GROUPED_CONFIG", "default_config", "set_prologue_tiles", "supports_fused",
           "unpacks_in_kernel", "packed_run", "block_rows", "tiles_ok", "Operands", "SCALE_FLOOR", "scale_from_max",
           "scale_from_level", "codes_from_scale", "codes_from_inverse"]
