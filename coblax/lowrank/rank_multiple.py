"""Hardware-friendly ranks: every factored rank a multiple of k (full rank excepted).

Matrix units multiply in tiles (8, 16, 128 lanes...), so a rank of 37 costs what 40
does. ``rank_multiple = k`` restricts every allocator to ranks {k, 2k, 3k, ...} and
the original form, as a constraint, not a rounding afterwards: the allocation
problem is rewritten in units of k triplets and the allocator solves that problem.

Grouped problem (layer with full rank R, U = ceil(R / k) groups):

* group u holds triplets uk .. min((u+1)k, R) - 1; its "singular value" is the
  group's energy, σ'_u = sqrt(Σ_{j in u} σ_j²) (descending, as the σ_j are);
* one grouped rank costs k ranks: mac_per_rank' = k · mac_per_rank, likewise params;
  the original cost is unchanged, so grouped rank u costs exactly what rank
  min(uk, R) costs, and it is the original form exactly when rank min(uk, R) is
  (u ≥ ceil(a / k) ⇔ uk ≥ a for the saturation rank a; u = U ⇔ rank R);
* a measured latency curve is asked at real rank min(uk, R) (``LatencyCurve.grouped``);
* ``min_rank`` becomes ceil(min_rank / k) groups;
* a loss oracle sees grouped masks m' through :class:`GroupedLoss`:
  E'(m') = E(expand(m')) with expand repeating m'_u over its group, and
  ∂E'/∂m'_u = Σ_{j in u} ∂E/∂m_j (chain rule).

The allocator's answer maps back: rank u → min(uk, R); masks and relaxed masks are
expanded the same way. Because costs are identical, the real allocation meets the
budgets exactly when the grouped one does. Every allocator therefore respects the
restriction unchanged: COBLA optimizes and rounds group masks; POS-exact's MILP is
exact over the restricted ranks; allocators that estimate a rank from the spectrum
and the matrix shape (Gavish–Donoho, VBMF) see the group energies, whose threshold
scales like the σ's (both ∝ sqrt(k) for a flat tail), so they choose about rank/k groups.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from coblax.lowrank.allocation import Allocation, AllocationProblem, Allocator, LayerCost

__all__ = [
    "GroupedLoss",
    "check_rank_multiple",
    "expand_allocation",
    "grouped_layer",
    "grouped_problem",
    "multiple_floor",
    "with_rank_multiple",
]


def check_rank_multiple(k: Any, layers: Sequence[LayerCost] = ()) -> int:
    """``k`` as an int, checked: at least 1 and at most every layer's full rank.

    Raises:
      ValueError: naming ``rank_multiple`` (and the layer whose full rank is below it).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"rank_multiple={k!r} must be an integer >= 1")
    for layer in layers:
        if k > layer.full_rank:
            raise ValueError(f"rank_multiple={k} is larger than layer {layer.name!r}'s full rank "
                             f"{layer.full_rank}: that layer could only stay original; lower rank_multiple "
                             f"or leave the layer out of the rules")
    return int(k)


def multiple_floor(min_rank: int, k: int) -> int:
    """The smallest rank allowed: ``min_rank`` rounded up to a multiple of ``k``."""
    return k * math.ceil(min_rank / k)


def _groups(full_rank: int, k: int) -> int:
    return math.ceil(full_rank / k)


def grouped_layer(layer: LayerCost, k: int) -> LayerCost:
    """The layer in units of ``k`` triplets (see the module docstring)."""
    sigma = np.asarray(layer.sigma, np.float64)
    energy = np.add.reduceat(sigma ** 2, np.arange(0, len(sigma), k))
    latency = None if layer.latency is None else layer.latency.grouped(k)  # grouped rank u = real rank uk
    # a sliced layer (alds:k): grouped rank u keeps u·k triplets per slice, ALDS's error there is σ_{s,uk}
    spectra = getattr(layer, "slice_sigma", None)
    extra = {} if spectra is None else {"slice_sigma": np.asarray(spectra)[:, ::k]}
    return dataclasses.replace(layer, sigma=np.sqrt(energy), mac_per_rank=k * layer.mac_per_rank,
                               param_per_rank=k * layer.param_per_rank, latency=latency, **extra)


def _expand(block: np.ndarray, full_rank: int, k: int) -> np.ndarray:
    return np.repeat(np.asarray(block), k)[:full_rank]


class GroupedLoss:
    """A loss oracle over grouped masks m' wrapping one over per-triplet masks m."""

    def __init__(self, loss: Any, problem: AllocationProblem, k: int):
        self._loss, self._k = loss, k
        self._full = [layer.full_rank for layer in problem.layers]
        self.names = [layer.name for layer in problem.layers]
        self.sizes = [_groups(r, k) for r in self._full]
        # expand: m = P m' with P the (Σ R) x (Σ U) 0/1 matrix of group membership
        cols = np.concatenate([np.minimum(np.arange(r) // k, u - 1) + off for r, u, off in
                               zip(self._full, self.sizes, np.concatenate([[0], np.cumsum(self.sizes)[:-1]]))])
        self._cols = cols.astype(np.int64)
        self.size = int(sum(self.sizes))
        if hasattr(loss, "value"):  # optional parts of the oracle, kept optional
            self.value = lambda m: loss.value(self.expand(m))
        if hasattr(loss, "validation_metrics"):
            self.validation_metrics = lambda m: loss.validation_metrics(self.expand(m))

    def expand(self, m: np.ndarray) -> np.ndarray:
        """Per-triplet masks from grouped ones (each group's value over its triplets)."""
        return np.asarray(m, np.float64)[self._cols]

    def value_and_grad(self, m: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = self._loss.value_and_grad(self.expand(m))
        return value, np.bincount(self._cols, weights=np.asarray(grad, np.float64), minlength=self.size)

    def validation_loss(self, m: np.ndarray) -> float:
        return self._loss.validation_loss(self.expand(m))


def grouped_problem(problem: AllocationProblem, k: int) -> AllocationProblem:
    """The problem in units of ``k`` triplets; ``problem.min_rank`` must be a multiple of k."""
    layers = tuple(grouped_layer(layer, k) for layer in problem.layers)
    loss = None if problem.loss is None else GroupedLoss(problem.loss, problem, k)
    return dataclasses.replace(problem, layers=layers, min_rank=max(1, math.ceil(problem.min_rank / k)),
                               loss=loss)


def expand_allocation(problem: AllocationProblem, allocation: Allocation, k: int) -> Allocation:
    """The grouped allocation in real ranks: u → min(uk, R); masks expanded over their groups."""
    full = {layer.name: layer.full_rank for layer in problem.layers}

    def expand_all(blocks):
        if blocks is None:
            return None
        return {n: _expand(b, full[n], k) for n, b in blocks.items()}

    ranks = {n: min(int(u) * k, full[n]) for n, u in allocation.ranks.items()}
    return dataclasses.replace(allocation, ranks=ranks, relaxed=expand_all(allocation.relaxed),
                               masks=expand_all(allocation.masks),
                               stats={**allocation.stats, "rank_multiple": k})


@dataclasses.dataclass(frozen=True)
class _Multiple:
    allocator: Allocator
    k: int

    @property
    def name(self) -> str:
        return self.allocator.name

    def __call__(self, problem: AllocationProblem) -> Allocation:
        check_rank_multiple(self.k, problem.layers)
        if problem.min_rank % self.k:
            problem = dataclasses.replace(problem, min_rank=multiple_floor(problem.min_rank, self.k))
        return expand_allocation(problem, self.allocator(grouped_problem(problem, self.k)), self.k)


def with_rank_multiple(allocator: Allocator, k: int) -> Allocator:
    """``allocator`` restricted to ranks that are multiples of ``k`` (or full); k = 1 is ``allocator``."""
    k = check_rank_multiple(k)
    return allocator if k == 1 else _Multiple(allocator, k)
