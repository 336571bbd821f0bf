"""Configured allocators, optax style: ``allocate(..., method=coblax.allocators.cobla(max_iter=50))``.

Each function builds the allocator registered under its name
(:mod:`coblax.lowrank.registry`) with the options given, and returns the
:class:`~coblax.Allocator` object, which :func:`coblax.allocate` runs as is. The
options are the fields of the allocator's class (named in each docstring); an unknown
option is a ``TypeError`` naming it. Allocators registered elsewhere (a plug-in's
``coblax.allocators`` entry point, :func:`coblax.register_allocator`) are reached
by attribute too, ``coblax.allocators.<name>(...)``, or by :func:`by_name`.

    import coblax
    result = coblax.allocate(model, variables, (x, y), rules=rules, mac=0.4, param=0.4,
                             method=coblax.allocators.cobla(max_iter=50, roundings=5))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from coblax.lowrank.allocation import Allocator
from coblax.lowrank.registry import allocator_names, get_allocator

__all__ = [
    "by_name",
    "cobla",
    "uniform",
    "cptv",
    "pos_greedy",
    "pos_greedy_unnormalized",
    "pos_exact",
    "vbmf",
    "gavish_donoho",
]


def by_name(name: str, **options: Any) -> Allocator:
    """The allocator registered as ``name``, built with ``options``."""
    return get_allocator(name, **options)


def _builder(name: str, doc: str) -> Callable[..., Allocator]:
    """``f(**options)`` building the allocator registered as ``name``."""

    def build(**options: Any) -> Allocator:
        return get_allocator(name, **options)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    return build


cobla = _builder("cobla", "COBLA (:class:`coblax.lowrank.cobla.COBLA`: ``max_iter``, ``roundings``, "
                          "``warm_start``...).")
uniform = _builder("uniform", "One rank fraction for every layer, bisected to the budgets "
                              "(:class:`coblax.lowrank.uniform.Uniform`).")
cptv = _builder("cptv", "CPTV: the largest shared energy fraction that fits "
                        "(:class:`coblax.baselines.cptv.CPTV`: ``iters``).")
pos_greedy = _builder("pos_greedy", "POS greedy, Zhang et al. 2016 "
                                    "(:class:`coblax.baselines.pos.POSGreedy`: ``per_cost``).")
pos_greedy_unnormalized = _builder("pos_greedy_unnormalized",
                                   "POS greedy without the per-cost normalization "
                                   "(``POSGreedy(per_cost=False)``).")
pos_exact = _builder("pos_exact", "Exact POS by MILP (:class:`coblax.baselines.pos.POSExact`: ``solver``...).")
vbmf = _builder("vbmf", "EVBMF ranks in budget mode (:class:`coblax.baselines.vbmf.VBMF`).")
gavish_donoho = _builder("gavish_donoho", "Gavish-Donoho thresholds in budget mode "
                                          "(:class:`coblax.baselines.gavish_donoho.GavishDonoho`).")


def __getattr__(name: str) -> Callable[..., Allocator]:
    # Allocators registered at run time or by plug-ins: coblax.allocators.<name>(...).
    if not name.startswith("_") and name in allocator_names():
        return _builder(name, f"The allocator registered as {name!r}, built with ``options``.")
    raise AttributeError(f"module 'coblax.allocators' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(allocator_names()))
