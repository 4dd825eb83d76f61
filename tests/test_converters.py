"""Key-table mechanism, transformer table (full size on the meta device), CLI, safetensors and model files."""
import os
import struct
import sys

import ml_dtypes
import numpy as np
import pytest

from converters.keytable import CONV_HWIO, LINEAR, ConversionError, Rule, convert_state_dict, plan
from qdit4sr_jax.config import ModelConfig
from qdit4sr_jax.io.modelfile import config_from_json, config_to_json, load_model, load_pretrained, save_model
from qdit4sr_jax.io.safetensors import SafeTensorsError, SafeTensorsFile, load_file, save_file


class SDS:  # abstract leaf
    def __init__(self, shape, dtype=np.float32):
        self.shape, self.dtype = shape, np.dtype(dtype)


TABLE = [
    Rule(r"layers\.(\d+)\.fc\.weight", r"layers_\1/fc/kernel", LINEAR),
    Rule(r"layers\.(\d+)\.fc\.bias", r"layers_\1/fc/bias"),
    Rule(r"conv\.weight", "conv/kernel", CONV_HWIO),
    Rule(r"buffer", None),
]
ABSTRACT = {"layers_0": {"fc": {"kernel": SDS((3, 5)), "bias": SDS((5,))}},
            "layers_1": {"fc": {"kernel": SDS((5, 2)), "bias": SDS((2,))}},
            "conv": {"kernel": SDS((3, 3, 1, 4), ml_dtypes.bfloat16)}}


def good_sd():
    r = np.random.default_rng(0)
    return {"layers.0.fc.weight": r.standard_normal((5, 3)), "layers.0.fc.bias": r.standard_normal(5),
            "layers.1.fc.weight": r.standard_normal((2, 5)), "layers.1.fc.bias": r.standard_normal(2),
            "conv.weight": r.standard_normal((4, 1, 3, 3)), "buffer": np.zeros(7)}


def test_keytable_converts_transposes_and_casts():
    sd = good_sd()
    out = convert_state_dict(sd, TABLE, ABSTRACT)
    np.testing.assert_array_equal(out["layers_0"]["fc"]["kernel"], sd["layers.0.fc.weight"].T.astype(np.float32))
    assert out["layers_1"]["fc"]["bias"].dtype == np.float32
    assert out["conv"]["kernel"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out["conv"]["kernel"].astype(np.float64),
                                  sd["conv.weight"].transpose(2, 3, 1, 0).astype(ml_dtypes.bfloat16).astype(np.float64))
    assert "buffer" not in str(out)


def test_keytable_collects_every_failure():
    sd = good_sd()
    del sd["layers.1.fc.bias"]                       # missing
    sd["layers.0.fc.extra"] = np.zeros(3)            # unmatched
    sd["layers.0.fc.weight"] = np.zeros((5, 4))      # wrong shape
    sd["layers.7.fc.bias"] = np.zeros(2)             # target not in the model
    with pytest.raises(ConversionError) as e:
        convert_state_dict(sd, TABLE, ABSTRACT)
    msg = str(e.value)
    assert len(e.value.problems) == 4, msg
    assert "'layers.0.fc.extra'" in msg and "no rule" in msg
    assert "'layers_1/fc/bias'" in msg and "missing" in msg
    assert "'layers.0.fc.weight' has shape (5, 4)" in msg and "(4, 5)" in msg and "(3, 5)" in msg
    assert "'layers_7/fc/bias'" in msg


# ---------------------------------------------------------------- full-size transformer table (meta device)

def _meta_state_dict(module_fn):
    torch = pytest.importorskip("torch")
    with torch.device("meta"):
        m = module_fn()
    return m, {k: tuple(v.shape) for k, v in m.state_dict().items()}


def test_full_size_dit4sr_maps_completely():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "parity"))
    from torch_dit4sr import TorchDiT4SR
    from converters.transformer import plan_transformer
    m, shapes = _meta_state_dict(TorchDiT4SR)
    # the public facts: 1,383 tensors, 2,716,814,144 parameters (the 384^2 x 1536 pos table is a buffer)
    assert len(shapes) == 1383
    assert sum(p.numel() for p in m.parameters()) == 2_716_814_144
    steps = plan_transformer(shapes, ModelConfig.preset("dit4sr"))   # raises on any unmatched/missing key
    dropped = set(shapes) - {s.src for s in steps}
    assert len(steps) == 1252
    assert dropped == {"pos_embed.pos_embed"} | {
        f"transformer_blocks.{i}.attn2.{n}.{w}" for i in range(13)
        for n, w in [(a, b) for a in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out") for b in ("weight", "bias")]
        + [("norm_added_q", "weight"), ("norm_added_k", "weight")]}


def test_full_size_sd35_medium_maps_completely():
    pytest.importorskip("diffusers")
    from diffusers import SD3Transformer2DModel
    from converters.transformer import plan_transformer
    m, shapes = _meta_state_dict(lambda: SD3Transformer2DModel(
        sample_size=128, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"))
    assert sum(p.numel() for p in m.parameters()) == 2_243_171_520
    steps = plan_transformer(shapes, ModelConfig.preset("dit4sr").replace(lr_stream=False))
    assert len(steps) == len(shapes) - 1


# ---------------------------------------------------------------- CLI end to end on a tiny checkpoint

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "parity"))
    from torch_dit4sr import TorchDiT4SR
    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    tm = TorchDiT4SR(sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
                     num_layers=cfg.num_layers, attention_head_dim=cfg.attention_head_dim,
                     num_attention_heads=cfg.num_attention_heads, joint_attention_dim=cfg.joint_attention_dim,
                     caption_projection_dim=cfg.caption_projection_dim,
                     pooled_projection_dim=cfg.pooled_projection_dim, out_channels=cfg.out_channels,
                     pos_embed_max_size=cfg.pos_embed_max_size, dual_attention_layers=cfg.dual_attention_layers)
    sd = {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}
    return tmp_path_factory.mktemp("ckpt"), sd


def _run_cli(args, capsys):
    from converters.__main__ import main
    rc = main(args)
    return rc, capsys.readouterr()


def test_cli_converts_safetensors_and_bin(tiny_ckpt, capsys):
    torch = pytest.importorskip("torch")
    d, sd = tiny_ckpt
    src = str(d / "t.safetensors")
    save_file(sd, src)
    out = str(d / "model.safetensors")
    rc, cap = _run_cli(["transformer", "--src", src, "--config", "tiny", "--out", out], capsys)
    assert rc == 0, cap.err
    cfg, params = load_model(out)
    assert cfg == ModelConfig.preset("tiny")
    k = params["transformer"]["transformer_blocks_0"]["attn2"]["to_q_control"]["kernel"]
    np.testing.assert_array_equal(k, sd["transformer_blocks.0.attn2.to_q_control.weight"].T)
    conv = params["transformer"]["transformer_blocks_1"]["ff"]["control_conv"]["kernel"]
    np.testing.assert_array_equal(conv, sd["transformer_blocks.1.ff.control_conv.weight"].transpose(2, 3, 1, 0))
    # the same through torch.load(weights_only=True), stored as bf16
    binp = str(d / "t.bin")
    torch.save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()}, binp)
    out2 = str(d / "model_bf16.safetensors")
    rc, cap = _run_cli(["transformer", "--src", binp, "--config", "tiny", "--param-dtype", "bfloat16",
                        "--out", out2], capsys)
    assert rc == 0, cap.err
    cfg2, p2 = load_model(out2)
    assert cfg2.param_dtype == "bfloat16"
    k2 = p2["transformer"]["transformer_blocks_0"]["attn2"]["to_q_control"]["kernel"]
    assert k2.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(k2, k.astype(ml_dtypes.bfloat16))


def test_cli_checks_the_dropped_pos_table(tiny_ckpt, capsys):
    """The positional buffer is recomputed, not loaded: a checkpoint whose table was built for another
    sample_size (another base grid) is refused instead of silently shifting positions."""
    from diffusers.models.embeddings import PatchEmbed
    d, sd = tiny_ckpt
    cfg = ModelConfig.preset("tiny")
    other = PatchEmbed(height=32, width=32, patch_size=2, in_channels=4, embed_dim=cfg.hidden_size,
                       pos_embed_max_size=cfg.pos_embed_max_size).pos_embed.numpy()
    assert other.shape == sd["pos_embed.pos_embed"].shape
    src = str(d / "other_pos.safetensors")
    save_file(dict(sd, **{"pos_embed.pos_embed": other}), src)
    out = d / "never_pos.safetensors"
    rc, cap = _run_cli(["transformer", "--src", src, "--config", "tiny", "--out", str(out)], capsys)
    assert rc == 1 and "'pos_embed.pos_embed'" in cap.err and "sample_size=128" in cap.err, cap.err
    assert not out.exists()
    rc, cap = _run_cli(["transformer", "--src", src, "--config", "tiny", "--set", "sample_size=32",
                        "--out", str(out)], capsys)
    assert rc == 0, cap.err


@pytest.mark.parametrize("damage,needles", [
    ("missing", ["missing", "'transformer_blocks_2/ff/net_2/kernel'", "(128, 32)"]),
    ("extra", ["'transformer_blocks.0.attn.bogus.weight'", "(3, 3)", "no rule"]),
    ("shape", ["'proj_out.weight'", "(15, 32)", "(32, 15)", "(32, 16)"]),
])
def test_cli_bad_checkpoint_fails_and_writes_nothing(tiny_ckpt, capsys, damage, needles):
    d, sd = tiny_ckpt
    sd = dict(sd)
    if damage == "missing":
        del sd["transformer_blocks.2.ff.net.2.weight"]
    elif damage == "extra":
        sd["transformer_blocks.0.attn.bogus.weight"] = np.zeros((3, 3), np.float32)
    else:
        sd["proj_out.weight"] = np.zeros((15, 32), np.float32)
    src = str(d / f"bad_{damage}.safetensors")
    save_file(sd, src)
    out = d / f"never_{damage}.safetensors"
    rc, cap = _run_cli(["transformer", "--src", src, "--config", "tiny", "--out", str(out)], capsys)
    assert rc == 1
    for n in needles:
        assert n in cap.err, (n, cap.err)
    assert not out.exists()
    assert not [p for p in os.listdir(d) if p.startswith(".tmp-")]


# ---------------------------------------------------------------- safetensors reader / writer

def test_safetensors_roundtrip_all_dtypes(tmp_path):
    r = np.random.default_rng(1)
    ts = {"f32": r.standard_normal((3, 4)).astype(np.float32),
          "bf16": r.standard_normal((5,)).astype(ml_dtypes.bfloat16),
          "f16": r.standard_normal((2, 2)).astype(np.float16),
          "f8": r.standard_normal((4,)).astype(ml_dtypes.float8_e4m3fn),
          "i8": r.integers(-128, 127, (3, 3)).astype(np.int8), "u8": np.arange(5, dtype=np.uint8),
          "i64": np.array([1, -2], np.int64), "scalar": np.array(3.5, np.float32), "empty": np.zeros((0, 3), np.float32),
          "b": np.array([True, False])}
    p = tmp_path / "a.safetensors"
    save_file(ts, p, {"hello": "world"})
    f = SafeTensorsFile(p)
    assert f.metadata == {"hello": "world"}
    back = load_file(p)
    for k, v in ts.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert back[k].tobytes() == v.tobytes()


def test_safetensors_lazy_tensors_stream_and_are_checked(tmp_path):
    from qdit4sr_jax.io.safetensors import LazyTensor
    calls = []
    lazy = LazyTensor((2, 3), np.float32, lambda: calls.append(1) or np.ones((2, 3), np.float32))
    p = tmp_path / "lazy.safetensors"
    save_file({"a": np.zeros(2, np.int8), "b": lazy}, p)
    assert calls == [1]
    np.testing.assert_array_equal(load_file(p)["b"], np.ones((2, 3), np.float32))
    bad = LazyTensor((2, 3), np.float32, lambda: np.ones((3, 2), np.float32))
    q = tmp_path / "bad.safetensors"
    with pytest.raises(ValueError, match="declared"):
        save_file({"b": bad}, q)
    assert not q.exists() and not [x for x in os.listdir(tmp_path) if x.startswith(".tmp-")]


def test_safetensors_interoperates_with_reference_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    a = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "y": np.array([1, 2], np.int32)}
    p1 = str(tmp_path / "ref.safetensors")
    st.save_file(a, p1, metadata={"m": "1"})
    f = SafeTensorsFile(p1)
    assert f.metadata == {"m": "1"}
    np.testing.assert_array_equal(f.get("x"), a["x"])
    p2 = str(tmp_path / "ours.safetensors")
    save_file(a, p2)
    b = st.load_file(p2)
    np.testing.assert_array_equal(b["y"], a["y"])
    torch = pytest.importorskip("torch")
    import safetensors.torch
    save_file({"z": np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16)}, p2)
    z = safetensors.torch.load_file(p2)["z"]
    assert z.dtype == torch.bfloat16 and z.float().tolist() == [0, 1, 2, 3]


def test_safetensors_bad_files_fail_clearly(tmp_path):
    p = tmp_path / "a.safetensors"
    save_file({"x": np.zeros((64, 64), np.float32)}, p)
    raw = p.read_bytes()
    cases = {"trunc.safetensors": raw[:-100], "tiny.safetensors": b"abc",
             "png.safetensors": b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
             "nojson.safetensors": struct.pack("<Q", 4) + b"{{{{",
             "hugeheader.safetensors": struct.pack("<Q", 10 ** 9) + b"{}"}
    for name, data in cases.items():
        q = tmp_path / name
        q.write_bytes(data)
        with pytest.raises(SafeTensorsError) as e:
            SafeTensorsFile(q)
        assert name in str(e.value)
    assert "truncated" in str(pytest.raises(SafeTensorsError, SafeTensorsFile, tmp_path / "trunc.safetensors").value)
    with pytest.raises(FileNotFoundError):
        SafeTensorsFile(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------- model files

@pytest.mark.parametrize("name", ["dit4sr", "tiny"])
def test_config_json_roundtrip(name):
    cfg = ModelConfig.preset(name)
    assert config_from_json(config_to_json(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        config_from_json(config_to_json(cfg)[:-1] + ', "from_the_future": 1}')


def test_save_load_model_roundtrip(tmp_path):
    cfg = ModelConfig.preset("tiny").replace(lr_key_mode="r1")
    params = {"transformer": {"a": {"kernel": np.ones((2, 3), np.float32)},
                              "b": np.arange(4).astype(ml_dtypes.bfloat16)}, "prompt": {"pooled": np.zeros(5)}}
    p = str(tmp_path / "m.safetensors")
    save_model(p, cfg, params)
    cfg2, back = load_model(p)
    assert cfg2 == cfg
    assert back["transformer"]["b"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(back["transformer"]["a"]["kernel"], params["transformer"]["a"]["kernel"])
    save_file({"x": np.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a qdit4sr-jax model file"):
        load_model(str(tmp_path / "plain.safetensors"))
    with pytest.raises(TypeError, match="not an array"):
        save_model(str(tmp_path / "x.safetensors"), cfg, {"transformer": {"w": object()}})


def test_load_pretrained_demo_or_clear_message():
    from qdit4sr_jax.io.modelfile import PRETRAINED
    if os.path.exists(PRETRAINED["demo"]):
        cfg, params = load_pretrained("demo")
        assert "transformer" in params
    else:
        with pytest.raises(FileNotFoundError, match="not available"):
            load_pretrained("demo")
    with pytest.raises(FileNotFoundError, match="known names"):
        load_pretrained("/no/such/model.safetensors")
