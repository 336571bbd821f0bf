"""ALDS: one shared relative operator-norm error for every layer (Liebenwein et al. 2021).

ALDS ("Automatic Layer-wise Decomposition Selector") folds each layer's weight into a
matrix W_l, cuts its input channels into k_l slices and keeps rank j in every slice.
The error of layer l at rank j is measured in the operator norm, relative to the
layer's own:

    rel_error_l[j] = max_slices sigma_{j+1}(W_l^(s)) / ||W_l||_2,

(torchprune's ``_compute_rel_error_for_weight``: the largest (j+1)-th singular value
of any slice. The residual W_l - W_hat_l of a sliced truncation is the slices'
residuals side by side along the input channels, so its true operator norm lies
between that max and sqrt(k) times it: for a 256 x 128 Gaussian matrix in 32 slices
at rank 1 the max says 0.52 and the residual's norm is 0.92, above the 0.87 of an
unsliced truncation with the same parameters. This is why the search below favours
many thin slices; ``experiments/README.md`` measures what that does to accuracy.) The
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
both. ``slices = 1`` (default) is the min-max allocator on the schemes the rules
chose (``tai``/``zhang`` matricizations, ``dense``, or ``alds:k`` slices), with
||W_l||_2 = sigma_1 of the problem's spectrum for an unsliced layer.

Sliced layers (scheme ``alds:k``, :mod:`coblax.lowrank.decompose`): a rank r keeps
r triplets in each of the k slices (ALDS keeps one rank per layer), and the
problem's :class:`~coblax.lowrank.costs.SlicedLayerCost` carries each slice's
spectrum and ||W_l||_2 of the whole folded kernel (X·Y·C) x N, so rel_error is the
formula above exactly (torchprune takes the same max over slices).

``slices = k > 1`` factors every decomposed conv layer with k slices (k must divide
every one of their input channel counts: a ValueError names ``slices`` otherwise);
``slices = "search"`` runs ALDS's search for k per layer (:func:`search_slices`):
for each of ``search_seeds`` starts, (i) the start's k (seeds 0-3: the largest
divisor of c_in not above 3, 5, 7, 9; later seeds: a uniformly random divisor per
layer), halved until the budget is reachable; (ii) ``search_iterations`` rounds of
per-layer improvement: each layer keeps its current cost (MACs and parameters at
its current k and rank) and takes the k whose largest rank within that cost has the
smallest relative error, then eps is re-solved; a round that does not lower eps
ends the seed's iterations (its k are not kept). The start with the smallest eps
wins. Both need the sliced factored form, which :func:`coblax.allocate` builds
through the ``slice_plan`` hook (:mod:`coblax.lowrank.slicing`), and so does the
config runner (``method_options.alds.slices``); a problem built without that hook
(no sliced conv layer) is refused naming ``slices``.

Reference defaults (lucaslie/torchprune, ``ALDSErrorIterativeAllocator``): operator
norm (``ord=2``) relative error, max over slices; k searched over the divisors of
c_in, seeded with k in {3, 5, 7, 9} plus random starts (15 seeds in all) and 4
rounds of per-layer improvement at fixed layer budget (parameters there; here MACs
and parameters, and the largest rank within the budget rather than torchprune's
rounding with a shrinking rounding factor, so no round overshoots); the threshold
bisected between min and 1.01·max of the relative errors (here: exactly, over the
candidate values).

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
    BudgetError,
    LayerCost,
    budget_error,
    is_feasible,
)

__all__ = ["ALDS", "alds_ranks", "max_relative_error", "relative_errors", "threshold_ranks", "search_slices",
           "SEARCH"]

#: ``slices`` value that turns on ALDS's per-layer search for k.
SEARCH = "search"
_FIXED_SEEDS = (3, 5, 7, 9)


def relative_errors(layer: LayerCost) -> np.ndarray:
    """rel_error[j] for j = 0..R: the relative operator-norm error at rank j.

    Unsliced: rel_error[j] = sigma_{j+1} / sigma_1. Sliced (a
    :class:`~coblax.lowrank.costs.SlicedLayerCost` with its spectra):
    max_s sigma_{j+1}(W^(s)) / ||W||_2. 0 at j = R. Ranks at or above the saturation
    rank keep the original layer, which is exact: error 0 there too. A layer with
    a zero norm has error 0 at every rank.
    """
    sigma = np.asarray(layer.sigma, dtype=np.float64)
    full = len(sigma)
    err = np.zeros(full + 1)
    spectra = getattr(layer, "slice_sigma", None)
    if spectra is not None and full:
        norm = float(getattr(layer, "norm", 0.0))
        if norm > 0.0:
            err[:full] = np.max(np.asarray(spectra, dtype=np.float64), axis=0) / norm
    elif full and sigma[0] > 0.0:
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


def _solve(cands, plan: Mapping[str, int], budgets: tuple[float, float], min_rank: int) -> tuple[float, dict] | None:
    """(eps, ranks) of the slice counts ``plan``; None where the budget is out of reach."""
    problem = AllocationProblem(tuple(cands.cost(n, plan[n]) for n in cands.names), budgets[0], budgets[1],
                                min_rank=min_rank)
    try:
        return alds_ranks(problem)
    except BudgetError:
        return None


def _at_most(options: tuple[int, ...], k: int) -> int:
    """The largest option <= k (options hold 1)."""
    return max(o for o in options if o <= max(k, 1))


def _best_k(cands, name: str, k: int, rank: int, min_rank: int) -> int:
    """The k whose largest rank within the layer's current cost has the smallest error.

    The current cost is (MACs, params) at (k, rank); ties keep the current k, then the smaller.
    """
    here = cands.cost(name, k)
    mac_b, par_b = here.macs(rank), here.params(rank)
    best, best_err = k, relative_errors(here)[rank]
    for option in cands.options[name]:
        layer = cands.cost(name, option)
        err = relative_errors(layer)
        fits = [r for r in range(min_rank, layer.full_rank + 1)
                if layer.macs(r) <= mac_b * (1 + 1e-12) and layer.params(r) <= par_b * (1 + 1e-12)]
        if fits and err[max(fits)] < best_err:
            best, best_err = option, err[max(fits)]
    return best


def search_slices(cands, mac_max: float, param_max: float, min_rank: int = 1, seed: int = 0, *,
                  seeds: int = 15, iterations: int = 4) -> tuple[dict[str, int], float]:
    """ALDS's search for the slice count of every layer (see the module docstring).

    Args:
      cands: a :class:`~coblax.lowrank.slicing.SliceCandidates` (``names``, ``options``
        per layer, ``cost(name, k)``).
      mac_max, param_max: absolute budgets on the decomposed layers.
      seeds, iterations: starts and improvement rounds per start.

    Returns:
      (layer -> k, eps): the plan with the smallest shared relative error.

    Raises:
      BudgetError: no start reaches the budget, not even with k = 1 everywhere.
    """
    rng = np.random.default_rng(seed)
    budgets = (mac_max, param_max)
    best: tuple[dict[str, int], float] | None = None
    for i in range(seeds):
        if i < len(_FIXED_SEEDS):
            plan = {n: _at_most(cands.options[n], _FIXED_SEEDS[i]) for n in cands.names}
        else:
            plan = {n: int(rng.choice(cands.options[n])) for n in cands.names}
        solved = _solve(cands, plan, budgets, min_rank)
        while solved is None and any(k > 1 for k in plan.values()):  # halve k until reachable
            plan = {n: _at_most(cands.options[n], k // 2) for n, k in plan.items()}
            solved = _solve(cands, plan, budgets, min_rank)
        if solved is None:
            continue
        eps, ranks = solved
        for _ in range(iterations):
            moved = {n: _best_k(cands, n, plan[n], ranks[n], min_rank) for n in cands.names}
            again = _solve(cands, moved, budgets, min_rank)
            if again is None or again[0] >= eps:
                break
            plan, (eps, ranks) = moved, again
        if best is None or eps < best[1]:
            best = (dict(plan), eps)
    if best is None:
        problem = AllocationProblem(tuple(cands.cost(n, 1) for n in cands.names), mac_max, param_max,
                                    min_rank=min_rank)
        check_floor(problem, "alds")
        raise BudgetError("alds: no slice plan reaches the budget")  # pragma: no cover - floor raised
    return best


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ALDS:
    """ALDS min-max allocator (see the module docstring).

    Attributes:
      slices: input-channel slices k of every decomposed conv layer: 1 (default: the
        schemes the rules chose), an integer k > 1 dividing every such layer's input
        channels, or ``"search"`` (ALDS's per-layer search over the divisors of c_in).
      search_seeds: starts of the search (torchprune: 15, the first four k = 3, 5, 7, 9).
      search_iterations: per-layer improvement rounds per start (torchprune: 4).
    stats: ``eps`` (the shared relative error threshold), ``max_relative_error``
      (the largest layer error of the result, <= eps), ``layer_errors``,
      ``slices`` (layer -> k of the problem's layers), ``mac_ratio``, ``param_ratio``.
    """

    slices: int | str = 1
    search_seeds: int = 15
    search_iterations: int = 4

    name: ClassVar[str] = "alds"

    def __post_init__(self) -> None:
        if self.slices != SEARCH:
            if isinstance(self.slices, bool) or not isinstance(self.slices, int) or self.slices < 1:
                raise ValueError(f"slices must be a positive integer or {SEARCH!r}, got {self.slices!r}")
        _positive_int("search_seeds", self.search_seeds)
        _positive_int("search_iterations", self.search_iterations)

    def slice_plan(self, cands, mac_max: float, param_max: float, min_rank: int, seed: int) -> dict[str, int] | None:
        """layer -> k for :func:`coblax.lowrank.slicing.plan_slices` (None: keep the rules' schemes).

        Raises:
          ValueError: ``slices = k`` that does not divide a conv layer's input channels (names ``slices``).
        """
        if self.slices == 1:
            return None
        if self.slices == SEARCH:
            return search_slices(cands, mac_max, param_max, min_rank, seed, seeds=self.search_seeds,
                                 iterations=self.search_iterations)[0]
        bad = [n for n in cands.convs if self.slices not in cands.options[n]]
        if bad:
            channels = max(cands.options[bad[0]])
            raise ValueError(f"slices = {self.slices} does not divide the {channels} input channels of layer "
                             f"{bad[0]!r}; use a divisor of every decomposed conv layer's input channels "
                             f"or slices = {SEARCH!r}")
        return {n: self.slices if n in cands.convs else 1 for n in cands.names}

    def __call__(self, problem: AllocationProblem) -> Allocation:
        if self.slices != 1 and not any(getattr(l, "slice_sigma", None) is not None for l in problem.layers):
            raise ValueError(f"slices = {self.slices!r} needs the sliced factored form (scheme 'alds:k'), which "
                             f"coblax.allocate and the config runner build through slice_plan; this "
                             f"problem has no sliced layer")
        eps, ranks = alds_ranks(problem, self.name)
        errors = {layer.name: relative_errors(layer) for layer in problem.layers}
        return ok_allocation(problem, ranks, {
            "eps": eps,
            "max_relative_error": max_relative_error(problem, ranks, errors),
            "layer_errors": {n: float(errors[n][r]) for n, r in ranks.items()},
            "slices": {l.name: int(getattr(l, "slices", 1)) for l in problem.layers},
        })
