"""BALF: activation-aware energy allocation under a budget (Lagrangian bisection).

Each kernel is factored in the metric of its inputs: with the Gram matrix
G = PᵀP of the rows P its first factor sees on the objective data, the SVD of
Lᵀ W (G = L Lᵀ) ranks triplets by their effect on the layer's *response* — coblax's
``whitened`` spectrum (:func:`coblax.lowrank.decompose.factorize_whitened`; the
allocator's ``spectrum = "whitened"`` makes the runner and ``allocate`` factor the
layers so for it, see :mod:`coblax.lowrank.spectra`). On that spectrum BALF maximizes the sum of
normalized cumulative energies under the budgets,

    maximize  sum_i e_i(r_i),   e_i(r) = sum_{j<=r} s_ij^2 / sum_j s_ij^2   (1 in original form)
    s.t.      N_C(r) <= N_C,max,   N_M(r) <= N_M,max,

by Lagrangian relaxation: for a multiplier lam >= 0 each layer independently takes

    r_i(lam) = argmax_r  e_i(r) - lam * c_i(r),   c_i(r) = N_C,i(r) / N_C,max + N_M,i(r) / N_M,max,

(ties to the cheaper rank) and lam is bisected to the smallest value whose ranks meet
both budgets. r_i(lam) is non-increasing in lam, so feasibility is monotone. Each
Lagrangian solution is the exact optimum of the knapsack whose combined budget is
its own cost sum_i c_i(r_i) (tested against brute force); a leftover below the
budget is the usual duality gap of the relaxation, and ``refill`` (off by default,
as in the reference) spends it greedily.

With one budget c_i is that budget's normalized cost, as in the reference (one of
parameters or FLOPs). With ``spectrum = "weight"`` the rule is the same energy
allocation without the whitening.

Reference: "BALF: Budgeted Activation-Aware Low-Rank Factorization for
Fine-Tuning-Free Compression" (2025), code davidgonmar/BALF. Its defaults: the
input Gram matrix of a calibration set whitens each kernel; per-layer costs are
min(factored, original) (a layer whose factored form is not cheaper stays
original); the multiple-choice knapsack over cumulative energies is solved by
Lagrangian relaxation, lam_max = 1 doubled until feasible, 300 bisection rounds,
ties to the smallest cost; one budget, FLOPs by default (or parameters). The
reference takes the SVD of Λ^{1/2} Vᵀ W from the eigendecomposition G = V Λ Vᵀ, coblax
that of Lᵀ W with the (ridged) Cholesky factor G = L Lᵀ: for a full-rank Gram matrix
the two differ by an orthogonal factor on the left, so their singular values agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from coblax.baselines._budget import check_floor, clip_ranks, ok_allocation
from coblax.lowrank.allocation import (
    Allocation,
    AllocationProblem,
    LayerCost,
    is_feasible,
    refill,
)

__all__ = ["BALF", "balf_objective", "balf_ranks", "candidates", "lagrangian_ranks", "normalized_energy"]


def normalized_energy(layer: LayerCost, rank: int) -> float:
    """e(r): share of the layer's energy in its top r triplets; 1 in original form (or no energy)."""
    sigma2 = np.asarray(layer.sigma, dtype=np.float64) ** 2
    total = float(np.sum(sigma2))
    if total <= 0.0 or layer.is_original(rank):
        return 1.0
    return float(np.sum(sigma2[:rank])) / total


def candidates(layer: LayerCost, min_rank: int) -> list[int]:
    """Ranks of distinct cost: factored min_rank..saturation-1, then full (original)."""
    top = min(layer.saturation_rank, layer.full_rank)
    lo = min(min_rank, layer.full_rank)
    return list(range(lo, top)) + [layer.full_rank]


def _scales(problem: AllocationProblem) -> tuple[float, float]:
    return (problem.mac_max if problem.mac_max > 0 else 1.0,
            problem.param_max if problem.param_max > 0 else 1.0)


def combined_cost(problem: AllocationProblem, layer: LayerCost, rank: int) -> float:
    """c_i(r) = N_C,i(r) / N_C,max + N_M,i(r) / N_M,max."""
    s_mac, s_par = _scales(problem)
    return layer.macs(rank) / s_mac + layer.params(rank) / s_par


def lagrangian_ranks(problem: AllocationProblem, lam: float) -> dict[str, int]:
    """r_i(lam) = argmax_r e_i(r) - lam c_i(r), ties to the cheaper rank."""
    ranks = {}
    for layer in problem.layers:
        best: tuple[float, float, int] | None = None
        for r in candidates(layer, problem.min_rank):
            c = combined_cost(problem, layer, r)
            value = normalized_energy(layer, r) - lam * c
            key = (value, -c)
            if best is None or key > best[:2]:
                best = (value, -c, r)
        ranks[layer.name] = best[2]
    return clip_ranks(problem, ranks)


def balf_objective(problem: AllocationProblem, ranks: Mapping[str, int]) -> float:
    """sum_i e_i(r_i)."""
    return float(sum(normalized_energy(layer, int(ranks[layer.name])) for layer in problem.layers))


def balf_ranks(problem: AllocationProblem, *, iters: int = 300, method: str = "balf") -> tuple[float, dict[str, int]]:
    """(lam, ranks) at the smallest multiplier lam whose Lagrangian ranks meet both budgets.

    As in the reference: lam = 0 first (every layer's most energetic rank, if that
    fits), then lam_max = 1 doubled until its ranks fit (a large enough lam sends
    every layer to its cheapest rank, which fits once the floor does), then
    ``iters`` rounds of bisection on [0, lam_max]; the feasible end is returned.

    Raises:
      BudgetError: if even min_rank everywhere is infeasible.
    """
    check_floor(problem, method)
    if is_feasible(problem, lagrangian_ranks(problem, 0.0)):
        return 0.0, lagrangian_ranks(problem, 0.0)
    lo, hi = 0.0, 1.0
    while not is_feasible(problem, lagrangian_ranks(problem, hi)):
        lo, hi = hi, 2.0 * hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if is_feasible(problem, lagrangian_ranks(problem, mid)):
            hi = mid
        else:
            lo = mid
    return hi, lagrangian_ranks(problem, hi)


@dataclasses.dataclass(frozen=True)
class BALF:
    """BALF energy allocator (see the module docstring).

    Attributes:
      refill: after the bisection, raise ranks greedily (largest normalized-energy
        gain per unit of budget) while both budgets hold. False (the reference's
        rule) returns the Lagrangian solution as it is.
      iters: bisection rounds on lam (the reference's 300).
      spectrum: ``"whitened"`` (BALF: the runner and :func:`coblax.allocate` factor
        the layers in the metric of their inputs on the objective data for this
        method, whatever ``[decompose] spectrum`` says) or ``"weight"`` (the plain SVD:
        the same energy allocation without activation awareness).
    stats: ``multiplier`` (lam), ``objective`` (sum of normalized energies),
      ``lagrangian_objective`` (before any refill), ``mac_ratio``, ``param_ratio``.
    """

    refill: bool = False
    iters: int = 300
    spectrum: str = "whitened"

    name: ClassVar[str] = "balf"

    def __post_init__(self) -> None:
        if self.spectrum not in ("whitened", "weight"):
            raise ValueError(f"spectrum must be 'whitened' (BALF) or 'weight' (plain SVD), got {self.spectrum!r}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"iters must be a positive integer, got {self.iters!r}")

    def __call__(self, problem: AllocationProblem) -> Allocation:
        lam, ranks = balf_ranks(problem, iters=self.iters, method=self.name)
        lagrangian = balf_objective(problem, ranks)
        if self.refill:
            ranks = refill(problem, ranks, lambda layer, r, new_r, current=None:
                           normalized_energy(layer, new_r) - normalized_energy(layer, r))
        return ok_allocation(problem, ranks, {
            "multiplier": lam,
            "objective": balf_objective(problem, ranks),
            "lagrangian_objective": lagrangian,
        })
