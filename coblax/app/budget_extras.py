"""The config's extra budget keys in ``coblax run``: ``budgets.latency`` and ``budgets.rank_multiple``.

``budgets.latency = λ`` adds a third budget to every (mac, param) pair: λ times the
base network's latency measured with ``jax.jit`` at batch ``budgets.latency_batch``
(:mod:`coblax.lowrank.latency`; tables cached under the cache folder's ``latency/``).
``budgets.rank_multiple = k`` restricts every method's factored ranks to multiples of
k (:mod:`coblax.lowrank.rank_multiple`; ``min_rank`` rounded up to a multiple).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from coblax.lowrank.allocation import AllocationProblem, Allocator
from coblax.lowrank.api import factored_builder, table_schemes, with_latency_stats
from coblax.lowrank.costs import NetworkCost, make_problem
from coblax.lowrank.latency import NetworkLatency
from coblax.lowrank.latency_api import float_dtype
from coblax.lowrank.latency_check import check_latency, network_measure
from coblax.lowrank.latency_measure import latency_model
from coblax.lowrank.rank_multiple import check_rank_multiple, multiple_floor, with_rank_multiple

__all__ = ["record_problem", "restricted", "with_latency_stats", "checked_latency"]

_TIMINGS: dict[tuple, NetworkLatency] = {}  # (id of the base params, layers, batch) -> measured once per run


def _timing(cfg: Any, base: Any, traced, net: NetworkCost, full, x: np.ndarray) -> NetworkLatency:
    key = (id(base.params), tuple(sorted(full)), tuple(f.scheme for f in full.values()), cfg.budgets.latency_batch)
    if key not in _TIMINGS:
        _TIMINGS[key] = latency_model(base.model.apply, base.params, np.asarray(x[:1]), traced, net.layers,
                                      table_schemes(full), batch=cfg.budgets.latency_batch,
                                      factored=factored_builder(base.model, base.params, net, full, {}))
    return _TIMINGS[key]


def record_problem(cfg: Any, base: Any, traced, net: NetworkCost, full, x: np.ndarray, budget: tuple[float, float],
                   **kwargs: Any) -> tuple[AllocationProblem, NetworkCost, NetworkLatency | None]:
    """(problem, cost model whose layers carry the latency tables, the latency model) of one record.

    ``kwargs`` go to :func:`~coblax.lowrank.costs.make_problem` (loss, seed).
    """
    k = check_rank_multiple(cfg.budgets.rank_multiple, net.layers)
    latency = cfg.budgets.latency
    timing = None if latency is None else _timing(cfg, base, traced, net, full, x)
    problem = make_problem(net, budget[0], budget[1], cfg.budgets.basis, min_rank=multiple_floor(cfg.budgets.min_rank, k),
                           latency=latency, timing=timing, **kwargs)
    return problem, dataclasses.replace(net, layers=problem.layers), timing


def restricted(cfg: Any, allocator: Allocator) -> Allocator:
    """``allocator`` restricted to ranks that are multiples of ``budgets.rank_multiple``."""
    return with_rank_multiple(allocator, cfg.budgets.rank_multiple)


def checked_latency(cfg: Any, allocation, problem: AllocationProblem, allocator: Allocator,
                    timing: NetworkLatency | None, base: Any, net: NetworkCost, full, x: np.ndarray):
    """``allocation`` measured end to end and re-allocated under a corrected budget while
    slower than ``budgets.latency``, at most ``budgets.latency_checks`` times
    (:mod:`coblax.lowrank.latency_check`); unchanged without a latency budget."""
    if timing is None or not cfg.budgets.latency_checks:
        return allocation

    def run(p: AllocationProblem):
        return with_latency_stats(allocator(p), p, timing)

    measure = network_measure((base.model.apply, base.params), factored_builder(base.model, base.params, net, full, {}),
                              np.shape(x)[1:], timing.batch, dtype=float_dtype(x))
    return check_latency(allocation, problem, run, timing, cfg.budgets.latency, measure,
                         checks=cfg.budgets.latency_checks)
