"""COBLA allocator: feasibility, descent from the warm start, cost saturation."""

from __future__ import annotations

import numpy as np
import pytest

from coblax.lowrank.allocation import AllocationProblem, LayerCost, is_feasible
from coblax.lowrank.cobla import COBLA, warm_start_point
from coblax.lowrank.registry import get_allocator


class QuadraticLoss:
    """E(m) = sum_ij w_ij sigma_ij^2 (1 - m_ij)^2: a stand-in network loss."""

    def __init__(self, layers, weights):
        self.s2 = np.concatenate([l.sigma**2 for l in layers])
        self.w = np.concatenate(weights)
        self.calls = 0

    def value(self, m):
        return float(np.sum(self.w * self.s2 * (1 - m) ** 2))

    def value_and_grad(self, m):
        self.calls += 1
        return self.value(m), -2 * self.w * self.s2 * (1 - m)

    def validation_loss(self, m):
        return self.value(m)


def _dense(name, k, l, decay):
    s = np.exp(-decay * np.arange(min(k, l)))
    return LayerCost(name, "dense", (k, l), s, k + l, k + l, k * l, k * l)


def test_feasible_and_descends_from_warm_start():
    layers = (_dense("a", 60, 40, 0.05), _dense("b", 80, 30, 0.3), _dense("c", 30, 30, 0.01))
    loss = QuadraticLoss(layers, [np.ones(l.full_rank) for l in layers])
    o = sum(l.original_macs for l in layers)
    problem = AllocationProblem(layers, 0.4 * o, 0.4 * o, loss=loss, seed=0)
    alloc = COBLA(max_iter=200)(problem)
    assert is_feasible(problem, alloc.ranks)
    trace = alloc.stats["objective_trace"]
    assert trace[-1] < trace[0]
    # The relaxed optimum spends the budget where sigma^2 decays slowly (layer c).
    assert alloc.stats["relaxed_ranks"]["c"] > alloc.stats["relaxed_ranks"]["b"]
    # warm start is the uniform allocation: feasible
    m0 = warm_start_point(problem, "uniform")
    assert set(np.unique(m0)) <= {0.0, 1.0}


def test_saturated_layer_keeps_original_form():
    # Layer "tiny" is very important and cheap: its relaxed rank reaches the rank at
    # which the factored form costs as much as the original, so it is fixed original.
    layers = (_dense("big", 200, 150, 0.02), _dense("tiny", 12, 10, 0.0))
    w = [np.ones(150), np.full(10, 1e4)]
    loss = QuadraticLoss(layers, w)
    o = sum(l.original_macs for l in layers)
    problem = AllocationProblem(layers, 0.3 * o, 0.3 * o, loss=loss, seed=0)
    alloc = COBLA(max_iter=200)(problem)
    assert "tiny" in alloc.stats["saturated_layers"]
    assert alloc.ranks["tiny"] == 10  # full rank = original layer
    assert is_feasible(problem, alloc.ranks)


def test_needs_a_loss_oracle():
    layers = (_dense("a", 10, 10, 0.1),)
    with pytest.raises(ValueError, match="loss"):
        get_allocator("cobla")(AllocationProblem(layers, 50.0, 50.0))
