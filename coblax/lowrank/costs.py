"""Cost model: MACs per example N_C(m) and parameters N_M(m), affine in the masks.

For a decomposable layer at rank r (number of kept triplets, r = Σ_j m_ij):

* dense, W in x out, P positions (P = 1 for a plain vector input):
    N_C = P·r·(in + out),            N_M = r·(in + out)
* conv ``zhang`` (X·Y·C, N), output Ho x Wo:
    N_C = Ho·Wo·r·(X·Y·C + N),       N_M = r·(X·Y·C + N)
* conv ``tai`` (C·X, Y·N), input width W_in (the vertical conv runs on every
  input column; the horizontal one applies the width stride and padding):
    N_C = r·(Ho·W_in·X·C + Ho·Wo·Y·N), N_M = r·(X·C + Y·N)
* conv ``alds:k`` (k input-channel slices of c = C/k; rank r keeps r triplets in
  every slice, k·r in all): a grouped X x Y conv, k groups of c -> r channels, then
  a 1x1 conv k·r -> N:
    N_C = Ho·Wo·r·(X·Y·C + k·N),     N_M = r·(X·Y·C + k·N)
  (each slice's rows are X·Y·c, so the grouped conv has X·Y·c·k·r = X·Y·C·r weights);
  its full rank is a slice's, R = min(X·Y·C/k, N).

The original layer costs P·in·out (dense) or Ho·Wo·X·Y·C·N / groups (conv) MACs
and its kernel size in parameters. Biases, normalization parameters and every
other leaf of the parameter tree are a fixed memory cost; the MACs of layers that
are not decomposed are a fixed compute cost. Pooling, activations and additions
are not counted (MACs are the convention of the seed). Only the ``params``
collection counts as parameters: BatchNorm running statistics and any other
collection are state, not weights. A layer called several times (shared weights)
costs its MACs once per call and its parameters once. A layer whose factored form
would cost at least as much as the original keeps its original form (see
:class:`coblax.lowrank.allocation.LayerCost`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from coblax.lowrank.allocation import (
    AllocationProblem,
    BudgetError,
    LayerCost,
    ranks_cost,
)
from coblax.lowrank.decompose import TracedLayer, slice_count
from coblax.lowrank.latency import NetworkLatency

__all__ = ["layer_cost", "count_params", "NetworkCost", "network_cost", "make_problem", "with_latency",
           "BUDGET_BASES", "SlicedLayerCost"]

BUDGET_BASES = ("decomposed", "network")


@dataclasses.dataclass(frozen=True, eq=False)
class SlicedLayerCost(LayerCost):
    """A layer in the sliced form ``alds:k``: its :class:`LayerCost` plus what ALDS reads.

    Attributes:
      slices: k.
      slice_sigma: (k, R) each slice's singular values (``sigma`` is their
        root-sum-square per index, σ̄_j).
      norm: ||W||_2 of the whole (unsliced) kernel folded as (X·Y·C) x N.
    """

    slices: int = 1
    slice_sigma: np.ndarray | None = None
    norm: float = 0.0


def layer_cost(layer: TracedLayer, sigma: np.ndarray, scheme: str,
               sliced: tuple[np.ndarray, float] | None = None) -> LayerCost:
    """The affine cost vector of one decomposable layer under ``scheme``.

    MACs per rank sum over the layer's calls (see :attr:`TracedLayer.call_shapes`).
    ``sliced`` ((k, R) per-slice spectra, ||W||_2; :func:`~coblax.lowrank.decompose.slice_info`)
    makes a conv layer under ``alds:k`` a :class:`SlicedLayerCost`.
    """
    k = slice_count(scheme) if layer.kind == "conv" else 0
    if k:
        return _sliced_cost(layer, sigma, k, sliced)
    per_mac = 0
    if layer.kind == "dense":
        n_in, n_out = layer.kernel_shape
        per_param = n_in + n_out
        for in_shape, _ in layer.call_shapes:
            positions = int(np.prod(in_shape[:-1])) if len(in_shape) > 1 else 1
            per_mac += positions * per_param
        shape = (n_in, n_out)
    else:
        X, Y, C, N = layer.kernel_shape
        if scheme == "zhang":
            per_param = X * Y * C + N
            shape = (X * Y * C, N)
        else:
            per_param = X * C + Y * N
            shape = (C * X, Y * N)
        for in_shape, out_shape in layer.call_shapes:
            Ho, Wo = out_shape[:2]
            W_in = in_shape[1]
            per_mac += Ho * Wo * per_param if scheme == "zhang" else Ho * W_in * X * C + Ho * Wo * Y * N
    return LayerCost(
        name=layer.name,
        kind=layer.kind,
        shape=shape,
        sigma=np.asarray(sigma, dtype=np.float64),
        mac_per_rank=float(per_mac),
        param_per_rank=float(per_param),
        original_macs=float(layer.macs),
        original_params=float(np.prod(layer.kernel_shape)),
    )


def _sliced_cost(layer: TracedLayer, sigma: np.ndarray, k: int, sliced: tuple[np.ndarray, float] | None) -> LayerCost:
    X, Y, C, N = layer.kernel_shape
    per_param = X * Y * C + k * N
    per_mac = sum(int(out_shape[0]) * int(out_shape[1]) * per_param for _, out_shape in layer.call_shapes)
    spectra, norm = sliced if sliced is not None else (None, 0.0)
    return SlicedLayerCost(
        name=layer.name, kind=layer.kind, shape=(X * Y * C // k, N), sigma=np.asarray(sigma, dtype=np.float64),
        mac_per_rank=float(per_mac), param_per_rank=float(per_param), original_macs=float(layer.macs),
        original_params=float(np.prod(layer.kernel_shape)), slices=k,
        slice_sigma=None if spectra is None else np.asarray(spectra, dtype=np.float64), norm=float(norm),
    )


def count_params(variables: Any) -> int:
    """Number of parameters: the leaves of the ``params`` collection only.

    A bare parameter tree (no ``params`` key) counts whole.
    """
    tree = variables["params"] if isinstance(variables, Mapping) and "params" in variables else variables
    return int(sum(math.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(tree)))


@dataclasses.dataclass(frozen=True)
class NetworkCost:
    """Whole-network costs split into the decomposable part and the fixed rest.

    ``total_*`` are the original network's N_C,O and N_M,O.
    """

    layers: tuple[LayerCost, ...]
    fixed_macs: float
    fixed_params: float
    total_macs: float
    total_params: float

    def decomposed_original(self) -> tuple[float, float]:
        return (sum(l.original_macs for l in self.layers), sum(l.original_params for l in self.layers))

    def cost(self, ranks: Mapping[str, int]) -> tuple[float, float]:
        """Whole-network (MACs, params) at the given ranks."""
        macs, params = ranks_cost(self.layers, ranks)
        return macs + self.fixed_macs, params + self.fixed_params

    def ratios(self, ranks: Mapping[str, int], basis: str) -> tuple[float, float]:
        """(MAC ratio, param ratio) on the budget basis."""
        if basis == "network":
            macs, params = self.cost(ranks)
            return macs / self.total_macs, params / self.total_params
        macs, params = ranks_cost(self.layers, ranks)
        o_mac, o_par = self.decomposed_original()
        return macs / o_mac, params / o_par

    def budgets(self, mac_fraction: float, param_fraction: float, basis: str) -> tuple[float, float]:
        """Absolute budgets on the decomposable layers for fractions on ``basis``."""
        if basis == "network":
            return (mac_fraction * self.total_macs - self.fixed_macs,
                    param_fraction * self.total_params - self.fixed_params)
        o_mac, o_par = self.decomposed_original()
        return mac_fraction * o_mac, param_fraction * o_par


def network_cost(
    traced: list[TracedLayer], params, decomposed: Mapping[str, np.ndarray], scheme: str | Mapping[str, str],
    sliced: Mapping[str, tuple[np.ndarray, float]] | None = None,
) -> NetworkCost:
    """Costs of a network whose layers in ``decomposed`` (name -> σ) are factored.

    ``params`` is the variables dict (only its ``params`` collection is counted);
    ``scheme`` is one conv scheme for every layer or a layer name -> scheme map;
    ``sliced`` the per-slice spectra of the ``alds:k`` layers
    (:func:`~coblax.lowrank.decompose.slice_info`).
    """
    sliced = sliced or {}
    total_params = float(count_params(params))
    total_macs = float(sum(layer.macs for layer in traced))
    schemes = scheme if isinstance(scheme, Mapping) else {name: scheme for name in decomposed}
    layers = tuple(layer_cost(l, decomposed[l.name], schemes[l.name], sliced.get(l.name))
                   for l in traced if l.name in decomposed)
    fixed_macs = total_macs - sum(l.original_macs for l in layers)
    fixed_params = total_params - sum(l.original_params for l in layers)
    return NetworkCost(layers, fixed_macs, fixed_params, total_macs, total_params)


def make_problem(
    net: NetworkCost,
    mac_fraction: float,
    param_fraction: float,
    basis: str = "decomposed",
    *,
    min_rank: int = 1,
    loss=None,
    seed: int = 0,
    latency: float | None = None,
    timing: NetworkLatency | None = None,
) -> AllocationProblem:
    """The allocation problem for budget fractions, or a BudgetError naming the minimum.

    ``latency`` (a fraction of the original network's measured latency, always on the
    whole network) needs ``timing``, the measured model
    (:func:`coblax.lowrank.latency_measure.measure_network`): each layer gets its
    table and the budget on the decomposed layers is λ T_net,O − T_rest
    (:meth:`~coblax.lowrank.latency.NetworkLatency.budget`).
    """
    if basis not in BUDGET_BASES:
        raise ValueError(f"unknown budget basis {basis!r}; valid: {', '.join(BUDGET_BASES)}")
    mac_max, param_max = net.budgets(mac_fraction, param_fraction, basis)
    floor = {l.name: min_rank for l in net.layers}
    min_mac, min_par = net.ratios(floor, basis)
    if mac_fraction < min_mac * (1 - 1e-12) or param_fraction < min_par * (1 - 1e-12):
        raise BudgetError(
            f"budget mac={mac_fraction:g}, param={param_fraction:g} ({basis} basis) is below what the "
            f"network costs with rank {min_rank} in every decomposed layer and every other layer intact: "
            f"the smallest feasible budget is mac >= {min_mac:.4f}, param >= {min_par:.4f}"
        )
    layers, latency_max = net.layers, None
    if latency is not None:
        layers, latency_max = with_latency(net.layers, timing, latency, min_rank)
    return AllocationProblem(layers, mac_max, param_max, min_rank=min_rank, loss=loss, seed=seed,
                             latency_max=latency_max)


def with_latency(layers: tuple[LayerCost, ...], timing: NetworkLatency | None, fraction: float,
                 min_rank: int = 1) -> tuple[tuple[LayerCost, ...], float]:
    """(layers carrying their latency tables, absolute latency budget), or a BudgetError
    naming the smallest feasible latency fraction."""
    if timing is None:
        raise ValueError("latency budget: no measured latency model (timing) was given")
    missing = [l.name for l in layers if l.name not in timing.curves]
    if missing:
        raise ValueError(f"latency budget: no latency table for layers {missing}")
    timed = tuple(dataclasses.replace(l, latency=timing.curves[l.name]) for l in layers)
    floor = {l.name: min(min_rank, l.full_rank) for l in timed}
    smallest = timing.ratio(timed, floor)
    if fraction < smallest * (1 - 1e-12):
        raise BudgetError(f"budget latency={fraction:g} is below what the network measures with rank {min_rank} "
                          f"in every decomposed layer (or its original form where that is faster): the smallest "
                          f"feasible latency budget is {smallest:.4f} of the original network's "
                          f"{timing.total * 1e3:.3g} ms at batch {timing.batch}")
    return timed, timing.budget(fraction)
