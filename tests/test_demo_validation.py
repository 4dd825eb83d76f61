"""benchmarks/demo_validation.py self-ensemble: every view's inverse undoes it, so an equivariant upscaler's
ensemble equals its plain output, and a non-equivariant one is averaged."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks import demo_validation as V  # noqa: E402


@pytest.mark.parametrize("kind,n", [("none", 1), ("geometric", 8), ("color", 12)])
def test_views_invert_and_ensemble_of_an_equivariant_upscaler(kind, n):
    views = V.ensemble_views(kind)
    assert len(views) == n
    a = np.random.default_rng(0).integers(0, 256, (6, 5, 3)).astype(np.uint8)
    for fwd, inv in views:
        np.testing.assert_array_equal(inv(fwd(a).astype(np.float64)), a)
    up = lambda x: np.repeat(np.repeat(x, 2, 0), 2, 1)                  # nearest x2: equivariant to every view
    np.testing.assert_array_equal(V.ensemble_upscale(up, a, kind), up(a))
    if kind == "geometric":                                            # a shift is not rotation-equivariant
        shifted = V.ensemble_upscale(lambda x: np.roll(up(x), 1, axis=0), a, kind)
        assert not np.array_equal(shifted, np.roll(up(a), 1, axis=0))
    with pytest.raises(ValueError, match="ensemble"):
        V.ensemble_views("mirror")


def test_output_names_and_sweep_grid():
    from qdit4sr_jax.config import ModelConfig
    assert V.output_name("val/mate_Dune_0.png") == "mate_Dune_0.png"
    assert V.output_name("val/mate_Dune_0.png~2") == "mate_Dune_0_seed2.png"
    cfg = ModelConfig.preset("demo")
    grid = V.sweep_grid(cfg)
    assert (cfg.num_steps, cfg.start_noise, cfg.color_fix) in grid and len(set(grid)) == len(grid)
    assert {cf for _, _, cf in grid} == {"adain", "wavelet", "none"} and {n for _, n, _ in grid} == {0.0, 0.5, 1.0}
