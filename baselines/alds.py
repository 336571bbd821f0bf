"""ALDS: one shared relative operator-norm error for every layer (Liebenwein et al. 2021).

ALDS ("Automatic Layer-wise Decomposition Selector") folds each layer's weight into a
matrix W_l, cuts its input channels into k_l slices and keeps rank j in every slice.
The error of layer l at rank j is measured in the operator norm, relative to the
layer's own:

    rel_error_l[j] = max_slices sigma_{j+1}(W_l^(s)) / ||W_l||_2,

(the residual W_l - W_hat_l of a sliced truncation is block-diagonal in the slices,
so its operator norm is the largest (j+1)-th singular value of any slice). The
allocation minimizes the *largest* relative error over the layers under the budget
(the min-max problem of the paper, Sec. 3): one threshold eps is shared by all
layers, each layer takes the smallest rank whose error is <= eps, and eps is the
smallest value whose ranks meet the budgets. Feasibility is monotone in eps (ranks
fall as eps grows, costs are monotone in rank), so eps is found exactly by bisection
over the sorted candidate values {rel_error_l[j]} ∪ {0}: no float tolerance.

Any feasible allocation with largest error E has every rank at least the threshold
rank at eps = E, hence costs at least as much; so the threshold solution at the
smallest feasible eps is the min-max optimum over *all* feasible allocations
(tested by brute force). A layer at or above its saturation rank is kept in its
original form, which is exact (error 0): "stays original where that is not
smaller".

With two budgets (MACs and parameters; the paper has one) the same eps must meet
both. ``slices = 1`` is the min-max allocator on coblax's schemes (``tai``/``zhang``
matricizations, ``dense``), with ||W_l||_2 = sigma_1 of the problem's spectrum.

Not built: ``slices > 1`` (ALDS's k-way input-channel split, a grouped convolution
with k groups and k·r outputs followed by a 1x1 convolution, with its per-layer
search over divisors of c_in). It needs a new factored form in the decomposition,
the cost model and the export; until then the option is refused with an error
naming ``slices``.

Reference defaults (lucaslie/torchprune, ``ALDSErrorIterativeAllocator``): operator
norm (``ord=2``) relative error; k searched over the divisors of c_in, seeded with
k in {3, 5, 7, 9} plus random starts (15 seeds) and 4 rounds of per-layer
improvement at fixed layer budget; the threshold bisected between min and 1.01·max
of the relative errors.

Reference: L. Liebenwein, A. Maalouf, O. Gal, D. Feldman, D. Rus, "Compressing
neural networks: towards determining the optimal layer-wise decomposition",
NeurIPS 2021.
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
    budget_error,
    is_feasible,
)

__all__ = ["ALDS", "alds_ranks", "max_relative_error", "relative_errors", "threshold_ranks"]


def relative_errors(layer: LayerCost) -> np.ndarray:
    """rel_error[j] for j = 0..R: the relative operator-norm error at rank j (one slice).

    rel_error[j] = sigma_{j+1} / sigma_1 for j < R, 0 at j = R. Ranks at or above the
    saturation rank keep the original layer, which is exact: error 0 there too. A layer
    with sigma_1 = 0 has error 0 at every rank.
    """
    sigma = np.asarray(layer.sigma, dtype=np.float64)
    full = len(sigma)
    err = np.zeros(full + 1)
    if full and sigma[0] > 0.0:
        err[:full] = sigma / sigma[0]
    top = min(layer.saturation_rank, full)
    err[top:] = 0.0
    return err


def threshold_ranks(problem: AllocationProblem, errors: Mapping[str, np.ndarray], eps: float) -> dict[str, int]:
    """Each layer's smallest rank (>= min_rank) whose relative error is <= eps."""
    ranks = {}
    for layer in problem.layers:
        err = errors[layer.name]
        # err is non-increasing in the rank, so the first index with err <= eps is the rank
        ranks[layer.name] = int(np.argmax(err <= eps))
    return clip_ranks(problem, ranks)


def max_relative_error(problem: AllocationProblem, ranks: Mapping[str, int],
                       errors: Mapping[str, np.ndarray] | None = None) -> float:
    """max over layers of rel_error_l[r_l] (the min-max objective)."""
    errors = errors or {layer.name: relative_errors(layer) for layer in problem.layers}
    return float(max(errors[layer.name][int(ranks[layer.name])] for layer in problem.layers))


def alds_ranks(problem: AllocationProblem, method: str = "alds") -> tuple[float, dict[str, int]]:
    """(eps, ranks): the smallest shared error threshold whose ranks meet both budgets.

    Raises:
      BudgetError: if even min_rank everywhere is infeasible.
    """
    check_floor(problem, method)
    errors = {layer.name: relative_errors(layer) for layer in problem.layers}
    cands = np.unique(np.concatenate([[0.0], *errors.values()]))
    lo, hi = 0, len(cands) - 1
    if not is_feasible(problem, threshold_ranks(problem, errors, cands[hi])):  # pragma: no cover - floor checked
        raise budget_error(problem, threshold_ranks(problem, errors, cands[hi]), method)
    while lo < hi:  # first feasible candidate: feasibility is monotone in eps
        mid = (lo + hi) // 2
        if is_feasible(problem, threshold_ranks(problem, errors, cands[mid])):
            hi = mid
        else:
            lo = mid + 1
    return float(cands[lo]), threshold_ranks(problem, errors, cands[lo])


@dataclasses.dataclass(frozen=True)
class ALDS:
    """ALDS min-max allocator (see the module docstring).

    Attributes:
      slices: input-channel slices k per layer; only 1 (the plain min-max allocator
        on today's schemes) is built, any other value is refused naming ``slices``.
    stats: ``eps`` (the shared relative error threshold), ``max_relative_error``
      (the largest layer error of the result, <= eps), ``layer_errors``,
      ``mac_ratio``, ``param_ratio``.
    """

    slices: int = 1

    name: ClassVar[str] = "alds"

    def __post_init__(self) -> None:
        if isinstance(self.slices, bool) or not isinstance(self.slices, int) or self.slices < 1:
            raise ValueError(f"slices must be a positive integer, got {self.slices!r}")
        if self.slices != 1:
            raise ValueError(
                f"slices = {self.slices}: the sliced factored form (grouped convolution with "
                f"slices groups, then a 1x1 convolution) is not built yet; only slices = 1 works"
            )

    def __call__(self, problem: AllocationProblem) -> Allocation:
        eps, ranks = alds_ranks(problem, self.name)
        errors = {layer.name: relative_errors(layer) for layer in problem.layers}
        return ok_allocation(problem, ranks, {
            "eps": eps,
            "max_relative_error": max_relative_error(problem, ranks, errors),
            "layer_errors": {n: float(errors[n][r]) for n, r in ranks.items()},
            "slices": self.slices,
        })
