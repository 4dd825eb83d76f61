"""`QuantConfig`: every number that decides how a model is quantized, with named presets.

Presets are named "<method>-<wXaY>", e.g. "rtn-w4a4", "smoothquant-w8a8", "svdquant-w4a4",
"rotation-w4a6", "qdit4sr-w4a4"; the bare "w8a8", "w4a8", "w4a6", "w4a4" mean RTN.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

# Linear layers quantized by default: every linear inside the joint blocks (attention q/k/v/out of all
# streams, the LR-stream *_control projections, FFNs, adaLN modulation linears). Regexes over the
# '/'-joined parameter path of the linear module (the path of its `kernel` without '/kernel').
DEFAULT_INCLUDE = (r"(^|/)transformer_blocks_\d+/",)
DEFAULT_EXCLUDE: Tuple[str, ...] = ()

from qdit4sr_jax.quant.presets import METHODS, preset_fields
from qdit4sr_jax.quant.transforms import HADAMARD_BASES, is_hadamard_block


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize. Bit-widths are targets (averages, under mixed precision).

    method: one of presets.METHODS ("rtn" | "smoothquant" | "svdquant" | "rotation" | "qdit4sr" | "qdit4sr-smooth" |
      "qdit4sr-paper"; a name only: the fields below say what runs).
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
    vatmp_step_weights: how VaTMP weighs the sampling steps. "none" (default, the paper): sum_t sigma_{l,t}^2
      2^(-2 a_t). "sensitivity": each step's term times the sampler's measured step gain (quant/stepgain.py:
      how much an error in the model output at that step reaches the final sample), read from the calibration
      statistics' "step_gain" (`calibrate_images(..., step_gains=True)`); matters with few sampling steps.
    vasmp_solver: "dp" (default: the exact multiple-choice knapsack, vasmp.py) or "greedy" (the paper's
      continuous relaxation - reverse water-filling on n sigma^2 2^(-2b), or the LP over each layer's convex
      hull for a measured table - then greedy discretisation; vasmp.allocate_*(solver="greedy")).
    vasmp_distortion: VaSMP's per-layer distortion at each candidate: "measured" (default: the squared
      error of this config's weight quantizer on the layer's residual, data-free) or "model" (MISSION.md's
      n sigma^2 2^(-2b); it under-rates the 2-bit error of a symmetric quantizer ~3x, so it over-uses 2 bits).
    hsvd_refine_iters: extra alternating refits of the H-SVD global / block branches (0 = the paper's
      order: global SVD, then blocks on what remains).
    hsvd_block_solver: rank-1 fit of each block: "subspace" (default; batched matmuls, ~100x faster than
      XLA:CPU's batched SVD on 256 x 256 blocks, <= 0.1% more block residual on random blocks) or "svd" (exact).
    rotate: Hadamard rotation of the input dimension (QuaRot-style).
    execution: "fake" (float reference), "int" (int8 dot_general) or "fused" (quant/kernels) - same semantics.
    branch_dtype: dtype of the 16-bit branches.
    w_clip_ratio: weight range multiplier before the scale is computed (1.0 = plain min/max RTN).
    w_clip_search: per weight group, search the clip ratio in [0.5, 1] x w_clip_ratio minimising the
      weight MSE (data-free; like AWQ's clip search without activations).
    rotate_block: Hadamard block size (transforms.rotation_block): None = the largest power of 2 dividing d_in
      (block-diagonal Hadamard when d_in is not a power of 2, e.g. 512 for 1536); "full" = the whole input
      dimension where it is m * 2^j with m in (1, 12, 20) (1536 = 12 * 128, 6144 = 12 * 512; QuaRot's
      choice), else its largest such divisor; an int m * 2^j = a cap of that form.
    rotate_signs: QuaRot's randomised Hadamard diag(signs) H with fixed random signs
      (transforms.rotation_signs), folded into the weight and marked on the node (`QuantizedWeight.signs`,
      static: x -> signs * x in x's dtype, exact, then H). Needs rotate.
    pack: store codes below 8 bits packed at their bit width (uint8, `quantizer.pack_codes`; 8-bit codes stay int8).
    lowrank_svd: "exact" (jnp.linalg.svd) or "randomized" (power-iteration range finder, Halko et al. 2011;
      O(N K r), for CPU quantization of the full model) for the low-rank branch.
    layer_w_bits: per-layer weight bits ((path, bits), ...) overriding w_bits (VaSMP's output; exact
      '/'-joined linear-module paths as in the params tree).
    w_group_scale: how group-wise weight scales are stored and executed. "float" (default): a float32 scale
      per (row, group) (0.5 bit per weight at group 64; the int8 kernels scale every group's partial sum).
      "int": two-level scales W ~ s[n] c[n, group] q (QServe-style progressive scales): s float32 per
      output channel, c an integer in 1..min(16, 127 // qmax) per group (4-bit packed: 0.0625 bit per
      weight at group 64) chosen by a per-group search for the least squared error; c * q is folded into
      int8 codes, so the layer runs at per-channel kernel speed (benchmarks/gpu_notes.md). Needs
      w_group_size and symmetric weights; layers with one group or 8-bit weights (c_max = 1) get plain
      per-channel scales. Presets "<method>-wXaY-fast" select it.
    lowrank_bits: storage of the low-rank / H-SVD branch factors. None (default): `branch_dtype`. 8: int8
      codes with one `branch_dtype` scale per factor vector (lr_a per input channel, lr_b per output
      channel, block u / v per block vector), dequantized on the fly by every execution path; the quantized residual is
      W' - (int8 branch), so it absorbs the branch rounding (qweight.make_qweight). Halves the branch
      bytes (full DiT4SR at W4A4: 0.158 -> 0.084 GB). No effect without branches (lowrank_rank 0).
      Presets "<method>-wXaY-small" = "-fast" + lowrank_bits=8.
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
    vasmp_distortion: str = "measured"
    vatmp_step_weights: str = "none"
    vasmp_solver: str = "dp"
    hsvd_refine_iters: int = 0
    hsvd_block_solver: str = "subspace"
    rotate: bool = False
    execution: str = "fake"
    branch_dtype: str = "bfloat16"
    w_clip_ratio: float = 1.0
    w_clip_search: bool = False
    rotate_block: Union[None, int, str] = None
    rotate_signs: bool = False
    pack: bool = True
    lowrank_svd: str = "exact"
    layer_w_bits: Tuple[Tuple[str, int], ...] = ()
    w_group_scale: str = "float"
    lowrank_bits: Optional[int] = None

    @property
    def needs_calibration(self) -> bool:
        """True when `quantize` needs activation statistics: smoothing (per-channel absmax) or VaTMP
        (per-layer, per-step activation variances)."""
        return bool(self.smooth or (self.vatmp and self.a_bits is not None))

    @property
    def needs_step_gains(self) -> bool:
        """True when VaTMP weights its steps by measured sensitivities: calibrate with step_gains=True."""
        return bool(self.vatmp and self.a_bits is not None and self.vatmp_step_weights == "sensitivity")

    def validate(self) -> "QuantConfig":
        """Raise ValueError naming the bad field; returns self."""
        if self.method not in METHODS:
            raise ValueError(f"QuantConfig.method={self.method!r} is unknown; known: {METHODS}")
        if self.execution not in ("fake", "int", "fused"):
            raise ValueError(f"QuantConfig.execution must be 'fake', 'int' or 'fused', got {self.execution!r}")
        mixed_w = self.vasmp
        mixed_a = self.vatmp
        for name, bits, mixed in (("w_bits", self.w_bits, mixed_w), ("a_bits", self.a_bits, mixed_a)):
            if bits is None and name == "a_bits":
                continue
            if not isinstance(bits, (int, float)) or isinstance(bits, bool) or not 2 <= bits <= 8:
                raise ValueError(f"QuantConfig.{name}={bits!r} is unsupported: use 2..8"
                                 + (" (None keeps activations in float)" if name == "a_bits" else ""))
            if not mixed and float(bits) != int(bits):
                raise ValueError(f"QuantConfig.{name}={bits} is fractional; fractional averages need "
                                 f"mixed precision ({'vasmp' if name == 'w_bits' else 'vatmp'}=True)")
        for name, cands in (("w_bit_candidates", self.w_bit_candidates),
                            ("a_bit_candidates", self.a_bit_candidates)):
            bad = [b for b in cands if not isinstance(b, int) or not 2 <= b <= 8]
            if bad or not cands:
                raise ValueError(f"QuantConfig.{name}={cands!r}: every candidate must be an int in 2..8")
        for path, bits in self.layer_w_bits:
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                raise ValueError(f"QuantConfig.layer_w_bits: layer {path!r} has unsupported bits {bits!r} (2..8)")
        if self.w_group_size is not None and self.w_group_size < 1:
            raise ValueError(f"QuantConfig.w_group_size must be >= 1 or None, got {self.w_group_size}")
        if self.vatmp_step_weights not in ("none", "sensitivity"):
            raise ValueError(f"QuantConfig.vatmp_step_weights must be 'none' or 'sensitivity', "
                             f"got {self.vatmp_step_weights!r}")
        if self.w_group_scale not in ("float", "int"):
            raise ValueError(f"QuantConfig.w_group_scale must be 'float' or 'int', got {self.w_group_scale!r}")
        if self.w_group_scale == "int" and self.w_group_size is None:
            raise ValueError("QuantConfig.w_group_scale='int' (two-level integer group scales) needs a group size: "
                             "set w_group_size (e.g. 64), or use w_group_scale='float' for per-channel scales")
        if self.w_group_scale == "int" and not self.w_symmetric:
            raise ValueError("QuantConfig.w_group_scale='int' needs w_symmetric=True: a per-group zero point "
                             "cannot be folded into the int8 codes")
        if self.lowrank_svd not in ("exact", "randomized"):
            raise ValueError(f"QuantConfig.lowrank_svd must be 'exact' or 'randomized', got {self.lowrank_svd!r}")
        if self.lowrank_bits is not None and (isinstance(self.lowrank_bits, bool) or self.lowrank_bits != 8):
            raise ValueError(f"QuantConfig.lowrank_bits={self.lowrank_bits!r} is unsupported: use None (branch "
                             f"factors kept in branch_dtype={self.branch_dtype!r}) or 8 (int8 factors with "
                             f"per-vector scales)")
        if self.lowrank_rank < 0:
            raise ValueError(f"QuantConfig.lowrank_rank must be >= 0, got {self.lowrank_rank}")
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"QuantConfig.smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        if self.rotate_block is not None and self.rotate_block != "full" and not is_hadamard_block(self.rotate_block):
            raise ValueError(f"QuantConfig.rotate_block must be None, 'full' or an int m * 2^j with m in "
                             f"{HADAMARD_BASES} (e.g. 256, 1536 = 12 * 128), got {self.rotate_block!r}")
        if self.rotate_signs and not self.rotate:
            raise ValueError("QuantConfig.rotate_signs=True (randomised Hadamard) needs rotate=True")
        if self.vasmp_solver not in ("dp", "greedy"):
            raise ValueError(f"QuantConfig.vasmp_solver must be 'dp' or 'greedy', got {self.vasmp_solver!r}")
        return self

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        return {k: ([list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v)
                for k, v in d.items()}

    @staticmethod
    def from_dict(d: dict) -> "QuantConfig":
        """Inverse of `to_dict`; unknown keys raise ValueError."""
        names = {f.name for f in dataclasses.fields(QuantConfig)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"QuantConfig: unknown fields {unknown}")
        tup = lambda v: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
        return QuantConfig(**{k: tup(v) for k, v in d.items()})

    def replace(self, **kw) -> "QuantConfig":
        return dataclasses.replace(self, **kw)

    @staticmethod
    def preset(name: str) -> "QuantConfig":
        """The named preset (quant/presets.py), validated."""
        return QuantConfig(**preset_fields(name)).validate()
