"""From an allocation to a factored network: truncated factors and their variables.

Shared by the config runner (:mod:`coblax.app.experiment`) and the Python entry
point (:func:`coblax.allocate`): an :class:`~coblax.lowrank.allocation.Allocation`
becomes per-layer truncated :class:`~coblax.lowrank.decompose.Factors` (a layer at
or above its saturation rank keeps its original form), and the original variables
become ``{"params": params without the factored kernels, "factors": {name:
{first, second}}, <every other collection>}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from coblax.lowrank.allocation import Allocation
from coblax.lowrank.costs import NetworkCost
from coblax.lowrank.decompose import Factors, truncate

__all__ = ["truncate_allocation", "factored_variables"]


def truncate_allocation(
    net: NetworkCost, full: Mapping[str, Factors], allocation: Allocation
) -> tuple[dict[str, Factors], dict[str, int]]:
    """The kept (truncated) factors and the reported ranks of an allocation.

    A layer whose rank means "original form" is left out of the factors and
    reported at full rank; otherwise the allocation's mask (or the top ``r``
    triplets when it has none) picks the triplets.
    """
    masks = allocation.masks or {}
    kept: dict[str, Factors] = {}
    ranks: dict[str, int] = {}
    for layer in net.layers:
        r = int(allocation.ranks[layer.name])
        if layer.is_original(r):
            ranks[layer.name] = layer.full_rank
            continue
        mask = masks.get(layer.name)
        if mask is None:
            mask = np.zeros(layer.full_rank)
            mask[:r] = 1.0
        kept[layer.name] = truncate(full[layer.name], mask)
        ranks[layer.name] = int(np.count_nonzero(mask))
    return kept, ranks


def factored_variables(variables: Mapping[str, Any], factors: Mapping[str, Factors]) -> dict:
    """Variables of the factored network (see :func:`~coblax.lowrank.decompose.apply_fn_for`).

    ``params`` loses the kernels of the factored layers (their biases stay);
    ``factors`` holds each layer's two kernels; every other collection
    (``batch_stats``...) is carried over unchanged.
    """

    def strip(node, prefix):
        out = {}
        for k, v in node.items():
            path = f"{prefix}/{k}" if prefix else k
            if isinstance(v, Mapping):
                out[k] = strip(v, path)
            elif not (k == "kernel" and prefix in factors):
                out[k] = v
        return out

    rest = {k: v for k, v in variables.items() if k != "params"}
    return {
        "params": strip(variables["params"], ""),
        "factors": {n: {"first": f.first, "second": f.second} for n, f in factors.items()},
        **rest,
    }
