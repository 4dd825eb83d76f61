"""Bad input: every case of docs/BAD_INPUTS.md that is not covered elsewhere, each with the message it must
give (what is wrong and what to do), and atomic writes (a failure mid-write leaves no partial file).
Fast: no model is compiled here (trees come from jax.eval_shape + numpy)."""
import json
import os
import shutil
import warnings

import jax
import numpy as np
import pytest
from PIL import Image

from qdit4sr_jax import checkpoint, pipeline
from qdit4sr_jax.config import ModelConfig
from qdit4sr_jax.io import modelfile
from qdit4sr_jax.io.safetensors import LazyTensor, SafeTensorsError, save_file
from qdit4sr_jax.model.dit4sr import param_shapes
from qdit4sr_jax.quant import quantizer as qz
from qdit4sr_jax.quant.api import quantize
from qdit4sr_jax.quant.config import QuantConfig
from qdit4sr_jax.quant.stats import merge_stats
from qdit4sr_jax.quant.vasmp import allocate_weight_bits
from qdit4sr_jax.quant.vatmp import schedule_activation_bits

TINY = ModelConfig.preset("tiny").replace(vae=ModelConfig.preset("demo").vae, in_channels=48, out_channels=48)


def _random_tree(abstract, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: (rng.standard_normal(a.shape) * 0.05).astype(np.float32), abstract)


def _small_linears(seed=0):
    """A params tree with two quantizable linears (no model needed)."""
    rng = np.random.default_rng(seed)
    lin = lambda k, n: {"kernel": rng.standard_normal((k, n)).astype(np.float32),  # noqa: E731
                        "bias": np.zeros(n, np.float32)}
    return {"transformer_blocks_0": {"attn": {"to_q": lin(64, 64), "to_k": lin(64, 64)}, "ff": {"net_2": lin(128, 64)}}}


def _only(folder, names):
    """The folder holds exactly `names` (no temp or partial files)."""
    assert sorted(os.listdir(folder)) == sorted(names), os.listdir(folder)


# ----------------------------------------------------------------------------- model files

@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    path = str(d / "tiny.safetensors")
    modelfile.save_model(path, TINY, {"transformer": _random_tree(param_shapes(TINY))})
    return path


def test_valid_model_file_passes_the_check(model_file):
    cfg, params = modelfile.load_pretrained(model_file)
    assert cfg == TINY and "transformer_blocks_2" in params["transformer"]


@pytest.mark.parametrize("damage, needles", [
    ("garbage", ["is not a safetensors file"]),
    ("truncated", ["truncated"]),
    ("plain", ["not a qdit4sr-jax model file", "python -m converters"]),
    ("bad_config", ["ModelConfig in its metadata is corrupt", "re-convert"]),
])
def test_corrupt_truncated_or_foreign_model_file(model_file, tmp_path, damage, needles):
    p = tmp_path / "m.safetensors"
    raw = open(model_file, "rb").read()
    if damage == "garbage":
        p.write_bytes(os.urandom(4096))
    elif damage == "truncated":
        p.write_bytes(raw[: len(raw) // 2])
    elif damage == "plain":
        save_file({"weight": np.zeros((4, 4), np.float32)}, p)
    else:
        save_file({"weight": np.zeros((4, 4), np.float32)}, p,
                  {"format": modelfile.FORMAT, "model_config": "{not json"})
    with pytest.raises(ValueError) as e:
        modelfile.load_pretrained(str(p))
    for n in needles:
        assert n in str(e.value)
    if damage in ("garbage", "truncated"):
        assert isinstance(e.value, SafeTensorsError) and str(p) in str(e.value)


def test_missing_extra_misshapen_and_nonfinite_weights_listed_together(tmp_path):
    tree = _random_tree(param_shapes(TINY))
    blk = tree["transformer_blocks_1"]
    del blk["attn"]["to_q"]["kernel"]                                          # missing
    blk["attn"]["to_x"] = {"kernel": np.zeros((32, 32), np.float32)}           # unexpected
    blk["ff"]["net_2"]["kernel"] = np.zeros((64, 32), np.float32)              # wrong shape (128, 32)
    blk["norm1"]["linear"]["kernel"][0, :3] = [np.nan, np.inf, -np.inf]        # non-finite
    p = str(tmp_path / "bad.safetensors")
    modelfile.save_model(p, TINY, {"transformer": tree})
    with pytest.raises(ValueError) as e:
        modelfile.load_pretrained(p)
    msg = str(e.value)
    assert "4 problem(s)" in msg
    assert "missing transformer/transformer_blocks_1/attn/to_q/kernel (32, 32)" in msg
    assert "unexpected key transformer/transformer_blocks_1/attn/to_x/kernel" in msg
    assert "shape mismatch transformer/transformer_blocks_1/ff/net_2/kernel: got (64, 32)" in msg and "(128, 32)" in msg
    assert "norm1/linear/kernel: 3 NaN/Inf value(s)" in msg
    assert "python -m converters transformer --config" in msg
    cfg, params = modelfile.load_model(p)            # the raw reader still reads it (check=False)
    assert params["transformer"]["transformer_blocks_1"]["attn"]["to_x"]["kernel"].shape == (32, 32)


def test_check_params_accepts_quantized_nodes_and_catches_their_shape():
    tree = _random_tree(param_shapes(TINY))
    q = quantize(tree, "w4a4")
    modelfile.check_params(TINY, {"transformer": q})
    other = TINY.replace(attention_head_dim=8, caption_projection_dim=16)        # hidden 16 instead of 32
    with pytest.raises(ValueError, match="shape mismatch transformer/transformer_blocks_0/attn/to_q/kernel"):
        modelfile.check_params(other, {"transformer": q})


def test_sd3_vae_tree_is_checked():
    from qdit4sr_jax.model import vae
    cfg = ModelConfig.preset("tiny")
    v = _random_tree(jax.eval_shape(lambda k: vae.init(cfg.vae, k, 64), jax.random.PRNGKey(0)))
    modelfile.check_params(cfg, {"vae": v})
    del v["decoder"]
    with pytest.raises(ValueError, match="missing vae/decoder/"):
        modelfile.check_params(cfg, {"vae": v})


def test_missing_pretrained_name_or_path():
    with pytest.raises(FileNotFoundError, match="known names"):
        modelfile.load_pretrained("/no/such/model.safetensors")


# ----------------------------------------------------------------------------- quantized checkpoints

@pytest.fixture(scope="module")
def qckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    qp = quantize(_small_linears(), "w4a4")
    checkpoint.save(str(d / "ck"), qp, QuantConfig.preset("w4a4"))
    return str(d / "ck"), qp


@pytest.mark.parametrize("damage, exc, needle", [
    ("not_a_checkpoint", FileNotFoundError, "is not a qdit4sr-jax quantized checkpoint"),
    ("meta_not_json", ValueError, "is corrupt (not JSON"),
    ("meta_wrong_format", ValueError, "is not 'qdit4sr-jax/quantized-params'"),
    ("state_missing", FileNotFoundError, "incomplete quantized checkpoint: state/ is missing"),
    ("state_truncated", ValueError, "truncated or damaged: re-export"),
    ("bits_changed", ValueError, "wrong bit-width"),
])
def test_damaged_quantized_checkpoint(qckpt, tmp_path, damage, exc, needle):
    src, _ = qckpt
    p = str(tmp_path / "ck")
    shutil.copytree(src, p)
    meta = os.path.join(p, checkpoint.META)
    if damage == "not_a_checkpoint":
        p = str(tmp_path)
    elif damage == "meta_not_json":
        open(meta, "w").write("{truncated")
    elif damage == "meta_wrong_format":
        m = json.load(open(meta))
        m["format"] = "something-else"
        json.dump(m, open(meta, "w"))
    elif damage == "state_missing":
        shutil.rmtree(os.path.join(p, checkpoint.STATE))
    elif damage == "state_truncated":
        for r, _, fs in os.walk(os.path.join(p, checkpoint.STATE)):
            for f in fs:
                fp = os.path.join(r, f)
                with open(fp, "r+b") as fh:
                    fh.truncate(os.path.getsize(fp) // 2)
    else:
        m = json.load(open(meta))
        m["nodes"]["transformer_blocks_0/attn/to_q/kernel"]["w_bits"] = 8     # codes are packed 4-bit
        json.dump(m, open(meta, "w"))
    with pytest.raises(exc) as e:
        checkpoint.load(p)
    assert needle in str(e.value)


# ----------------------------------------------------------------------------- other files

def test_corrupt_prompt_embeddings_and_images(tmp_path):
    bad = tmp_path / "p.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="not a readable .npz of prompt embeddings.*python -m converters prompts"):
        pipeline.load_prompts(str(bad))
    np.savez(tmp_path / "other.npz", x=np.ones(3))
    with pytest.raises(ValueError, match="not a prompt-embeddings file"):
        pipeline.load_prompts(str(tmp_path / "other.npz"))
    img = tmp_path / "broken.png"
    img.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    with pytest.raises(ValueError, match="cannot read image .*broken.png.*corrupt or not an image"):
        pipeline.read_images(str(img))
    good = tmp_path / "t.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(good)
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:60])
    with pytest.raises(ValueError, match="trunc.png"):
        pipeline.read_images(str(tmp_path / "trunc.png"))


# ----------------------------------------------------------------------------- images

def test_image_modes_converted_with_warnings(tmp_path):
    """Image files as users have them: grayscale, RGBA, palette (with transparency), 16-bit grayscale."""
    a = np.linspace(0, 255, 6 * 5).reshape(6, 5).astype(np.uint8)
    Image.fromarray(a, "L").save(tmp_path / "a_gray.png")
    Image.fromarray(np.dstack([a, a, a, np.full_like(a, 100)]), "RGBA").save(tmp_path / "b_rgba.png")
    pal = Image.fromarray(a, "L").convert("P")
    pal.info["transparency"] = 0
    pal.save(tmp_path / "c_palette.png", transparency=0)
    i16 = Image.fromarray(a.astype(np.uint16) * 257)
    assert i16.mode.startswith("I;16")
    i16.save(tmp_path / "d_16bit.png")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        imgs = pipeline.read_images(str(tmp_path))
    msgs = " | ".join(str(x.message) for x in w)
    assert len(imgs) == 4 and all(i.shape == (6, 5, 3) and i.dtype == np.uint8 for i in imgs)
    for i in imgs:                                   # every mode gives the same gray picture
        assert np.abs(i[..., 0].astype(int) - a).max() <= 1
    assert "converted L" in msgs and "alpha channel is dropped" in msgs and "16-bit" in msgs
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rgb16 = pipeline.to_rgb_uint8(np.full((4, 4, 3), 65535, np.uint16))
    assert rgb16.max() == 255 and "uint16" in str(w[0].message)


@pytest.mark.parametrize("arr, needle", [
    (np.full((8, 8, 3), np.nan, np.float32), "NaN or Inf"),
    (np.full((8, 8, 3), np.inf, np.float64), "NaN or Inf"),
    (np.full((8, 8, 3), 2.0, np.float32), r"must be in \[0, 1\]"),
    (np.zeros((8, 8, 2), np.uint8), "got shape"),
    (np.zeros((8, 8, 3), np.int32), "unsupported image dtype"),
    (np.zeros((0, 8, 3), np.uint8), "non-empty"),
])
def test_bad_image_arrays_rejected(arr, needle):
    with pytest.raises(ValueError, match=needle):
        pipeline.to_rgb_uint8(arr)


def test_image_below_minimum_size():
    cfg = ModelConfig.preset("tiny").replace(scale=1)                   # VAE /2 x patch 2 -> 4 pixels
    bundle = {"transformer": {}, "vae": {"x": np.zeros(1)}}
    with pytest.raises(ValueError, match="3x8 is too small: the minimum side is 4 pixels"):
        pipeline.upscale(cfg, bundle, np.zeros((8, 3, 3), np.uint8))


def test_large_images_are_tiled():
    """Latents above one tile go through overlapping tiles (memory bounded by the tile, and tile_batch
    tiles per model call); the multi-tile numerics are tested in tests/test_pipeline.py."""
    from qdit4sr_jax import sampling
    cfg = ModelConfig.preset("dit4sr")
    lat = 4096 // 8                                                   # 1024px LR x4 -> 512 x 512 latent
    assert sampling.needs_tiling(lat, lat, cfg.tile_latent)
    offs = sampling.tile_offsets(lat, cfg.tile_latent, cfg.tile_overlap)
    assert offs[0] == 0 and offs[-1] == lat - cfg.tile_latent and len(offs) == 13
    with pytest.raises(ValueError, match="tile_overlap 64 must be smaller than the tile size 64"):
        sampling.tile_offsets(100, 64, 64)


# ----------------------------------------------------------------------------- quantization

@pytest.mark.parametrize("make, needle", [
    (lambda: QuantConfig(w_bits=1).validate(), "w_bits=1 is unsupported: use 2..8"),
    (lambda: QuantConfig(a_bits=16).validate(), "a_bits=16 is unsupported"),
    (lambda: QuantConfig(w_bits=3.5).validate(), "fractional averages need mixed precision"),
    (lambda: QuantConfig(w_bit_candidates=(1, 4)).validate(), "every candidate must be an int in 2..8"),
    (lambda: QuantConfig(layer_w_bits=(("a/b", 12),)).validate(), "unsupported bits 12"),
    (lambda: QuantConfig.preset("w9a4"), "weight bits must be 2..8"),
    (lambda: QuantConfig.preset("w4a4x"), "unknown quantization preset"),
    (lambda: qz.check_bits(1, "weight bits"), "weight bits"),
    (lambda: quantize(_small_linears(), "w4a4", layer_w_bits={"transformer_blocks_0/attn/to_q": 9}), "9"),
])
def test_unsupported_bit_widths(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()


def test_infeasible_budgets():
    with pytest.raises(ValueError, match="infeasible weight-bit budget: avg_bits=1.5 is below the smallest candidate 2"):
        allocate_weight_bits([1.0, 2.0], [10, 10], 1.5, (2, 4))
    with pytest.raises(ValueError, match="infeasible activation-bit budget: avg_bits=2.5 is below the smallest"):
        schedule_activation_bits(np.ones((2, 4)), 2.5, (3, 4))
    with pytest.raises(ValueError, match="infeasible"):       # through quantize: VaSMP below every candidate
        quantize(_small_linears(), QuantConfig(method="qdit4sr", w_bits=2.5, w_bit_candidates=(3, 4), vasmp=True,
                                               a_bits=None, lowrank_rank=4, hsvd=False))


def test_zero_variance_layers():
    """An all-zero weight quantizes to exact zeros (no division by zero) and gets the smallest
    candidate under VaSMP; all-zero activations still give a schedule meeting the average."""
    p = _small_linears()
    p["transformer_blocks_0"]["attn"]["to_k"]["kernel"][:] = 0.0
    q, info = __import__("qdit4sr_jax.quant.qdit4sr", fromlist=["x"]).quantize_qdit4sr(
        p, QuantConfig(method="qdit4sr", w_bits=4, vasmp=True, a_bits=None, lowrank_rank=4, hsvd=False).validate(),
        return_info=True)
    node = q["transformer_blocks_0"]["attn"]["to_k"]["kernel"]
    dq = np.asarray(node.dequantize())
    assert np.all(dq == 0.0) and info["w_bits"]["transformer_blocks_0/attn/to_k"] == 2
    s = schedule_activation_bits(np.zeros((3, 8)), 4, (3, 4, 6))
    assert s.shape == (3, 8) and np.all(s.mean(axis=1) == 4)


def test_nan_weights_rejected_by_quantize():
    p = _small_linears()
    p["transformer_blocks_0"]["ff"]["net_2"]["kernel"][5, 5] = np.inf
    with pytest.raises(ValueError, match="'transformer_blocks_0/ff/net_2': kernel has non-finite values"):
        quantize(p, "w4a4")


def test_calibration_with_zero_images():
    with pytest.raises(ValueError, match="at least one image"):
        pipeline.calibrate_images(TINY, {"transformer": {}}, [])
    with pytest.raises(ValueError, match="needs calibration statistics.*calibrate"):
        quantize(_small_linears(), "qdit4sr-w4a4")
    with pytest.raises(ValueError, match="needs calibration statistics"):
        quantize(_small_linears(), "qdit4sr-w4a4", calib={})
    with pytest.raises(ValueError, match="at least one stats dict"):
        merge_stats()


# ----------------------------------------------------------------------------- atomic writes

def test_safetensors_write_failure_leaves_nothing(tmp_path):
    """A tensor that fails while the file is being written (the streaming converter's LazyTensor)."""
    def boom():
        raise OSError("source checkpoint became unreadable")
    tensors = {"a": np.ones((256, 256), np.float32), "b": LazyTensor((4, 4), np.float32, boom)}
    with pytest.raises(OSError, match="unreadable"):
        save_file(tensors, tmp_path / "out.safetensors")
    _only(tmp_path, [])
    # the same through save_model, over an existing good file: the old file survives intact
    good = tmp_path / "m.safetensors"
    modelfile.save_model(str(good), TINY, {"transformer": {"x": np.ones(3, np.float32)}})
    before = good.read_bytes()
    with pytest.raises(OSError):
        modelfile.save_model(str(good), TINY, {"transformer": {"x": np.ones(3, np.float32), "y": tensors["b"]}})
    assert good.read_bytes() == before
    _only(tmp_path, ["m.safetensors"])


def test_quantized_export_failure_leaves_nothing(qckpt, tmp_path, monkeypatch):
    _, qp = qckpt
    real_dump = json.dump

    def broken_dump(obj, f, **kw):                   # after orbax wrote every array
        f.write('{"partial": ')
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(str(tmp_path / "ck"), qp)
    _only(tmp_path, [])
    monkeypatch.setattr(checkpoint.json, "dump", real_dump)
    checkpoint.save(str(tmp_path / "ck"), qp)
    monkeypatch.setattr(checkpoint.json, "dump", broken_dump)
    with pytest.raises(OSError):
        checkpoint.save(str(tmp_path / "ck"), qp, overwrite=True)
    _only(tmp_path, ["ck"])
    back, _ = checkpoint.load(str(tmp_path / "ck"))                 # the previous export is intact
    a = back["transformer_blocks_0"]["attn"]["to_q"]["kernel"].qvalue
    assert np.array_equal(np.asarray(a), np.asarray(qp["transformer_blocks_0"]["attn"]["to_q"]["kernel"].qvalue))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        checkpoint.save(str(tmp_path / "ck"), qp)


def test_output_image_and_prompt_write_failures_leave_nothing(tmp_path, monkeypatch):
    def broken_save(self, fp, *a, **k):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half an image")
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", broken_save)
        with pytest.raises(OSError, match="disk full"):
            pipeline.save_image(np.zeros((8, 8, 3), np.uint8), str(tmp_path / "out.png"))
    _only(tmp_path, [])
    with pytest.raises(ValueError, match="unknown image extension"):
        pipeline.save_image(np.zeros((8, 8, 3), np.uint8), str(tmp_path / "out.xyz"))

    emb = {"prompt_embeds": np.zeros((1, 7, 24), np.float32), "pooled_prompt_embeds": np.zeros((1, 20), np.float32)}

    def broken_savez(path, **kw):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(pipeline.np, "savez", broken_savez)
        with pytest.raises(OSError, match="disk full"):
            pipeline.save_prompts(str(tmp_path / "p.npz"), emb)
    _only(tmp_path, [])


def test_converter_cli_writes_nothing_on_bad_source(tmp_path, capsys):
    """Missing / extra keys and shape mismatches of PyTorch checkpoints are listed together by the key
    table (tests/test_converters.py); here: the CLI exits 1 with the message and writes nothing."""
    from converters.__main__ import main
    src = tmp_path / "src.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.weight": np.zeros((3, 3), np.float32)}, src)
    out = tmp_path / "out.safetensors"

    def run(source, needle):
        assert main(["transformer", "--src", str(source), "--config", "tiny", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert needle in err, err
        assert not out.exists()

    run(src, "does not map onto the model")
    (tmp_path / "weights.npy").write_bytes(b"x")
    run(tmp_path / "weights.npy", "unknown checkpoint type")
    run(tmp_path / "missing.safetensors", "no checkpoint at")
    (tmp_path / "weights.bin").write_bytes(b"this is not a torch file")
    pytest.importorskip("torch")
    run(tmp_path / "weights.bin", "weights_only=True")
    _only(tmp_path, ["src.safetensors", "weights.npy", "weights.bin"])

