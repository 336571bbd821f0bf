"""The shared excess-weighted descent and the refill: feasible, and no room left."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from coblax.baselines.pos import pos_greedy_ranks, pos_milp
from coblax.lowrank.allocation import (
    AllocationProblem,
    LayerCost,
    down_targets,
    greedy_repair,
    has_room,
    is_feasible,
    up_target,
)


def _layers(rng, n):
    out = []
    for i in range(n):
        if rng.random() < 0.5:
            k, l = int(rng.integers(2, 40)), int(rng.integers(2, 40))
            s = np.sort(rng.uniform(0.0, 1.0, min(k, l)) ** 2)[::-1]
            out.append(LayerCost(f"d{i}", "dense", (k, l), s, k + l, k + l, k * l, k * l))
        else:
            X, C, N = 3, int(rng.integers(1, 8)), int(rng.integers(2, 20))
            HW = int(rng.integers(2, 10)) ** 2
            s = np.sort(rng.uniform(0.0, 1.0, min(C * X, X * N)))[::-1]
            out.append(LayerCost(f"c{i}", "conv", (C * X, X * N), s, HW * (X * C + X * N), X * C + X * N,
                                 HW * X * X * C * N, X * X * C * N))
    return tuple(out)


def _problem(seed, n, mac, par):
    rng = np.random.default_rng(seed)
    layers = _layers(rng, n)
    o_mac = sum(l.original_macs for l in layers)
    o_par = sum(l.original_params for l in layers)
    return AllocationProblem(layers, mac * o_mac, par * o_par), rng


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 5), mac=st.floats(0.05, 1.0), par=st.floats(0.05, 1.0))
def test_no_allocation_leaves_room_for_one_more_rank(seed, n, mac, par):
    problem, rng = _problem(seed, n, mac, par)
    if not is_feasible(problem, {l.name: 1 for l in problem.layers}):
        return
    start = {l.name: int(rng.integers(1, l.full_rank + 1)) for l in problem.layers}
    for ranks in (greedy_repair(problem, start), pos_greedy_ranks(problem), pos_milp(problem)[0]):
        assert is_feasible(problem, ranks)
        assert has_room(problem, ranks) == []
        for layer in problem.layers:  # spelled out: one more rank breaks a budget, or the layer is full
            up = up_target(layer, ranks[layer.name])
            assert up is None or not is_feasible(problem, {**ranks, layer.name: up})


def test_repair_without_fill_only_lowers():
    problem, _ = _problem(3, 4, 0.3, 0.3)
    start = problem.full_ranks()
    low = greedy_repair(problem, start, fill=False)
    assert is_feasible(problem, low)
    assert all(low[k] <= start[k] for k in start)
    full = greedy_repair(problem, start)
    assert all(full[k] >= low[k] for k in start) and has_room(problem, full) == []


def test_down_targets_stay_at_or_above_min_rank():
    # sat = 1: no factored rank is cheaper than the original, so no step down at all
    lay = LayerCost("d", "dense", (2, 2), np.array([2.0, 1.0]), 4.0, 4.0, 4.0, 4.0)
    assert lay.saturation_rank == 1 and down_targets(lay, 2, 1) == []
    lay = LayerCost("d", "dense", (8, 8), np.ones(8), 16.0, 16.0, 64.0, 64.0)  # sat 4
    assert down_targets(lay, 8, 1) == [1, 2, 3]
    assert down_targets(lay, 8, 1, every=False) == [3]
    assert down_targets(lay, 8, 4) == []  # min_rank 4 is already the original form
    assert down_targets(lay, 3, 1) == [2]
