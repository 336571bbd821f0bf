"""Per-layer slice counts chosen by the allocator: the pipeline side of ALDS's k search.

ALDS (Liebenwein et al. 2021) picks for every conv layer both a rank and k, the
number of input-channel slices of its factored form (``alds:k``, see
:mod:`coblax.lowrank.decompose`). k changes the layer's factors, spectrum and cost
vector, so it is chosen before the allocation problem is built: an allocator with a
``slice_plan`` method gets, for every decomposed layer, the divisors of its input
channels and a (cached) cost model per candidate k, and returns layer -> k (or None:
keep the rules' schemes). :func:`plan_slices` then factors each conv layer as
``alds:k`` and rebuilds the network's cost model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from coblax.lowrank.allocation import LayerCost
from coblax.lowrank.costs import NetworkCost, layer_cost, network_cost
from coblax.lowrank.decompose import (
    Factors,
    factorize_sliced,
    get_kernel,
    slice_info,
    sliced_scheme,
    trace_layers,
)

__all__ = ["divisors", "plan_slices", "SliceCandidates", "refuse_sliced"]


def refuse_sliced(schemes: Mapping[str, str], what: str) -> None:
    """ValueError when a layer is in the sliced form ``alds:k``, which ``what`` does not support."""
    from coblax.lowrank.decompose import slice_count

    sliced = sorted(n for n, s in schemes.items() if slice_count(s))
    if sliced:
        raise ValueError(f"{what} is not built for the sliced scheme 'alds:k' (layer {sliced[0]!r} is "
                         f"{schemes[sliced[0]]!r}); use 'tai' or 'zhang' there")


def divisors(n: int) -> tuple[int, ...]:
    """The positive divisors of n, ascending."""
    return tuple(d for d in range(1, int(n) + 1) if n % d == 0)


class SliceCandidates:
    """Layer name -> the slice counts it can take, and its cost model at each (computed once).

    A conv layer's options are the divisors of its input channels (its cost model at k
    is a :class:`~coblax.lowrank.costs.SlicedLayerCost` of the ``alds:k`` factors); any
    other decomposed layer has the single option 1, its cost model as the rules made it.
    """

    def __init__(self, variables: Any, traced: Mapping[str, Any], net: NetworkCost):
        self._variables = variables
        self._traced = traced
        self._fixed = {l.name: l for l in net.layers if traced[l.name].kind != "conv"}
        self.names = tuple(l.name for l in net.layers)
        self.convs = tuple(n for n in self.names if n not in self._fixed)
        self.options = {n: (1,) if n in self._fixed else divisors(traced[n].kernel_shape[-2]) for n in self.names}
        self._factors: dict[tuple[str, int], Factors] = {}
        self._costs: dict[tuple[str, int], LayerCost] = {}

    def factors(self, name: str, k: int) -> Factors:
        if (name, k) not in self._factors:
            self._factors[(name, k)] = factorize_sliced(get_kernel(self._variables, name), self._traced[name], k)
        return self._factors[(name, k)]

    def cost(self, name: str, k: int) -> LayerCost:
        """The layer's cost model with k slices."""
        if name in self._fixed:
            return self._fixed[name]
        if (name, k) not in self._costs:
            f = self.factors(name, k)
            self._costs[(name, k)] = layer_cost(self._traced[name], np.asarray(f.sigma), f.scheme,
                                                slice_info({name: f})[name])
        return self._costs[(name, k)]


def plan_slices(
    allocator: Any,
    model: Any,
    variables: Any,
    x: np.ndarray,
    apply_kwargs: Mapping[str, Any],
    schemes: Mapping[str, str],
    full: Mapping[str, Factors],
    net: NetworkCost,
    *,
    budgets: tuple[float, float],
    min_rank: int,
    seed: int,
) -> tuple[dict[str, str], dict[str, Factors], NetworkCost]:
    """(schemes, full factors, cost model) with the slice counts ``allocator.slice_plan`` picks.

    Unchanged when the allocator has no ``slice_plan`` or it returns None.
    ``budgets`` are the absolute (MACs, params) budgets on the decomposed layers
    (the same for every k: they depend on the original layers only).
    """
    planner: Callable | None = getattr(allocator, "slice_plan", None)
    if planner is None:
        return dict(schemes), dict(full), net
    traced = {l.name: l for l in trace_layers(model, variables, jnp.asarray(x[:1]), apply_kwargs)}
    cands = SliceCandidates(variables, traced, net)
    plan = planner(cands, budgets[0], budgets[1], min_rank, seed)
    if plan is None:
        return dict(schemes), dict(full), net
    schemes, full = dict(schemes), dict(full)
    for name in cands.names:
        if traced[name].kind == "conv":
            full[name] = cands.factors(name, int(plan[name]))
            schemes[name] = sliced_scheme(int(plan[name]))
    net = network_cost(list(traced.values()), variables, {n: np.asarray(f.sigma) for n, f in full.items()},
                       {n: f.scheme for n, f in full.items()}, sliced=slice_info(full))
    return schemes, full, net
