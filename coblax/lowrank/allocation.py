"""The allocation problem and the one protocol every rank allocator implements.

An allocator (COBLA or any baseline) receives an :class:`AllocationProblem` — the
decomposable layers with their singular values and their affine cost vectors, plus
the two budgets — and returns an :class:`Allocation` (integer ranks, relaxed masks
if it has any, status and diagnostics).

Cost model (per decomposable layer i, rank r):
    factored:  N_C,i(r) = r * mac_per_rank_i,  N_M,i(r) = r * param_per_rank_i
    original:  N_C,i = original_macs_i,        N_M,i = original_params_i
A layer is kept in its original (unfactored) form once the factored form would cost
at least as much as the original in MACs *or* in parameters, i.e. for
r >= saturation_rank_i. This is the "cost saturation" rule of the COBLA authors'
code; it keeps every layer's cost monotone in r and never above the original.
Budgets in the problem are absolute and refer to the decomposable layers only: the
caller has already subtracted the cost of the layers that are not decomposed.

Optional third budget, latency (:mod:`coblax.lowrank.latency`): a layer with a
measured :class:`~coblax.lowrank.latency.LatencyCurve` costs t_i(r) (the table,
interpolated monotonically) in factored form and T_i,O in original form, and is kept
original also once t_i(r) >= T_i,O; ``problem.latency_max`` (None: no latency
budget) bounds Σ_i of those. Every loop here treats it as a third budget row.

Two loops shared by every allocator that lowers or raises ranks greedily:
:func:`descend` (the excess-weighted greedy of Zhang et al.: POS greedy and the
repair of roundings) and :func:`refill` (raise ranks while both budgets hold), after
which :func:`has_room` is empty: no layer that is not full can take one more rank.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from coblax.lowrank.latency import LatencyCurve
from coblax.util.errors import CoblaxError

__all__ = [
    "LayerCost",
    "AllocationProblem",
    "Allocation",
    "Allocator",
    "LossOracle",
    "BudgetError",
    "budget_error",
    "clip_ranks",
    "ranks_cost",
    "ranks_latency",
    "is_feasible",
    "within_budgets",
    "largest_feasible",
]


class BudgetError(CoblaxError, ValueError):
    """A budget that an allocator cannot meet; the message names the closest ratio."""


@dataclasses.dataclass(frozen=True, eq=False)
class LayerCost:
    """One decomposable layer as the allocators see it.

    Attributes:
      name: layer key used everywhere else (``"conv1"``, ``"Dense_0"``...).
      kind: ``"dense"`` or ``"conv"``.
      shape: (rows, cols) of the matricized weight that was factored.
      sigma: singular values of that matrix, descending, length ``full_rank``.
      mac_per_rank: MACs per example added by one kept singular triplet.
      param_per_rank: parameters added by one kept singular triplet.
      original_macs: MACs per example of the unfactored layer (kernel only).
      original_params: parameters of the unfactored kernel (bias excluded: it is
        a fixed cost, identical in both forms).
      latency: the layer's measured :class:`~coblax.lowrank.latency.LatencyCurve`
        (None: no latency model; then :meth:`latency_at` is 0).
    """

    name: str
    kind: str
    shape: tuple[int, int]
    sigma: np.ndarray
    mac_per_rank: float
    param_per_rank: float
    original_macs: float
    original_params: float
    latency: LatencyCurve | None = None

    @functools.cached_property
    def full_rank(self) -> int:
        return int(len(self.sigma))

    # Cached: the greedy loops ask for it millions of times at VGG-16 size (the
    # fields are frozen, so the value never goes stale).
    @functools.cached_property
    def saturation_rank(self) -> int:
        """Smallest r whose factored form costs >= the original in MACs, params or
        (with a latency curve) measured latency.

        Ranks at or above it mean "keep the original layer". May exceed full_rank
        (then the factored form is cheaper even at full rank).
        """
        r_c = math.ceil(self.original_macs / self.mac_per_rank - 1e-12)
        r_m = math.ceil(self.original_params / self.param_per_rank - 1e-12)
        r_l = math.inf if self.latency is None else self.latency.first_not_faster(self.full_rank)
        return max(1, int(min(r_c, r_m, r_l)))

    def is_original(self, rank: int) -> bool:
        """Whether a layer at ``rank`` is kept in its original form."""
        return rank >= min(self.saturation_rank, self.full_rank)

    def macs(self, rank: int) -> float:
        if self.is_original(rank):
            return float(self.original_macs)
        return float(rank) * self.mac_per_rank

    def params(self, rank: int) -> float:
        if self.is_original(rank):
            return float(self.original_params)
        return float(rank) * self.param_per_rank

    @functools.cached_property
    def latency_line(self) -> tuple[float, float]:
        """(a, s): the line a + s·r fitted to the latency table below the saturation rank
        (COBLA's relaxed row; :meth:`coblax.lowrank.latency.LatencyCurve.line`)."""
        return self.latency.line(self.saturation_rank)

    def latency_at(self, rank: int) -> float:
        """Measured latency (s) at ``rank``: the table's t(r), or T_O in original form."""
        if self.latency is None:
            return 0.0
        if self.is_original(rank):
            return float(self.latency.original)
        return float(self._factored_times[rank])

    @functools.cached_property
    def _factored_times(self) -> np.ndarray:
        # t(r) for r = 0..full_rank, interpolated once: the greedy loops ask per step.
        ranks = np.arange(self.full_rank + 1, dtype=np.float64) * self.latency.unit
        return np.interp(ranks, np.asarray(self.latency.ranks, np.float64), self.latency.monotone_times)


@runtime_checkable
class LossOracle(Protocol):
    """Network-level loss callbacks, for allocators that look at the data (COBLA).

    Both take the flat vector of masking variables m (layers in problem order, each
    layer's triplets in descending-sigma order; a layer whose block is all ones is
    the original layer exactly). ``value_and_grad(m)`` returns (E(m), dE/dm) as
    (float, float64 array) on the objective subset; ``validation_loss(m)`` is E on
    a held-out split of the training data (used to pick among roundings).

    Optional, used by COBLA when present: ``names`` and ``sizes`` (the layer order and
    block lengths the oracle splits m by; a mismatch with the problem raises),
    ``value(m)`` (E without the gradient) and ``validation_metrics(m)`` ->
    (loss, accuracy) on the validation split.
    """

    def value_and_grad(self, m: np.ndarray) -> tuple[float, np.ndarray]: ...

    def validation_loss(self, m: np.ndarray) -> float: ...


@dataclasses.dataclass(frozen=True, eq=False)
class AllocationProblem:
    """Layers, budgets and (optionally) a loss oracle.

    ``mac_max`` / ``param_max`` bound the summed cost of the decomposable layers;
    ``latency_max`` (seconds, None: no latency budget) their summed measured latency
    (every layer then carries a :class:`~coblax.lowrank.latency.LatencyCurve`).
    ``min_rank`` is the smallest rank any layer may get (a rank-0 layer would cut
    the network). ``seed`` drives any randomness of an allocator. ``training``
    (optional) gives allocators that train the network (LC) its weights and data:
    a :class:`coblax.lowrank.training.NetworkTrainer`.
    """

    layers: tuple[LayerCost, ...]
    mac_max: float
    param_max: float
    min_rank: int = 1
    loss: LossOracle | None = None
    seed: int = 0
    training: Any = None
    latency_max: float | None = None

    def __post_init__(self) -> None:
        if self.latency_max is not None:
            missing = [layer.name for layer in self.layers if layer.latency is None]
            if missing:
                raise ValueError(f"latency_max is set but layers {missing} have no latency table")

    @property
    def has_latency(self) -> bool:
        return self.latency_max is not None

    def original_latency(self) -> float:
        """Σ_i T_i,O over the decomposable layers (0 without latency tables)."""
        return float(sum(layer.latency.original for layer in self.layers if layer.latency is not None))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def full_ranks(self) -> dict[str, int]:
        return {layer.name: layer.full_rank for layer in self.layers}

    def original_cost(self) -> tuple[float, float]:
        return (
            float(sum(layer.original_macs for layer in self.layers)),
            float(sum(layer.original_params for layer in self.layers)),
        )

    def offsets(self) -> np.ndarray:
        """Start index of each layer's block in the flat masking vector."""
        return np.concatenate([[0], np.cumsum([layer.full_rank for layer in self.layers])])


@dataclasses.dataclass(frozen=True)
class Allocation:
    """What every allocator returns.

    Attributes:
      ranks: layer name -> integer rank (full rank = original layer kept).
      status: short machine-readable outcome (``"ok"``, ``"repaired"``...).
      relaxed: layer name -> relaxed masking variables in [0, 1], if any.
      masks: layer name -> final length-R multiplier vector of the singular values:
        nonzero entries are the kept triplets (COBLA keeps sigma_ij * m_ij, so its
        entries are m_ij). None (or a missing layer) means "the top ``ranks[name]``
        triplets with multiplier 1", which is what every SVD-truncation baseline wants.
      stats: diagnostics (threshold, beta, optimality gap, iterations, trace...).
      weights: trained weights the factored network starts from (COBLA's ``joint``:
        a :class:`coblax.lowrank.joint.TrainedWeights`); None: the original network's.
    """

    ranks: dict[str, int]
    status: str = "ok"
    relaxed: dict[str, np.ndarray] | None = None
    masks: dict[str, np.ndarray] | None = None
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    weights: Any = None


@runtime_checkable
class Allocator(Protocol):
    """``allocator(problem) -> Allocation``; ``name`` is its registry key."""

    name: str

    def __call__(self, problem: AllocationProblem) -> Allocation: ...


def clip_ranks(problem: AllocationProblem, ranks: Mapping[str, int]) -> dict[str, int]:
    """Each layer's rank clipped into [problem.min_rank, layer.full_rank] (plain ints)."""
    return {
        layer.name: int(min(layer.full_rank, max(problem.min_rank, int(ranks[layer.name]))))
        for layer in problem.layers
    }


def ranks_cost(layers: tuple[LayerCost, ...], ranks: Mapping[str, int]) -> tuple[float, float]:
    """Total (MACs, params) of the decomposable layers at the given ranks."""
    macs = sum(layer.macs(int(ranks[layer.name])) for layer in layers)
    params = sum(layer.params(int(ranks[layer.name])) for layer in layers)
    return float(macs), float(params)


def ranks_latency(layers: tuple[LayerCost, ...], ranks: Mapping[str, int]) -> float:
    """Total measured latency (s) of the decomposable layers at the given ranks (0 without tables)."""
    return float(sum(layer.latency_at(int(ranks[layer.name])) for layer in layers))


def within_budgets(problem: AllocationProblem, macs: float, params: float, lat: float = 0.0) -> bool:
    """:func:`is_feasible` on costs already summed (``lat`` is ignored without a latency budget)."""
    if problem.latency_max is not None and lat > problem.latency_max + 1e-9 * abs(problem.latency_max):
        return False
    return macs <= problem.mac_max * (1 + 1e-9) and params <= problem.param_max * (1 + 1e-9)


def is_feasible(problem: AllocationProblem, ranks: Mapping[str, int]) -> bool:
    """Every budget met (MACs, params, latency if set; relative slack 1e-9 for float sums)."""
    macs, params = ranks_cost(problem.layers, ranks)
    lat = ranks_latency(problem.layers, ranks) if problem.has_latency else 0.0
    return within_budgets(problem, macs, params, lat)


def budget_error(problem: AllocationProblem, ranks: Mapping[str, int], method: str) -> BudgetError:
    """The :class:`BudgetError` for a method whose cheapest allocation is ``ranks``."""
    macs, params = ranks_cost(problem.layers, ranks)
    o_mac, o_par = problem.original_cost()
    lat = ""
    if problem.has_latency:
        o_lat = problem.original_latency() or 1.0
        lat = (f"; latency {ranks_latency(problem.layers, ranks) / o_lat:.4f} of the decomposed layers' "
               f"measured latency (budget {problem.latency_max / o_lat:.4f})")
    return BudgetError(
        f"method {method} cannot meet the budget: its smallest allocation costs "
        f"{macs / o_mac:.4f} of the decomposable MACs and {params / o_par:.4f} of the "
        f"parameters (budget {problem.mac_max / o_mac:.4f} / {problem.param_max / o_par:.4f}){lat}"
    )


def largest_feasible(
    problem: AllocationProblem,
    ranks_at: Callable[[float], Mapping[str, int]],
    lo: float,
    hi: float,
    *,
    iters: int = 60,
    method: str = "",
) -> tuple[float, dict[str, int]]:
    """Bisect a scalar knob t in [lo, hi] for the largest t whose ranks are feasible.

    ``ranks_at(t)`` must give ranks non-decreasing in t (CPTV's beta, a uniform
    fraction, a threshold's inverse multiplier...). Raises :class:`BudgetError`
    naming ``method`` and the closest achievable ratio if even ``ranks_at(lo)``
    breaks a budget.
    """

    def clip(ranks: Mapping[str, int]) -> dict[str, int]:
        return clip_ranks(problem, ranks)

    best = clip(ranks_at(lo))
    if not is_feasible(problem, best):
        raise budget_error(problem, best, method or "?")
    top = clip(ranks_at(hi))
    if is_feasible(problem, top):
        return hi, top
    best_t = lo
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        ranks = clip(ranks_at(mid))
        if is_feasible(problem, ranks):
            lo, best_t, best = mid, mid, ranks
        else:
            hi = mid
    return best_t, best


# The greedy rank moves (repair by descent, refill, their scores) live in
# coblax.lowrank.greedy, which builds on the types above; their old names here are
# resolved on first use, so that the two modules import each other without a cycle.
_GREEDY = ("StepScore", "RefillGain", "down_targets", "up_target", "descend", "refill", "has_room",
           "importance_loss", "importance_gain", "greedy_repair")


def __getattr__(name: str) -> Any:
    if name in _GREEDY:
        from coblax.lowrank import greedy

        return getattr(greedy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
