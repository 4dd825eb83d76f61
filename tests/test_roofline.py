"""benchmarks/gpu/roofline.py: the matmul inventory of one step (tiny preset) and the floor arithmetic."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu"))

from benchmarks.gpu import roofline as R  # noqa: E402


@pytest.fixture(scope="module")
def tiny_inv():
    return R.inventory(R.step_cfg("tiny"), 32, 1)


def test_tiny_inventory_matches_the_kernel_leaves(tiny_inv):
    cfg = R.step_cfg("tiny")
    c, t = tiny_inv["check"], tiny_inv["totals"]
    # every 2-D kernel leaf is one linear of the traced step (the VAE is not in the step and owns no leaf here)
    assert c["linears_traced"] == c["kernel_leaves_2d"] == c["kernels_traced"] == 66
    assert c["never_traced"] == []
    # lr_key_mode "released": to_k_control's output is discarded, one per attention module (attn + attn2)
    assert cfg.lr_key_mode == "released"
    n_dead = cfg.num_layers + len(cfg.dual_attention_layers)
    assert c["dead_count"] == n_dead and c["linears_live"] == 66 - n_dead
    assert c["dead_after_dce"] == ["transformer_blocks_*/attn/to_k_control", "transformer_blocks_*/attn2/to_k_control"]
    # FLOPs are 2 M K N summed; activation / output elements M K and M N
    rows = tiny_inv["linears"]
    assert sum(g["count"] for g in rows) == t["linear"]["count"]
    assert t["linear"]["gflop"] == pytest.approx(sum(2 * g["m"] * g["k"] * g["n"] * g["count"] for g in rows) / 1e9)
    assert t["act_elems"] == sum(g["act"] * g["count"] for g in rows)
    assert t["out_elems"] == sum(g["out"] * g["count"] for g in rows)
    # shapes: 2B = 2 rows of CFG, 2N tokens (noisy + LR) per row in the blocks' shared projections
    n = (32 // cfg.vae.downsample // cfg.patch_size) ** 2
    D = cfg.hidden_size
    by_role = {r: (g["m"], g["k"], g["n"]) for g in rows for r in g["roles"]}
    assert by_role["transformer_blocks_*/ff/net_0/proj"] == (2 * 2 * n, D, 4 * D)
    assert by_role["transformer_blocks_*/attn/to_q_control"] == (2 * n, D, D)
    assert by_role["transformer_blocks_*/attn/add_q_proj"] == (2 * cfg.context_len, D, D)
    assert by_role["proj_out"] == (2 * n, D, cfg.patch_size ** 2 * cfg.out_channels)
    # attention: QK^T and PV per attention module (attn with context, attn2 without)
    assert t["attention"]["count"] == 2 * (cfg.num_layers + len(cfg.dual_attention_layers))
    assert t["other"]["count"] == 0
    assert t["conv"]["count"] == 2 + cfg.num_layers          # pos_embed on x and LR, control_conv per block
    # the transformer blocks are quantized, the embedders / norm_out / proj_out not
    assert t["linear_quantized"]["count"] == sum(g["count"] for g in rows if g["quantized"])
    assert {r for g in rows if not g["quantized"] for r in g["roles"]} == {
        "proj_out", "context_embedder", "norm_out/linear", "time_text_embed/timestep_embedder/linear_1",
        "time_text_embed/timestep_embedder/linear_2", "time_text_embed/text_embedder/linear_1",
        "time_text_embed/text_embedder/linear_2"}
    # q / k / v read one array: one prologue per distinct input
    assert t["act_elems_quantized_shared"] < t["act_elems_quantized"]


def test_collect_dots_classifies_and_recurses():
    params = {"a": {"kernel": jnp.zeros((8, 16), jnp.bfloat16)}, "b": {"kernel": jnp.zeros((16, 4), jnp.float32),
                                                                     "bias": jnp.zeros((4,))}}

    @jax.custom_jvp
    def cj(x, w):
        return x @ w

    cj.defjvp(lambda p, t: (cj(*p), t[0] @ p[1]))

    def f(p, x):                                   # x [2, 3, 8] bf16
        y = jnp.einsum("...k,kn->...n", x, p["a"]["kernel"])                  # linear 6 x 8 x 16
        y = jax.jit(lambda y, w: y.astype(jnp.float32) @ w.astype(jnp.float32))(y, p["b"]["kernel"] * 2)  # 6x16x4
        s = jnp.einsum("bqd,bkd->bqk", y, y)                                   # attention, batch 2
        z = jax.lax.scan(lambda c, _: (c, cj(c, p["b"]["kernel"].T)), y, None, length=5)[1]  # 5x linear 6x4x16
        o = y @ jnp.ones((4, 4))                                               # a constant matrix: other
        mix = y @ (p["b"]["kernel"][:4] + p["a"]["kernel"][:4, :4].astype(jnp.float32))    # two leaves: other
        return s.sum() + z.sum() + o.sum() + mix.sum()

    x = jax.ShapeDtypeStruct((2, 3, 8), jnp.bfloat16)
    closed = jax.make_jaxpr(f)(params, x)
    paths = ["/".join(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    dots = R.collect_dots(closed, paths)
    lin = sorted((d.name, d.m, d.k, d.n, d.count) for d in dots if d.kind == "linear")
    assert lin == [("a", 6, 8, 16, 1), ("b", 6, 4, 16, 5), ("b", 6, 16, 4, 1)]
    att = [d for d in dots if d.kind == "attention"]
    assert [(d.batch, d.m, d.k, d.n) for d in att] == [(2, 3, 4, 3)]
    assert att[0].flops == 2 * 2 * 3 * 4 * 3
    assert len([d for d in dots if d.kind == "other"]) == 2
    assert sum(d.flops for d in dots if d.kind == "linear") == 2 * (6 * 8 * 16 + 6 * 16 * 4 + 5 * 6 * 4 * 16)


def test_designs_match_the_stated_byte_counts():
    got = {k: R.design_bytes(v) for k, v in R.DESIGNS.items()}
    assert [v for v in got.values()] == [(-1, 0), (3, 4), (5, 6), (17, 18), (49, 50), (21, 22)]


def test_floor_arithmetic_on_a_hand_made_inventory():
    card = R.Card("test", 1e12, 0.117, 1.25, {})
    m, k, n = R.GEMM_SHAPE
    rows = [{"m": m, "k": k, "n": n, "count": 10, "quantized": True},
            {"m": 2, "k": 1536, "n": 9216, "count": 4, "quantized": True},          # memory-bound
            {"m": m, "k": k, "n": 64, "count": 3, "quantized": False}]              # stays bf16: no effect
    t = R.linear_times(rows, card, rank=32)
    r16 = 2.0 * m * k * n / 0.117e-3
    small16 = 4 * 2 * (1536 * 9216 + 2 * 1536 + 2 * 9216) / 1e12
    small8 = 4 * (1536 * 9216 + 2 * 1536 + 2 * 2 * 9216) / 1e12
    assert t["bf16"] == pytest.approx(10 * 0.117e-3 + small16)
    assert t["int8"] == pytest.approx(10 * 0.117e-3 / 1.25 + small8)
    assert t["memory_bound"] == 4
    assert t["act_elems"] == 10 * m * k + 4 * 2 * 1536
    lowrank = (10 * (2.0 * m * k * 32 + 2.0 * m * 32 * n) + 4 * (2.0 * 2 * 1536 * 32 + 2.0 * 2 * 32 * 9216)) / r16 \
        + (10 * 4 * m * 32 + 4 * 4 * 2 * 32) / 1e12
    assert t["lowrank"] == pytest.approx(lowrank)
    step_ms = 10.0
    fl = R.floor_table(rows, card, step_ms, rank=32, shared_elems=t["act_elems"] // 2)
    gain = t["bf16"] - t["int8"]
    one = {r["design"]: r for r in fl["rows"]}["one-pass prologue kernel"]
    pro = t["act_elems"] * 3 / 1e12
    assert one["prologue_ms"] == pytest.approx(pro * 1e3)
    assert one["ratio"] == pytest.approx(10e-3 / (10e-3 - gain + pro))
    assert one["ratio_lowrank"] == pytest.approx(10e-3 / (10e-3 - gain + pro + lowrank))
    assert one["ratio_all_lowrank"] == pytest.approx(10e-3 / (10e-3 - gain + t["act_elems"] * 4 / 1e12 + lowrank))
    assert one["ratio_shared_lowrank"] == pytest.approx(10e-3 / (10e-3 - gain + (t["act_elems"] // 2) * 3 / 1e12 + lowrank))
    assert fl["ceiling"] == pytest.approx(10e-3 / (10e-3 - gain))
    be0, be1 = fl["break_even_bytes"]
    assert be0 == pytest.approx(gain * 1e12 / t["act_elems"])
    # at the break-even byte count the predicted step equals bf16's
    assert 10e-3 / (10e-3 - gain + t["act_elems"] * be1 / 1e12 + lowrank) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="exceeds the measured step"):
        R.floor_table(rows, card, 0.5)


def test_main_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    R.main(["--preset", "tiny", "--sizes", "32", "--card", "h200", "--step-ms", "32=1.0", "--json", str(out)])
    d = json.loads(out.read_text())
    assert d["card"]["name"] == "H200 SXM" and d["sizes"]["32"]["floor"]["step_ms"] == 1.0
    text = capsys.readouterr().out
    assert "| design |" in text and "| M x K x N |" in text


def test_attention_ceiling_counts_scores_and_bounds_fp8(tiny_inv):
    """One ex2 per score element against 4 d MMA FLOPs: the FP8 speed-up of attention lies between the overlapped
    (max) and serialized (sum) bounds, both in [1, 2]; at head dim 64 on an H100 the exps cost about what the bf16
    MMAs cost, so FP8 MMAs buy at most ~1.08x overlapped (what cuDNN's FP8 attention measured: 1.06-1.13x)."""
    cfg = R.step_cfg("tiny")
    at = R.attention_ceiling(tiny_inv, R.CARDS["h100"])
    qk = [d for d in tiny_inv["dots"] if d["kind"] == "attention" and d["k"] == cfg.attention_head_dim < d["m"]]
    assert at["scores"] == sum(d["batch"] * d["m"] * d["n"] * d["count"] for d in qk) > 0
    assert at["head_dim"] == pytest.approx(cfg.attention_head_dim)
    assert 1.0 <= at["overlapped"] <= at["serial"] <= 2.0
    card = R.CARDS["h100"]
    d64 = {"size": 512, "dots": [dict(kind="attention", batch=48, m=2048, n=2048, k=64, count=1),
                                 dict(kind="attention", batch=48, m=64, n=2048, k=2048, count=1)]}
    at64 = R.attention_ceiling(d64, card)
    assert at64["mma_bf16_ms"] == pytest.approx(4 * 64 * 48 * 2048 ** 2 / (card.bf16_dense_tflops * 1e12) * 1e3)
    assert at64["exp_ms"] == pytest.approx(48 * 2048 ** 2 / card.exp_per_s * 1e3)
    assert 1.0 < at64["overlapped"] < 1.1 and 1.3 < at64["serial"] < 1.4
    assert at64["measured_vs_floor"] == pytest.approx(max(at64["mma_bf16_ms"], at64["exp_ms"]) / 5.67)
    d256 = dict(d64, dots=[dict(d64["dots"][0], k=256), dict(d64["dots"][1], m=256)])
    assert R.attention_ceiling(d256, card)["overlapped"] > 1.5          # wide heads: MMA-bound, FP8 pays


def test_w8a8_ceiling_adds_attention_and_solves_for_the_int8_rate():
    """The W8A8 best case: the int8 GEMM gain, the prologue's bytes and what faster attention saves; the int8 speed-up
    it reports as needed for the target gives exactly the target when plugged back (compute-bound card)."""
    m, k, n = R.GEMM_SHAPE
    rows = [{"m": m, "k": k, "n": n, "count": 20, "quantized": True}]
    card = R.Card("test", 1e18, 0.117, 1.5, {}, fp8_attention_speedup=1.1)        # HBM ~free: compute-bound
    at = {"overlapped": 1.05, "serial": 1.3, "measured_ms": 1.0}
    w8 = R.w8a8_ceiling(rows, card, 5.0, at, target=1.25)
    got = {(r["prologue"], r["attention"]): r for r in w8["rows"]}
    assert len(got) == 8
    lin16 = 20 * 0.117e-3
    base = got[("fused into the producer", "bf16")]
    assert base["ratio"] == pytest.approx(5e-3 / (5e-3 - lin16 + lin16 / 1.5), rel=1e-6)
    fp8 = got[("fused into the producer", "cuDNN FP8 (measured)")]
    assert fp8["ratio"] == pytest.approx(5e-3 / (5e-3 - lin16 + lin16 / 1.5 - 1e-3 * (1 - 1 / 1.1)), rel=1e-6)
    for p in ("fused into the producer", "one-pass kernel"):           # faster attention: a faster step, a lower need
        rs = sorted((got[(p, a)] for a in ("bf16", "FP8 bound, overlapped", "cuDNN FP8 (measured)",
                                           "FP8 bound, serialized")), key=lambda r: r["speedup"])
        assert [r["ratio"] for r in rs] == sorted(r["ratio"] for r in rs)
        assert [r["int8_needed"] for r in rs] == sorted((r["int8_needed"] for r in rs), reverse=True)
    for r in w8["rows"]:
        plugged = R.w8a8_ceiling(rows, R.dataclasses.replace(card, int8_speedup=r["int8_needed"]), 5.0, at)
        assert {(q["prologue"], q["attention"]): q for q in plugged["rows"]}[
            (r["prologue"], r["attention"])]["ratio"] == pytest.approx(1.25, rel=1e-6)
    # a target beyond free linears is unreachable; no attention time: the bf16-attention rows only
    assert R.w8a8_ceiling(rows, card, 5.0, at, target=5.0)["rows"][0]["int8_needed"] == float("inf")
    assert {r["attention"] for r in R.w8a8_ceiling(rows, card, 5.0, dict(at, measured_ms=None))["rows"]} == {"bf16"}
