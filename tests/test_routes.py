"""benchmarks/gpu/routes.py (issue 24 routes per layer): a tiny CPU run of every part; the routes are exact."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.gpu import routes as R  # noqa: E402
from qdit4sr_jax.quant import transforms as T  # noqa: E402


def test_small_run_is_exact():
    jax.clear_caches()      # the profiler's trace carries every live executable: in a long pytest worker 10x the run
    res = R.main(["--small", "--reps", "2"])
    for row in res["gemm"]:                       # e4m3 sums of 4-bit codes equal the int8 / int32 ones
        assert row["fp8_vs_int8_acc_max_abs_diff"] == 0.0
        assert row["routes"]["fp8"]["rel_err_vs_int8"] <= 1e-6
    for row in res["down"]:                       # one joint GEMM = the current branch features
        assert row["dh_max_rel_diff"] <= 1e-2 and row["dt_max_rel_diff"] <= 1e-2
    for row in res["hadamard"]:                       # every implementation equals float64
        assert all(v["max_rel_err_f64"] <= 1e-6 for v in row["impls"].values() if "max_rel_err_f64" in v)
        assert {"butterfly", "dense", "dense f32-in"} <= set(row["impls"])


def test_kron_hadamard_equals_the_transform():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 384)), jnp.float32)
    for b in (128, 384):
        np.testing.assert_allclose(np.asarray(R.kron_hadamard(x, b)), np.asarray(T.hadamard_transform(x, b)),
                                   rtol=1e-5, atol=1e-5)


def test_hadamard_config_names_parse():
    """rotation_gemm.py --hadamard-configs: wNpNoN[cRUN] -> the Hadamard kernel's tuning arguments; others named."""
    import pytest
    from benchmarks.gpu import rotation_gemm
    assert rotation_gemm.parse_config("w3p2o2") == dict(wgs=3, prefetch=2, out_slots=2)
    assert rotation_gemm.parse_config("w2p1o1c128") == dict(wgs=2, prefetch=1, out_slots=1, run=128)
    for bad in ("w2p1", "w2p1o1c96"):
        with pytest.raises(ValueError, match=bad):
            rotation_gemm.parse_config(bad)
