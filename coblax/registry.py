"""Name -> allocator factory registry shared by COBLA and every baseline.

coblax registers its own allocators (``cobla``, ``uniform``); the top-level
``baselines`` package registers the others through the ``coblax.allocators``
entry-point group declared in ``pyproject.toml``, so that coblax never imports it.
A factory is called with the method's options (a dict from the config) and returns
an :class:`~coblax.allocation.Allocator`.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata
from typing import Any

from coblax.allocation import Allocator

__all__ = ["register_allocator", "get_allocator", "allocator_names", "UnknownMethodError"]

AllocatorFactory = Callable[..., Allocator]

_REGISTRY: dict[str, AllocatorFactory] = {}
_entry_points_loaded = False


class UnknownMethodError(ValueError):
    """A method name that is not registered; the message lists the valid ones."""


def register_allocator(name: str, factory: AllocatorFactory) -> AllocatorFactory:
    """Register ``factory`` under ``name`` (last registration wins)."""
    _REGISTRY[name] = factory
    return factory


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group="coblax.allocators"):
        if ep.name not in _REGISTRY:
            _REGISTRY[ep.name] = ep.load()


def allocator_names() -> list[str]:
    """All registered method names, coblax's own and the plug-ins'."""
    _load_builtin()
    _load_entry_points()
    return sorted(_REGISTRY)


def get_allocator(name: str, **options: Any) -> Allocator:
    """Build the allocator registered as ``name`` with ``options``."""
    names = allocator_names()
    if name not in _REGISTRY:
        raise UnknownMethodError(f"unknown method {name!r}; valid methods: {', '.join(names)}")
    return _REGISTRY[name](**options)


def _load_builtin() -> None:
    # Imported lazily: the allocator modules import jax, the registry must not.
    from coblax import cobla, uniform  # noqa: F401
