"""H-SVD's matmul-only top singular pairs (used on GPU, where cuSOLVER runs one SVD per matrix) against
the exact SVD: power iteration for the block rank-1, subspace iteration for the global rank-r."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit4sr_jax.quant import hsvd as H


def _resid(m, u, s, v):
    return np.linalg.norm(np.asarray(m) - np.asarray((u * s[..., None, :]) @ np.swapaxes(v, -1, -2)), axis=(-2, -1))


def test_top1_power_matches_exact_and_zero_blocks():
    b = jax.random.normal(jax.random.PRNGKey(0), (6, 48, 40), jnp.float32)
    b = b.at[2].set(0.0)                                         # a zero (padded) block
    b = b.at[3].set(b[3] + 3.0 * jnp.outer(jnp.ones(48), jnp.linspace(-1, 1, 40)))
    u, s, v = H.top1_power(b)
    su, ss, svt = np.linalg.svd(np.asarray(b), full_matrices=False)
    assert np.all(np.isfinite(np.asarray(u))) and float(jnp.abs(u[2]).max()) == 0.0 == float(s[2])
    ok = [0, 1, 3, 4, 5]
    np.testing.assert_allclose(np.asarray(s)[ok], ss[ok, 0], rtol=2e-3)
    exact = _resid(b, su[..., :1], ss[..., :1], np.swapaxes(svt[..., :1, :], -1, -2))
    got = _resid(b, u[..., None], s[..., None], v[..., None])
    assert np.all(got[ok] <= exact[ok] * (1 + 1e-4))


@pytest.mark.parametrize("shape", [(96, 160), (160, 96)])
def test_top_svd_subspace_near_optimal(shape):
    rng = np.random.default_rng(1)
    p, q = shape
    m = (rng.normal(size=(p, 12)) * np.geomspace(10, 1, 12)) @ rng.normal(size=(12, q)) / np.sqrt(q)
    m = jnp.asarray(m + 0.05 * rng.normal(size=shape), jnp.float32)
    u, s, v = H.top_svd_subspace(m, 8)
    assert u.shape == (p, 8) and s.shape == (8,) and v.shape == (q, 8)
    assert np.all(np.diff(np.asarray(s)) <= 1e-5)                # descending
    su, ss, svt = np.linalg.svd(np.asarray(m), full_matrices=False)
    np.testing.assert_allclose(np.asarray(s), ss[:8], rtol=1e-3)
    exact = _resid(m, su[:, :8], ss[:8], svt[:8].T)
    assert _resid(m, u, s, v) <= exact * (1 + 1e-3)


def test_hsvd_fast_path_matches_exact(monkeypatch):
    w = jax.random.normal(jax.random.PRNGKey(3), (64, 96), jnp.float32)
    w = w + 4.0 * jnp.outer(jnp.sin(jnp.arange(64.0)), jnp.cos(jnp.arange(96.0) / 7))
    exact = H.hsvd(w, rank=8, block=(32, 32))
    monkeypatch.setattr(H, "FAST_TOP_SVD_BACKENDS", (jax.default_backend(),))
    H.hsvd.clear_cache()
    try:
        fast = H.hsvd(w, rank=8, block=(32, 32))
    finally:
        H.hsvd.clear_cache()
    e_exact = float(jnp.linalg.norm(exact.residual) / jnp.linalg.norm(w))
    e_fast = float(jnp.linalg.norm(fast.residual) / jnp.linalg.norm(w))
    assert e_fast <= e_exact * (1 + 1e-3), (e_fast, e_exact)
    np.testing.assert_allclose(np.asarray(H.reconstruct(fast)), np.asarray(w), atol=1e-4)
