"""Opt-in phase timing of quantize (quant/timing.py), opt-in concurrent compilation, and the GPU
orthonormalisation of H-SVD's subspace block solver (hsvd.orthonormal_columns) against QR."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit4sr_jax.config import QuantConfig
from qdit4sr_jax.quant import hsvd as H
from qdit4sr_jax.quant.api import precompile, quantize
from qdit4sr_jax.quant.qdit4sr import quantize_qdit4sr
from qdit4sr_jax.quant.timing import Phases, format_phases

T = 3


def _setup():
    """Two blocks, two layer shapes ([32, 32] x 3, [32, 64] x 1), float32, random stats over T steps."""
    rng = np.random.default_rng(0)
    k = lambda *s: (rng.normal(size=s) * np.exp(rng.normal(0.0, 1.0)) * 0.2).astype(np.float32)
    params = {"transformer_blocks_0": {"attn": {"to_q": {"kernel": k(32, 32), "bias": k(32)},
                                                "to_k": {"kernel": k(32, 32)}},
                                       "ff": {"kernel": k(32, 64)}},
              "transformer_blocks_1": {"attn": {"to_q": {"kernel": k(32, 32)}}},
              "norm_out": {"scale": np.ones(32, np.float32)}}
    qcfg = QuantConfig.preset("qdit4sr-w4a4").replace(w_group_size=16, hsvd_block=(16, 16), lowrank_rank=8,
                                                       w_bit_candidates=(3, 5), a_bit_candidates=(4, 6))
    calib = {}
    for name, kin in (("transformer_blocks_0/attn/to_q", 32), ("transformer_blocks_0/attn/to_k", 32),
                      ("transformer_blocks_0/ff", 32), ("transformer_blocks_1/attn/to_q", 32)):
        calib[name] = {"var": rng.uniform(0.5, 2.0, T).astype(np.float32),
                       "ch_absmax": rng.uniform(0.5, 3.0, (T, kin)).astype(np.float32)}
    return params, qcfg, calib


def _assert_same_tree(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_timings_filled_and_results_unchanged():
    params, qcfg, calib = _setup()
    plain, info = quantize_qdit4sr(params, qcfg, calib, return_info=True)
    t = {}
    timed, info_t = quantize_qdit4sr(params, qcfg, calib, return_info=True, timings=t)
    _assert_same_tree(plain, timed)
    assert info["w_bits"] == info_t["w_bits"]
    ph = t["phases"]
    for name in ("select layers + calib stats", "layer specs (per-layer host loop)", "VaSMP", "VaTMP",
                 "pass 1 H-SVD + sq. errors 32x32 (dispatch + device)",
                 "pass 1 H-SVD + sq. errors 32x64 (dispatch + device)",
                 "pass 2 residual quantization 32x32 (dispatch + device)", "tree rebuild", "wait for outputs"):
        assert name in ph and ph[name] >= 0.0, (name, sorted(ph))
    assert not any("precompile" in n for n in ph)                 # serial compilation is the default
    assert sum(ph.values()) <= t["total_s"] + 1e-6
    assert set(t["compile_s"]) <= set(ph) and set(t["compiles"]) == set(t["compile_s"])
    table = format_phases(t)
    assert table.splitlines()[0].startswith("| phase |") and "| total |" in table
    # the baseline path of `quantize` records its phases too, and the {'params': ...} wrapper passes timings on
    tb = {}
    q = quantize({"params": params}, "rtn-w4a4", timings=tb)
    assert "params" in q and "tree rebuild" in tb["phases"] and any(n.startswith("quantize 32x32") for n in tb["phases"])


def test_phases_off_is_inert_and_bad_timings_rejected():
    p = Phases(None)
    assert not p.on
    p.lap("x", jnp.ones(3))
    p.close()
    with pytest.raises(TypeError, match="timings must be a dict"):
        Phases([])
    d = {}
    with Phases(d) as p:
        p.lap("a")
        jax.jit(lambda x: x * 3.0 + 1.0)(jnp.arange(7.0)).block_until_ready()     # a fresh compilation
        p.lap("b")
    assert set(d["phases"]) == {"a", "b"} and d["compiles"].get("b", 0) >= 1 and "a" not in d["compiles"]
    assert d["total_s"] >= d["phases"]["a"] + d["phases"]["b"] - 1e-9


def test_concurrent_compilation_is_opt_in_and_identical():
    params, qcfg, calib = _setup()
    f = jax.jit(lambda x: x + 1)
    assert precompile(f, [(jnp.ones(3),), (jnp.ones(4),)], 1) == 0
    t = {}
    a = quantize_qdit4sr(params, qcfg, calib)
    b = quantize_qdit4sr(params, qcfg, calib, compile_threads=2, timings=t)
    _assert_same_tree(a, b)
    assert "pass 1 precompile (threads)" in t["phases"]


def test_orthonormal_columns():
    rng = np.random.default_rng(2)
    y = rng.normal(size=(5, 40, 6)).astype(np.float32)
    y[1] = 0.0                                                    # zero matrix -> zero basis
    y[2, :, 3] = y[2, :, 0] * 2.0 - y[2, :, 1]                    # a dependent column -> zero column
    y[3, :, 1] *= 1e-3                                            # badly scaled but independent
    q = np.asarray(H.orthonormal_columns(jnp.asarray(y)))
    assert np.all(np.isfinite(q)) and np.abs(q[1]).max() == 0.0
    assert np.abs(q[2, :, 3]).max() == 0.0
    for b in (0, 2, 3, 4):
        nz = np.linalg.norm(q[b], axis=0) > 0
        g = q[b][:, nz].T @ q[b][:, nz]
        np.testing.assert_allclose(g, np.eye(nz.sum()), atol=2e-6)
        # same column space as QR's Q
        qr = np.linalg.qr(y[b][:, nz] if b != 2 else y[b][:, [0, 1, 2, 4, 5]])[0]
        np.testing.assert_allclose(np.abs(qr.T @ q[b][:, nz]).sum(0), np.ones(nz.sum()), atol=1e-4)


def test_subspace_block_solver_gpu_orthonormalisation_matches_qr(monkeypatch):
    """The GPU form of the "subspace" block solver (orthonormal_columns instead of jnp.linalg.qr) gives
    the same top singular triple as the QR form (same subspaces, rounding only), zero blocks included."""
    rng = np.random.default_rng(3)
    b = rng.normal(size=(12, 48, 40)).astype(np.float32)
    b[2] = 0.0
    b[3, :, 9:] = 0.0                                             # ragged-edge-like padding
    b[4] = np.outer(rng.normal(size=48), rng.normal(size=40))      # rank 1
    b[5] += 4.0 * np.outer(np.ones(48), np.linspace(-1, 1, 40))
    b = jnp.asarray(b)
    u0, s0, v0 = jax.jit(H._top1_subspace)(b)
    monkeypatch.setattr(H, "FAST_TOP_SVD_BACKENDS", (jax.default_backend(),))
    u1, s1, v1 = jax.jit(lambda x: H._top1_subspace(x))(b)
    np.testing.assert_allclose(np.asarray(s1), np.asarray(s0), rtol=1e-5, atol=1e-6)
    r0 = np.asarray(s0)[:, None, None] * np.einsum("ba,bc->bac", np.asarray(u0), np.asarray(v0))
    r1 = np.asarray(s1)[:, None, None] * np.einsum("ba,bc->bac", np.asarray(u1), np.asarray(v1))
    np.testing.assert_allclose(r1, r0, atol=2e-4 * float(jnp.abs(b).max()))
    assert float(s1[2]) == 0.0 and float(jnp.abs(u1[2]).max()) == 0.0


def test_gpu_compiler_options_path(monkeypatch):
    """The programs compiled with `GPU_COMPILER_OPTIONS` (exercised here on this backend; XLA:CPU ignores
    the GPU autotuning level) give the same nodes; options XLA rejects fall back to the defaults."""
    from qdit4sr_jax.quant import qdit4sr as Q
    params, qcfg, calib = _setup()
    want = quantize_qdit4sr(params, qcfg, calib)
    monkeypatch.setattr(Q, "COMPILER_OPTIONS_BACKENDS", (jax.default_backend(),))
    monkeypatch.setattr(Q, "_VARIANTS", {})
    monkeypatch.setattr(Q, "_OPTIONS_ACCEPTED", {})
    assert Q._program(Q._branches_program) is not Q._branches_program
    _assert_same_tree(quantize_qdit4sr(params, qcfg, calib), want)
    monkeypatch.setattr(Q, "GPU_COMPILER_OPTIONS", {"xla_no_such_option_for_this_test": 1})
    with pytest.warns(UserWarning, match="rejected compiler options"):
        assert Q._program(Q._residual_program) is Q._residual_program
    monkeypatch.setattr(Q, "GPU_COMPILER_OPTIONS", {})
    assert Q._program(Q._branches_program) is Q._branches_program
