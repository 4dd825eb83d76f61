"""benchmarks/gpu/step_profile.py: trace parsing on a synthetic GPU-layout trace and a tiny CPU run end to end."""
import gzip
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu"))

from benchmarks.gpu import step_profile as P  # noqa: E402


def _gpu_trace(path):
    """Two steps on a GPU-like timeline: kernels on a Stream line, the same ops on the derived XLA Ops line
    (which must not be counted twice), host events elsewhere."""
    ev = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
          {"ph": "M", "pid": 1, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}},
          {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
          {"ph": "M", "pid": 2, "tid": 1, "name": "thread_name", "args": {"name": "python"}}]
    for _ in range(2):
        for name, dur in (("qlinear_nk_w4p", 30.0), ("loop_multiply_fusion.3", 5.0), ("loop_multiply_fusion.12", 7.0),
                          ("cudnn_flash_attention_fwd", 40.0), ("sm90_xmma_gemm_bf16", 20.0), ("memcpy_d2d", 1.0),
                          ("weird_kernel", 2.0)):
            ev.append({"ph": "X", "pid": 1, "tid": 7, "name": name, "dur": dur})
            ev.append({"ph": "X", "pid": 1, "tid": 8, "name": name, "dur": dur})
        ev.append({"ph": "X", "pid": 2, "tid": 1, "name": "PjitFunction(step)", "dur": 500.0})
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": ev}, f)


def test_breakdown_of_a_gpu_layout_trace(tmp_path):
    p = str(tmp_path / "perfetto_trace.json.gz")
    _gpu_trace(p)
    b = P.breakdown(p, iters=2)
    assert b["kernel_us_per_step"] == pytest.approx(105.0) and b["kernels_per_step"] == 7
    assert b["categories_us"] == pytest.approx({"qlinear": 30.0, "attention": 40.0, "gemm": 20.0, "fusion": 12.0,
                                                "copy": 1.0, "other": 2.0})
    assert b["by_kind"]["loop_multiply_fusion"] == {"calls": 2.0, "us": 12.0}
    assert b["lines"]["/device:GPU:0 | XLA Ops"]["us"] == pytest.approx(105.0)
    assert b["lines"]["/host:CPU | python"]["events"] == 1
    other = dict(b, kernel_us_per_step=125.0, categories_us=dict(b["categories_us"], fusion=32.0),
                 by_kind=dict(b["by_kind"], loop_multiply_fusion={"calls": 5.0, "us": 32.0}))
    d = P.diff(b, other)
    assert d["total_us"] == pytest.approx(20.0) and d["categories_us"]["fusion"] == pytest.approx(20.0)
    assert next(iter(d["kinds"])) == "loop_multiply_fusion"
    assert d["kinds"]["loop_multiply_fusion"] == {"us": 20.0, "calls": 3.0}


def test_kind_and_category():
    assert P.kind("loop_add_fusion.23") == "loop_add_fusion" and P.kind("fusion_1.2") == "fusion"
    assert P.category("qlinear_nk_w8") == "qlinear" and P.category("nvjet_hsh_128x256") == "gemm"
    assert P.category("something_new") == "other"


def test_tiny_profile_on_cpu(tmp_path):
    out = tmp_path / "prof.json"
    import jax
    jax.clear_caches()      # the profiler's trace carries every live executable: in a long pytest worker 10x the run
    res = P.main(["--preset", "tiny", "--cases", "16x1", "--modes", "bf16", "w8a8-fused", "--attention", "xla",
                  "--iters", "1", "--warmup", "1", "--out", str(out)])
    assert [r["mode"] for r in res["runs"]] == ["bf16", "w8a8-fused"]
    for r in res["runs"]:
        assert r["kernels_per_step"] > 0
        assert sum(r["categories_us"].values()) == pytest.approx(r["kernel_us_per_step"], rel=1e-6)
    assert res["diffs"][0]["mode"] == "w8a8-fused" and json.load(open(out))["diffs"]
