"""Rounding relaxed masks m̂ to integer ranks that meet both budgets.

Following the COBLA authors: r_i = Σ_j m̂_ij is rounded stochastically (up with
probability frac(r_i)); layer i keeps its top-r_i triplets ranked by σ_ij·m̂_ij,
with singular values σ_ij·m̂_ij. K draws are made; those that break a budget are
discarded and the one with the lowest validation loss is kept. If none is
feasible, a deterministic greedy repair lowers ranks until both budgets hold.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from coblax.lowrank.allocation import AllocationProblem, LayerCost, clip_ranks, greedy_repair, is_feasible

__all__ = ["masks_for_ranks", "stochastic_ranks", "round_masks", "flat_mask"]


def _importance_order(layer: LayerCost, m_hat: np.ndarray) -> np.ndarray:
    # Stable sort keeps sigma order among ties (e.g. all-ones masks).
    return np.argsort(-(layer.sigma * m_hat), kind="stable")


def masks_for_ranks(
    problem: AllocationProblem, ranks: Mapping[str, int], m_hat: Mapping[str, np.ndarray] | None
) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Final multiplier vectors for integer ranks.

    A layer at or above its saturation rank is the original layer (all ones).
    Otherwise the top-r triplets by σ·m̂ keep multiplier m̂ (1 without m̂). The
    returned ranks count the kept triplets (full rank for an original layer).
    """
    out_ranks, out_masks = {}, {}
    for layer in problem.layers:
        r = int(ranks[layer.name])
        mh = np.ones(layer.full_rank) if m_hat is None else np.asarray(m_hat[layer.name], np.float64)
        if layer.is_original(r):
            out_ranks[layer.name] = layer.full_rank
            out_masks[layer.name] = np.ones(layer.full_rank)
            continue
        keep = _importance_order(layer, mh)[:r]
        mask = np.zeros(layer.full_rank)
        # A kept triplet whose m̂ is 0 contributes nothing; keep it at a tiny
        # multiplier so "nonzero = kept" still matches the rank that is paid for.
        mask[keep] = np.maximum(mh[keep], 1e-6)
        out_ranks[layer.name] = r
        out_masks[layer.name] = mask
    return out_ranks, out_masks


def stochastic_ranks(
    problem: AllocationProblem, m_hat: Mapping[str, np.ndarray], rng: np.random.Generator
) -> dict[str, int]:
    """r_i = floor(Σ m̂_i) + Bernoulli(frac(Σ m̂_i)), clipped to [min_rank, R_i]."""
    ranks = {}
    for layer in problem.layers:
        expected = float(np.sum(m_hat[layer.name]))
        r = int(np.floor(expected)) + int(rng.random() < expected - np.floor(expected))
        ranks[layer.name] = r
    return clip_ranks(problem, ranks)


def flat_mask(problem: AllocationProblem, masks: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(masks[layer.name], np.float64) for layer in problem.layers])


def round_masks(
    problem: AllocationProblem,
    m_hat: Mapping[str, np.ndarray],
    *,
    draws: int,
    seed: int,
    score: Callable[[np.ndarray], float] | None,
) -> tuple[dict[str, int], dict[str, np.ndarray], dict]:
    """Pick the best of ``draws`` feasible stochastic roundings, else repair.

    Args:
      score: loss of a flat mask vector on the validation split (lower wins);
        None picks the first feasible draw.
    Returns:
      (ranks, masks, info) with info ``draws``, ``feasible_draws``,
      ``draw_losses``, ``repaired``.
    """
    rng = np.random.default_rng(seed)
    seen: set[tuple] = set()
    candidates = []
    for _ in range(draws):
        ranks = stochastic_ranks(problem, m_hat, rng)
        ranks, masks = masks_for_ranks(problem, ranks, m_hat)
        key = tuple(ranks[n] for n in problem.names)
        if key in seen or not is_feasible(problem, ranks):
            continue
        seen.add(key)
        candidates.append((ranks, masks))
    info: dict = {"draws": draws, "feasible_draws": len(candidates), "repaired": False}
    if candidates:
        losses = [score(flat_mask(problem, m)) if score else 0.0 for _, m in candidates]
        info["draw_losses"] = [float(v) for v in losses]
        best = int(np.argmin(losses))
        return candidates[best][0], candidates[best][1], info
    start = {
        layer.name: int(np.clip(np.rint(np.sum(m_hat[layer.name])), problem.min_rank, layer.full_rank))
        for layer in problem.layers
    }
    importance = {}
    for layer in problem.layers:
        mh = np.asarray(m_hat[layer.name], np.float64)
        importance[layer.name] = np.sort((layer.sigma * mh) ** 2)[::-1]
    ranks = greedy_repair(problem, start, importance)
    ranks, masks = masks_for_ranks(problem, ranks, m_hat)
    info["repaired"] = True
    return ranks, masks, info
