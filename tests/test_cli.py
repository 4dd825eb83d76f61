"""The CLI main job (`qdit4sr-jax demo`, shortened) and the other subcommands on the shipped demo model."""
import os

import numpy as np
import pytest
from PIL import Image

from qdit4sr_jax import cli
from qdit4sr_jax.demo import CAPTION_PX, DEFAULT_METHODS, HEADER_PX, SAMPLES_DIR
from qdit4sr_jax.metrics import psnr


@pytest.mark.slow
def test_demo_job_shortened(tmp_path, capsys):
    rc = cli.main(["demo", "--out", str(tmp_path), "--images", "1", "--crop", "64", "--steps", "2",
                   "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for m in ("bicubic",) + DEFAULT_METHODS:
        assert f"| {m} |" in out
    grid = Image.open(tmp_path / "demo_grid.png")
    # one sample row: bicubic | fp | rtn | qdit4sr | HR, each 64x64, under the header strip, over its PSNR captions
    assert grid.size == (64 * (len(DEFAULT_METHODS) + 2), HEADER_PX + 64 + CAPTION_PX)
    size = {m: float([l for l in out.splitlines() if l.startswith(f"| {m} |")][0].split("|")[4])
            for m in DEFAULT_METHODS}
    # RTN W4 < Q-DiT4SR W4 (+ its 16-bit branches, counted at 32 bits as the paper does) < FP
    assert 0 < size["rtn-w4a4"] < size["qdit4sr-w4a4"] < size["fp"]


def test_upscale_subcommand_and_bad_input(tmp_path, capsys):
    src = tmp_path / "in.png"
    hr = np.asarray(Image.open(os.path.join(SAMPLES_DIR, sorted(os.listdir(SAMPLES_DIR))[0])).convert("RGB"))
    Image.fromarray(hr[:16, :16]).save(src)
    dst = tmp_path / "out.png"
    assert cli.main(["upscale", str(src), str(dst), "--steps", "1"]) == 0
    out = np.asarray(Image.open(dst))
    assert out.shape == (64, 64, 3)
    assert psnr(out, out) == float("inf")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert cli.main(["upscale", str(bad), str(tmp_path / "x.png")]) == 2
    assert "bad.png" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_report_subcommand(capsys):
    assert cli.main(["report", "--config", "dit4sr"]) == 0
    out = capsys.readouterr().out
    assert "2,594,049,216" in out or "2,716,814,144" in out


def test_quantize_then_upscale_quantized(tmp_path, capsys):
    ck = tmp_path / "rtn"
    assert cli.main(["quantize", "--preset", "rtn-w4a8", "--out", str(ck)]) == 0
    assert "quantized layers" in capsys.readouterr().out
    src = tmp_path / "in.png"
    hr = np.asarray(Image.open(os.path.join(SAMPLES_DIR, sorted(os.listdir(SAMPLES_DIR))[0])).convert("RGB"))
    Image.fromarray(hr[:16, :16]).save(src)
    assert cli.main(["upscale", str(src), str(tmp_path / "q.png"), "--quantized", str(ck), "--steps", "1"]) == 0
    assert np.asarray(Image.open(tmp_path / "q.png")).shape == (64, 64, 3)
    # the fused kernels' path, per call and with prepared weights: the same image ("fast" too: RTN has no
    # transform and no branches, so nothing of it rounds otherwise)
    # ("unpacked" / "packed" against per-call on the tiny model: test_prepared.test_sampler_prepared_equals_per_call)
    for extra, name in ((["--execution", "fused"], "f.png"), (["--execution", "fused", "--prepare", "fast"], "pf.png")):
        assert cli.main(["upscale", str(src), str(tmp_path / name), "--quantized", str(ck), "--steps", "1"]
                        + extra) == 0
    for name in ("pf.png",):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "f.png")), np.asarray(Image.open(tmp_path / name)))
    # quantized in the same run (--preset): the image of the saved tree (the fused sampler compiled above reused)
    assert cli.main(["upscale", str(src), str(tmp_path / "o.png"), "--preset", "rtn-w4a8", "--steps", "1",
                     "--execution", "fused"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "f.png")), np.asarray(Image.open(tmp_path / "o.png")))
    assert cli.main(["upscale", str(src), str(tmp_path / "x.png"), "--prepare", "packed"]) == 2   # no --quantized
    assert "--quantized" in capsys.readouterr().err
    assert cli.main(["upscale", str(src), str(tmp_path / "x.png"), "--quantized", str(ck), "--preset", "rtn-w4a8"]) == 2
    assert "pass one" in capsys.readouterr().err
    assert cli.main(["upscale", str(src), str(tmp_path / "x.png"), "--preset", "rtn-w3a1"]) == 2
    assert "rtn-w3a1" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_evaluate_subcommand_is_wired(capsys):
    """`qdit4sr-jax evaluate` parses its flags (the run itself: tests/test_evaluate.py)."""
    a = cli.build_parser().parse_args(["evaluate", "--hr", "x", "--methods", "fp,qdit4sr-w4a4", "--crop", "64",
                                       "--y-channel", "--border", "4", "--calib", "2", "--devices", "1"])
    assert a.fn is cli.cmd_evaluate and a.y_channel and a.border == 4 and a.calib == "2" and a.devices == 1
    assert cli.main(["evaluate", "--hr", "x", "--methods", "nonsense"]) == 2
    assert "unknown method(s) ['nonsense']" in capsys.readouterr().err
