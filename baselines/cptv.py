"""CPTV: keep a certain percentage of the total variation in every layer (Tai et al. 2016).

Per layer i the rank is the smallest k with

    sum_{j<=k} sigma_ij^2 >= beta * sum_j sigma_ij^2,

one beta shared by all layers. (The lecture slide writes the inequality as "<=";
Tai et al. choose the smallest rank that *retains* a fraction beta of the energy,
which is the ">=" form used here.) In budget mode beta is bisected to the largest
value whose ranks meet both budgets.

Reference: C. Tai, T. Xiao, Y. Zhang, X. Wang, W. E, "Convolutional neural networks
with low-rank regularization", ICLR 2016.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from coblax.baselines._budget import check_floor, ok_allocation
from coblax.lowrank.allocation import Allocation, AllocationProblem, LayerCost, largest_feasible

__all__ = ["CPTV", "cptv_rank"]


def cptv_rank(sigma: np.ndarray, beta: float) -> int:
    """Smallest k with sum_{j<=k} sigma_j^2 >= beta * sum_j sigma_j^2 (0 when beta <= 0).

    Args:
      sigma: singular values, descending.
      beta: energy fraction in [0, 1].
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    energy = np.cumsum(np.asarray(sigma, dtype=np.float64) ** 2)
    if len(energy) == 0:
        return 0
    target = beta * energy[-1]
    if target <= 0.0:
        return 0
    # energy[-1] >= target always (beta <= 1), so the index is at most len - 1.
    return int(np.searchsorted(energy, target, side="left")) + 1


@dataclasses.dataclass(frozen=True)
class CPTV:
    """Budget-mode CPTV allocator: the largest shared beta whose ranks meet both budgets.

    Attributes:
      iters: bisection steps on beta in [0, 1].
    stats: ``beta`` (the chosen fraction), ``mac_ratio``, ``param_ratio``.
    """

    iters: int = 60
    name: ClassVar[str] = "cptv"

    def __post_init__(self) -> None:
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")

    def __call__(self, problem: AllocationProblem) -> Allocation:
        check_floor(problem, self.name)

        def ranks_at(beta: float) -> dict[str, int]:
            return {layer.name: _layer_rank(layer, beta) for layer in problem.layers}

        beta, ranks = largest_feasible(
            problem, ranks_at, 0.0, 1.0, iters=self.iters, method=self.name
        )
        return ok_allocation(problem, ranks, {"beta": float(beta)})


def _layer_rank(layer: LayerCost, beta: float) -> int:
    return cptv_rank(layer.sigma, min(1.0, max(0.0, beta)))
