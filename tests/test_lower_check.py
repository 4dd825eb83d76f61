"""benchmarks/gpu/lower_check.py: a whole quantized step, traced as for a GPU and lowered for CUDA on the CPU,
has one GEMM kernel per quantized linear (and one prologue kernel each when prepared with prologue="pallas")."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.gpu import lower_check as L  # noqa: E402
from qdit4sr_jax.config import ModelConfig  # noqa: E402

# the tiny model at width 128 (2 heads x 64): every linear tiles the kernels' 128-wide output tiles
CFG = ModelConfig.preset("tiny").replace(attention_head_dim=64, caption_projection_dim=128)


# the Pallas prologue kernel rotates too (prologue_rotated.py; the tiny model's K <= 512 fit its register budget)
@pytest.mark.parametrize("preset,prepare,per_layer", [("qdit4sr-w4a4-small", "none", 1),
                                                      ("qdit4sr-paper-w4a4-small", "pallas", 2),
                                                      ("qdit4sr-smooth-w4a4-small", "pallas", 2),
                                                      ("qdit4sr-paper-w4a4-small", "fast", 1)])
def test_step_lowers_with_a_kernel_per_layer(preset, prepare, per_layer):
    r = L.check(CFG, preset, size=64, prepare=prepare)
    assert r["layers"] > 20
    assert r["triton_kernels"] == per_layer * r["layers"], r
    assert sum(r["by_name"].values()) == r["triton_kernels"]
    if per_layer == 2:
        assert r["by_name"]["qlinear_prologue"] == r["layers"]


def test_tpu_lowering_takes_the_xla_path():
    r = L.check(CFG, "qdit4sr-w4a4-small", size=64, prepare="pallas", platform="tpu")
    assert r["triton_kernels"] == 0 and r["custom_calls"] == 0 and r["layers"] > 20
    with pytest.raises(ValueError, match="platform"):
        L.check(CFG, "qdit4sr-w4a4-small", size=64, platform="rocm")


def test_fast_mosaic_sampler_mode_lowers_to_mosaic_kernels_on_hopper():
    """The sampler's "fast-mosaic-separate" traced as for a Hopper GPU runs the Mosaic GEMM (where a layer fits its
    tiles) and the Hadamard kernel; "fast" none of them (test above)."""
    fast = L.check(CFG, "qdit4sr-paper-w4a4-small", size=64, prepare="fast-mosaic-separate")
    gemm_only = L.check(CFG, "qdit4sr-paper-w4a4-small", size=64, prepare="fast-mosaic-gemm")
    assert gemm_only["triton_kernels"] + gemm_only["mosaic_kernels"] == gemm_only["layers"]
    assert fast["triton_kernels"] == gemm_only["triton_kernels"] < fast["layers"]
    assert fast["mosaic_kernels"] > gemm_only["mosaic_kernels"] > 0      # + Hadamard kernels and features GEMMs


@pytest.mark.parametrize("preset,fewer", [("w8a8", 2), ("qdit4sr-paper-w4a4-small", 6)])
def test_merged_layers_lower_to_one_gemm_per_group(preset, fewer):
    """The sampler's "fast-mosaic" (`merged.merge_inputs`) lowers for CUDA with each of a layer's kernels
    once per q / k / v group instead of once per member (the tiny model's 4 attentions with to_q / to_k / to_v and 3
    with add_*_proj): W8A8 two GEMMs fewer per group; the paper preset's -small form (H-SVD blocks, low-rank
    factors read per member: `branch_ops`' blocked low-rank) also two Hadamard and two feature kernels fewer (counted
    before XLA's CSE of the members' identical ones)."""
    alone = L.check(CFG, preset, size=64, prepare="fast-mosaic-separate")
    merged = L.check(CFG, preset, size=64, prepare="fast-mosaic")
    kernels = lambda r: r["triton_kernels"] + r["mosaic_kernels"]
    assert kernels(merged) == kernels(alone) - fewer * 7, (kernels(alone), kernels(merged))
    for r in (alone, merged):           # the census (`mosaic_gemm.recording_calls`) counts every Mosaic call site
        assert sum(c["calls"] for c in r["census"]) == r["mosaic_kernels"]
    if preset == "w8a8":
        assert kernels(alone) == alone["layers"]
