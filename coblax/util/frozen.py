"""A read-only, hashable ``dict``: static metadata of a PyTree.

JAX compares and hashes the static (non-leaf) fields of a PyTree node whenever it
looks a compiled function up (``jax.jit``), so those fields must be hashable and
compare by value. A plain ``dict`` is neither hashable nor safe to share; a
:class:`FrozenMap` is a ``dict`` subclass (so ``json.dumps`` and ``isinstance(x,
dict)`` keep working) that refuses every change after it is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["FrozenMap", "frozen"]


class FrozenMap(dict):
    """A ``dict`` that cannot change, hashed by its items (values must be hashable)."""

    __slots__ = ()

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"{type(self).__name__} is read-only; change a copy: dict(m)")

    __setitem__ = __delitem__ = _read_only
    clear = pop = popitem = setdefault = update = __ior__ = _read_only  # type: ignore[assignment]

    def __reduce__(self) -> tuple:
        return (type(self), (dict(self),))

    def __repr__(self) -> str:
        return f"FrozenMap({dict.__repr__(self)})"


def frozen(mapping: Mapping[str, Any] | None) -> FrozenMap:
    """``mapping`` as a :class:`FrozenMap` (an empty one for ``None``)."""
    return mapping if isinstance(mapping, FrozenMap) else FrozenMap(mapping or {})
