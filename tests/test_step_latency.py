"""CPU smoke test of benchmarks/step_latency.py: the case list and one tiny run per mode with ratios to bf16."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from benchmarks import step_latency as S  # noqa: E402


def test_parse_cases():
    assert S.parse_cases(["1024x1", "512X4"]) == [(1024, 1), (512, 4)]
    for bad in (["1024"], ["ax1"], ["0x1"], ["512x-1"]):
        with pytest.raises(SystemExit, match="--cases"):
            S.parse_cases(bad)


def test_tiny_cases_in_the_given_order(tmp_path):
    """Modes run in the order given; ratios to bf16 are filled in also for modes timed before bf16."""
    out = tmp_path / "step.json"
    S.main(["--preset", "tiny", "--cases", "32x2", "16x1", "--modes", "w8a8-fused", "bf16", "--attention", "xla",
            "--iters", "1", "--warmup", "0", "--out", str(out)])
    res = json.load(open(out))
    got = [(r["size"], r["batch"], r["mode"]) for r in res["runs"]]
    assert got == [(32, 2, "w8a8-fused"), (32, 2, "bf16"), (16, 1, "w8a8-fused"), (16, 1, "bf16")]
    for r in res["runs"]:
        assert "error" not in r and r["median_ms"] > 0
        assert r["speedup_vs_bf16"] == pytest.approx(
            next(b["median_ms"] for b in res["runs"] if b["mode"] == "bf16" and b["size"] == r["size"])
            / r["median_ms"])
    w8 = next(r for r in res["runs"] if r["mode"] == "w8a8-fused")
    assert w8["weight_bytes"] < res["bf16_weight_bytes"]


def test_scan_steps_report_per_step_times(tmp_path):
    """--scan-steps N runs N steps in one lax.scan (quantized trees included) and reports per-step figures."""
    out = tmp_path / "scan.json"
    modes = ["bf16", "p:qdit4sr-w4a4-small:fused", "p:qdit4sr-w4a4-small:prepbf"]    # one quantize for both
    S.main(["--preset", "tiny", "--cases", "16x1", "--modes", *modes, "--attention", "xla", "--iters", "3",
            "--warmup", "1", "--scan-steps", "2", "--out", str(out)])
    res = json.load(open(out))
    assert [r["mode"] for r in res["runs"]] == modes
    stored, prepared = (r["weight_bytes"] for r in res["runs"][1:])
    assert prepared > stored                      # the prepared tree: unpacked codes, float branches
    for r in res["runs"]:
        assert r["scan_steps"] == 2 and "error" not in r
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]


def test_xla_variants_compile_each_step_with_their_options(tmp_path):
    """--xla-variants: every mode is compiled once per XLA option set (command buffers), ratios within a variant.
    Two non-default option sets (an emptied and an extended command-buffer list; "default", {}, is what every
    other test here compiles with): each compile is a few seconds on CPU."""
    out = tmp_path / "var.json"
    S.main(["--preset", "tiny", "--cases", "16x1", "--modes", "bf16", "w8a8-fused", "--attention", "xla",
            "--iters", "1", "--warmup", "0", "--scan-steps", "2", "--xla-variants", "cb-off", "cb-while",
            "--out", str(out)])
    res = json.load(open(out))
    assert [(r["xla_variant"], r["mode"]) for r in res["runs"]] == [
        (v, m) for v in ("cb-off", "cb-while") for m in ("bf16", "w8a8-fused")]
    for r in res["runs"]:
        assert "error" not in r
        base = next(b for b in res["runs"] if b["mode"] == "bf16" and b["xla_variant"] == r["xla_variant"])
        assert r["speedup_vs_bf16"] == pytest.approx(base["median_ms"] / r["median_ms"])
    assert set(S.XLA_VARIANTS) >= {"default", "cb-off", "cb-while"} and S.XLA_VARIANTS["default"] == {}


def test_every_xla_variant_is_a_known_compile_option():
    """Each variant's options name fields XLA knows (a removed or misspelled flag fails the compile here on CPU,
    not after a device machine has been started)."""
    import jax
    import jax.numpy as jnp
    f = jax.jit(lambda x: x @ x)
    for name, opts in S.XLA_VARIANTS.items():
        f.lower(jnp.ones((4, 4))).compile(compiler_options=opts)


def test_prologue_args_set_the_mosaic_prologue(monkeypatch):
    """--codes-in-kernel / --run-tile set prologue_mosaic's settings (read when a step is traced); absent, unchanged."""
    import argparse

    from common import add_prologue_args, apply_prologue_args
    from qdit4sr_jax.quant.kernels import prologue_mosaic
    monkeypatch.setattr(prologue_mosaic, "CODES_IN_KERNEL", (128,))
    monkeypatch.setattr(prologue_mosaic, "RUN_TILE", 16)
    ap = argparse.ArgumentParser()
    add_prologue_args(ap)
    apply_prologue_args(ap.parse_args([]))
    assert (prologue_mosaic.CODES_IN_KERNEL, prologue_mosaic.RUN_TILE) == ((128,), 16)
    apply_prologue_args(ap.parse_args(["--codes-in-kernel", "64", "128", "--run-tile", "8"]))
    assert (prologue_mosaic.CODES_IN_KERNEL, prologue_mosaic.RUN_TILE) == ((64, 128), 8)
    from qdit4sr_jax.quant.kernels import mosaic_hadamard as mh
    monkeypatch.setattr(mh, "RUN_LENGTH", {})
    apply_prologue_args(ap.parse_args(["--hadamard-run", "1536=128"]))
    assert mh.RUN_LENGTH == {1536: 128} and mh.hadamard_plan(1536)[1] == 128
    for bad in ("6144=64", "1536=96", "x=128"):                  # no such plan / run length / K: named
        with pytest.raises(SystemExit, match=bad):
            apply_prologue_args(ap.parse_args(["--hadamard-run", bad]))
