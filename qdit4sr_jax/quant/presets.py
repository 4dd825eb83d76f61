"""Named `QuantConfig` presets: "<method>-w<X>a<Y>" (e.g. "rtn-w4a4", "smoothquant-w8a8",
"svdquant-w4a4", "rotation-w4a6", "qdit4sr-w4a4", "qdit4sr-paper-w4a4") and the bare "w8a8", "w4a8", "w4a6", "w4a4" (RTN).
Any X in 2..8 and Y in 2..8 parses; "a16" keeps activations in float (weight-only).
A "-fast" suffix (e.g. "qdit4sr-w4a4-fast", "svdquant-w4a4-fast") keeps the method's group size but stores
the group scales as two-level integer scales (`QuantConfig.w_group_scale="int"`: per-channel float scale
times a 4-bit integer factor per group, folded into the int8 codes), so the layers run through the
per-channel int8 kernels; only for presets with group-wise weights. A "-small" suffix (e.g.
"qdit4sr-w4a4-small", "svdquant-w4a4-small") is "-fast" plus int8 storage of the low-rank / H-SVD branch
factors (`QuantConfig.lowrank_bits=8`: per-vector scales, half the branch bytes); only for methods with a
branch (svdquant, qdit4sr). A final "-sens" suffix (e.g. "qdit4sr-w4a4-sens", "qdit4sr-w4a4-small-sens") weights
VaTMP's steps by the sampler's measured step sensitivities (`QuantConfig.vatmp_step_weights="sensitivity"`,
quant/stepgain.py; calibrate with `calibrate_images(..., step_gains=True)`): an extension of the paper, only for
qdit4sr. At W4A4 it gained 2.4 dB PSNR vs FP over the paper's VaTMP on the 4-step demo model shipped before
2026-12-04 (5.6 dB with 2 steps), and 1.5 dB on the current 2-step demo model (benchmarks/RESULTS.md, 2026-12-04).

Per-method settings (and where they come from):
- rtn:          weights RTN group 64 (per channel at 8 bits), activations per token.
- smoothquant:  alpha 0.5, per-channel weights, per-token activations (SmoothQuant, Xiao et al. 2023).
- svdquant:     smoothing alpha 0.5, rank-32 16-bit branch, 4-bit group-64 residual (SVDQuant, Li et al. 2025).
- rotation:     randomised Hadamard diag(signs) H over the whole d_in (1536 = H_12 kron H_128), RTN weights
                (QuaRot-RTN, Ashkboos et al. 2024), group 64 at <= 4 bits. Before 2026-12-05 it was the block
                Hadamard of the largest power of 2 without signs: on post-GELU / post-SiLU inputs (ff/net_2,
                norm1/linear) a plain Hadamard turns the common positive offset into one huge coefficient
                (per-token kurtosis 44 on ff/net_2; benchmarks/RESULTS.md, rotation study).
- qdit4sr:      the recommended Q-DiT4SR: smoothing alpha 0.5 (as SVDQuant), then the randomised full Hadamard
                (x / s, then diag(signs) H), H-SVD at SVDQuant's rank-32 budget, VaSMP weight bits, VaTMP activation
                schedule. The winner of the rotation study (benchmarks/RESULTS.md, 2026-12-05, data/val, chosen on
                data/dev): W4A4 PSNR vs FP 32.65 dB vs 32.36 for the paper as drawn, 31.63 SVDQuant-style, 31.18
                smoothing alone (3 steps); first again at 20 steps. Until 2026-12-05 "qdit4sr" meant smoothing alone
                (now "qdit4sr-smooth"); "qdit4sr-rot" is kept as another name of "qdit4sr" for the recorded commands.
- qdit4sr-smooth: qdit4sr without the rotation (smoothing only before H-SVD): the preset's meaning before 2026-12-05.
                Without smoothing or rotation W4A4 lost 4.6 dB PSNR vs FP to SVDQuant on the demo model (per-token A4
                needs the outliers migrated).
- qdit4sr-paper: the paper's method as its overview figure draws it (arXiv 2602.01273, figs/overview.png): an
                orthonormal Hadamard of the whole input dimension (rotate_block="full": 1536 = H_12 kron H_128,
                6144 = H_12 kron H_512) with QuaRot's random signs, no smoothing, H-SVD of the rotated weight
                at SVDQuant's rank-32 budget, VaSMP from the residual variance (n sigma^2 2^(-2b)) solved by
                continuous relaxation + greedy discretisation, VaTMP; bit candidates (X-1, X, X+1) around the
                target (3, 4, 5 at W4A4, as the figure's cells; (5, 6, 7) for A6, whose average 6 a {3, 4, 5}
                set cannot reach).
"""
from __future__ import annotations

import re

METHODS = ("rtn", "smoothquant", "svdquant", "rotation", "qdit4sr", "qdit4sr-smooth", "qdit4sr-paper", "qdit4sr-rot")
ALIASES = {"qdit4sr-rot": "qdit4sr"}    # an earlier name, kept so that recorded commands still run

_METHOD_FIELDS = {
    "rtn": {},
    "smoothquant": dict(smooth=True, smooth_alpha=0.5, w_group_size=None),
    "svdquant": dict(smooth=True, smooth_alpha=0.5, lowrank_rank=32, w_group_size=64),
    "rotation": dict(rotate=True, rotate_block="full", rotate_signs=True),
    "qdit4sr-smooth": dict(smooth=True, smooth_alpha=0.5, hsvd=True, lowrank_rank=32, vasmp=True, vatmp=True),
    "qdit4sr": dict(smooth=True, smooth_alpha=0.5, rotate=True, rotate_block="full", rotate_signs=True, hsvd=True,
                        lowrank_rank=32, vasmp=True, vatmp=True),
    "qdit4sr-paper": dict(rotate=True, rotate_block="full", rotate_signs=True, smooth=False, hsvd=True,
                          lowrank_rank=32, vasmp=True, vatmp=True, vasmp_solver="greedy", vasmp_distortion="model"),
}
PAPER_METHODS = ("qdit4sr-paper",)      # bit candidates (X-1, X, X+1) around the target bits

_METHOD_RE = "|".join(re.escape(m) for m in sorted(METHODS, key=len, reverse=True))   # longest first
_NAME = re.compile(rf"^(?:(?P<method>{_METHOD_RE})-)?w(?P<w>\d+)a(?P<a>\d+)(?P<fast>-fast|-small)?(?P<sens>-sens)?$")


def preset_fields(name: str) -> dict:
    """QuantConfig fields for a preset name (`QuantConfig.preset` builds and validates the config from them);
    ValueError listing the grammar for unknown names. This module imports nothing of the project, so that
    quant/config.py can use it."""
    m = _NAME.match(name.strip().lower())
    if not m:
        raise ValueError(f"unknown quantization preset {name!r}: use '<method>-w<bits>a<bits>[-fast|-small][-sens]' with method "
                         f"in {METHODS} (or bare 'w8a8', 'w4a8', 'w4a6', 'w4a4' for RTN)")
    method = ALIASES.get(m.group("method") or "rtn", m.group("method") or "rtn")
    w, a = int(m.group("w")), int(m.group("a"))
    if not 2 <= w <= 8 or not (2 <= a <= 8 or a == 16):
        raise ValueError(f"preset {name!r}: weight bits must be 2..8 and activation bits 2..8 or 16")
    fields = dict(_METHOD_FIELDS[method])
    if method in PAPER_METHODS:
        around = lambda b: tuple(c for c in (b - 1, b, b + 1) if 2 <= c <= 8)
        fields["w_bit_candidates"] = around(w)
        if a != 16:
            fields["a_bit_candidates"] = around(a)
    if w == 8 and method == "rtn":
        fields["w_group_size"] = None                 # W8: per-channel is already near-lossless
    suffix = m.group("fast")
    if suffix:
        if "w_group_size" in fields and fields["w_group_size"] is None:   # absent: QuantConfig's group 64
            raise ValueError(f"preset {name!r}: '{suffix}' (two-level integer group scales) applies to presets "
                             f"with group-wise weight scales; {name[:-len(suffix)]!r} already uses per-channel scales")
        fields["w_group_scale"] = "int"
    if suffix == "-small":
        if not fields.get("lowrank_rank"):
            raise ValueError(f"preset {name!r}: '-small' (int8 low-rank branch factors) applies to methods with a "
                             f"low-rank branch (svdquant, qdit4sr); {method!r} has none: use '-fast'")
        fields["lowrank_bits"] = 8
    if m.group("sens"):
        if not fields.get("vatmp") or a == 16:
            raise ValueError(f"preset {name!r}: '-sens' (VaTMP weighted by step sensitivity) applies to methods with "
                             f"VaTMP activation schedules (qdit4sr) and quantized activations")
        fields["vatmp_step_weights"] = "sensitivity"
    return dict(method=method, w_bits=w, a_bits=None if a == 16 else a, **fields)


PRESET_NAMES = tuple(f"{m}-{b}" for m in METHODS for b in ("w8a8", "w4a8", "w4a6", "w4a4")) + (
    "w8a8", "w4a8", "w4a6", "w4a4") + tuple(
    f"{m}-{b}-fast" for m in ("rtn", "svdquant", "rotation", "qdit4sr") for b in ("w4a8", "w4a6", "w4a4")) + tuple(
    f"{m}-{b}-small" for m in ("svdquant", "qdit4sr") for b in ("w4a8", "w4a6", "w4a4")) + tuple(
    f"{m}-{b}{s}-sens" for m in ("qdit4sr", "qdit4sr-smooth", "qdit4sr-paper") for s in ("", "-fast", "-small")
    for b in ("w4a6", "w4a4")) + tuple(f"{m}-{b}{s}" for m in ("qdit4sr-smooth", "qdit4sr-paper") for s in ("-fast", "-small")
                                       for b in ("w4a6", "w4a4"))
