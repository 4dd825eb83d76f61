"""benchmarks/rotation_study.py, lightly: its transforms keep x W^T, the statistics show the mechanism found on the
demo model (a common positive offset, as after GELU, becomes one huge coefficient under a plain Hadamard and is
spread again by random signs), the tables format, the timing runs, and every variant config validates."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from benchmarks import rotation_study as R  # noqa: E402


def _gelu_like(n=256, k=192, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) + 1.0                                            # a common positive offset
    x = 0.5 * z * (1 + np.tanh(0.7978845608 * (z + 0.044715 * z ** 3)))          # GELU: mostly >= 0
    w = rng.normal(size=(48, k)) / np.sqrt(k)
    return x, w, np.abs(x).max(0)


def test_transforms_keep_the_function():
    x, w, ch = _gelu_like()
    for name in R.TRANSFORMS:
        xt, wt = R.transform(name, x, w, ch)
        np.testing.assert_allclose(xt @ wt.T, x @ w.T, rtol=1e-6, atol=1e-8)


def test_plain_hadamard_concentrates_a_common_offset_and_signs_spread_it():
    x, w, ch = _gelu_like()
    st = R.layer_stats(x, w, ch)
    assert st["full"]["kurtosis"] > 5 * st["full+signs"]["kurtosis"]                  # one huge coefficient
    assert st["full"]["tok_max"] > 2 * st["full+signs"]["tok_max"]
    assert st["full"]["act_err"] > 5 * st["full+signs"]["act_err"]
    assert st["full"]["out_err"] > 3 * st["full+signs"]["out_err"]
    table = R.format_layers({"transformer_blocks_0/ff/net_2": st})
    assert "ff/net_2 (1)" in table and "lowest out_err" in table


def test_timing_and_variants():
    rows = R.time_rotation(shapes=((8, 192, 16),), reps=1)
    assert rows[0]["full"] == 192 and rows[0]["block"] == 64 and rows[0]["full_ms"] > 0
    assert "192, 16" in R.format_timing(rows)
    cfgs = R.variant_configs("w4a4")
    assert cfgs["qdit4sr-paper (full, signs)"].rotate_signs and not cfgs["qdit4sr-paper, no signs"].rotate_signs
    for c in cfgs.values():
        c.validate()
