"""Shared budget machinery for the threshold-style baselines (private).

Threshold rules (VBMF, Gavish–Donoho) keep the singular values above a per-layer
threshold tau_i. In budget mode one multiplier t >= 0 scales every threshold, and
the ranks are r_i(t) = #{j : sigma_ij > t * tau_i}, non-increasing in t. The ranks
only change where t crosses a ratio sigma_ij / tau_i, so the smallest feasible
multiplier is found *exactly* by binary search over those ratios (no float
bisection needed).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from coblax.lowrank.allocation import (
    Allocation,
    AllocationProblem,
    budget_error,
    clip_ranks,
    is_feasible,
    ranks_cost,
)

__all__ = [
    "clip_ranks",
    "check_floor",
    "smallest_feasible_multiplier",
    "cost_ratios",
    "ok_allocation",
    "threshold_allocation",
]


def cost_ratios(problem: AllocationProblem, ranks: Mapping[str, int]) -> tuple[float, float]:
    """(MAC ratio, param ratio) of ``ranks`` relative to the original decomposable layers."""
    macs, params = ranks_cost(problem.layers, ranks)
    o_mac, o_par = problem.original_cost()
    return macs / o_mac, params / o_par


def ok_allocation(problem: AllocationProblem, ranks: dict[str, int], stats: Mapping[str, object],
                  status: str = "ok") -> Allocation:
    """An :class:`Allocation` of ``ranks`` whose stats are ``stats`` plus ``mac_ratio`` / ``param_ratio``
    (:func:`cost_ratios`): what every budget-mode baseline returns."""
    mac_r, par_r = cost_ratios(problem, ranks)
    return Allocation(ranks=ranks, status=status, stats={**stats, "mac_ratio": mac_r, "param_ratio": par_r})


def check_floor(problem: AllocationProblem, method: str) -> dict[str, int]:
    """Return the min_rank-everywhere allocation, or raise BudgetError if it is infeasible."""
    floor = clip_ranks(problem, {layer.name: problem.min_rank for layer in problem.layers})
    if not is_feasible(problem, floor):
        raise budget_error(problem, floor, method)
    return floor


def _ranks_above(ratios: Mapping[str, np.ndarray], t: float) -> dict[str, int]:
    if t == 0.0:  # multiplier 0: no threshold at all, every triplet is kept
        return {name: int(len(r)) for name, r in ratios.items()}
    return {name: int(np.count_nonzero(r > t)) for name, r in ratios.items()}


def smallest_feasible_multiplier(
    problem: AllocationProblem, ratios: Mapping[str, np.ndarray], method: str
) -> tuple[float, dict[str, int]]:
    """Smallest t >= 0 whose ranks #{sigma_ij / tau_i > t} (clipped) meet both budgets.

    Args:
      ratios: layer name -> sigma_ij / tau_i (``inf`` where tau_i == 0 < sigma_ij).
    Returns:
      (t, ranks): ``t`` is exact — any multiplier in [t, next ratio) gives the same
      ranks; ``t == 0`` means full rank everywhere.
    Raises:
      BudgetError: if even min_rank everywhere is infeasible.
    """
    finite = [np.asarray(r, dtype=np.float64) for r in ratios.values()]
    cands = np.unique(np.concatenate([[0.0, np.inf], *[r[np.isfinite(r)] for r in finite]]))
    cands = cands[cands >= 0.0]

    def ranks_at(t: float) -> dict[str, int]:
        return clip_ranks(problem, _ranks_above(ratios, float(t)))

    # Feasibility is monotone in t (ranks non-increasing, costs monotone in rank).
    lo, hi = 0, len(cands) - 1
    if not is_feasible(problem, ranks_at(cands[hi])):
        raise budget_error(problem, ranks_at(cands[hi]), method)
    while lo < hi:
        mid = (lo + hi) // 2
        if is_feasible(problem, ranks_at(cands[mid])):
            hi = mid
        else:
            lo = mid + 1
    return float(cands[lo]), ranks_at(cands[lo])


def threshold_allocation(
    problem: AllocationProblem,
    thresholds: Mapping[str, float],
    method: str,
    extra_stats: Mapping[str, object] | None = None,
) -> Allocation:
    """Budget-mode allocation for a per-layer singular-value threshold rule.

    Natural ranks (multiplier 1) are #{sigma_ij > tau_i}; the returned ranks use the
    smallest multiplier t (possibly < 1, down to 0 = full rank) whose ranks meet both
    budgets, i.e. the largest ranks of the form #{sigma_ij > t tau_i} that fit.

    stats: ``threshold_multiplier``, ``thresholds``, ``natural_ranks`` (clipped to
    [min_rank, full_rank]), ``natural_mac_ratio``, ``natural_param_ratio``,
    ``mac_ratio``, ``param_ratio`` and ``extra_stats``.
    """
    ratios: dict[str, np.ndarray] = {}
    for layer in problem.layers:
        sigma = np.asarray(layer.sigma, dtype=np.float64)
        tau = float(thresholds[layer.name])
        if tau > 0.0:
            ratios[layer.name] = sigma / tau
        else:  # zero threshold: every nonzero triplet is above it at any multiplier
            ratios[layer.name] = np.where(sigma > 0.0, np.inf, 0.0)
    natural = clip_ranks(problem, _ranks_above(ratios, 1.0))
    nat_mac, nat_par = cost_ratios(problem, natural)
    t, ranks = smallest_feasible_multiplier(problem, ratios, method)
    stats: dict[str, object] = {
        "threshold_multiplier": t,
        "thresholds": {name: float(v) for name, v in thresholds.items()},
        "natural_ranks": natural,
        "natural_mac_ratio": nat_mac,
        "natural_param_ratio": nat_par,
    }
    return ok_allocation(problem, ranks, {**stats, **(extra_stats or {})})
