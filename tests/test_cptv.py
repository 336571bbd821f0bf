"""CPTV (Tai et al. 2016): hand-counted ranks and the budget-mode bisection vs brute force."""

import numpy as np
import pytest

from coblax.baselines.cptv import CPTV, cptv_rank
from coblax.lowrank.allocation import AllocationProblem, BudgetError, LayerCost, is_feasible


def dense(name, k, l, sigma):
    return LayerCost(name, "dense", (k, l), np.asarray(sigma, float), k + l, k + l, k * l, k * l)


@pytest.mark.parametrize(
    ("beta", "rank"),
    # sigma = 3, 2, 1: energies 9, 4, 1 (total 14), cumulative 9, 13, 14.
    [(0.0, 0), (0.5, 1), (9 / 14, 1), (0.65, 2), (13 / 14, 2), (0.93, 3), (1.0, 3)],
)
def test_cptv_rank_hand_counts(beta, rank):
    assert cptv_rank(np.array([3.0, 2.0, 1.0]), beta) == rank


def test_cptv_rank_rejects_bad_beta():
    with pytest.raises(ValueError, match="beta"):
        cptv_rank(np.ones(3), 1.5)


def _brute_force(problem):
    """Largest beta among the breakpoints (cumulative energy fractions) that is feasible."""
    fracs = {0.0}
    for layer in problem.layers:
        e = np.cumsum(layer.sigma**2)
        fracs.update((e / e[-1]).tolist())
    best = None
    for beta in sorted(fracs):
        ranks = {
            l.name: min(l.full_rank, max(problem.min_rank, cptv_rank(l.sigma, beta)))
            for l in problem.layers
        }
        if is_feasible(problem, ranks):
            best = ranks
    return best


def test_cptv_matches_brute_force_and_reports_beta():
    rng = np.random.default_rng(3)
    for _ in range(20):
        layers = tuple(
            dense(f"l{i}", k, l, np.sort(rng.gamma(0.7, size=min(k, l)))[::-1])
            for i, (k, l) in enumerate(rng.integers(2, 12, size=(3, 2)))
        )
        o = sum(l.original_macs for l in layers)
        floor = sum(l.macs(1) for l in layers) / o
        frac = rng.uniform(floor, 1.0)
        problem = AllocationProblem(layers, frac * o, frac * o)
        alloc = CPTV()(problem)
        assert alloc.ranks == _brute_force(problem)
        beta = alloc.stats["beta"]
        # The reported beta reproduces the ranks.
        assert {l.name: max(1, cptv_rank(l.sigma, beta)) for l in layers} == alloc.ranks


def test_cptv_hand_example():
    # a: 4x4 (sat 2: rank >= 2 is the original, cost 16), sigma^2 = 16, 9, 4, 1.
    # b: 1x8 (full rank 1 = original, cost 8).
    a = dense("a", 4, 4, [4.0, 3.0, 2.0, 1.0])
    b = dense("b", 1, 8, [1.0])
    # Budget 17: a must be factored at rank 1 (cost 8); b stays original (8) -> 16 <= 17.
    problem = AllocationProblem((a, b), 17.0, 17.0)
    alloc = CPTV()(problem)
    assert alloc.ranks == {"a": 1, "b": 1}
    # a reaches rank 2 (= original) once beta > 16/30, which would cost 24 > 17.
    assert alloc.stats["beta"] == pytest.approx(16 / 30, abs=1e-12)


def test_cptv_generous_budget_keeps_everything():
    a = dense("a", 5, 6, [5.0, 4.0, 3.0, 2.0, 1.0])
    alloc = CPTV()(AllocationProblem((a,), 30.0, 30.0))
    assert alloc.ranks == {"a": 5} and alloc.stats["beta"] == 1.0


def test_cptv_infeasible_raises_budget_error():
    a = dense("a", 5, 6, [5.0, 4.0, 3.0, 2.0, 1.0])
    with pytest.raises(BudgetError, match="cptv"):
        CPTV()(AllocationProblem((a,), 10.0, 30.0))  # rank 1 already costs 11 MACs
