"""Latency budgets: monotone tables, POS-exact and COBLA's rounding vs brute force with an
injected (synthetic) latency table, every allocator feasible under it, bad input named."""

import dataclasses
import itertools
import math

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coblax.baselines.pos import pos_milp, pos_objective
from coblax.lowrank.allocation import (
    AllocationProblem,
    BudgetError,
    LayerCost,
    descend,
    has_room,
    importance_loss,
    is_feasible,
    ranks_latency,
)
from coblax.lowrank.latency import LatencyCurve, NetworkLatency, fit_quality
from coblax.lowrank.rank_multiple import with_rank_multiple
from coblax.lowrank.registry import allocator_names, get_allocator
from coblax.lowrank.rounding import round_masks

NEEDS_LOSS = {"cobla"}


# -- the curve --------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=8), st.floats(0.0, 2.0))
def test_interpolation_is_monotone_in_rank(times, original):
    ranks = tuple(1 + 3 * i for i in range(len(times)))  # 1, 4, 7, ...
    curve = LatencyCurve(ranks, tuple(times), original)
    values = [curve.at(r) for r in np.linspace(0, ranks[-1] + 3, 200)]
    assert np.all(np.diff(values) >= 0)
    # at the grid points: the least-squares non-decreasing fit; a table that already is
    # non-decreasing is kept exactly
    fit = np.array([curve.at(r) for r in ranks])
    if np.all(np.diff(times) >= 0):
        np.testing.assert_allclose(fit, times, atol=1e-12)
    assert np.mean(fit) == pytest.approx(np.mean(times), abs=1e-9)  # PAVA keeps the mean of each pool


def test_one_slow_outlier_does_not_lift_the_larger_ranks():
    curve = LatencyCurve((1, 2, 3, 4), (1.0, 5.0, 3.0, 4.0), 10.0)
    # pools {5, 3} -> 4, then 4 <= 4: the fit is 1, 4, 4, 4 (a running maximum would give 1, 5, 5, 5)
    np.testing.assert_allclose([curve.at(r) for r in (1, 2, 3, 4)], [1.0, 4.0, 4.0, 4.0])


def test_interpolation_between_grid_points_is_linear():
    curve = LatencyCurve((1, 5), (1.0, 3.0), 10.0)
    assert curve.at(3) == pytest.approx(2.0)  # hand: 1 + (3 - 1) * (3 - 1) / (5 - 1)
    assert curve.at(9) == pytest.approx(3.0)  # flat beyond the grid
    assert curve.grouped(2).at(2) == pytest.approx(curve.at(4))


def test_line_fit_is_exact_on_an_affine_table_and_ignores_points_above_saturation():
    curve = LatencyCurve((1, 3, 5, 7, 9), (2.5, 3.5, 4.5, 5.5, 100.0), 6.0)
    a, s = curve.line(below=9)
    assert (a, s) == (pytest.approx(2.0), pytest.approx(0.5))
    assert fit_quality(curve, 9) == pytest.approx(0.0, abs=1e-12)


def test_never_faster_layer_stays_original():
    curve = LatencyCurve((1, 4), (2.0, 3.0), 1.5)  # factored slower already at rank 1
    lay = _layer("a", [4.0, 3.0, 2.0, 1.0], 1.0, 10.0, curve)
    assert lay.saturation_rank == 1
    assert all(lay.is_original(r) for r in range(1, 5))
    assert lay.latency_at(1) == 1.5


def test_network_latency_rest_is_by_difference():
    net = NetworkLatency({"a": LatencyCurve((1, 2), (1.0, 2.0), 3.0)}, total=10.0, batch=1)
    assert net.rest == pytest.approx(7.0)
    assert net.budget(0.5) == pytest.approx(0.5 * 10.0 - 7.0)


# -- tiny problems with an injected table --------------------------------------------------


def _layer(name, sigma2, per_rank, original, curve):
    sigma = np.sqrt(np.asarray(sigma2, float))
    return LayerCost(name, "dense", (len(sigma), len(sigma)), sigma, per_rank, per_rank, original, original,
                     latency=curve)


@st.composite
def timed_problems(draw, max_layers=3, max_rank=5):
    n = draw(st.integers(1, max_layers))
    layers = []
    for i in range(n):
        k = draw(st.integers(1, max_rank))
        width = draw(st.integers(1, 8))
        r = min(k, width)
        sig = sorted(draw(st.lists(st.floats(0.01, 10.0), min_size=r, max_size=r)), reverse=True)
        grid = tuple(range(1, r + 1))
        fixed = draw(st.floats(0.0, 2.0))  # a second kernel call: a fixed part, not rank x slope
        steps = draw(st.lists(st.floats(0.0, 1.0), min_size=r, max_size=r))
        times = tuple(fixed + float(np.sum(steps[: j + 1])) for j in range(r))
        curve = LatencyCurve(grid, times, draw(st.floats(0.5, 4.0)))
        layers.append(LayerCost(f"l{i}", "dense", (k, width), np.array(sig), float(k + width), float(k + width),
                                float(k * width), float(k * width), latency=curve))
    o_mac = sum(x.original_macs for x in layers)
    o_par = sum(x.original_params for x in layers)
    o_lat = sum(x.latency.original for x in layers)
    return AllocationProblem(tuple(layers), draw(st.floats(0.3, 1.0)) * o_mac, draw(st.floats(0.3, 1.0)) * o_par,
                             latency_max=draw(st.floats(0.2, 1.0)) * o_lat)


def _all_ranks(problem):
    return (dict(zip(problem.names, rs))
            for rs in itertools.product(*[range(problem.min_rank, l.full_rank + 1) for l in problem.layers]))


def _brute_force(problem, objective):
    best = None
    for ranks in _all_ranks(problem):
        if is_feasible(problem, ranks):
            value = objective(ranks)
            if best is None or value > best[0] + 1e-12:
                best = (value, ranks)
    return best


def _floor(problem):
    return {l.name: problem.min_rank for l in problem.layers}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(timed_problems())
def test_pos_exact_equals_brute_force_with_a_latency_table(problem):
    if not is_feasible(problem, _floor(problem)):
        with pytest.raises(BudgetError, match="latency"):
            pos_milp(problem)
        return
    ranks, obj = pos_milp(problem)
    assert is_feasible(problem, ranks)
    assert ranks_latency(problem.layers, ranks) <= problem.latency_max * (1 + 1e-9)
    best, _ = _brute_force(problem, lambda r: pos_objective(problem, r))
    assert obj == pytest.approx(best, abs=1e-9)


def test_latency_row_binds_where_macs_and_params_do_not():
    # a: fast factored form; b: its factored form costs a large fixed part (the second call)
    a = _layer("a", [4.0, 2.0, 1.0], 1.0, 3.0, LatencyCurve((1, 2, 3), (0.1, 0.2, 0.3), 1.0))
    b = _layer("b", [4.0, 2.0, 1.0], 1.0, 3.0, LatencyCurve((1, 2, 3), (0.9, 0.95, 1.0), 1.0))
    free = AllocationProblem((a, b), 1e9, 1e9)
    timed = dataclasses.replace(free, latency_max=1.2)
    # without the latency row both layers stay original (the full energy)
    assert pos_milp(free)[0] == {"a": 3, "b": 3}
    ranks, _ = pos_milp(timed)
    best, brute = _brute_force(timed, lambda r: pos_objective(timed, r))
    assert ranks == brute
    assert ranks_latency(timed.layers, ranks) <= 1.2 + 1e-12


# -- COBLA's rounding with the table ----------------------------------------------------------


def _separable_objective(problem, weights):
    """Σ_i w_i log(energy_i(r_i)): a score the rounding can evaluate (lower = better for it)."""
    cum = {l.name: np.concatenate([[0.0], np.cumsum(l.sigma ** 2)]) for l in problem.layers}

    def value(ranks):
        total = 0.0
        for l in problem.layers:
            r = l.full_rank if l.is_original(ranks[l.name]) else ranks[l.name]
            total += weights[l.name] * math.log(cum[l.name][r] + 1e-9)
        return total

    return value


@pytest.mark.parametrize("seed", range(12))
def test_cobla_rounding_finds_the_brute_force_allocation_with_a_latency_table(seed):
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(3):
        r = int(rng.integers(2, 6))
        sig = np.sort(rng.uniform(0.1, 5.0, r))[::-1]
        fixed = rng.uniform(0.0, 1.0)
        times = tuple(fixed + np.cumsum(rng.uniform(0.05, 0.5, r)))
        curve = LatencyCurve(tuple(range(1, r + 1)), times, float(rng.uniform(1.0, 3.0)))
        layers.append(LayerCost(f"l{i}", "dense", (r, r), sig, float(2 * r), float(2 * r), float(r * r),
                                float(r * r), latency=curve))
    o_lat = sum(l.latency.original for l in layers)
    problem = AllocationProblem(tuple(layers), 1e9, 1e9, latency_max=float(rng.uniform(0.4, 0.9)) * o_lat)
    if not is_feasible(problem, _floor(problem)):
        pytest.skip("floor infeasible for this draw")
    weights = {l.name: float(rng.uniform(0.5, 2.0)) for l in layers}
    objective = _separable_objective(problem, weights)
    offsets = problem.offsets()

    def score(m):  # flat mask -> ranks (count of kept triplets; all ones = original)
        ranks = {l.name: int(np.count_nonzero(m[offsets[i]:offsets[i + 1]])) for i, l in enumerate(problem.layers)}
        return -objective(ranks)

    m_hat = {l.name: np.full(l.full_rank, 0.5) for l in layers}
    ranks, _, info = round_masks(problem, m_hat, draws=4, seed=seed, score=score, values="plain",
                                 local_search_evals=500)
    _, brute = _brute_force(problem, objective)
    assert is_feasible(problem, ranks)
    assert objective(ranks) == pytest.approx(objective(brute), abs=1e-9), (ranks, brute, info["chosen"])
    assert has_room(problem, ranks) == []


def test_repair_lowers_the_layer_that_saves_latency():
    a = _layer("a", [1.0, 1.0, 1.0], 1.0, 9.0, LatencyCurve((1, 3), (0.1, 0.3), 5.0))
    b = _layer("b", [1.0, 1.0, 1.0], 1.0, 9.0, LatencyCurve((1, 3), (1.0, 3.0), 5.0))
    problem = AllocationProblem((a, b), 1e9, 1e9, latency_max=2.1)  # start: 0.2 + 2.0
    ranks = descend(problem, {"a": 2, "b": 2}, importance_loss())
    # equal σ loss per step; b saves 1.0 s per rank, a only 0.1 s: b goes down
    assert ranks == {"a": 2, "b": 1}
    assert ranks_latency(problem.layers, ranks) == pytest.approx(0.2 + 1.0)


# -- every allocator under an injected table ---------------------------------------------------


@pytest.mark.parametrize("name", [n for n in allocator_names() if n not in NEEDS_LOSS])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=timed_problems(max_layers=3, max_rank=6))
def test_every_allocator_meets_the_latency_budget(name, problem):
    allocator = get_allocator(name)
    if not is_feasible(problem, _floor(problem)):
        with pytest.raises(BudgetError):
            allocator(problem)
        return
    alloc = allocator(problem)
    assert is_feasible(problem, alloc.ranks)
    assert ranks_latency(problem.layers, alloc.ranks) <= problem.latency_max * (1 + 1e-9)


@pytest.mark.parametrize("name", ["pos_exact", "uniform"])
def test_rank_multiple_and_latency_together(name):
    rng = np.random.default_rng(3)
    layers = []
    for i in range(2):
        sig = np.sort(rng.uniform(0.1, 5.0, 8))[::-1]
        curve = LatencyCurve((1, 4, 8), (0.5, 0.8, 1.2), 1.0)
        layers.append(LayerCost(f"l{i}", "dense", (8, 8), sig, 40.0, 40.0, 640.0, 640.0, latency=curve))
    problem = AllocationProblem(tuple(layers), 1e9, 1e9, latency_max=1.8)  # ranks 4+4: 1.6, 4+8: 1.8, 8+8: 2.0
    alloc = with_rank_multiple(get_allocator(name), 4)(problem)
    assert all(r % 4 == 0 for r in alloc.ranks.values())
    if name == "pos_exact":  # exact: one layer original, the other at 4
        assert sorted(alloc.ranks.values()) == [4, 8]
    assert is_feasible(problem, alloc.ranks)


def test_latency_max_without_tables_is_refused():
    lay = LayerCost("a", "dense", (2, 2), np.ones(2), 4.0, 4.0, 4.0, 4.0)
    with pytest.raises(ValueError, match="latency table"):
        AllocationProblem((lay,), 1.0, 1.0, latency_max=1.0)


def test_timing_under_disable_jit_is_named():
    from coblax.lowrank.latency_measure import LatencyError, time_calls

    with jax.disable_jit():
        with pytest.raises(LatencyError, match="jit"):
            time_calls([lambda: 1.0])


def test_savings_scale_is_the_least_squares_slope_through_the_origin():
    from coblax.lowrank.latency_measure import savings_scale

    # hand: (1*0.5 + 2*1.1) / (1 + 4) = 0.54
    assert savings_scale([1.0, 2.0], [0.5, 1.1], total=10.0) == pytest.approx(0.54)
    assert savings_scale([0.1, 0.15], [5.0, 5.0], total=10.0) == 1.0  # below 2 % of the network: no scale
    assert savings_scale([1.0], [-3.0], total=10.0) == 0.2  # clipped
