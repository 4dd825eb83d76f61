"""Size / ops report on the full dit4sr config (jax.eval_shape only): the paper's Figure 1 figures."""
import numpy as np
import pytest

from qdit4sr_jax.config import ModelConfig, QuantConfig
from qdit4sr_jax import report


@pytest.fixture(scope="module")
def full():
    cfg = ModelConfig.preset("dit4sr")
    return cfg, report.linear_inventory(cfg, (64, 64))


def test_fp_size_and_ops_match_paper(full):
    cfg, inv = full
    lin, flat, other = inv
    assert sum(li.used for li in lin) == 540 and len(lin) == 540 + 52
    r = report.size_ops(cfg, None, inventory=inv)
    assert r["params"] == 2_716_814_144                                 # the PyTorch checkpoint's count
    assert round(r["size_M"]) == 2717 and round(r["ops_G"]) == 170_476
    assert r["forwards"] == 80 and r["latent"] == (64, 64) and r["tiles"] == 1
    assert sum(int(np.prod(v)) for v in flat.values()) == 2_594_049_216    # our Flax tree


def test_quantized_rows(full):
    cfg, inv = full
    rows = {r["label"]: r for r in report.report_table(cfg, inventory=inv)}
    quarot = rows["rotation-w4a4 (QuaRot-style)"]
    assert (round(quarot["size_M"]), round(quarot["ops_G"])) == (359, 2664)
    r40 = rows["svdquant-w4a4 (rank 40)"]
    assert (round(r40["size_M"]), round(r40["ops_G"])) == (465, 2776)
    r32, q = rows["svdquant-w4a4 (rank 32)"], rows["qdit4sr-w4a4 (H-SVD, rank-32 budget)"]
    assert q["size_M"] <= r32["size_M"] and q["ops_G"] <= r32["ops_G"]      # matched budget: never more
    assert q["size_M"] > quarot["size_M"]
    assert rows["qdit4sr-w4a6"]["ops_G"] == pytest.approx(q["ops_G"] * 6 / 4, rel=1e-12)
    text = report.format_table(list(rows.values()))
    assert "170,476" in text and "2,776" in text
    m = report.size_ops(cfg, QuantConfig.preset("qdit4sr-w4a4"), convention="mission", inventory=inv)
    assert m["size_M"] < q["size_M"] and m["ops_G"] > q["ops_G"]           # 16-bit branches: smaller, costlier


def test_resolution_steps_and_tiling():
    cfg = ModelConfig.preset("tiny")
    f = cfg.vae.downsample
    base = report.size_ops(cfg, None, height=8 * f, width=8 * f)
    assert base["latent"] == (8, 8) and base["tiles"] == 1
    assert report.size_ops(cfg, None, height=8 * f, width=8 * f, steps=2)["ops_G"] == pytest.approx(base["ops_G"] / 2)
    big = report.size_ops(cfg, None, height=16 * f, width=16 * f)        # 16x16 latent, 8x8 tiles, overlap 4
    assert big["tiles"] == 9 and big["ops_G"] == pytest.approx(9 * base["ops_G"])
    with pytest.raises(ValueError, match="multiple"):
        report.size_ops(cfg, None, height=8 * f + 1, width=8 * f)


def test_dense_flops_per_step_at_512(full):
    cfg, inv = full
    lin = [li for li in inv[0] if li.used]
    d = report.dense_flops_per_forward(cfg, (64, 64), inventory=(lin, None, None))
    assert 2 * d["total"] / 1e12 == pytest.approx(10.88, abs=0.01)          # MISSION.md: 10.88 TFLOP / step
    assert d["linear"] < d["total"]


def test_cli_main_prints_table_and_config_plot(tmp_path, capsys):
    assert report.main(["--config", "tiny", "--plots", str(tmp_path), "--json", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert "qdit4sr-w4a4" in out and "FP (32-bit)" in out
    assert (tmp_path / "layer_costs.png").stat().st_size > 1000 and (tmp_path / "t.json").exists()
