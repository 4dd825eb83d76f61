"""`QuantConfig`: every number that decides how a model is quantized, with named presets.

Presets are named "<method>-<wXaY>", e.g. "rtn-w4a4", "smoothquant-w8a8", "svdquant-w4a4",
"rotation-w4a6", "qdit4sr-w4a4"; the bare "w8a8", "w4a8", "w4a6", "w4a4" mean RTN.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

# Linear layers quantized by default: every linear inside the joint blocks (attention q/k/v/out of all
# streams, the LR-stream *_control projections, FFNs, adaLN modulation linears). Regexes over the
# '/'-joined parameter path of the linear module (the path of its `kernel` without '/kernel').
DEFAULT_INCLUDE = (r"(^|/)transformer_blocks_\d+/",)
DEFAULT_EXCLUDE: Tuple[str, ...] = ()

METHODS = ("rtn", "smoothquant", "svdquant", "rotation", "qdit4sr")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize. Bit-widths are targets (averages, under mixed precision).

    method: "rtn" | "smoothquant" | "svdquant" | "rotation" | "qdit4sr".
    w_bits / a_bits: weight and activation bits (a_bits=None keeps activations in float).
    w_group_size: group size along the input dimension (None = per output channel). SVDQuant uses 64.
    a_granularity: activations are quantized dynamically per token (SVDQuant, QuaRot do the same).
    include / exclude: regexes over linear-module paths (see DEFAULT_INCLUDE).
    smooth / smooth_alpha: SmoothQuant-style migration s_j = max|X_j|^a / max|W_j|^(1-a) (alpha 0.5 in
      the SmoothQuant paper); needs calibration statistics.
    lowrank_rank: rank of the 16-bit low-rank branch (SVDQuant uses 32); for H-SVD the matched budget.
    hsvd / hsvd_block: H-SVD on (b_out, b_in) blocks (MISSION.md's example uses 256x256 at d=1536).
    vasmp / w_bit_candidates: data-free per-layer weight bits (VaSMP) from this candidate set.
    vatmp / a_bit_candidates: per-layer, per-timestep activation bits (VaTMP) from this candidate set.
    rotate: Hadamard rotation of the input dimension (QuaRot-style).
    execution: "fake" (float reference) or "int" (int8 dot_general) - same semantics.
    branch_dtype: dtype of the 16-bit branches.
    """
    method: str = "rtn"
    w_bits: float = 4
    a_bits: Optional[float] = 4
    w_group_size: Optional[int] = 64
    w_symmetric: bool = True
    a_symmetric: bool = True
    include: Tuple[str, ...] = DEFAULT_INCLUDE
    exclude: Tuple[str, ...] = DEFAULT_EXCLUDE
    smooth: bool = False
    smooth_alpha: float = 0.5
    lowrank_rank: int = 0
    hsvd: bool = False
    hsvd_block: Tuple[int, int] = (256, 256)
    vasmp: bool = False
    w_bit_candidates: Tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    vatmp: bool = False
    a_bit_candidates: Tuple[int, ...] = (3, 4, 5, 6, 8)
    rotate: bool = False
    execution: str = "fake"
    branch_dtype: str = "bfloat16"

    def replace(self, **kw) -> "QuantConfig":
        return dataclasses.replace(self, **kw)

    @staticmethod
    def preset(name: str) -> "QuantConfig":
        from qdit4sr_jax.quant.presets import preset
        return preset(name)
