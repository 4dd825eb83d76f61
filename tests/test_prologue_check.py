"""benchmarks/gpu/prologue_check.py --shared, the GPU check of the shared q / k / v path, run here on the Pallas
interpreter at small shapes: what the device run reports must hold on the CPU (bit-equal members, the exact
prepared tree equal to the stored nodes under VaTMP schedules)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.gpu import prologue_check as P  # noqa: E402


def test_shared_check_on_the_interpreter():
    rows = P.shared_check(40, 256, 256, interpret=True, block=128)
    assert [r["member"] for r in rows] == ["to_q", "to_k", "to_v"]          # no timing row off the GPU
    assert [r["jd_col"] for r in rows] == [0, 64, 128]
    for r in rows:
        assert r["max_abs_diff"] == 0.0 and r["max_abs_diff_exact_vs_stored"] == 0.0, r
        assert 0.0 < r["rel_vs_fake"] < 0.05, r                               # W4A4 with x' in bf16
