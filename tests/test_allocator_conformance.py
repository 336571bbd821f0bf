"""Every registered allocator (except loss-driven ones) honours the Allocator contract.

On random layer sets: ranks are integers in [min_rank, full_rank] meeting both budgets,
or the allocator raises BudgetError — exactly when min_rank everywhere is infeasible.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coblax.lowrank.allocation import (
    Allocation,
    AllocationProblem,
    BudgetError,
    LayerCost,
    is_feasible,
)
from coblax.lowrank.registry import allocator_names, get_allocator

NEEDS_LOSS = {"cobla"}  # allocators that need problem.loss (a network to evaluate)


def _names():
    return [n for n in allocator_names() if n not in NEEDS_LOSS]


@st.composite
def layer_sets(draw):
    n = draw(st.integers(1, 4))
    layers = []
    for i in range(n):
        k = draw(st.integers(1, 12))
        l = draw(st.integers(1, 12))
        r = min(k, l)
        sigma = np.sort(np.array(draw(st.lists(
            st.floats(0.0, 50.0, allow_subnormal=False), min_size=r, max_size=r))))[::-1]
        if draw(st.booleans()):
            # A conv-like layer: MACs scale with an output map and need not saturate
            # at the same rank as the parameters.
            spatial = draw(st.sampled_from([1, 4, 16]))
            mpr = spatial * (k * draw(st.sampled_from([1, 2])) + l)
            layers.append(LayerCost(f"conv{i}", "conv", (k, l), sigma, float(mpr),
                                    float(k + l), float(spatial * k * l), float(k * l)))
        else:
            layers.append(LayerCost(f"dense{i}", "dense", (k, l), sigma, float(k + l),
                                    float(k + l), float(k * l), float(k * l)))
    o_mac = sum(x.original_macs for x in layers)
    o_par = sum(x.original_params for x in layers)
    min_rank = draw(st.integers(1, min(2, min(x.full_rank for x in layers))))
    return AllocationProblem(
        tuple(layers),
        draw(st.floats(0.2, 1.0, exclude_min=True)) * o_mac,
        draw(st.floats(0.2, 1.0, exclude_min=True)) * o_par,
        min_rank=min_rank,
    )


@pytest.mark.parametrize("name", _names())
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=layer_sets())
def test_allocator_contract(name, problem):
    allocator = get_allocator(name)
    assert allocator.name == name
    floor = {x.name: problem.min_rank for x in problem.layers}
    if not is_feasible(problem, floor):
        with pytest.raises(BudgetError, match=name):
            allocator(problem)
        return
    alloc = allocator(problem)
    assert isinstance(alloc, Allocation)
    assert set(alloc.ranks) == set(problem.names)
    for layer in problem.layers:
        r = alloc.ranks[layer.name]
        assert isinstance(r, int)
        assert problem.min_rank <= r <= layer.full_rank
    assert is_feasible(problem, alloc.ranks)
