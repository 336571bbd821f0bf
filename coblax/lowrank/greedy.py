"""Greedy rank moves shared by the allocators: repair by descent, refill, and their scores.

A repair lowers ranks, the step with the least relative loss per unit of budget
excess first, until every budget holds (:func:`descend`); a refill raises ranks,
the largest gain per unit of budget first, while every budget holds (:func:`refill`).
COBLA's rounding, POS and every threshold baseline end through them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping

import numpy as np

from coblax.lowrank.allocation import (
    AllocationProblem,
    BudgetError,
    LayerCost,
    budget_error,
    clip_ranks,
    is_feasible,
    ranks_cost,
    ranks_latency,
    within_budgets,
)

__all__ = ["StepScore", "RefillGain", "down_targets", "up_target", "descend", "refill", "has_room",
           "importance_loss", "importance_gain", "greedy_repair"]


StepScore = Callable[[LayerCost, int, int], float]
"""``score(layer, rank, new_rank) -> float``: the relative loss of lowering a layer
from ``rank`` to ``new_rank`` (:func:`descend`) or the gain of raising it (:func:`refill`)."""


def down_targets(layer: LayerCost, rank: int, min_rank: int, *, every: bool = True) -> list[int]:
    """Lower ranks a step may move a layer to, each cheaper than ``rank``.

    From a factored rank the only step is ``rank - 1``. From the original form every
    factored rank min_rank..saturation_rank-1 is a target (``every``), so a greedy can
    score a jump out of original form to the rank that is worth it, not only to
    saturation_rank - 1 (which saves almost nothing and loses the whole tail).
    """
    if rank <= min_rank:
        return []
    if not layer.is_original(rank):
        return [rank - 1]
    top = min(layer.saturation_rank, layer.full_rank)  # factored ranks are min_rank..top-1
    if top - 1 < min_rank:
        return []
    return list(range(min_rank, top)) if every else [top - 1]


def up_target(layer: LayerCost, rank: int) -> int | None:
    """The next rank that adds a triplet (the original form past saturation), or None if full."""
    if layer.is_original(rank) or rank >= layer.full_rank:
        return None
    new = rank + 1
    return layer.full_rank if layer.is_original(new) else new


def _excess(cost: float, budget: float) -> float:
    if budget <= 0.0:
        return 1.0 if cost > budget else 0.0
    return max(0.0, cost / budget - 1.0)


def descend(
    problem: AllocationProblem,
    ranks: Mapping[str, int],
    loss: StepScore,
    *,
    per_cost: bool = True,
    every_target: bool = True,
    method: str = "repair",
) -> dict[str, int]:
    """The excess-weighted greedy: lower ranks until both budgets hold.

    Each step takes, over layers above ``min_rank`` and their :func:`down_targets`,
    the move with the smallest ``loss(layer, r, new_r) / saved`` (``loss`` alone when
    not ``per_cost``), where saved = w_C ΔN_C / N_C,orig + w_M ΔN_M / N_M,orig and
    w_b = max(0, N_b / N_b,max - 1) weighs each budget by how far it is exceeded
    (Zhang et al. 2016, Sec. 3.4, with two budgets; with a latency budget a third term
    w_L ΔT / T_O alike). Both :func:`greedy_repair` and
    the POS greedy (``baselines.pos``) are this loop with their own ``loss``.

    Raises:
      BudgetError: if even ``min_rank`` everywhere is infeasible.
    """
    floor = clip_ranks(problem, {layer.name: problem.min_rank for layer in problem.layers})
    if not is_feasible(problem, floor):
        raise budget_error(problem, floor, method)
    o_mac, o_par = problem.original_cost()
    o_lat = problem.original_latency() or 1.0
    timed = problem.has_latency
    current = clip_ranks(problem, ranks)
    by_name = {layer.name: layer for layer in problem.layers}
    macs, params = ranks_cost(problem.layers, current)  # kept up to date step by step
    lat = ranks_latency(problem.layers, current) if timed else 0.0
    while not within_budgets(problem, macs, params, lat) or not is_feasible(problem, current):
        if within_budgets(problem, macs, params, lat):  # rounding drift of the running sums: recount
            macs, params = ranks_cost(problem.layers, current)
            lat = ranks_latency(problem.layers, current) if timed else 0.0
            continue
        w_c, w_m = _excess(macs, problem.mac_max), _excess(params, problem.param_max)
        w_l = _excess(lat, problem.latency_max) if timed else 0.0
        best: tuple[float, str, int] | None = None
        for layer in problem.layers:
            r = current[layer.name]
            for new_r in down_targets(layer, r, problem.min_rank, every=every_target):
                saved = w_c * (layer.macs(r) - layer.macs(new_r)) / o_mac + w_m * (
                    layer.params(r) - layer.params(new_r)
                ) / o_par
                if w_l:
                    saved += w_l * (layer.latency_at(r) - layer.latency_at(new_r)) / o_lat
                if saved <= 0.0:  # helps no exceeded budget
                    continue
                lost = max(0.0, float(loss(layer, r, new_r)))
                score = lost / saved if per_cost else lost
                if best is None or score < best[0]:
                    best = (score, layer.name, new_r)
        if best is None:  # pragma: no cover - the floor was checked feasible
            raise BudgetError(f"method {method} could not make progress")
        layer, r = by_name[best[1]], current[best[1]]
        macs += layer.macs(best[2]) - layer.macs(r)
        params += layer.params(best[2]) - layer.params(r)
        if timed:
            lat += layer.latency_at(best[2]) - layer.latency_at(r)
        current[best[1]] = best[2]
    return current


RefillGain = Callable[[LayerCost, int, int, Mapping[str, int]], float]
"""``gain(layer, rank, new_rank, current) -> float``: the value of raising one layer
from ``rank`` to ``new_rank`` when the allocation is ``current``."""


def refill(
    problem: AllocationProblem,
    ranks: Mapping[str, int],
    gain: RefillGain,
    *,
    exclude: Collection[str] = (),
) -> dict[str, int]:
    """Raise ranks while every budget holds, best gain per unit of budget first.

    Each step raises, among the layers (not in ``exclude``) whose :func:`up_target`
    fits every budget, the one with the largest
    ``gain(layer, r, new_r, current) / (ΔN_C / N_C,max + ΔN_M / N_M,max [+ ΔT / T_max])``.
    Costs are monotone in rank, so at the end no layer that is not full (nor
    excluded) can take one more rank without breaking a budget (:func:`has_room`).
    Start from a feasible point.
    """
    current = clip_ranks(problem, ranks)
    if not is_feasible(problem, current):
        raise ValueError("refill needs a feasible allocation to start from")
    s_mac = problem.mac_max if problem.mac_max > 0 else 1.0
    s_par = problem.param_max if problem.param_max > 0 else 1.0
    timed = problem.has_latency
    s_lat = problem.latency_max if timed and problem.latency_max > 0 else 1.0
    by_name = {layer.name: layer for layer in problem.layers}
    macs, params = ranks_cost(problem.layers, current)  # kept up to date step by step
    lat = ranks_latency(problem.layers, current) if timed else 0.0

    def d_lat(layer: LayerCost, r: int, new_r: int) -> float:
        return layer.latency_at(new_r) - layer.latency_at(r) if timed else 0.0

    while True:
        best: tuple[float, float, str, int] | None = None
        for layer in problem.layers:
            r = current[layer.name]
            new_r = None if layer.name in exclude else up_target(layer, r)
            if new_r is None or not within_budgets(problem, macs + layer.macs(new_r) - layer.macs(r),
                                          params + layer.params(new_r) - layer.params(r),
                                          lat + d_lat(layer, r, new_r)):
                continue
            used = (layer.macs(new_r) - layer.macs(r)) / s_mac + (layer.params(new_r) - layer.params(r)) / s_par
            used += d_lat(layer, r, new_r) / s_lat
            value = float(gain(layer, r, new_r, current))
            score = math.inf if used <= 0 else value / used
            key = (score, -used)  # ties: the cheaper step
            if best is None or key > best[:2]:
                best = (score, -used, layer.name, new_r)
        if best is None:
            return current
        layer, r = by_name[best[2]], current[best[2]]
        trial = {**current, best[2]: best[3]}
        if not is_feasible(problem, trial):  # rounding drift of the running sums: recount
            macs, params = ranks_cost(problem.layers, current)
            lat = ranks_latency(problem.layers, current) if timed else 0.0
            if not within_budgets(problem, macs + layer.macs(best[3]) - layer.macs(r),
                         params + layer.params(best[3]) - layer.params(r), lat + d_lat(layer, r, best[3])):
                continue
            return current  # pragma: no cover - the exact and running sums disagree at the limit
        macs += layer.macs(best[3]) - layer.macs(r)
        params += layer.params(best[3]) - layer.params(r)
        lat += d_lat(layer, r, best[3])
        current = trial


def has_room(problem: AllocationProblem, ranks: Mapping[str, int]) -> list[str]:
    """Layers that are not full and could take one more rank within every budget."""
    out = []
    for layer in problem.layers:
        new_r = up_target(layer, int(ranks[layer.name]))
        if new_r is not None and is_feasible(problem, {**ranks, layer.name: new_r}):
            out.append(layer.name)
    return out


def importance_loss(importance: Mapping[str, np.ndarray] | None = None) -> StepScore:
    """Step loss = share of a layer's importance (default σ²) in the triplets dropped."""

    cumulative: dict[str, np.ndarray] = {}  # per layer: [0, c_1, c_2, ...] / total, built once

    def loss(layer: LayerCost, r: int, new_r: int) -> float:
        c = cumulative.get(layer.name)
        if c is None:
            imp = layer.sigma**2 if importance is None else np.asarray(importance[layer.name])
            c = np.concatenate([[0.0], np.cumsum(np.asarray(imp, np.float64))])
            c = c / max(float(c[-1]), 1e-30)
            cumulative[layer.name] = c
        hi, lo = min(r, c.size - 1), min(new_r, c.size - 1)
        return float(c[hi] - c[lo])

    return loss


def importance_gain(importance: Mapping[str, np.ndarray] | None = None) -> RefillGain:
    """Step gain = share of a layer's importance (default σ²) in the triplets added."""
    loss = importance_loss(importance)
    return lambda layer, r, new_r, current=None: loss(layer, new_r, r)


def greedy_repair(
    problem: AllocationProblem,
    ranks: Mapping[str, int],
    importance: Mapping[str, np.ndarray] | None = None,
    *,
    fill: bool = True,
) -> dict[str, int]:
    """Lower ranks until both budgets hold, then (``fill``) raise them while they fit.

    Lowering is :func:`descend` with the step loss = the share of the layer's
    importance (default σ², each layer's entries in the order its triplets are kept)
    in the triplets dropped, per unit of weighted cost saved; raising is
    :func:`refill` with the share gained. Raises :class:`BudgetError` if even
    ``min_rank`` everywhere is infeasible.
    """
    current = descend(problem, ranks, importance_loss(importance), method="repair")
    return refill(problem, current, importance_gain(importance)) if fill else current
