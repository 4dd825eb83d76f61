"""H-SVD: matched parameter budget, error vs plain SVD, ragged blocks, apply/reconstruct, vmap."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit4sr_jax.quant import hsvd as H


def test_matched_global_rank_mission_example():
    assert H.matched_global_rank(1536, 1536, 32, (256, 256)) == 26
    assert H.hsvd_params(1536, 1536, 26, (256, 256)) <= 32 * 3072 < H.hsvd_params(1536, 1536, 27, (256, 256))
    # DiT4SR shapes: FFN and adaLN linears
    for d_out, d_in in [(6144, 1536), (1536, 6144), (13824, 1536), (1000, 700)]:
        r = H.matched_global_rank(d_out, d_in, 32, (256, 256))
        assert H.hsvd_params(d_out, d_in, r, (256, 256)) <= 32 * (d_out + d_in)
        assert H.hsvd_params(d_out, d_in, r + 1, (256, 256)) > 32 * (d_out + d_in)
    with pytest.raises(ValueError, match="budget"):
        H.matched_global_rank(64, 64, 1, (8, 8))


def _planted(rng, d_out, d_in, block, rank=2, noise=0.01):
    """Low-rank global part + a strong rank-1 pattern in every block + small noise."""
    w = rng.standard_normal((d_out, rank)) @ rng.standard_normal((rank, d_in)) * 0.3
    bo, bi = block
    for i in range(0, d_out, bo):
        for j in range(0, d_in, bi):
            sh = w[i:i + bo, j:j + bi].shape
            w[i:i + bo, j:j + bi] += np.outer(rng.standard_normal(sh[0]), rng.standard_normal(sh[1]))
    return jnp.asarray(w + noise * rng.standard_normal((d_out, d_in)), jnp.float32)


@pytest.mark.parametrize("shape,block,rank", [((96, 64), (16, 16), 8), ((90, 70), (16, 24), 8)])
def test_hsvd_beats_svd_on_block_local_structure(shape, block, rank):
    rng = np.random.default_rng(0)
    for _ in range(3):
        w = _planted(rng, *shape, block)
        f = H.hsvd(w, rank=rank, block=block)
        s = H.svd_branch(w, rank)
        assert H.branch_param_count(f) <= H.branch_param_count(s) == rank * sum(shape)
        e_h = float(H.relative_error(w, H.branch_dense(f)))
        e_s = float(H.relative_error(w, H.branch_dense(s)))
        assert e_h < 0.75 * e_s, (e_h, e_s)
        f3 = H.hsvd(w, rank=rank, block=block, refine_iters=3)   # block-coordinate refinement
        assert float(H.relative_error(w, H.branch_dense(f3))) < 0.35 * e_s


def test_hsvd_close_to_svd_on_random_matrices_and_refine_helps():
    rng = np.random.default_rng(1)
    for shape in [(128, 128), (160, 96)]:
        w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        f = H.hsvd(w, rank=16, block=(32, 32))
        s = H.svd_branch(w, 16)
        e_h = float(H.relative_error(w, H.branch_dense(f)))
        e_s = float(H.relative_error(w, H.branch_dense(s)))
        assert e_h <= e_s * 1.01, (e_h, e_s)
        f2 = H.hsvd(w, rank=16, block=(32, 32), refine_iters=2)
        assert float(H.relative_error(w, H.branch_dense(f2))) <= e_h + 1e-6


def test_ragged_layout_apply_and_reconstruct():
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((70, 45)), jnp.float32)
    f = H.hsvd(w, rank=10, block=(16, 20))
    r_g = H.matched_global_rank(70, 45, 10, (16, 20))
    assert f.U.shape == (70, r_g) and f.V.shape == (45, r_g)
    assert f.u.shape == (5, 3, 16) and f.v.shape == (5, 3, 20)
    assert np.all(np.asarray(f.u)[4, :, 6:] == 0) and np.all(np.asarray(f.v)[:, 2, 5:] == 0)  # padding
    np.testing.assert_allclose(H.reconstruct(f), w, atol=1e-5)
    # block branch equals the per-block best rank-1 of W - L_g
    e = np.asarray(w - f.U @ f.V.T)
    blk = e[64:70, 40:45]
    sv = np.linalg.svd(blk, compute_uv=False)
    got = np.asarray(H.block_dense(f.u, f.v, 70, 45))[64:70, 40:45]
    assert np.linalg.norm(blk - got) == pytest.approx(np.sqrt(np.sum(sv[1:] ** 2)), rel=1e-4)
    x = jnp.asarray(rng.standard_normal((2, 3, 45)), jnp.float32)
    np.testing.assert_allclose(H.apply_branches(f, x), x @ H.branch_dense(f).T, atol=1e-4)
    s = H.svd_branch(w, 10)
    np.testing.assert_allclose(H.apply_branches(s, x), x @ (s.U @ s.V.T).T, atol=1e-4)
    # a block larger than the matrix is clamped
    g = H.hsvd(w[:8, :8], rank=4, block=(256, 256))
    assert g.u.shape == (1, 1, 8) and g.v.shape == (1, 1, 8)


def test_vmap_over_layers_and_dtype():
    rng = np.random.default_rng(3)
    ws = jnp.asarray(rng.standard_normal((3, 48, 32)), jnp.float32)
    fn = functools.partial(H.hsvd, rank=6, block=(16, 16))
    fb = jax.vmap(fn)(ws)
    for i in range(3):
        fi = fn(ws[i])
        np.testing.assert_allclose(fb.residual[i], fi.residual, atol=1e-5)
    fbf = H.hsvd(ws[0].astype(jnp.bfloat16), rank=6, block=(16, 16))
    assert fbf.U.dtype == jnp.bfloat16 and fbf.residual.dtype == jnp.bfloat16


def test_subspace_block_solver_close_to_exact():
    rng = np.random.default_rng(4)
    for shape, block in [((96, 64), (16, 16)), ((70, 45), (16, 20))]:
        w_struct = _planted(rng, *shape, block)
        w_rand = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        for w, tol in ((w_struct, 1e-4), (w_rand, 2e-3)):
            e = {s: float(H.relative_error(w, H.branch_dense(H.hsvd(w, rank=8, block=block, block_solver=s))))
                 for s in ("svd", "subspace")}
            assert e["svd"] <= e["subspace"] + 1e-6 and e["subspace"] <= e["svd"] * (1 + tol), e
        f = H.hsvd(w_rand, rank=8, block=block, block_solver="subspace")
        np.testing.assert_allclose(H.reconstruct(f), w_rand, atol=1e-5)
    with pytest.raises(ValueError, match="block solver"):
        H.fit_block_rank1(jnp.ones((8, 8)), (4, 4), "lanczos")


def test_randomized_global_solver_close_to_exact():
    rng = np.random.default_rng(5)
    w = _planted(rng, 96, 64, (16, 16))
    e = {s: float(H.relative_error(w, H.branch_dense(H.hsvd(w, rank=8, block=(16, 16), global_solver=s))))
         for s in ("exact", "randomized")}
    assert e["randomized"] <= e["exact"] * 1.01, e
    s = H.svd_branch(w, 8, "randomized")
    assert float(H.relative_error(w, H.branch_dense(s))) <= float(
        H.relative_error(w, H.branch_dense(H.svd_branch(w, 8)))) * 1.01
    with pytest.raises(ValueError, match="global SVD solver"):
        H.svd_branch(w, 8, "lanczos")
