"""``rank_multiple = k``: every allocator's ranks are multiples of k or full, costs unchanged."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coblax import allocate
from coblax.lowrank.allocation import AllocationProblem, BudgetError, LayerCost, is_feasible
from coblax.lowrank.rank_multiple import (
    GroupedLoss,
    check_rank_multiple,
    grouped_layer,
    grouped_problem,
    multiple_floor,
    with_rank_multiple,
)
from coblax.lowrank.registry import allocator_names, get_allocator
from helpers import blobs


def _layer(name, rows, cols, spatial=1, seed=0):
    sigma = np.sort(np.random.default_rng(seed).uniform(0.1, 5.0, min(rows, cols)))[::-1]
    return LayerCost(name, "conv" if spatial > 1 else "dense", (rows, cols), sigma, float(spatial * (rows + cols)),
                     float(rows + cols), float(spatial * rows * cols), float(rows * cols))


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("shape", [(8, 8, 1), (12, 30, 4), (20, 9, 16), (5, 40, 1)])
def test_grouped_rank_costs_what_the_real_rank_costs(k, shape):
    layer = _layer("l", *shape)
    if k > layer.full_rank:
        with pytest.raises(ValueError, match=f"larger than layer 'l'.s full rank {layer.full_rank}"):
            check_rank_multiple(k, [layer])
        return
    g = grouped_layer(layer, k)
    assert g.full_rank == math.ceil(layer.full_rank / k)
    np.testing.assert_allclose(np.sum(g.sigma ** 2), np.sum(layer.sigma ** 2))  # energy kept
    assert np.all(np.diff(g.sigma) <= 1e-12)  # still descending
    for u in range(1, g.full_rank + 1):
        r = min(u * k, layer.full_rank)
        assert (g.macs(u), g.params(u), g.is_original(u)) == (layer.macs(r), layer.params(r), layer.is_original(r))


def test_grouped_loss_is_the_chain_rule():
    layers = (_layer("a", 7, 9), _layer("b", 4, 12, seed=1))
    w = np.random.default_rng(2).uniform(size=11)

    class Quadratic:  # E(m) = Σ w_j m_j², a closed form to differentiate
        def value_and_grad(self, m):
            return float(np.sum(w * m ** 2)), 2 * w * m

        def validation_loss(self, m):
            return float(np.sum(w * m ** 2))

    problem = AllocationProblem(layers, 1.0, 1.0, loss=Quadratic())
    loss = GroupedLoss(problem.loss, problem, 3)
    assert loss.sizes == [3, 2]
    mg = np.array([0.5, 1.0, 0.2, 0.9, 0.3])
    m = np.array([0.5] * 3 + [1.0] * 3 + [0.2] + [0.9] * 3 + [0.3])
    value, grad = loss.value_and_grad(mg)
    assert value == pytest.approx(np.sum(w * m ** 2))
    groups = [range(3), range(3, 6), range(6, 7), range(7, 10), range(10, 11)]
    np.testing.assert_allclose(grad, [sum(2 * w[j] * m[j] for j in g) for g in groups])
    assert not hasattr(loss, "value")  # optional parts stay optional


@st.composite
def problems(draw):
    k = draw(st.integers(2, 4))
    layers = []
    for i in range(draw(st.integers(1, 3))):
        rows, cols = draw(st.integers(k, 14)), draw(st.integers(k, 14))
        layers.append(_layer(f"l{i}", rows, cols, draw(st.sampled_from([1, 4])), seed=draw(st.integers(0, 99))))
    o_mac = sum(x.original_macs for x in layers)
    o_par = sum(x.original_params for x in layers)
    return k, AllocationProblem(tuple(layers), draw(st.floats(0.15, 1.0)) * o_mac,
                                draw(st.floats(0.15, 1.0)) * o_par, min_rank=draw(st.integers(1, 2)))


@pytest.mark.parametrize("name", [n for n in allocator_names() if n != "cobla"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=problems())
def test_every_allocator_respects_rank_multiple(name, case):
    k, problem = case
    allocator = with_rank_multiple(get_allocator(name), k)
    assert allocator.name == name
    floor = {x.name: multiple_floor(problem.min_rank, k) for x in problem.layers}
    if not is_feasible(problem, floor):
        with pytest.raises(BudgetError):
            allocator(problem)
        return
    allocation = allocator(problem)
    assert is_feasible(problem, allocation.ranks)
    for layer in problem.layers:
        r = allocation.ranks[layer.name]
        assert r == layer.full_rank or (r % k == 0 and r >= floor[layer.name]), (layer.name, r)
        if allocation.masks and layer.name in allocation.masks:
            assert len(allocation.masks[layer.name]) == layer.full_rank
    assert allocation.stats["rank_multiple"] == k


def test_rank_multiple_one_is_the_allocator_itself():
    allocator = get_allocator("uniform")
    assert with_rank_multiple(allocator, 1) is allocator
    problem = AllocationProblem((_layer("a", 10, 10),), 1e9, 1e9)
    assert grouped_problem(problem, 1).layers[0].full_rank == 10


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 16, rngs=rngs)
        self.fc3 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc3(nnx.tanh(self.fc2(nnx.tanh(self.fc1(x)))))


def test_cobla_through_allocate_and_bad_multiples():
    x, y = blobs(n=200)
    model = MLP(nnx.Rngs(0))
    rules = [("fc1|fc2", "dense")]
    result = allocate(model, (x, y), rules=rules, mac=0.8, param=0.8, method="cobla", rank_multiple=4,
                      method_options={"max_iter": 5, "roundings": 2})
    assert all(r % 4 == 0 or r == result.full_ranks[n] for n, r in result.ranks.items()), result.ranks
    assert result.mac_ratio <= 0.8 + 1e-9 and result.allocation.stats["rank_multiple"] == 4
    assert result.model.fc2.first.kernel[...].shape[1] == result.ranks["fc2"] or result.ranks["fc2"] == 16
    for bad, match in ((0, "rank_multiple=0 must be an integer >= 1"), (2.5, "rank_multiple=2.5"),
                       (7, "rank_multiple=7 is larger than layer 'fc1'.s full rank 6")):
        with pytest.raises(ValueError, match=match):
            allocate(model, (x, y), rules=rules, mac=0.6, param=0.6, method="uniform", rank_multiple=bad)
    with pytest.raises(BudgetError, match="rank 4 in every decomposed layer"):
        allocate(model, (x, y), rules=rules, mac=0.15, param=0.15, method="uniform", rank_multiple=4)
