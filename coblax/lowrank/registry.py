"""Name -> allocator factory registry shared by COBLA and every baseline.

The registry is an explicit table of ``"module:attribute"`` import paths, resolved
lazily on first use, so that importing it imports no allocator (no import side
effects, no cycle with :mod:`coblax.lowrank.cobla`, which itself asks the registry
for its warm start). The built-in table names coblax's own allocators and the
``coblax.baselines`` package (the repository's ``baselines/`` folder, mapped there
by ``pyproject.toml``), found from an editable and from a regular install alike;
a third party adds allocators through the ``coblax.allocators`` entry-point group or :func:`register_allocator`.

A factory is called with the method's options (a dict from the config) and returns
an :class:`~coblax.lowrank.allocation.Allocator`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib import metadata
from typing import Any

from coblax.lowrank.allocation import Allocator
from coblax.util.errors import CoblaxError

__all__ = ["register_allocator", "get_allocator", "allocator_factory", "allocator_names", "UnknownMethodError"]

AllocatorFactory = Callable[..., Allocator]

#: Every allocator that ships with coblax (and its ``coblax.baselines`` package).
BUILTIN_ALLOCATORS: dict[str, str] = {
    "cobla": "coblax.lowrank.cobla:COBLA",
    "uniform": "coblax.lowrank.uniform:Uniform",
    "cptv": "coblax.baselines.cptv:CPTV",
    "pos_greedy": "coblax.baselines.pos:POSGreedy",
    "pos_greedy_unnormalized": "coblax.baselines.pos:POSGreedyUnnormalized",
    "pos_exact": "coblax.baselines.pos:POSExact",
    "vbmf": "coblax.baselines.vbmf:VBMF",
    "gavish_donoho": "coblax.baselines.gavish_donoho:GavishDonoho",
    "alds": "coblax.baselines.alds:ALDS",
    "lc": "coblax.baselines.lc:LC",
    "balf": "coblax.baselines.balf:BALF",
}

_USER: dict[str, AllocatorFactory] = {}


class UnknownMethodError(CoblaxError, ValueError):
    """A method name that is not registered; the message lists the valid ones."""


def register_allocator(name: str, factory: AllocatorFactory) -> AllocatorFactory:
    """Register ``factory`` under ``name`` (overrides a built-in of the same name)."""
    _USER[name] = factory
    return factory


def _resolve(target: str) -> AllocatorFactory:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _plugin_table() -> dict[str, Any]:
    return {ep.name: ep for ep in metadata.entry_points(group="coblax.allocators")}


def allocator_names() -> list[str]:
    """All method names: user-registered, built-in and plug-ins."""
    return sorted(set(_USER) | set(BUILTIN_ALLOCATORS) | set(_plugin_table()))


def allocator_factory(name: str) -> AllocatorFactory:
    """The factory registered as ``name`` (user table, then built-ins, then plug-ins)."""
    if name in _USER:
        return _USER[name]
    if name in BUILTIN_ALLOCATORS:
        return _resolve(BUILTIN_ALLOCATORS[name])
    plugins = _plugin_table()
    if name in plugins:
        return plugins[name].load()
    raise UnknownMethodError(f"unknown method {name!r}; valid methods: {', '.join(allocator_names())}")


def get_allocator(name: str, **options: Any) -> Allocator:
    """Build the allocator registered as ``name`` with ``options``."""
    return allocator_factory(name)(**options)
