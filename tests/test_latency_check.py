"""The end-to-end latency check (coblax.lowrank.latency_check): the correction of the
budget by the measured miss, against hand-computed budgets and brute force."""

import dataclasses
import itertools

import numpy as np
import pytest

from coblax.baselines.pos import pos_objective
from coblax.lowrank.allocation import AllocationProblem, LayerCost, is_feasible, ranks_latency
from coblax.lowrank.latency import LatencyCurve, NetworkLatency
from coblax.lowrank.latency_check import GAIN, check_latency, corrected_fraction
from coblax.lowrank.registry import get_allocator


def _problem(target: float):
    """Three dense layers of rank 6 whose factored time is 0.1 + 0.1 r (original 1.0),
    and a rest of the network of 1.0: T_net,O = 4.0."""
    layers = []
    for i, decay in enumerate((0.5, 0.7, 0.9)):
        sigma = np.array([decay ** j for j in range(6)]) * (3 - i)
        curve = LatencyCurve(tuple(range(1, 7)), tuple(0.1 + 0.1 * r for r in range(1, 7)), 1.0)
        layers.append(LayerCost(f"l{i}", "dense", (6, 6), sigma, 12.0, 12.0, 36.0, 36.0, latency=curve))
    timing = NetworkLatency({l.name: l.latency for l in layers}, total=4.0, batch=1)
    problem = AllocationProblem(tuple(layers), 1e9, 1e9, latency_max=timing.budget(target))
    return problem, timing


def _brute_pos(problem):
    """The largest POS objective of a feasible rank vector (POS-exact's optimum, by enumeration;
    ranks at or above a layer's saturation rank tie)."""
    best = None
    for rs in itertools.product(*[range(1, 7)] * len(problem.layers)):
        ranks = dict(zip(problem.names, rs))
        if is_feasible(problem, ranks):
            energy = pos_objective(problem, ranks)
            if best is None or energy > best[0] + 1e-12:
                best = (energy, ranks)
    return best[0]


def _predicted(problem, timing, ranks):
    return (timing.rest + ranks_latency(problem.layers, ranks)) / timing.total


def test_a_network_slower_than_its_tables_is_reallocated_under_the_corrected_budget():
    target, offset = 0.7, 0.06  # the network measures 6 points of T_net,O slower than predicted
    problem, timing = _problem(target)
    run = get_allocator("pos_exact", bound=False, compare_greedy=False)
    first = run(problem)
    assert pos_objective(problem, first.ranks) == pytest.approx(_brute_pos(problem))
    measured = []

    def measure(ranks):
        measured.append(_predicted(problem, timing, ranks) + offset)
        return measured[-1]

    kept = check_latency(first, problem, run, timing, target, measure, checks=2)
    report = kept.stats["latency"]
    # by hand: λ1 = p0 − 1.1 (ρ0 − 0.7), with p0 the first allocation's prediction, ρ0 = p0 + 0.06
    p0 = _predicted(problem, timing, first.ranks)
    rho0 = p0 + offset
    assert rho0 > target
    lam1 = p0 - GAIN * (rho0 - target)
    assert report["end_to_end"][1]["fraction"] == pytest.approx(lam1)
    corrected = dataclasses.replace(problem, latency_max=timing.budget(lam1))
    assert is_feasible(corrected, kept.ranks)
    assert pos_objective(problem, kept.ranks) == pytest.approx(_brute_pos(corrected))
    assert report["met"] and report["measured_ratio"] <= target
    assert report["measured_ratio"] == pytest.approx(_predicted(problem, timing, kept.ranks) + offset)


def test_tables_that_hold_keep_the_first_allocation_with_one_measurement():
    problem, timing = _problem(0.7)
    run = get_allocator("pos_exact", bound=False, compare_greedy=False)
    first = run(problem)
    calls = []
    kept = check_latency(first, problem, run, timing, 0.7,
                         lambda r: calls.append(r) or _predicted(problem, timing, r), checks=2)
    assert kept.ranks == first.ranks and len(calls) == 1
    assert kept.stats["latency"]["met"] and len(kept.stats["latency"]["end_to_end"]) == 1


def test_a_miss_the_floor_cannot_absorb_keeps_the_fastest_and_says_so():
    problem, timing = _problem(0.7)
    run = get_allocator("pos_exact", bound=False, compare_greedy=False)
    first = run(problem)
    # 40 points slower than the tables: even every layer at rank 1 (0.55 predicted) misses 0.7
    kept = check_latency(first, problem, run, timing, 0.7, lambda r: _predicted(problem, timing, r) + 0.4, checks=3)
    report = kept.stats["latency"]
    assert not report["met"]
    assert report["measured_ratio"] == pytest.approx(min(a["measured"] for a in report["end_to_end"]))
    floor = (timing.rest + 3 * 0.2) / timing.total
    assert report["budget_fraction_used"] == pytest.approx(floor)
    assert kept.ranks == {"l0": 1, "l1": 1, "l2": 1}


def test_corrected_fraction_is_clamped_at_the_floor():
    assert corrected_fraction(0.48, 0.6, 0.5, 0.3) == pytest.approx(0.48 - GAIN * 0.1)
    assert corrected_fraction(0.48, 0.9, 0.5, 0.3) == 0.3


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_bad_latency_checks_are_named(value):
    from coblax.lowrank.latency_api import latency_checks_for

    with pytest.raises(ValueError, match="latency_checks"):
        latency_checks_for(value, None)
    assert latency_checks_for(None, None) == 2 and latency_checks_for(None, object()) == 0
