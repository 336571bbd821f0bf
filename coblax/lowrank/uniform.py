"""The ``uniform`` allocator: the same fraction of rank in every layer.

r_i = max(min_rank, floor(f · R_i)), with one f for all layers bisected to the
largest value whose ranks meet both budgets.
"""

from __future__ import annotations

import dataclasses
import math

from coblax.lowrank.allocation import Allocation, AllocationProblem, largest_feasible

__all__ = ["Uniform", "uniform_ranks"]


def uniform_ranks(problem: AllocationProblem, fraction: float) -> dict[str, int]:
    """Ranks at rank fraction ``fraction`` (non-decreasing in it)."""
    return {
        layer.name: max(problem.min_rank, min(layer.full_rank, math.floor(fraction * layer.full_rank + 1e-9)))
        for layer in problem.layers
    }


@dataclasses.dataclass(frozen=True)
class Uniform:
    """Uniform rank fraction, bisected to the budgets. stats: ``fraction``."""

    name: str = "uniform"

    def __call__(self, problem: AllocationProblem) -> Allocation:
        fraction, ranks = largest_feasible(
            problem, lambda f: uniform_ranks(problem, f), 0.0, 1.0, method=self.name
        )
        return Allocation(ranks=ranks, stats={"fraction": fraction})

