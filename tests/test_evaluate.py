"""`qdit4sr-jax evaluate` on the shipped demo model: two bundled samples (48 px HR crops), 2 steps, FP + RTN-W4A4.

The table, results.csv / results.json / grid / images, an interrupted run that resumes without recomputing
finished images, the same figures as benchmarks/fidelity.py on the same images (one implementation), the
metric conventions (--y-channel, --border), and the bad inputs of docs/BAD_INPUTS.md.
"""
import csv
import json
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from qdit4sr_jax import cli, pipeline
from qdit4sr_jax.demo import SAMPLES_DIR
from qdit4sr_jax.evaluation import data as D
from qdit4sr_jax.evaluation.scores import Scorer, rgb_to_y
from qdit4sr_jax.io.modelfile import PRETRAINED
from qdit4sr_jax.metrics import psnr, ssim

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

needs_demo = pytest.mark.skipif(not os.path.exists(PRETRAINED["demo"]), reason="the demo model is not shipped")
NAMES = ("chelsea", "ladybird")
ARGS = ["--crop", "48", "--steps", "2", "--methods", "fp,rtn-w4a4", "--no-progress"]


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hr")
    for n in NAMES:
        shutil.copy(os.path.join(SAMPLES_DIR, f"{n}.png"), d / f"{n}.png")
    return d


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def run(hr_dir, tmp_path_factory):
    """One evaluation interrupted at its 4th upscale (FP x 2 and RTN chelsea done), then resumed."""
    out = tmp_path_factory.mktemp("eval") / "out"
    real, calls = pipeline.upscale, []

    def upscale(*a, **k):
        calls.append(k.get("seed"))
        if len(calls) == 4 and interrupt:
            raise Interrupt("simulated interruption")
        return real(*a, **k)
    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "upscale", upscale)
    interrupt = True
    with pytest.raises(Interrupt):
        cli.main(["evaluate", "--hr", str(hr_dir), "--out", str(out)] + ARGS)
    cached = sorted(os.path.relpath(os.path.join(r, f), out / "cache") for r, _, fs in os.walk(out / "cache")
                    for f in fs if not f.startswith("_"))
    leftovers = [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".tmp")]
    interrupt, n_before = False, len(calls)
    import io
    from contextlib import redirect_stdout
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli.main(["evaluate", "--hr", str(hr_dir), "--out", str(out)] + ARGS)
    mp.undo()
    return dict(out=out, rc=rc, stdout=buf.getvalue(), cached=cached, leftovers=leftovers,
                resumed_calls=len(calls) - n_before, results=json.loads((out / "results.json").read_text()))


@needs_demo
def test_interrupted_run_resumes_without_recomputing(run):
    # before the interruption: FP for both images, bicubic for both, RTN for the first; no temp file left
    assert run["cached"] == sorted(["bicubic/chelsea.json", "bicubic/ladybird.json", "fp/chelsea.json",
                                    "fp/ladybird.json", "rtn-w4a4/chelsea.json"])
    assert run["leftovers"] == []
    assert run["rc"] == 0
    assert run["resumed_calls"] == 1                    # only RTN on ladybird was computed again
    assert "Resumed: 5 (method, image) result(s)" in run["stdout"]
    assert run["results"]["resumed"] == 5


@needs_demo
def test_table_csv_json_images_and_grid(run):
    out, res = run["out"], run["results"]
    text = run["stdout"]
    for m in ("bicubic", "fp", "rtn-w4a4"):
        assert f"| {m} |" in text
    assert "PSNR / SSIM vs HR on RGB, no border crop" in text and "LPIPS" in text
    assert [m["method"] for m in res["methods"]] == ["bicubic", "fp", "rtn-w4a4"]
    from qdit4sr_jax.data.datasets import val_seed
    assert res["degradation_seeds"] == {n: val_seed(f"{n}.png") for n in NAMES} and "val_seed" in text
    for m in res["methods"]:
        assert [p["image"] for p in m["per_image"]] == list(NAMES)
        for p in m["per_image"]:
            assert set(p) >= {"psnr_hr", "ssim_hr", "psnr_fp", "hf_fp", "niqe", "texture_hr", "texture_fp", "seconds"}
    fp = res["methods"][1]
    assert fp["mean"]["psnr_fp"] == "inf" and fp["w_bits"] == 32.0 and fp["size_m"] > 0
    rtn = res["methods"][2]
    assert 20 < rtn["mean"]["psnr_fp"] < 60 and rtn["w_bits"] == pytest.approx(4.0) and rtn["size_m"] < fp["size_m"]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 3 * 3 and {r["image"] for r in rows} == set(NAMES) | {"mean"}
    r = [r for r in rows if r["method"] == "rtn-w4a4" and r["image"] == "ladybird"][0]
    assert float(r["psnr_hr"]) == pytest.approx(rtn["per_image"][1]["psnr_hr"], abs=1e-12)
    for m in ("bicubic", "fp", "rtn-w4a4"):
        for n in NAMES:
            assert np.asarray(Image.open(out / "images" / m / f"{n}.png")).shape == (48, 48, 3)
    g = np.asarray(Image.open(out / "grid.png"))
    cols, cell = 4, 48 * 2 + 2                  # bicubic | FP | rtn-w4a4 | HR, 48 px shown 2x
    assert g.shape[1] == cols * cell and g.shape[0] == 14 + 2 * (96 + 12 + 2)
    assert all((g[:14, j * cell:(j + 1) * cell] < 128).any() for j in range(cols))    # a header over each column
    # the output PNGs are the figures' inputs: PSNR vs HR recomputed from the files
    hr = D.crop16(np.asarray(Image.open(os.path.join(SAMPLES_DIR, "ladybird.png")).convert("RGB")), 48)
    assert psnr(np.asarray(Image.open(out / "images" / "rtn-w4a4" / "ladybird.png")), hr) == \
        pytest.approx(rtn["per_image"][1]["psnr_hr"], abs=1e-12)


@needs_demo
def test_same_figures_as_the_fidelity_study(run, hr_dir):
    from benchmarks import fidelity as F
    st = F.Study("demo", images=str(hr_dir), crop=48, num_steps=2, calib="samples", log=lambda *a: None,
                 step_gains=False)
    r = st.run("rtn-w4a4", F.method_config("rtn", "w4a4"), "rtn", "w4a4")
    ev = {m["method"]: m for m in run["results"]["methods"]}
    for key in ("psnr_hr", "ssim_hr", "psnr_fp", "hf_fp", "texture_hr", "texture_fp"):
        assert [p[key] for p in ev["rtn-w4a4"]["per_image"]] == [m[key] for m in r.per_image], key
        assert [p[key] for p in ev["bicubic"]["per_image"]] == [m[key] for m in st.bicubic_result().per_image], key
    assert [p["psnr_hr"] for p in ev["fp"]["per_image"]] == [m["psnr_hr"] for m in st.fp_result().per_image]
    assert ev["rtn-w4a4"]["w_bits"] == r.w_bits and ev["rtn-w4a4"]["a_bits"] == r.a_bits
    # the default calibration inputs are the study's too (bundled samples not scored, same crop and seeds)
    from qdit4sr_jax.evaluation.run import Evaluation, Options
    e = Evaluation(Options(hr=str(hr_dir), crop=48, steps=2, methods="svdquant-w4a4", out="unused", learned=False))
    lrs, desc = F.calibration_lrs("samples", 4, 48, exclude=list(NAMES))
    assert len(e._calib_lrs) == len(lrs) == 1 and np.array_equal(e._calib_lrs[0], lrs[0]) and "rocket" in desc


@needs_demo
def test_rerun_with_other_settings_is_refused(run, hr_dir, capsys):
    before = sorted(os.listdir(run["out"]))
    rc = cli.main(["evaluate", "--hr", str(hr_dir), "--out", str(run["out"]), "--crop", "48", "--steps", "1",
                   "--methods", "fp", "--no-progress"])
    assert rc == 2 and "other settings (steps: 2 -> 1)" in capsys.readouterr().err
    assert sorted(os.listdir(run["out"])) == before


@needs_demo
def test_devices_path_gives_the_same_figures(run, hr_dir, tmp_path):
    """--devices 1 runs the images through qdit4sr_jax.parallel.upscale_batch (a data mesh of one device here):
    the same outputs and figures as one image at a time."""
    from qdit4sr_jax.evaluation import Options, evaluate
    res = evaluate(Options(hr=str(hr_dir), crop=48, steps=2, methods="fp", out=str(tmp_path / "d"), devices=1,
                           progress=False, learned=False), log=lambda *a: None)
    fp = {m["method"]: m for m in run["results"]["methods"]}["fp"]
    assert [p["psnr_hr"] for p in res["methods"][1]["per_image"]] == [p["psnr_hr"] for p in fp["per_image"]]
    for n in NAMES:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "d" / "images" / "fp" / f"{n}.png")),
                              np.asarray(Image.open(run["out"] / "images" / "fp" / f"{n}.png")))


def test_scorer_conventions():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    assert rgb_to_y(np.zeros((1, 1, 3), np.uint8))[0, 0] == pytest.approx(16.0)
    assert rgb_to_y(np.full((1, 1, 3), 255, np.uint8))[0, 0] == pytest.approx(235.0)
    rgb = Scorer(learned=False).score(a, b, None)
    assert rgb["psnr_hr"] == psnr(a, b) and rgb["ssim_hr"] == ssim(a, b)
    y = Scorer(y_channel=True, border=4, learned=False).score(a, b, b)
    ya, yb = rgb_to_y(a[4:-4, 4:-4]), rgb_to_y(b[4:-4, 4:-4])
    assert y["psnr_hr"] == psnr(ya, yb) and y["ssim_hr"] == ssim(ya, yb)
    assert y["psnr_fp"] == psnr(a, b)                   # vs FP: RGB, whole image, whatever the HR convention
    assert "Y channel" in Scorer(y_channel=True, border=4, learned=False).convention()
    nr = Scorer(learned=False).score(a, None, b)
    assert "psnr_hr" not in nr and np.isfinite(nr["psnr_fp"])


# ----------------------------------------------------------------------------- bad inputs

def _save(path, arr, mode=None):
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)


def test_pairs_by_name_odd_images_and_lr_only(tmp_path):
    rng = np.random.default_rng(1)
    lr, hr = tmp_path / "lr", tmp_path / "hr"
    lr.mkdir(), hr.mkdir()
    _save(lr / "Canon_001_LR4.png", rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    _save(hr / "Canon_001_HR.png", rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    _save(lr / "gray.png", rng.integers(0, 256, (12, 12), dtype=np.uint8))                           # L
    _save(hr / "gray.png", rng.integers(0, 256, (48, 48, 4), dtype=np.uint8))                        # RGBA
    Image.fromarray(rng.integers(0, 65535, (12, 12), dtype=np.uint16)).save(lr / "deep.png")        # I;16
    _save(hr / "deep.png", rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    notes = []
    items, desc = D.load_items(str(hr), str(lr), scale=4, min_lr=4, notes=notes)
    assert [i.name for i in items] == ["Canon_001_LR4", "deep", "gray"] and "paired by file name" in desc
    assert all(i.lr.dtype == np.uint8 and i.lr.shape[2] == 3 and
               i.hr.shape[:2] == (i.lr.shape[0] * 4, i.lr.shape[1] * 4) for i in items)
    text = " ".join(notes)
    assert "gray.png: converted L image" in text and "alpha channel is dropped" in text and "16-bit" in text
    items, _ = D.load_items(str(hr), str(lr), scale=4, min_lr=4, crop=32)        # centre crops stay aligned
    full, _ = D.load_items(str(hr), str(lr), scale=4, min_lr=4)
    assert items[0].lr.shape == (8, 8, 3) and np.array_equal(items[0].hr, full[0].hr[8:40, 16:48])
    assert np.array_equal(items[0].lr, full[0].lr[2:10, 4:12])
    only, desc = D.load_items(None, str(lr), scale=4, min_lr=4)
    assert all(i.hr is None for i in only) and "no-reference" in desc


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable", "tiny", "not4x", "unmatched", "crop_odd",
                                  "crop_big", "no_dirs", "same_stem"])
def test_bad_image_sets_fail_clearly(tmp_path, case):
    rng = np.random.default_rng(2)
    lr, hr = tmp_path / "lr", tmp_path / "hr"
    lr.mkdir(), hr.mkdir()
    _save(lr / "a.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    _save(hr / "a.png", rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    kw = dict(hr_dir=str(hr), lr_dir=str(lr), scale=4, min_lr=4)
    expect = {"missing": (FileNotFoundError, "does not exist"), "empty": (FileNotFoundError, "no images"),
              "unreadable": (ValueError, "cannot read image"), "tiny": (ValueError, "too small"),
              "not4x": (ValueError, "HR must be exactly 4x the LR"), "unmatched": (ValueError, "do not pair up"),
              "crop_odd": (ValueError, "--crop 40 is infeasible: use a positive multiple of 16"),
              "crop_big": (ValueError, "--crop 64 is infeasible for"), "no_dirs": (ValueError, "give --hr DIR"),
              "same_stem": (ValueError, "several files share the name")}[case]
    if case == "missing":
        kw["lr_dir"] = str(tmp_path / "nope")
    elif case == "empty":
        (tmp_path / "e").mkdir()
        kw["hr_dir"], kw["lr_dir"] = str(tmp_path / "e"), None
    elif case == "unreadable":
        (lr / "a.png").write_bytes(b"not a png")
    elif case == "tiny":
        _save(lr / "a.png", rng.integers(0, 256, (2, 12, 3), dtype=np.uint8))
    elif case == "not4x":
        _save(hr / "a.png", rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    elif case == "unmatched":
        _save(hr / "b.png", rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    elif case == "crop_odd":
        kw["crop"] = 40
    elif case == "crop_big":
        kw["crop"] = 64
    elif case == "no_dirs":
        kw["hr_dir"] = kw["lr_dir"] = None
    elif case == "same_stem":
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(hr / "a.jpg")
        kw["lr_dir"] = None
    with pytest.raises(expect[0], match=expect[1]):
        D.load_items(**kw)


@needs_demo
@pytest.mark.parametrize("case", ["method", "calib_n", "calib_samples", "out_foreign", "hr_missing", "niqe_patch",
                                  "border", "devices", "no_prompt"])
def test_cli_bad_inputs_write_nothing(tmp_path, hr_dir, capsys, case):
    out = tmp_path / "out"
    args = ["evaluate", "--hr", str(hr_dir), "--out", str(out), "--crop", "48", "--steps", "1", "--no-progress"]
    expect = {"method": "unknown method(s) ['svdqant-w4a4']", "calib_n": "nothing would be left to score",
              "calib_samples": "every bundled sample is scored",
              "out_foreign": "is not empty and holds no evaluate.json", "hr_missing": "does not exist",
              "niqe_patch": "--niqe-patch 50", "border": "--border 30 leaves too little",
              "devices": "--devices 64: this machine has", "no_prompt": "no prompt embeddings"}[case]
    if case == "method":
        args += ["--methods", "fp,svdqant-w4a4"]
    elif case == "calib_n":
        args += ["--methods", "svdquant-w4a4", "--calib", "2"]
    elif case == "calib_samples":                  # evaluating all bundled samples: the default calibration is empty
        args[2] = SAMPLES_DIR
        args += ["--methods", "qdit4sr-w4a4"]
    elif case == "out_foreign":
        out.mkdir()
        (out / "mine.txt").write_text("x")
        args += ["--methods", "fp"]
    elif case == "hr_missing":
        args[2] = str(tmp_path / "nope")
    elif case == "no_prompt":                      # a model file of another config that needs prompt embeddings
        import jax
        from qdit4sr_jax.config import ModelConfig
        from qdit4sr_jax.io import modelfile
        from qdit4sr_jax.model.dit4sr import param_shapes
        tiny = ModelConfig.preset("tiny").replace(vae=ModelConfig.preset("demo").vae, in_channels=48, out_channels=48)
        tree = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), param_shapes(tiny))
        modelfile.save_model(str(tmp_path / "tiny.safetensors"), tiny, {"transformer": tree})
        args += ["--methods", "fp", "--model", str(tmp_path / "tiny.safetensors")]
    elif case in ("niqe_patch", "border", "devices"):
        args += ["--methods", "fp", {"niqe_patch": "--niqe-patch", "border": "--border", "devices": "--devices"}[case],
                 {"niqe_patch": "50", "border": "30", "devices": "64"}[case]]
    assert cli.main(args) == 2
    assert expect in capsys.readouterr().err
    assert (sorted(os.listdir(out)) == ["mine.txt"]) if case == "out_foreign" else not out.exists()
