"""VaSMP: variance-aware spatial mixed precision (data-free per-layer weight bits).

Problem (MISSION.md, rate-distortion of a uniform quantizer):
    minimise   sum_l n_l * sigma_l^2 * 2^(-2 b_l)
    subject to sum_l n_l * b_l <= avg_bits * sum_l n_l,   b_l in candidates
(n_l = parameters of layer l, sigma_l^2 = variance of what gets quantized, e.g. the H-SVD residual).

This is a multiple-choice knapsack; `allocate_weight_bits` solves it exactly:
  1. Zero-variance layers cost nothing at any width: they get the smallest candidate.
  2. Budget units: every layer's extra cost over the smallest candidate, n_l (b - b_min), is a
     multiple of g * d (g = gcd of the layer sizes, d = gcd of the candidate gaps), so the budget
     dimension shrinks to W = floor((B - b_min N) / (g d)) units. Real transformers have few distinct
     layer shapes (DiT4SR: all sizes are multiples of 1536^2), so W is a few thousand.
  3. W * L small (<= `dense_limit`): dense DP over (layer, units spent), O(L W K) with numpy.
     Otherwise: exact DP over Pareto-optimal (cost, distortion) states, pruned by the LP-relaxation
     lower bound of the remaining layers (each layer's options lie on a convex curve, so the LP is a
     greedy fill in decreasing marginal-gain order) against the greedy integer solution. Pruning only
     removes dominated states or states provably worse than a known feasible solution, so the result
     is optimal.
`solver="greedy"` (both functions) is the paper's solver instead: a continuous relaxation (for the variance
model, reverse water-filling: b_l = clip(theta + log2(sigma_l), b_min, b_max) with theta set by bisection so
that sum n_l b_l = budget, every layer rounded down to a candidate; for a distortion table, every layer at the
smallest candidate), then greedy discretisation (upgrades in decreasing gain per budget unit while they fit).
Feasible by construction, never better than the DP's optimum.
`allocate_bits_table` solves the same problem for any per-layer, per-candidate distortion table (e.g. the
measured quantization error of each layer at each width; the LP bound then uses each layer's lower convex
hull). Budgets are exact integer arithmetic (avg_bits is read through its decimal repr, so 4.1 means 41/10).
Ties in distortion go to the lower cost.
"""
from __future__ import annotations

import math
from fractions import Fraction
from functools import reduce
from typing import Sequence

import numpy as np


def _budget(avg_bits, total: int) -> int:
    """floor(avg_bits * total) in exact arithmetic (avg_bits as written: repr of the float)."""
    if isinstance(avg_bits, (int, np.integer)):
        return int(avg_bits) * total
    a = float(avg_bits)
    if not math.isfinite(a):
        raise ValueError(f"avg_bits must be finite, got {avg_bits!r}")
    return math.floor(Fraction(repr(a)) * total)


def check_candidates(candidates) -> np.ndarray:
    """Sorted unique positive int candidates (ValueError otherwise)."""
    c = np.asarray(candidates)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"bit candidates must be a non-empty 1-D sequence, got {candidates!r}")
    if not np.all(np.isfinite(c.astype(np.float64))) or np.any(c != np.round(c)) or np.any(c < 1):
        raise ValueError(f"bit candidates must be positive integers, got {candidates!r}")
    return np.unique(c.astype(np.int64))


def _check_variances(v, name="variances") -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    if v.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite; got non-finite values at {np.argwhere(~np.isfinite(v)).tolist()[:5]}")
    if np.any(v < 0):
        raise ValueError(f"{name} must be >= 0; negative at {np.argwhere(v < 0).tolist()[:5]}")
    return v


def allocate_weight_bits(variances: Sequence[float], sizes: Sequence[int], avg_bits: float,
                         candidates: Sequence[int] = (2, 3, 4, 5, 6, 8), *, method: str = "auto",
                         dense_limit: int = 20_000_000, max_states: int = 5_000_000,
                         solver: str = "dp") -> np.ndarray:
    """Optimal per-layer weight bits.

    variances: [L] float >= 0 (e.g. the variance of each layer's quantized residual).
    sizes:     [L] positive integers (parameters per layer).
    avg_bits:  size-weighted average budget; must be >= min(candidates).
    candidates: allowed bit-widths (positive integers).
    method: "auto" | "dense" | "pareto" (both exact; "auto" picks dense when L * W <= dense_limit).
    solver: "dp" (exact, `method`) or "greedy" (the paper's relaxation + greedy discretisation).
    Returns int64 [L] of candidate bit-widths minimising sum n var 2^(-2b) with sum n b <= avg_bits sum n
    (exactly with "dp"; approximately with "greedy").
    """
    var = _check_variances(variances)
    if var.ndim != 1:
        raise ValueError(f"variances must be 1-D [L], got shape {var.shape}")
    sz = _check_sizes(sizes, var.shape)
    cand = check_candidates(candidates)
    if method not in ("auto", "dense", "pareto"):
        raise ValueError(f"method must be 'auto', 'dense' or 'pareto', got {method!r}")
    total = int(sz.sum())
    budget = _budget(avg_bits, total)
    bmin = int(cand[0])
    if budget < bmin * total:
        raise ValueError(f"infeasible weight-bit budget: avg_bits={avg_bits} is below the smallest candidate "
                         f"{bmin} (candidates {cand.tolist()})")
    act = var > 0
    dist = (sz.astype(np.float64) * var)[:, None] * np.exp2(-2.0 * cand.astype(np.float64))[None, :]
    _check_solver(solver)
    if solver == "greedy":
        return _water_fill_greedy(var, sz, budget, cand, dist)
    return _allocate(dist, sz, budget, cand, act, method, dense_limit, max_states)


def allocate_bits_table(distortion, sizes: Sequence[int], avg_bits: float,
                        candidates: Sequence[int] = (2, 3, 4, 5, 6, 8), *, method: str = "auto",
                        dense_limit: int = 20_000_000, max_states: int = 5_000_000,
                        solver: str = "dp") -> np.ndarray:
    """Optimal per-layer bits for an arbitrary distortion table (same constraint as allocate_weight_bits).

    distortion: [L, K] float >= 0, distortion[l, k] = total distortion of layer l at candidates[k]
      (e.g. the measured squared error of quantizing the layer at that width; need not be convex).
    sizes, avg_bits, candidates, method, solver: as for `allocate_weight_bits` ("greedy": the LP relaxation over
      each layer's lower convex hull filled greedily, then the fractional layer rounded down).
    Layers whose distortion is the same for every candidate get the smallest candidate.
    Returns int64 [L] minimising sum_l distortion[l, b_l] s.t. sum_l n_l b_l <= avg_bits sum_l n_l.
    """
    cand_in = np.asarray(candidates)
    cand = check_candidates(candidates)
    if cand.size != cand_in.size:
        raise ValueError(f"candidates must be distinct, got {candidates!r}")
    dist = _check_variances(distortion, "distortion")
    sz = _check_sizes(sizes, (dist.shape[0],) if dist.ndim == 2 else None)
    if dist.ndim != 2 or dist.shape[1] != cand.size:
        raise ValueError(f"distortion must be [L, {cand.size}] (one column per candidate), got {dist.shape}")
    dist = dist[:, np.argsort(cand_in, kind="stable")]          # columns in ascending-bits order
    if method not in ("auto", "dense", "pareto"):
        raise ValueError(f"method must be 'auto', 'dense' or 'pareto', got {method!r}")
    total = int(sz.sum())
    budget = _budget(avg_bits, total)
    if budget < int(cand[0]) * total:
        raise ValueError(f"infeasible weight-bit budget: avg_bits={avg_bits} is below the smallest candidate "
                         f"{int(cand[0])} (candidates {cand.tolist()})")
    act = np.any(dist != dist[:, :1], axis=1)
    _check_solver(solver)
    if solver == "greedy":
        start = np.zeros(dist.shape[0], np.int64)
        return cand[_greedy_fill(dist, sz[:, None] * cand[None, :], start, budget)]
    return _allocate(dist, sz, budget, cand, act, method, dense_limit, max_states)


def _check_solver(solver):
    if solver not in ("dp", "greedy"):
        raise ValueError(f"VaSMP solver must be 'dp' (exact) or 'greedy' (relaxation + greedy), got {solver!r}")


def water_fill(variances, sizes, budget_bits: float, lo: float, hi: float) -> np.ndarray:
    """The continuous relaxation of the VaSMP problem: minimise sum n_l var_l 2^(-2 b_l) over real b_l in
    [lo, hi] with sum n_l b_l = budget_bits (reverse water-filling). The KKT conditions give
    b_l = clip(theta + 0.5 log2(var_l), lo, hi) for one level theta, found by bisection (100 halvings).
    Zero-variance layers get lo. Returns float64 [L]."""
    v = np.asarray(variances, np.float64)
    n = np.asarray(sizes, np.float64)
    act = v > 0
    half_log = np.where(act, 0.5 * np.log2(np.where(act, v, 1.0)), 0.0)
    spend = lambda th: float(np.sum(n * np.where(act, np.clip(th + half_log, lo, hi), lo)))
    if not act.any() or spend(-1e9) >= budget_bits:
        return np.full(v.shape, float(lo))
    a, b = lo - half_log[act].max() - 1.0, hi - half_log[act].min() + 1.0
    if spend(b) <= budget_bits:
        return np.where(act, hi, lo).astype(np.float64)
    for _ in range(100):
        mid = 0.5 * (a + b)
        a, b = (mid, b) if spend(mid) <= budget_bits else (a, mid)
    return np.where(act, np.clip(a + half_log, lo, hi), lo)


def _water_fill_greedy(var, sz, budget, cand, dist):
    """The paper's VaSMP solver: water-filling relaxation, round down to candidates, greedy upgrades."""
    b = water_fill(var, sz, float(budget), float(cand[0]), float(cand[-1]))
    start = np.searchsorted(cand, b + 1e-9, side="right") - 1                # largest candidate <= b_l
    start = np.clip(start, 0, cand.size - 1)
    return cand[_greedy_fill(dist, sz[:, None] * cand[None, :], start, budget)]


def _greedy_fill(dist, cost, start, budget):
    """Greedy discretisation: from option indices `start` [L] (feasible: sum cost <= budget), repeatedly
    take the single-option upgrade of best distortion gain per extra budget (over every layer and every
    higher option) that still fits; stop when none fits or gains. dist / cost [L, K] (ascending cost).
    Returns option indices [L]."""
    L, K = dist.shape
    k = np.asarray(start, np.int64).copy()
    spent = int(cost[np.arange(L), k].sum())
    if spent > budget:
        raise ValueError(f"greedy start spends {spent} > budget {budget}")
    while True:
        cur_d = dist[np.arange(L), k][:, None]
        cur_c = cost[np.arange(L), k][:, None]
        dc = cost - cur_c
        gain = cur_d - dist
        ok = (dc > 0) & (gain > 0) & (spent + dc <= budget)
        if not ok.any():
            return k
        ratio = np.where(ok, gain / np.where(dc > 0, dc, 1), -np.inf)
        l, j = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        spent += int(dc[l, j])
        k[l] = j


def _check_sizes(sizes, shape):
    sz = np.asarray(sizes)
    if shape is not None and sz.shape != shape:
        raise ValueError(f"sizes shape {sz.shape} != expected {shape}")
    if not np.all(np.isfinite(sz.astype(np.float64))) or np.any(sz != np.round(sz)) or np.any(sz <= 0):
        raise ValueError(f"sizes must be positive integers; bad at {np.argwhere(~(sz > 0)).ravel().tolist()[:5]}")
    return sz.astype(np.int64)


def _allocate(dist, sz, budget, cand, act_mask, method, dense_limit, max_states):
    """Shared core: dist [L, K] (ascending candidates), sizes [L], integer budget; inactive layers
    (act_mask False) are fixed at the smallest candidate."""
    bmin = int(cand[0])
    total = int(sz.sum())
    bits = np.full(sz.shape, bmin, dtype=np.int64)
    act = np.flatnonzero(act_mask)
    if act.size == 0 or cand.size == 1:
        return bits
    q = cand - bmin                                  # extra bits per candidate, q[0] = 0
    d = reduce(math.gcd, [int(x) for x in q[1:]])
    g = reduce(math.gcd, [int(x) for x in sz[act]])
    s = sz[act] // g                                 # layer sizes in units of g
    qd = q // d                                      # candidate steps in units of d
    W = (budget - bmin * total) // (g * d)
    W = int(min(W, int(s.sum()) * int(qd[-1])))      # more budget than everyone-at-max is useless
    cost = s[:, None] * qd[None, :]                  # [La, K] units
    dist = dist[act]
    if method == "dense" or (method == "auto" and act.size * (W + 1) <= dense_limit):
        k = _dense_dp(cost, dist, W)
    else:
        k = _pareto_dp(cost, dist, W, max_states)
    bits[act] = cand[k]
    return bits


def _dense_dp(cost, dist, W):
    """Exact DP; dp[w] = min distortion spending exactly w units. Returns chosen indices [L]."""
    L, K = cost.shape
    dp = np.full(W + 1, np.inf)
    dp[0] = 0.0
    choice = np.zeros((L, W + 1), dtype=np.int8)
    for l in range(L):
        new = np.full(W + 1, np.inf)
        ch = np.zeros(W + 1, dtype=np.int8)
        for k in range(K):
            c = int(cost[l, k])
            if c > W:
                break
            cand = dp[: W + 1 - c] + dist[l, k]
            better = cand < new[c:]
            new[c:][better] = cand[better]
            ch[c:][better] = k
        dp = new
        choice[l] = ch
    best = np.min(dp)
    w = int(np.flatnonzero(dp <= best)[0])           # lowest spend among the optimal
    out = np.zeros(L, dtype=np.int64)
    for l in range(L - 1, -1, -1):
        out[l] = choice[l, w]
        w -= int(cost[l, out[l]])
    return out


def _hull_steps(cost, dist):
    """Per layer, the steps between consecutive vertices of the lower convex hull of its options
    (cost increasing, distortion decreasing; options above the hull never help the LP).
    Returns a list over layers of (from_option [h], to_option [h], dcost [h], gain [h])."""
    out = []
    for c, dv in zip(cost, dist):
        hull = [0]
        for k in range(1, len(c)):
            if dv[k] >= dv[hull[-1]]:
                continue                                   # not cheaper in distortion: never on the useful hull
            while len(hull) >= 2:
                i, j = hull[-2], hull[-1]
                # drop j if it lies on or above the segment i -> k
                if (dv[j] - dv[i]) * (c[k] - c[i]) >= (dv[k] - dv[i]) * (c[j] - c[i]):
                    hull.pop()
                else:
                    break
            hull.append(k)
        h = np.asarray(hull)
        out.append((h[:-1], h[1:], (c[h[1:]] - c[h[:-1]]).astype(np.float64), dv[h[:-1]] - dv[h[1:]]))
    return out


def _lp_suffix_bounds(cost, dist):
    """For each l, the LP lower bound of layers l.. as breakpoints (cum_cost, cum_gain) + base."""
    L, K = cost.shape
    steps = _hull_steps(cost, dist)
    base = np.cumsum(dist[::-1, 0])[::-1]                 # distortion with every layer at b_min
    tabs = []
    for l in range(L):
        c = np.concatenate([st[2] for st in steps[l:]])
        gn = np.concatenate([st[3] for st in steps[l:]])
        o = np.argsort(-(gn / c), kind="stable")           # convex hull: per-layer order is kept
        tabs.append((np.concatenate([[0.0], np.cumsum(c[o])]), np.concatenate([[0.0], np.cumsum(gn[o])])))
    return base, tabs


def _pareto_dp(cost, dist, W, max_states, beam=None):
    """Exact DP over Pareto-optimal (cost, distortion) states with LP-bound pruning."""
    L, K = cost.shape
    order = np.argsort(-cost[:, -1], kind="stable")       # large layers first
    cost, dist = cost[order], dist[order]
    base, tabs = _lp_suffix_bounds(cost, dist)

    def lower(l, rem):                                      # LP bound of layers l.. with budget rem
        if l >= L:
            return np.zeros_like(rem, dtype=np.float64)
        cc, cg = tabs[l]
        return base[l] - np.interp(rem, cc, cg)

    ub = _greedy(cost, dist, W)
    if beam is None:                                        # a beam-limited pass first: a tight upper bound
        ub = min(ub, _pareto_pass(cost, dist, W, max_states, lower, ub, beam=2048)[0])
    return _pareto_pass(cost, dist, W, max_states, lower, ub, beam=beam)[1][np.argsort(order)]


def _pareto_pass(cost, dist, W, max_states, lower, ub, beam):
    """One DP pass; beam=None is exact, else keeps the `beam` states of lowest bound (heuristic).
    Returns (distortion, choices [L] in the given layer order)."""
    L, K = cost.shape
    tol = 1e-9
    sc = np.zeros(1, dtype=np.int64)
    sd = np.zeros(1)
    parents, choices = [], []
    for l in range(L):
        nc = (sc[:, None] + cost[l][None, :]).ravel()
        nd = (sd[:, None] + dist[l][None, :]).ravel()
        par = np.repeat(np.arange(sc.size), K)
        chs = np.tile(np.arange(K), sc.size)
        keep = nc <= W
        keep &= nd + lower(l + 1, (W - nc).astype(np.float64)) <= ub * (1 + tol) + 1e-300
        nc, nd, par, chs = nc[keep], nd[keep], par[keep], chs[keep]
        o = np.lexsort((nd, nc))                            # by cost, then distortion
        nc, nd, par, chs = nc[o], nd[o], par[o], chs[o]
        prev_min = np.minimum.accumulate(np.concatenate([[np.inf], nd[:-1]]))
        pareto = nd < prev_min                              # strictly better than every cheaper state
        sc, sd, par, chs = nc[pareto], nd[pareto], par[pareto], chs[pareto]
        if beam is not None and sc.size > beam:
            top = np.sort(np.argsort(sd + lower(l + 1, (W - sc).astype(np.float64)), kind="stable")[:beam])
            sc, sd, par, chs = sc[top], sd[top], par[top], chs[top]
        if sc.size > max_states:
            raise RuntimeError(f"VaSMP Pareto DP exceeded {max_states} states at layer {l}; "
                               "raise max_states or use method='dense'")
        if sc.size == 0:                                    # only in a beam pass: nothing beats ub
            return np.inf, None
        parents.append(par)
        choices.append(chs)
    i = int(np.argmin(sd))                                  # frontier sorted by cost: lowest cost on ties
    best = float(sd[i])
    out = np.zeros(L, dtype=np.int64)
    for l in range(L - 1, -1, -1):
        out[l] = choices[l][i]
        i = int(parents[l][i])
    return best, out


def _greedy(cost, dist, W):
    """Distortion of a feasible integer solution: greedy along the hull steps in decreasing marginal
    gain per unit, skipping steps that no longer fit."""
    L, K = cost.shape
    steps = _hull_steps(cost, dist)
    lay = np.concatenate([np.full(st[0].size, l) for l, st in enumerate(steps)])
    frm = np.concatenate([st[0] for st in steps])
    to = np.concatenate([st[1] for st in steps])
    dc = np.concatenate([st[2] for st in steps])
    eff = np.concatenate([st[3] for st in steps]) / dc
    k = np.zeros(L, dtype=np.int64)
    spent = 0
    for i in np.argsort(-eff, kind="stable"):
        l = int(lay[i])
        if k[l] == frm[i] and spent + int(dc[i]) <= W:
            spent += int(dc[i])
            k[l] = to[i]
    return float(dist[np.arange(L), k].sum())


def expected_distortion(variances, sizes, bits) -> float:
    """sum_l n_l var_l 2^(-2 b_l) (the VaSMP objective)."""
    v = np.asarray(variances, np.float64)
    return float(np.sum(np.asarray(sizes, np.float64) * v * np.exp2(-2.0 * np.asarray(bits, np.float64))))


def average_bits(sizes, bits) -> float:
    """Size-weighted average bit-width."""
    s = np.asarray(sizes, np.float64)
    return float(np.sum(s * np.asarray(bits, np.float64)) / np.sum(s))


__all__ = ["allocate_weight_bits", "allocate_bits_table", "water_fill", "expected_distortion", "average_bits", "check_candidates"]
