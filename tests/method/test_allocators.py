"""VaSMP and VaTMP: equal to brute-force search, budgets respected, infeasible/bad input raise."""
import itertools
import math

import numpy as np
import pytest

from qdit4sr_jax.quant.vasmp import allocate_weight_bits, average_bits, expected_distortion
from qdit4sr_jax.quant.vatmp import schedule_activation_bits, schedule_distortion

CANDS = [1, 2, 3, 4, 5, 6, 8]


def _random_cands(rng):
    return sorted(rng.choice(CANDS, size=int(rng.integers(1, 5)), replace=False).tolist())


def _brute_weight(v, s, budget, c):
    best = np.inf
    for bits in itertools.product(c, repeat=len(v)):
        if int(np.dot(s, bits)) <= budget:
            best = min(best, expected_distortion(v, s, bits))
    return best


@pytest.mark.parametrize("method", ["dense", "pareto", "auto"])
def test_vasmp_equals_brute_force(method):
    rng = np.random.default_rng(123)
    for _ in range(150):
        L = int(rng.integers(1, 6))
        c = _random_cands(rng)
        v = rng.exponential(size=L) * (rng.random(L) > 0.15)          # some zero-variance layers
        s = rng.integers(1, 40, size=L) * int(rng.choice([1, 3, 1000]))
        avg = round(c[0] + rng.random() * (c[-1] - c[0] + 1), 3)
        budget = math.floor(avg * 1000 * int(s.sum()) + 1e-6) // 1000
        bits = allocate_weight_bits(v, s, avg, c, method=method)
        assert bits.dtype.kind == "i" and set(bits.tolist()) <= set(c)
        assert int(np.dot(s, bits)) <= budget                          # budget respected exactly
        want = _brute_weight(v, s, budget, c)
        got = expected_distortion(v, s, bits)
        assert got <= want * (1 + 1e-12) + 1e-300, (v, s, avg, c, bits)
        assert np.all(bits[v == 0] == c[0])                            # zero variance -> smallest


def test_vasmp_paths_agree_on_large_instances():
    rng = np.random.default_rng(7)
    for _ in range(4):
        L = 60
        v = rng.lognormal(0, 1, size=L)
        s = rng.integers(1, 50, size=L) * 4096
        for avg in (2.5, 4, 5.3):
            a = allocate_weight_bits(v, s, avg, (2, 3, 4, 5, 6, 8), method="dense")
            b = allocate_weight_bits(v, s, avg, (2, 3, 4, 5, 6, 8), method="pareto")
            assert expected_distortion(v, s, a) == pytest.approx(expected_distortion(v, s, b), rel=1e-12)
            assert average_bits(s, a) <= avg + 1e-12 and average_bits(s, b) <= avg + 1e-12


def test_vasmp_dit4sr_like_hits_target():
    rng = np.random.default_rng(0)
    sizes = rng.choice([1536 * 1536, 1536 * 6144, 1536 * 9216], size=540)
    bits = allocate_weight_bits(rng.lognormal(size=540), sizes, 4, (2, 3, 4, 5, 6, 8))
    assert average_bits(sizes, bits) == 4.0
    assert len(set(bits.tolist())) > 1


def test_vasmp_errors():
    with pytest.raises(ValueError, match="infeasible"):
        allocate_weight_bits([1.0, 2.0], [10, 10], 1.5, (2, 4))
    with pytest.raises(ValueError, match="finite"):
        allocate_weight_bits([1.0, np.nan], [10, 10], 4, (2, 4))
    with pytest.raises(ValueError, match=">= 0"):
        allocate_weight_bits([1.0, -1.0], [10, 10], 4, (2, 4))
    with pytest.raises(ValueError, match="positive integers"):
        allocate_weight_bits([1.0, 1.0], [10, 0], 4, (2, 4))
    with pytest.raises(ValueError, match="shape"):
        allocate_weight_bits([1.0, 1.0], [10], 4, (2, 4))
    with pytest.raises(ValueError, match="candidates"):
        allocate_weight_bits([1.0], [10], 4, ())
    with pytest.raises(ValueError, match="finite"):
        allocate_weight_bits([1.0], [10], float("inf"), (2, 4))


def test_vatmp_equals_brute_force():
    rng = np.random.default_rng(5)
    for _ in range(150):
        T = int(rng.integers(1, 6))
        c = _random_cands(rng)
        v = rng.exponential(size=(3, T)) * (rng.random((3, T)) > 0.2)
        avg = round(c[0] + rng.random() * (c[-1] - c[0] + 0.5), 3)
        budget = math.floor(avg * 1000 * T + 1e-6) // 1000
        for exact in (True, False):
            out = schedule_activation_bits(v, avg, c, exact=exact)
            assert out.shape == (3, T) and set(out.ravel().tolist()) <= set(c)
            for l in range(3):
                combos = [a for a in itertools.product(c, repeat=T) if sum(a) <= budget]
                if exact:
                    top = max(sum(a) for a in combos)
                    combos = [a for a in combos if sum(a) == top]
                    assert out[l].sum() == top
                assert out[l].sum() <= budget
                want = min(schedule_distortion(v[l], a) for a in combos)
                assert schedule_distortion(v[l], out[l]) <= want * (1 + 1e-12) + 1e-300


def test_vatmp_spends_exact_budget_and_is_fast():
    import time
    rng = np.random.default_rng(1)
    v = rng.lognormal(size=(540, 40))
    t0 = time.perf_counter()
    for avg in (4, 6, 4.5):
        out = schedule_activation_bits(v, avg, (3, 4, 5, 6, 8))
        assert np.all(out.sum(1) == math.floor(avg * 40))
    assert time.perf_counter() - t0 < 3.0                             # < 1 s each on a laptop core
    one = schedule_activation_bits([1.0, 2.0, 3.0, 100.0], 4.5, (3, 4, 5, 6, 8))
    assert one.shape == (4,) and one.sum() == 18 and one[3] == one.max()


def test_vatmp_errors():
    with pytest.raises(ValueError, match="infeasible"):
        schedule_activation_bits(np.ones((2, 4)), 2.9, (3, 4))
    with pytest.raises(ValueError, match="finite"):
        schedule_activation_bits([1.0, np.inf], 4, (3, 4))
    with pytest.raises(ValueError, match=">= 0"):
        schedule_activation_bits([1.0, -2.0], 4, (3, 4))
    with pytest.raises(ValueError, match=r"\[T\] or \[L, T\]"):
        schedule_activation_bits(np.ones((2, 2, 2)), 4, (3, 4))


@pytest.mark.parametrize("method", ["dense", "pareto"])
def test_table_allocator_equals_brute_force_on_nonconvex_tables(method):
    from qdit4sr_jax.quant.vasmp import allocate_bits_table
    rng = np.random.default_rng(11)
    for _ in range(150):
        L = int(rng.integers(1, 6))
        c = _random_cands(rng)
        perm = rng.permutation(len(c))                                  # columns in any candidate order
        table = rng.exponential(size=(L, len(c))) * (rng.random((L, 1)) > 0.1)
        s = rng.integers(1, 30, size=L) * int(rng.choice([1, 5]))
        avg = round(c[0] + rng.random() * (c[-1] - c[0] + 1), 3)
        budget = math.floor(avg * 1000 * int(s.sum()) + 1e-6) // 1000
        cp = [c[i] for i in perm]
        bits = allocate_bits_table(table[:, perm], s, avg, cp, method=method)
        assert int(np.dot(s, bits)) <= budget
        col = {b: i for i, b in enumerate(c)}
        got = sum(table[l, col[int(b)]] for l, b in enumerate(bits))
        want = min(sum(table[l, col[b]] for l, b in enumerate(bs))
                   for bs in itertools.product(c, repeat=L) if int(np.dot(s, bs)) <= budget)
        assert got <= want * (1 + 1e-12) + 1e-300
    with pytest.raises(ValueError, match=r"\[L, 2\]"):
        allocate_bits_table(np.ones((2, 3)), [1, 1], 4, (2, 4))
