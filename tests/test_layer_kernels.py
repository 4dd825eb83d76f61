"""benchmarks/gpu/layer_kernels.py: HLO entry parsing and a small run of every feature case on CPU."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.gpu import layer_kernels as L  # noqa: E402

HLO = """HloModule jit_f, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_computation (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %m = f32[4]{0} multiply(%p, %p)
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %c = f32[] constant(1)
  %f = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_computation
  %g = (f32[4]{0}, s8[16]{0}) custom-call(%f), custom_call_target="__cublas$gemm"
  %b = f32[4]{0} bitcast(%f)
  ROOT %t = f32[4]{0} copy(%b)
}
"""


def test_entry_kernels_counts_only_the_entry_computation():
    assert L.entry_kernels(HLO) == {"copy": 1, "custom-call": 1, "fusion": 1}


def test_every_feature_case_compiles_and_runs():
    import jax
    jax.clear_caches()      # the profiler's trace carries every live executable: in a long pytest worker 10x the run
    rows = L.measure(m=16, k=128, n=128, rank=8, block=64, timed=True, iters=2)
    labels = [c[0] for c in L.feature_cases(128, 128, 8, 64)]
    assert [r["label"] for r in rows] == labels + ["prepared: weight-side operands once per run",
                                                   "prepared, down=split (before 2026-12-05)",
                                                   "prepared + prologue kernel (Pallas backend only)"]
    assert all(r["kernels"] >= 1 and r["ms"] > 0 and r["device_us"] > 0 for r in rows)   # device time from a trace
    assert rows[-3]["kernels"] < rows[-4]["kernels"]        # the prepared layer leaves weight-side kernels out
    assert rows[-3]["kernels"] <= rows[-2]["kernels"]       # one down-projection GEMM, not several kernels
