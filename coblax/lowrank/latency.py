"""Latency as a budget: a layer's measured latency curve and the network's latency model.

A decomposable layer i has a measured latency table (see
:mod:`coblax.lowrank.latency_measure`): the original layer's time T_i,O and the
factored layer's time t_i(r_g) at a grid of ranks r_1 = 1 < ... < r_G = R_i, each
the median of warm ``jax.jit`` calls at one batch size. Between grid points the
factored time is interpolated linearly on the isotonic (least-squares
non-decreasing, pool-adjacent-violators) fit τ_g of the table,

    t_i(r) = interp(r; r_g, τ_g),   τ = argmin_{τ_1 <= ... <= τ_G} Σ_g (τ_g − t_i(r_g))²,

so t_i is non-decreasing in r (a noisy table cannot make a larger rank cheaper,
which would break the monotonicity every greedy and bisection relies on); unlike
a running maximum, one slow outlier does not lift every larger rank.
The layer costs t_i(r) in factored form and T_i,O in original form; as with MACs
and parameters (:class:`coblax.lowrank.allocation.LayerCost`), it is kept original
once t_i(r) >= T_i,O, so a layer whose factored form is never faster stays original.

Network model: T(r) = T_rest + Σ_i T_i(r_i), where T_rest ("everything else":
BatchNorm, activations, pooling, additions, the layers not decomposed, and the
difference between layers timed alone and inside the network) is a constant,
measured once *by difference*: T_rest = T_net,O − Σ_i T_i,O, with T_net,O the
original network's measured end-to-end time. By difference, not directly, because
nothing else can be timed apart without changing the network (the rest of a
network is not a network), and because then the model is exact at the original
network (T(full) = T_net,O). A budget fraction λ of the original network's latency
is the absolute budget on the decomposed layers Σ_i T_i(r_i) <= λ T_net,O − T_rest.
A layer timed alone need not save inside the network what it saves alone; the
measurement therefore scales every table's savings by one factor measured in the
network (:func:`coblax.lowrank.latency_measure.measure_network`, ``scale``).

Relaxed problem (COBLA): t_i is replaced by a least-squares line a_i + s_i r fitted
to the table points below the layer's saturation rank; with r_i = Σ_j m_ij the
budget is the linear row Σ_i s_i Σ_j m_ij <= L_max − Σ_i a_i (the fixed parts
moved to the right-hand side). Rounding, repair, refill and feasibility use the
table itself (t_i above), never the line.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np
from sklearn.isotonic import isotonic_regression

__all__ = ["LatencyCurve", "NetworkLatency", "fit_quality"]


@dataclasses.dataclass(frozen=True, eq=False)
class LatencyCurve:
    """One layer's latency: original time and the factored time at a grid of ranks.

    Attributes:
      ranks: the grid, strictly ascending real ranks (first >= 1; the last should be
        the full rank, beyond it the curve is flat).
      times: factored-layer time (seconds) at each grid rank.
      original: original-layer time (seconds).
      unit: ranks the curve is asked about are in units of ``unit`` real ranks
        (:mod:`coblax.lowrank.rank_multiple`: grouped rank u is real rank u·unit,
        capped by the grid's last rank).
    """

    ranks: tuple[int, ...]
    times: tuple[float, ...]
    original: float
    unit: int = 1

    def __post_init__(self) -> None:
        r = np.asarray(self.ranks, np.float64)
        t = np.asarray(self.times, np.float64)
        if r.ndim != 1 or r.size == 0 or r.size != t.size:
            raise ValueError(f"latency table: {r.size} ranks and {t.size} times; need as many, at least one")
        if np.any(np.diff(r) <= 0) or r[0] < 1:
            raise ValueError(f"latency table: ranks {list(self.ranks)} must be strictly ascending and >= 1")
        if not np.all(np.isfinite(t)) or np.any(t < 0) or not math.isfinite(self.original) or self.original < 0:
            raise ValueError("latency table: times must be finite and >= 0")

    @functools.cached_property
    def monotone_times(self) -> np.ndarray:
        """The table's isotonic (non-decreasing least-squares) fit: the values interpolated."""
        t = np.asarray(self.times, np.float64)
        return np.maximum.accumulate(isotonic_regression(t, increasing=True)) if t.size > 1 else t

    def at(self, rank: float) -> float:
        """Factored time at ``rank`` (in units of ``unit``): monotone linear interpolation."""
        return float(np.interp(float(rank) * self.unit, np.asarray(self.ranks, np.float64), self.monotone_times))

    def grouped(self, k: int) -> LatencyCurve:
        """The same curve asked in units of ``k`` ranks (:func:`coblax.lowrank.rank_multiple.grouped_layer`)."""
        return dataclasses.replace(self, unit=self.unit * int(k))

    def first_not_faster(self, full_rank: int) -> int:
        """Smallest rank in 1..full_rank (curve units) whose factored time is >= the original;
        ``full_rank + 1`` if the factored form is faster at every rank."""
        lo, hi = 1, full_rank + 1  # answer in [lo, hi]; at() is monotone, so bisect
        while lo < hi:
            mid = (lo + hi) // 2
            if self.at(mid) >= self.original:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def fit_points(self, below: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(grid ranks in curve units, monotone times, the points the line is fitted to):
        those below ``below``, or the two lowest where fewer than two are."""
        r = np.asarray(self.ranks, np.float64) / self.unit
        t = self.monotone_times
        keep = r < below if below is not None else np.ones(r.size, bool)
        if keep.sum() < 2:
            keep = np.zeros(r.size, bool)
            keep[: min(2, r.size)] = True
        return r, t, keep

    def line(self, below: int | None = None) -> tuple[float, float]:
        """(a, s): least-squares t ≈ a + s·r (r in curve units) over the grid ranks below ``below``.

        ``below`` (curve units) is the layer's saturation rank: above it the layer is
        original and the line need not fit. With fewer than two grid points there,
        the two lowest grid points are used. The slope is kept positive (a rank that
        costs nothing would make the relaxed row vacuous for the layer).
        """
        r, t, keep = self.fit_points(below)
        if keep.sum() < 2:  # a one-point table: the line through the origin
            return 0.0, max(float(t[0] / r[0]), 1e-15)
        s, a = np.polyfit(r[keep], t[keep], 1)
        floor = 1e-6 * max(float(t[keep].max()), 1e-12) / max(float(r[keep].max()), 1.0)
        if s < floor:  # flat (or noisy-decreasing) table: keep a small positive slope, refit the level
            s = floor
            a = float(np.mean(t[keep] - s * r[keep]))
        return float(a), float(s)


def fit_quality(curve: LatencyCurve, below: int | None = None) -> float:
    """Largest error |a + s·r − t(r)| / T_O of :meth:`LatencyCurve.line` on the grid ranks it
    was fitted to (below ``below``), relative to the original layer's time T_O (the scale
    the budget trades in; relative to t(r) itself a microsecond miss at rank 1 looks huge)."""
    a, s = curve.line(below)
    r, t, keep = curve.fit_points(below)
    return float(np.max(np.abs(a + s * r[keep] - t[keep])) / max(curve.original, 1e-15))


@dataclasses.dataclass(frozen=True)
class NetworkLatency:
    """The measured latency model of one network at one batch size.

    Attributes:
      curves: layer name -> :class:`LatencyCurve` (the decomposed layers).
      total: the original network's measured end-to-end time T_net,O (seconds).
      batch: the batch size every time was measured at.
      device: ``jax.devices()[0].device_kind`` it was measured on.
      scale: the in-network calibration c of the tables' savings (1: none;
        :func:`coblax.lowrank.latency_measure.measure_network`).
      probes: (predicted, measured) savings (s) of the calibration networks.
    """

    curves: dict[str, LatencyCurve]
    total: float
    batch: int
    device: str = ""
    scale: float = 1.0
    probes: tuple = ()

    @property
    def rest(self) -> float:
        """T_rest = T_net,O − Σ_i T_i,O (measured by difference; may be negative when
        layers timed alone are slower than inside the fused network)."""
        return self.total - sum(c.original for c in self.curves.values())

    def budget(self, fraction: float) -> float:
        """Absolute budget on the decomposed layers: λ T_net,O − T_rest."""
        return fraction * self.total - self.rest

    def predict(self, times: Sequence[float]) -> float:
        """Network time T_rest + Σ layer times (one per decomposed layer)."""
        return self.rest + float(sum(times))

    def ratio(self, layers: Sequence, ranks) -> float:
        """T(r) / T_net,O the tables predict for ``ranks`` (``layers``: the problem's
        :class:`~coblax.lowrank.allocation.LayerCost` s carrying these tables)."""
        return self.predict([layer.latency_at(int(ranks[layer.name])) for layer in layers]) / self.total


def latency_report(layers: Sequence, timing: NetworkLatency, ranks: dict) -> dict:
    """What an allocation measures under the model: the predicted network latency ratio
    T(r) / T_net,O, the batch, T_net,O and T_rest (ms), and each layer's line-fit error.

    ``layers`` are the problem's :class:`~coblax.lowrank.allocation.LayerCost` s with their curves.
    """
    times = [layer.latency_at(int(ranks[layer.name])) for layer in layers]
    return {
        "predicted_ratio": timing.predict(times) / timing.total,
        "batch": timing.batch,
        "device": timing.device,
        "network_ms": timing.total * 1e3,
        "rest_ms": timing.rest * 1e3,
        "calibration_scale": timing.scale,
        "layer_ms": {layer.name: t * 1e3 for layer, t in zip(layers, times)},
        "line_fit_max_rel_error": {layer.name: fit_quality(layer.latency, layer.saturation_rank)
                                   for layer in layers},
    }


__all__.append("latency_report")
