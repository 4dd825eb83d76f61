"""The fidelity study (benchmarks/fidelity.py): metrics, data handling, and a reduced run on the shipped
demo model asserting the W4A4 ordering best Q-DiT4SR variant >= SVDQuant-style >= RTN on PSNR vs the FP output,
and the rotation's gain over smoothing alone."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks import fidelity as F  # noqa: E402
from qdit4sr_jax.io.modelfile import PRETRAINED  # noqa: E402


def _img(seed, h=32, w=32):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_metrics_identity_and_order():
    a = _img(0)
    assert F.hf_psnr(a, a) == float("inf")
    assert F.ssim(a, a) == pytest.approx(1.0)
    m = F.image_metrics(a, a, None)
    assert m["psnr_fp"] == float("inf") and m["psnr_hr"] == float("inf")
    noise = np.random.default_rng(1).normal(0, 1, a.shape)
    small = np.clip(a + 2 * noise, 0, 255).astype(np.uint8)
    big = np.clip(a + 12 * noise, 0, 255).astype(np.uint8)
    assert F.hf_psnr(small, a) > F.hf_psnr(big, a)
    assert F.ssim(small, a) > F.ssim(big, a)
    # a low-frequency change (a brightness offset) leaves the high band untouched, not the PSNR
    off = np.clip(a.astype(int) // 2 + 60, 0, 255).astype(np.uint8)
    base = (a // 2).astype(np.uint8)
    assert F.hf_psnr(off, base) > 60 and F.psnr(off, base) < 30
    with pytest.raises(ValueError, match="shapes differ"):
        F.hf_psnr(a, _img(0, 16, 16))


def test_high_band_of_constant_is_zero():
    c = np.full((24, 24, 3), 77, np.uint8)
    assert np.abs(F.high_band(c)).max() < 1e-9


def test_eval_images_crop_and_seeded_lr(tmp_path):
    from PIL import Image
    (tmp_path / "empty_dir_that_exists").mkdir()
    Image.fromarray(_img(3, 50, 70)).save(tmp_path / "b.png")
    Image.fromarray(_img(4, 40, 40)).save(tmp_path / "a.png")
    ims = F.eval_images(str(tmp_path))
    assert [n for n, _, _ in ims] == ["a", "b"]
    assert ims[0][1].shape == (32, 32, 3) and ims[1][1].shape == (48, 64, 3)
    assert ims[1][2].shape == (12, 16, 3)
    again = F.eval_images(str(tmp_path))
    assert all(np.array_equal(x[2], y[2]) for x, y in zip(ims, again))      # fixed degradation seeds
    with pytest.raises(FileNotFoundError, match="no images"):
        F.eval_images(str(tmp_path / "empty_dir_that_exists"))


def test_calibration_folder_excludes_eval_images():
    lrs, desc = F.calibration_lrs("samples", 4, 32, exclude=["chelsea", "ladybird"])
    assert len(lrs) == 1 and "rocket" in desc and lrs[0].shape == (8, 8, 3)


def test_study_without_step_gains_refuses_sensitivity_configs():
    """A Study that calibrates without step gains (fidelity.py without -sens methods) names the problem when a
    step-weighted config reaches it, before anything is calibrated."""
    st = F.Study.__new__(F.Study)
    st.step_gains, st._calib = False, None
    with pytest.raises(ValueError, match="step gains"):
        st.quantize(F.method_config("qdit4sr-sens", "w4a4"))
    assert st._calib is None


def test_ablation_configs_are_valid():
    rows = F.ablation_configs("w4a4")
    labels = [lb for lb, _ in rows]
    assert labels[0] == "RTN" and any("SVD-only" in lb for lb in labels)
    full = dict(rows)["+ smoothing + signed Hadamard + H-SVD + VaSMP + VaTMP (Q-DiT4SR)"]
    assert full.hsvd and full.vasmp and full.vatmp and full.rotate and full.smooth
    hs = dict(rows)["+ smoothing + signed Hadamard + H-SVD"]
    assert hs.hsvd and hs.rotate and not hs.vasmp and dict(rows)["+ smoothing (alpha 0.5)"].smooth
    assert not dict(rows)["+ smoothing (alpha 0.5)"].rotate
    rot = dict(rows)["+ smoothing + signed Hadamard"]
    assert rot.rotate and rot.smooth and rot.lowrank_rank == 0 and not rot.hsvd     # no branch yet
    assert not dict(rows)["Q-DiT4SR without the rotation (qdit4sr-smooth)"].rotate


@pytest.mark.skipif(not os.path.exists(PRETRAINED["demo"]), reason="the demo model is not shipped in this checkout")
def test_reduced_study_ordering_w4a4():
    """Two bundled samples (48x48 HR centre crops), the demo model's 3 sampling steps, calibration on the
    third sample (one 12 x 12 LR crop: far less than the study's). 2026-12-05, PSNR vs FP: qdit4sr-sens 39.6 >
    svdquant 35.1 > qdit4sr 34.3 > qdit4sr-paper 33.9 > qdit4sr-smooth 31.8 > rtn 30.0 dB. On so little
    calibration the unweighted Q-DiT4SR trails SVDQuant-style (on data/val it leads: benchmarks/RESULTS.md), so
    the ordering asserted is the issue's: the best Q-DiT4SR variant >= SVDQuant-style >= RTN, and the signed
    Hadamard ahead of smoothing alone (qdit4sr vs qdit4sr-smooth)."""
    st = F.Study("demo", images=F.SAMPLES_DIR, crop=48, limit=2, calib="samples", n_calib=1, num_steps=None,
                 log=lambda *a: None)
    assert st.steps == 3
    psnr_fp = {m: st.run(m, F.method_config(m, "w4a4"), m, "w4a4").mean("psnr_fp")
               for m in ("rtn", "svdquant", "qdit4sr", "qdit4sr-sens", "qdit4sr-smooth")}
    assert "rocket" in st.calib_desc                     # calibration disjoint from the evaluation images
    assert np.isfinite(list(psnr_fp.values())).all()
    best = max(psnr_fp["qdit4sr"], psnr_fp["qdit4sr-sens"])
    assert best >= psnr_fp["svdquant"] >= psnr_fp["rtn"], psnr_fp
    assert psnr_fp["qdit4sr"] > psnr_fp["qdit4sr-smooth"], psnr_fp
