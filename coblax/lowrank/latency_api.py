"""The latency budget's side of :func:`coblax.allocate`: argument checks, the forms the
per-layer tables time, the factored networks of the in-network calibration, and the
latency report attached to an allocation (:mod:`coblax.lowrank.latency`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from coblax.lowrank.allocation import Allocation
from coblax.lowrank.costs import NetworkCost
from coblax.lowrank.decompose import Factors, apply_fn_for
from coblax.lowrank.factored import factored_variables, truncate_allocation
from coblax.lowrank.latency import latency_report
from coblax.lowrank.validate import check_budget

__all__ = ["check_latency_arguments", "latency_checks_for", "float_dtype", "table_schemes", "factored_builder",
           "with_latency_stats"]


def check_latency_arguments(latency: Any, batch: Any, tables: Any) -> None:
    """``latency`` a fraction in (0, 1] or None, ``latency_batch`` an int >= 1; a latency budget
    without ``latency_tables`` needs jit (:class:`~coblax.lowrank.latency_measure.LatencyError`)."""
    from coblax.lowrank.latency_measure import check_can_time
    from coblax.lowrank.validate import check_int

    if latency is None:
        return
    check_budget("latency", latency)
    check_int("latency_batch", batch, 1)
    if tables is None:
        check_can_time("latency")


def latency_checks_for(checks: Any, tables: Any) -> int:
    """``latency_checks`` as an int >= 0: None means 2 when the tables are measured here,
    0 with injected ``latency_tables`` (a synthetic table says nothing about this device)."""
    from coblax.lowrank.validate import check_int

    if checks is None:
        return 0 if tables is not None else 2
    check_int("latency_checks", checks, 0)
    return int(checks)


def float_dtype(x: Any):
    """The floating dtype of the example inputs (float32 for integer inputs)."""
    dtype = np.asarray(x).dtype
    return dtype if np.issubdtype(dtype, np.floating) else np.float32


def table_schemes(full: Mapping[str, Factors]) -> dict[str, str]:
    """Layer -> the form its latency table times: ``dense`` or the conv scheme."""
    return {n: "dense" if f.kind == "dense" else f.scheme for n, f in full.items()}


def factored_builder(model, variables, net: NetworkCost, full: Mapping[str, Factors],
                     apply_kwargs: Mapping[str, Any]) -> Callable:
    """``build(ranks) -> (apply_fn, variables)`` of the linen network factored at ``ranks``
    (top triplets; full rank = original form): the latency model's in-network calibration."""

    def build(ranks: Mapping[str, int]):
        kept, _ = truncate_allocation(net, full, Allocation(ranks=dict(ranks)))
        return apply_fn_for(model, kept, **dict(apply_kwargs)), factored_variables(variables, kept)

    return build


def with_latency_stats(allocation: Allocation, problem, timing) -> Allocation:
    """The allocation with ``stats["latency"]`` (:func:`~coblax.lowrank.latency.latency_report`)."""
    if timing is None:
        return allocation
    return dataclasses.replace(allocation, stats={**allocation.stats,
                                                  "latency": latency_report(problem.layers, timing, allocation.ranks)})
