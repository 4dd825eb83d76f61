"""orbax export: bit-exact round trip, packed on disk, atomic save, clear errors on bad checkpoints."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qdit4sr_jax
from qdit4sr_jax import checkpoint
from qdit4sr_jax.quant.api import quantized_layers
from qdit4sr_jax.quant.config import QuantConfig
from qdit4sr_jax.quant.qweight import QuantizedWeight


@pytest.fixture(scope="module")
def qtree(toy):
    model, params, x = toy
    calib = qdit4sr_jax.calibrate(model, params, x)
    cfg = QuantConfig.preset("svdquant-w4a4").replace(lowrank_rank=4, w_symmetric=False)
    params = dict(params, proj_out=dict(params["proj_out"], kernel=params["proj_out"]["kernel"].astype(jnp.bfloat16)))
    q = qdit4sr_jax.quantize(params, cfg, calib,
                             a_schedules={"transformer_blocks_0/ff/net_2": np.array([4, 6, 8], np.int32)})
    return q, cfg


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def test_roundtrip_bit_exact(qtree, tmp_path, toy):
    q, cfg = qtree
    info = qdit4sr_jax.save(tmp_path / "ck", q, cfg)
    assert info["bytes_on_disk"] > 0 and info["quantized_layers"] == 10
    assert info["bytes_on_disk"] == checkpoint.dir_size(str(tmp_path / "ck"))
    q2, cfg2 = qdit4sr_jax.load(tmp_path / "ck")
    assert cfg2 == cfg
    a, b = _leaves(q), _leaves(q2)
    assert [p for p, _ in a] == [p for p, _ in b]
    for (p, x), (_, y) in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape, p
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
    n1 = quantized_layers(q)["transformer_blocks_0/ff/net_2"]
    n2 = quantized_layers(q2)["transformer_blocks_0/ff/net_2"]
    assert n2.static_dict() == n1.static_dict()
    assert n2.qvalue.dtype == jnp.uint8 and n2.packed                     # packed in memory after load
    model, _, x = toy
    np.testing.assert_array_equal(np.asarray(model.apply({"params": q}, x, step=1)),
                                  np.asarray(model.apply({"params": q2}, x, step=1)))


def test_packed_on_disk(toy, tmp_path):
    """4-bit packed codes take half the bytes of 8-bit codes in the arrays written, and the files shrink too
    (same layer shapes)."""
    _, params, _ = toy
    sizes = {}
    for bits in (4, 8):
        cfg = QuantConfig(w_bits=bits, a_bits=8, w_group_size=None)
        q = qdit4sr_jax.quantize(params, cfg)
        info = qdit4sr_jax.save(tmp_path / f"w{bits}", q, cfg)
        codes = sum(n.qvalue.size for n in quantized_layers(q).values())
        sizes[bits] = (info["bytes_on_disk"], codes, info["bytes_arrays"])
    assert sizes[4][1] * 2 == sizes[8][1]                                  # packed: half the elements (uint8)
    assert sizes[8][2] - sizes[4][2] == sizes[4][1]                       # the arrays written: exactly those bytes
    # on disk: orbax's OCDBT splits the arrays over a varying number of zstd-compressed files, so a checkpoint's
    # size varies by ~10 KB from save to save (the 4-bit one here 90.7-112.7 KB; it shrank by 30.9-50.9 KB of the
    # 45.1 KB the codes lose, 2026-12-07): half of it, at least
    assert sizes[8][0] - sizes[4][0] >= 0.5 * sizes[4][1]


def test_interrupted_save_leaves_nothing(qtree, tmp_path, monkeypatch):
    q, cfg = qtree
    real_dump = json.dump

    def boom(*a, **k):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(checkpoint.json, "dump", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        qdit4sr_jax.save(tmp_path / "ck", q, cfg)
    assert os.listdir(tmp_path) == []                                      # no ck, no temp dir
    monkeypatch.setattr(checkpoint.json, "dump", real_dump)
    qdit4sr_jax.save(tmp_path / "ck", q, cfg)
    with pytest.raises(FileExistsError):
        qdit4sr_jax.save(tmp_path / "ck", q, cfg)
    qdit4sr_jax.save(tmp_path / "ck", q, cfg, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def _edit_meta(path, fn):
    mp = os.path.join(path, checkpoint.META)
    meta = json.load(open(mp))
    fn(meta)
    json.dump(meta, open(mp, "w"))


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["nodes"]["transformer_blocks_0/attn/to_q/kernel"].update(w_bits=8), "wrong bit-width"),
    (lambda m: m["nodes"]["transformer_blocks_0/attn/to_q/kernel"].update(w_bits=2), "wrong bit-width"),
    (lambda m: (m.update(version=1), m["nodes"]["transformer_blocks_0/attn/to_q/kernel"].update(w_bits=2)),
     "outside the 2-bit range"),                                      # a version-1 file: nibbles repacked
    (lambda m: m["nodes"]["transformer_blocks_0/attn/to_q/kernel"].update(w_bits=9), "unsupported weight bits"),
    (lambda m: m["nodes"]["transformer_blocks_0/attn/to_q/kernel"].pop("group_size"), "lacks static fields"),
    (lambda m: m["nodes"]["transformer_blocks_0/attn/to_q/kernel"]["arrays"].append("block_u"), "missing array"),
    (lambda m: m.pop("nodes"), "missing field 'nodes'"),
    (lambda m: m.update(format="something-else"), "format"),
])
def test_bad_checkpoints_fail_clearly(qtree, tmp_path, edit, match):
    q, cfg = qtree
    qdit4sr_jax.save(tmp_path / "ck", q, cfg)
    _edit_meta(str(tmp_path / "ck"), edit)
    with pytest.raises(ValueError, match=match):
        qdit4sr_jax.load(tmp_path / "ck")


def test_expected_config_and_missing_checkpoint(qtree, tmp_path):
    q, cfg = qtree
    qdit4sr_jax.save(tmp_path / "ck", q, cfg)
    qdit4sr_jax.load(tmp_path / "ck", expect_cfg=cfg)
    with pytest.raises(ValueError, match="w_bits"):
        qdit4sr_jax.load(tmp_path / "ck", expect_cfg=cfg.replace(w_bits=8))
    with pytest.raises(FileNotFoundError, match="not a qdit4sr-jax"):
        qdit4sr_jax.load(tmp_path / "nothing")


def test_roundtrip_block_branch_schedule_and_config(tmp_path):
    """H-SVD-style node (global + ragged block rank-1 factors, schedule, rotation) and a config with
    per-layer bits survive save/load exactly."""
    from qdit4sr_jax.quant.qweight import make_qweight
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(40, 64)).astype(np.float32))
    node = make_qweight(w, w_bits=3, group_size=32, a_bits=6, lr_a=rng.normal(size=(64, 4)),
                        lr_b=rng.normal(size=(4, 40)), block_u=rng.normal(size=(3, 2, 16)),
                        block_v=rng.normal(size=(3, 2, 48)), block=(16, 48), rotate=64,
                        a_schedule=np.array([6, 4, 8]))
    tree = {"transformer_blocks_0": {"attn": {"to_q": {"kernel": node, "bias": jnp.zeros(40, jnp.bfloat16)}}}}
    cfg = QuantConfig(method="qdit4sr", hsvd=True, hsvd_block=(16, 48), lowrank_rank=4,
                      layer_w_bits=(("transformer_blocks_0/attn/to_q", 3),))
    qdit4sr_jax.save(tmp_path / "ck", tree, cfg)
    back, cfg2 = qdit4sr_jax.load(tmp_path / "ck")
    assert cfg2 == cfg and cfg2.layer_w_bits == (("transformer_blocks_0/attn/to_q", 3),)
    n2 = back["transformer_blocks_0"]["attn"]["to_q"]["kernel"]
    assert n2.block == (16, 48) and n2.static_dict() == node.static_dict()
    for f in ("qvalue", "scale", "lr_a", "lr_b", "block_u", "block_v", "a_schedule"):
        a, b = getattr(node, f), getattr(n2, f)
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)), f
    assert back["transformer_blocks_0"]["attn"]["to_q"]["bias"].dtype == jnp.bfloat16


def _rotated_net_2(seed: int):
    """(quantized tree, config, node) of one 192 -> 48 ff/net_2 layer under the paper preset (full rotation, signs)."""
    rng = np.random.default_rng(seed)
    params = {"transformer_blocks_0": {"ff": {"net_2": {"kernel": jnp.asarray(rng.normal(size=(192, 48)), jnp.float32),
                                                        "bias": jnp.zeros(48, jnp.float32)}}}}
    cfg = QuantConfig.preset("qdit4sr-paper-w4a4").replace(vatmp=False, lowrank_rank=8, hsvd_block=(16, 64))
    q = qdit4sr_jax.quantize(params, cfg)
    return q, cfg, q["transformer_blocks_0"]["ff"]["net_2"]["kernel"]


def test_roundtrip_full_rotation_with_signs(tmp_path):
    """A node rotated over its full input dimension (192 = 12 * 16, stored H_12 kron H_16) with QuaRot's random
    signs (the node's static `signs`): save/load keeps the block, the signs, the packed codes and the function,
    in a version-4 file."""
    from qdit4sr_jax.quant.linear import linear
    from qdit4sr_jax.quant.transforms import rotation_signs
    q, cfg, node = _rotated_net_2(4)
    rng = np.random.default_rng(4)
    assert node.rotate == 192 and node.packed
    assert node.smooth is None and node.signs
    np.testing.assert_array_equal(np.asarray(node.sign_vector()), rotation_signs(192))
    qdit4sr_jax.save(tmp_path / "ck", q, cfg)
    assert json.load(open(tmp_path / "ck" / checkpoint.META))["version"] == checkpoint.SIGNS_VERSION
    back, cfg2 = qdit4sr_jax.load(tmp_path / "ck")
    assert cfg2 == cfg and cfg2.rotate_block == "full" and cfg2.rotate_signs
    n2 = back["transformer_blocks_0"]["ff"]["net_2"]["kernel"]
    assert n2.static_dict() == node.static_dict() and n2.qvalue.dtype == jnp.uint8
    x = jnp.asarray(rng.normal(size=(5, 192)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(linear(x, node)), np.asarray(linear(x, n2)))


def test_signs_in_smooth_of_older_files(tmp_path, monkeypatch):
    """A version-3 file whose node carries the signs folded into `smooth` (how nodes were made before
    2026-12-06) and no `signs` field loads with signs=False and computes what the new node computes."""
    from qdit4sr_jax.quant.linear import linear
    from qdit4sr_jax.quant.transforms import rotation_signs
    _, cfg, node = _rotated_net_2(5)
    rng = np.random.default_rng(5)
    old = node.replace(smooth=jnp.asarray(rotation_signs(192)), signs=False)
    real_static = QuantizedWeight.static_dict

    def without_signs(self):
        d = real_static(self)
        d.pop("signs")
        return d
    monkeypatch.setattr(QuantizedWeight, "static_dict", without_signs)
    qdit4sr_jax.save(tmp_path / "old", {"transformer_blocks_0": {"ff": {"net_2": {"kernel": old}}}}, cfg)
    monkeypatch.undo()
    meta = json.load(open(tmp_path / "old" / checkpoint.META))
    assert meta["version"] == 2 and "signs" not in meta["nodes"]["transformer_blocks_0/ff/net_2/kernel"]
    back, _ = qdit4sr_jax.load(tmp_path / "old")
    n2 = back["transformer_blocks_0"]["ff"]["net_2"]["kernel"]
    assert not n2.signs and n2.smooth is not None
    for dt in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(rng.normal(size=(5, 192)).astype(np.float32)).astype(dt)
        np.testing.assert_array_equal(np.asarray(linear(x, node)), np.asarray(linear(x, n2)))
    np.testing.assert_allclose(np.asarray(n2.dequantize()), np.asarray(node.dequantize()), rtol=1e-6, atol=1e-6)
