"""COBLA's warm start: a feasible first m from an allocator's ranks or a constant.

The authors start from POS greedy's allocation as a 0/1 mask; ``constant`` starts
from m = α·1 with the largest α that meets every budget row, so that no baseline's
allocation enters the solve. Also the check that a loss oracle splits m the way the
problem orders its layers.
"""

from __future__ import annotations

import numpy as np

from coblax.lowrank.allocation import AllocationProblem
from coblax.lowrank.registry import get_allocator

__all__ = ["warm_start_ranks", "warm_start_point", "check_oracle_layout"]


def warm_start_ranks(problem: AllocationProblem, how: str) -> dict[str, int] | None:
    """The warm start's own integer allocation (None for ``constant``)."""
    if how == "cobla":
        raise ValueError("cobla.warm_start = 'cobla' would start COBLA from itself; use an allocator "
                         "such as pos_greedy (the authors' choice), pos_exact or uniform, or 'constant'")
    if how == "constant":
        return None
    options = {"bound": False, "compare_greedy": False} if how == "pos_exact" else {}  # only its ranks
    if how == "lc":
        # LC's first C step (direct compression, no L step): its L steps would take minutes
        # and hand on weights the solve never sees. With the network's trainer that C step
        # is on the weights, as in the paper; on a bare problem, on the problem's spectra.
        options = {"steps": 0}
    return dict(get_allocator(how, **options)(problem).ranks)


def warm_start_point(problem: AllocationProblem, how: str, ranks: dict[str, int] | None = None) -> np.ndarray:
    """A feasible starting m (flat), from an allocator's ranks or a constant."""
    if how == "constant":
        c_full = sum(l.mac_per_rank * l.full_rank for l in problem.layers)
        m_full = sum(l.param_per_rank * l.full_rank for l in problem.layers)
        alpha = min(1.0, problem.mac_max / c_full, problem.param_max / m_full)
        if problem.has_latency:  # the relaxed latency row: Σ s_i Σ m <= T_max − Σ a_i
            lines = [l.latency_line for l in problem.layers]
            t_full = sum(s * l.full_rank for l, (_, s) in zip(problem.layers, lines))
            alpha = min(alpha, max(0.0, problem.latency_max - sum(a for a, _ in lines)) / t_full)
        return np.concatenate([np.full(l.full_rank, alpha) for l in problem.layers])
    ranks = warm_start_ranks(problem, how) if ranks is None else ranks
    blocks = []
    for layer in problem.layers:
        # An original-form layer starts at its largest factored rank: in the affine
        # (unsaturated) cost model that is no dearer than the original.
        r = min(ranks[layer.name], min(layer.saturation_rank, layer.full_rank + 1) - 1)
        block = np.zeros(layer.full_rank)
        block[: max(r, 0)] = 1.0
        blocks.append(block)
    return np.concatenate(blocks)


def check_oracle_layout(problem: AllocationProblem) -> None:
    """Raise ValueError if the loss oracle splits m in another layer order or size.

    Oracles that declare ``names`` (and ``sizes``) are checked against the problem's
    layers; the flat m vector is meaningless if the two disagree.
    """
    names = getattr(problem.loss, "names", None)
    if names is None:
        return
    if tuple(names) != problem.names:
        raise ValueError(
            f"the loss oracle's layer order {list(names)} differs from the problem's {list(problem.names)}"
        )
    sizes = getattr(problem.loss, "sizes", None)
    if sizes is not None and [int(s) for s in sizes] != [l.full_rank for l in problem.layers]:
        raise ValueError(
            f"the loss oracle's block sizes {list(sizes)} differ from the problem's full ranks "
            f"{[l.full_rank for l in problem.layers]}"
        )
