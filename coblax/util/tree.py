"""Nested-dict PyTrees <-> flat ``{"a/b/kernel": array}`` dicts.

One convention for every file format of coblax (``.npz`` checkpoints, ``.cbx``):
keys are joined with ``/``, mapping keys are visited in sorted order, and a key
that is empty, not a string or contains ``/`` is refused because it could not be
recovered by :func:`unflatten_tree`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["flatten_tree", "unflatten_tree", "to_numpy_tree"]


def flatten_tree(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Nested mappings of arrays -> ``{"a/b/c": np.ndarray}``, keys sorted at every level."""
    flat: dict[str, np.ndarray] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for key in sorted(node):
                if not isinstance(key, str) or not key or "/" in key:
                    raise ValueError(
                        f"tree keys must be non-empty strings without '/', got {key!r} under {prefix!r}"
                    )
                walk(node[key], f"{prefix}/{key}" if prefix else key)
        else:
            flat[prefix] = np.asarray(node)

    walk(tree, "")
    return flat


def unflatten_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_tree` (values are kept as given)."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, last = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def to_numpy_tree(tree: Any) -> Any:
    """A (possibly device-resident) PyTree with every leaf as a host NumPy array."""
    return jax.tree.map(np.asarray, jax.device_get(tree))
