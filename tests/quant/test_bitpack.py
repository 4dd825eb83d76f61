"""b-bit code storage (`quantizer.pack_codes` / `unpack_codes`, `QuantizedWeight.packed` for every
w_bits < 8): exact round trips, the documented layout, stored bytes, and bit-identical model outputs of
packed vs unpacked (int8) codes for mixed per-layer widths."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
import qdit4sr_jax
from qdit4sr_jax.quant import quantizer as qz
from qdit4sr_jax.quant.api import quantized_layers
from qdit4sr_jax.quant.qweight import QuantizedWeight, make_qweight, packs


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_roundtrip_all_widths(bits):
    rng = np.random.default_rng(bits)
    lo, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    for shape in ((3, 1), (2, 3, 16), (4, 29)):
        q = rng.integers(lo, hi + 1, size=shape).astype(np.int8)
        q.flat[0], q.flat[-1] = lo, hi                                  # both ends of the range
        p = qz.pack_codes(jnp.asarray(q), bits)
        L = shape[-1]
        want_len = L if bits == 8 else (-(-L // 2) if bits == 4 else -(-L // 8) * bits)
        assert p.shape == shape[:-1] + (want_len,) == shape[:-1] + (qz.packed_length(L, bits),)
        assert p.dtype == (jnp.int8 if bits == 8 else jnp.uint8)
        np.testing.assert_array_equal(np.asarray(qz.unpack_codes(p, bits, L)), q)
        if bits == 4:                                                   # 4 bits: the pack_int4 nibbles
            np.testing.assert_array_equal(np.asarray(p), np.asarray(qz.pack_int4(jnp.asarray(q))))


def test_layout_documented():
    q = np.array([[-16, 15, 1, -1, 0, 7, -8, 9, 3]], np.int8)              # 5-bit codes, 9 = one run + 1
    u = q.astype(np.uint8) & 0x1F
    p = np.asarray(qz.pack_codes(jnp.asarray(q), 5))
    assert p.shape == (1, 10)
    for run in range(2):
        r = np.zeros(8, np.uint8)
        r[: len(u[0, 8 * run: 8 * run + 8])] = u[0, 8 * run: 8 * run + 8]
        nib = [(r[2 * j] & 0xF) | ((r[2 * j + 1] & 0xF) << 4) for j in range(4)]
        plane4 = sum(int((r[t] >> 4) & 1) << t for t in range(8))
        assert p[0, 5 * run: 5 * run + 5].tolist() == nib + [plane4]
    q2 = np.array([[1, -2, -1, 0, 1, 1, -2, -1]], np.int8)                # 2-bit: two bit-planes
    u2 = q2.astype(np.uint8) & 3
    assert np.asarray(qz.pack_codes(jnp.asarray(q2), 2)).tolist() == [
        [sum(int((u2[0, t] >> j) & 1) << t for t in range(8)) for j in range(2)]]


def test_unpack_rejects_bad_storage():
    p = qz.pack_codes(jnp.zeros((2, 16), jnp.int8), 5)
    with pytest.raises(ValueError, match="does not hold 17 5-bit values"):
        qz.unpack_codes(p, 5, 17)
    with pytest.raises(ValueError, match="5-bit codes are stored as uint8, got int8"):
        qz.unpack_codes(p.astype(jnp.int8), 5, 16)
    with pytest.raises(ValueError, match="packing bits"):
        qz.pack_codes(jnp.zeros((2, 16), jnp.int8), 9)


def _node_cases():
    # (w_bits, K, group_size, group_scale): per channel "nk", group-wise "gnk" (ragged last group),
    # two-level integer group scales ("nk" + gscale)
    return ([(b, 37, None, "float") for b in range(2, 9)]
            + [(b, k, gs, sc) for b in (3, 5) for k, gs, sc in ((72, 32, "float"), (64, 16, "int"))])


@pytest.mark.parametrize("w_bits,k,gs,scale_kind", _node_cases())
def test_node_stores_w_bits_per_code(w_bits, k, gs, scale_kind):
    """qvalue holds ceil(L/8) * b bytes per row (4 bits: ceil(L/2); 8: L), and codes() equal those of
    the unpacked (int8) node exactly (so does everything computed from them)."""
    n = 24
    w = jnp.asarray(np.random.default_rng(w_bits + k).normal(size=(n, k)).astype(np.float32))
    kw = dict(w_bits=w_bits, group_size=gs, a_bits=4, group_scale=scale_kind)
    node, ref = make_qweight(w, **kw), make_qweight(w, pack=False, **kw)
    assert node.packed == packs(w_bits) == (w_bits < 8) and not ref.packed
    L = k if node.layout == "nk" else node.groups[1]
    rows = n if node.layout == "nk" else node.groups[0] * n
    per_row = L if w_bits == 8 else (-(-L // 2) if w_bits == 4 else -(-L // 8) * w_bits)
    assert node.qvalue.size == rows * per_row and node.qvalue.dtype == (jnp.int8 if w_bits == 8 else jnp.uint8)
    if L % 8 == 0:
        assert node.qvalue.size == rows * L * w_bits // 8               # exactly b bits per code
    assert node.nibbles == (w_bits == 4)
    np.testing.assert_array_equal(np.asarray(node.codes()), np.asarray(ref.codes()))


MIXED = {"transformer_blocks_0/attn/to_q": 2, "transformer_blocks_0/attn/to_v": 3,
         "transformer_blocks_0/ff/net_0_proj": 5, "transformer_blocks_0/ff/net_2": 6,
         "transformer_blocks_1/attn/to_q": 7, "transformer_blocks_1/attn/to_v": 8}


def _unpacked(q):
    """The same tree with every node's codes stored as int8 (the storage 5..7-bit codes had before)."""
    return jax.tree_util.tree_map(
        lambda n: n.replace(qvalue=n.codes(), packed=False) if isinstance(n, QuantizedWeight) and n.packed else n,
        q, is_leaf=lambda n: isinstance(n, QuantizedWeight))


def _mode(q, mode):
    return jax.tree_util.tree_map(lambda n: n.replace(execution=mode) if isinstance(n, QuantizedWeight) else n,
                                  q, is_leaf=lambda n: isinstance(n, QuantizedWeight))


def test_mixed_bits_model_bit_identical(toy):
    """A toy model quantized with widths 2, 3, 4, 5, 6, 7, 8 (api.quantize layer_w_bits): packed storage
    gives bit-identical outputs to int8 codes in the fake-quant and int modes (the fused kernel on packed
    2-/3-/6-bit nodes: test_kernels.py), and the int path matches the fake-quant reference."""
    model, params, x = toy
    q = qdit4sr_jax.quantize(params, "w4a4", layer_w_bits=MIXED)
    qu = _unpacked(q)
    layers, ulayers = quantized_layers(q), quantized_layers(qu)
    for name, node in layers.items():
        b = MIXED.get(name, 4)
        assert node.w_bits == b and node.packed == (b < 8) and not ulayers[name].packed
        k_rows = node.groups[0] * node.n                                # "gnk" [G, N, g] (group size 64)
        assert node.qvalue.nbytes == k_rows * qz.packed_length(node.groups[1], b)
        assert node.qvalue.nbytes * 8 == ulayers[name].qvalue.nbytes * b   # g = 64: exactly b bits a code
    f = jax.jit(lambda p, x: model.apply({"params": p}, x))
    outs = {}
    for mode in ("fake", "int"):
        outs[mode] = f(_mode(q, mode), x)
        np.testing.assert_array_equal(np.asarray(outs[mode]), np.asarray(f(_mode(qu, mode), x)), err_msg=mode)
    assert rel_err(outs["int"], outs["fake"]) < 1e-3                   # see test_api.py: rare rounding ties


def test_checkpoint_v2_roundtrip_and_v1_files_load(tmp_path, monkeypatch):
    """Checkpoints keep the b-bit storage (version 2); a version-1 file (<= 4 bits as nibbles, 5..7 bits as
    int8) loads into the same b-bit packed nodes."""
    from qdit4sr_jax import checkpoint
    rng = np.random.default_rng(7)
    nodes = {f"l{b}": make_qweight(jnp.asarray(rng.normal(size=(16, 40)).astype(np.float32)), w_bits=b,
                                   group_size=gs, a_bits=4)
             for b, gs in ((2, None), (3, 8), (4, None), (5, 8), (6, None), (8, None))}
    tree = {k: {"kernel": n} for k, n in nodes.items()}
    checkpoint.save(str(tmp_path / "v2"), tree)
    back, _ = checkpoint.load(str(tmp_path / "v2"))
    for k, n in nodes.items():
        m = back[k]["kernel"]
        assert m.packed == n.packed and m.qvalue.dtype == n.qvalue.dtype
        np.testing.assert_array_equal(np.asarray(m.qvalue), np.asarray(n.qvalue))
    # the same nodes in the version-1 storage
    v1 = {}
    for k, n in nodes.items():
        c = n.codes()
        if n.w_bits <= 4:
            v1[k] = {"kernel": n.replace(qvalue=qz.pack_int4(c))}
        else:
            v1[k] = {"kernel": n.replace(qvalue=c, packed=False)}
    monkeypatch.setattr(checkpoint, "VERSION", 1)
    checkpoint.save(str(tmp_path / "v1"), v1)
    monkeypatch.undo()
    back, _ = checkpoint.load(str(tmp_path / "v1"))
    for k, n in nodes.items():
        m = back[k]["kernel"]
        assert m.packed == n.packed and m.qvalue.shape == n.qvalue.shape, k
        np.testing.assert_array_equal(np.asarray(m.qvalue), np.asarray(n.qvalue))
        np.testing.assert_array_equal(np.asarray(m.codes()), np.asarray(n.codes()))
