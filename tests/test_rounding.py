"""Rounding + repair never violates a budget; masks follow sigma * m_hat."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coblax.lowrank.allocation import (
    AllocationProblem,
    BudgetError,
    LayerCost,
    has_room,
    is_feasible,
    ranks_cost,
)
from coblax.lowrank.rounding import masks_for_ranks, round_masks


def dense(name, k, l, rng):
    s = np.sort(rng.uniform(0.01, 1.0, min(k, l)))[::-1]
    return LayerCost(name, "dense", (k, l), s, k + l, k + l, k * l, k * l)


def conv(name, rng):
    X, C, N = 3, int(rng.integers(1, 8)), int(rng.integers(2, 20))
    HW = int(rng.integers(2, 10)) ** 2
    R = min(C * X, X * N)
    s = np.sort(rng.uniform(0.01, 1.0, R))[::-1]
    return LayerCost(name, "conv", (C * X, X * N), s, HW * (X * C + X * N), X * C + X * N,
                     HW * X * X * C * N, X * X * C * N)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_layers=st.integers(1, 5),
    mac=st.floats(0.05, 1.0),
    par=st.floats(0.05, 1.0),
    draws=st.integers(1, 6),
)
def test_rounding_never_breaks_a_budget(seed, n_layers, mac, par, draws):
    rng = np.random.default_rng(seed)
    layers = tuple(
        dense(f"d{i}", int(rng.integers(2, 60)), int(rng.integers(2, 60)), rng) if rng.random() < 0.5 else conv(f"c{i}", rng)
        for i in range(n_layers)
    )
    o_mac = sum(l.original_macs for l in layers)
    o_par = sum(l.original_params for l in layers)
    problem = AllocationProblem(layers, mac * o_mac, par * o_par, min_rank=1)
    # relaxed masks that are typically over budget (the hard case for rounding)
    m_hat = {l.name: rng.uniform(0, 1, l.full_rank) ** rng.uniform(0.2, 3) for l in layers}
    floor_ok = is_feasible(problem, {l.name: 1 for l in layers})
    if not floor_ok:
        with pytest.raises(BudgetError):
            round_masks(problem, m_hat, draws=draws, seed=seed, score=lambda m: float(np.sum(m)))
        return
    ranks, masks, info = round_masks(problem, m_hat, draws=draws, seed=seed, score=lambda m: -float(np.sum(m)))
    assert is_feasible(problem, ranks)
    for l in layers:
        assert 1 <= ranks[l.name] <= l.full_rank
        kept = np.count_nonzero(masks[l.name])
        assert kept == ranks[l.name]
    macs, params = ranks_cost(layers, ranks)
    assert macs <= problem.mac_max * (1 + 1e-9) and params <= problem.param_max * (1 + 1e-9)
    assert not has_room(problem, ranks)  # refilled: no layer can take one more rank


def test_keeps_top_sigma_times_mhat_with_scaled_values():
    rng = np.random.default_rng(0)
    layer = dense("a", 10, 10, rng)
    problem = AllocationProblem((layer,), 1e9, 1e9)
    m_hat = np.zeros(10)
    m_hat[[1, 4, 7]] = [0.9, 1.0, 0.2]
    ranks, masks = masks_for_ranks(problem, {"a": 2}, {"a": m_hat})
    order = np.argsort(-(layer.sigma * m_hat))[:2]
    assert set(np.nonzero(masks["a"])[0]) == set(order)
    np.testing.assert_allclose(masks["a"][order], m_hat[order])
    assert ranks == {"a": 2}


def test_picks_the_candidate_with_the_best_score():
    rng = np.random.default_rng(3)
    a = dense("a", 100, 40, rng)
    layers = (a, LayerCost("b", "dense", (100, 40), a.sigma, 140, 140, 4000, 4000))
    problem = AllocationProblem(layers, 25 * 140, 25 * 140)  # room for 25 ranks in all
    m_hat = {"a": np.full(40, 0.3125), "b": np.full(40, 0.3125)}  # r = 12.5: 12 or 13
    seen = []

    def score(m):
        seen.append(m.copy())
        return -np.count_nonzero(m[:40])  # prefer more rank in layer a

    ranks, masks, info = round_masks(problem, m_hat, draws=10, seed=0, score=score)
    assert len(seen) >= 2  # distinct candidates, each scored once
    assert ranks == {"a": 13, "b": 12}  # every candidate refilled to 25 ranks
    assert not has_room(problem, ranks)


def test_best_values_scores_each_rank_vector_both_ways_and_keeps_the_better():
    """``values="best"``: the same ranks under m̂-scaled and plain masks, the better kept.

    The score below is the squared distance of the kept multipliers from 1 (a network
    that wants plain truncation), so plain must win although m̂ ranks the draws.
    """
    rng = np.random.default_rng(5)
    a = dense("a", 30, 20, rng)
    problem = AllocationProblem((a,), 6 * 50, 6 * 50)  # room for 6 ranks
    m_hat = {"a": np.r_[np.full(8, 0.7), np.zeros(12)]}  # Σ = 5.6: ranks 5 or 6, refilled to 6

    def score(m):
        kept = m[m > 0]
        return float(np.sum((1 - kept) ** 2))

    ranks, masks, info = round_masks(problem, m_hat, draws=4, seed=0, score=score, values="best")
    assert ranks == {"a": 6}
    assert info["values"] == "plain"
    np.testing.assert_array_equal(masks["a"], np.r_[np.ones(6), np.zeros(14)])  # top 6 by σ at 1
    modes = {c["values"] for c in info["candidates"]}
    assert modes == {"relaxed", "plain"}
    # Under "relaxed" alone, the kept multipliers are m̂ = 0.7: score 6 · 0.09.
    _, masks_r, info_r = round_masks(problem, m_hat, draws=4, seed=0, score=score, values="relaxed")
    assert info_r["score"] == pytest.approx([6 * 0.09])
    with pytest.raises(ValueError, match="best"):
        round_masks(problem, m_hat, draws=1, seed=0, score=score, values="bogus")
