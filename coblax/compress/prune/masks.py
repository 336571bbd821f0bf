"""Mask trees and the kernel helpers every compression method shares.

A *layer weight* is any leaf named ``kernel``; its layer name is the ``/``-joined path
of the module that owns it, with a leading ``params`` collection dropped
(``{"params": {"fc1": {"kernel": ...}}}`` -> ``"fc1"``; ``"Fire_0/squeeze"``). A *mask
tree* has the structure of the params with a boolean array (True = kept) for every
kernel and ``None`` for every other leaf (biases are never pruned: they are few and
cost nothing to keep).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = Any
Masks = Any
Sparsity = float | Mapping[str, float]

__all__ = [
    "Params",
    "Masks",
    "Sparsity",
    "key_str",
    "layer_name",
    "kernels",
    "map_kernels",
    "replace_kernels",
    "full_masks",
    "is_none",
    "apply_masks",
    "layer_masks",
    "masks_from_layers",
    "mask_or_true",
    "check_layer_keys",
]


def key_str(entry: Any) -> str:
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return str(entry.key)
    return str(entry)


def layer_name(path: tuple) -> str | None:
    """Layer name of a tree path if its leaf is a ``kernel``, else ``None``.

    The name is the ``/``-joined path without the final ``kernel`` and without a
    leading ``params`` collection key.
    """
    keys = [key_str(k) for k in path]
    if not keys or keys[-1] != "kernel":
        return None
    keys = keys[:-1]
    if keys and keys[0] == "params":
        keys = keys[1:]
    return "/".join(keys)


def kernels(params: Params) -> dict[str, jax.Array]:
    """All kernels of ``params`` as an ordered ``{layer: kernel}`` dict (tree order)."""
    out: dict[str, jax.Array] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = layer_name(path)
        if name is not None:
            out[name] = leaf
    return out


def map_kernels(
    fn: Callable[[str, Any], Any],
    tree: Params,
    other: Callable[[Any], Any] = lambda leaf: leaf,
) -> Params:
    """Map ``fn(layer, kernel)`` over the kernel leaves and ``other(leaf)`` elsewhere."""

    def f(path, leaf):
        name = layer_name(path)
        return other(leaf) if name is None else fn(name, leaf)

    return jax.tree_util.tree_map_with_path(f, tree)


def replace_kernels(params: Params, new: Mapping[str, Any]) -> Params:
    """``params`` with the kernels of the layers in ``new`` replaced (shape-checked)."""

    def f(name, leaf):
        if name not in new:
            return leaf
        value = new[name]
        if tuple(np.shape(value)) != tuple(np.shape(leaf)):
            raise ValueError(
                f"replacement for layer {name!r} has shape {np.shape(value)}, "
                f"the kernel has {np.shape(leaf)}"
            )
        return value

    return map_kernels(f, params)


def full_masks(params: Params) -> Masks:
    """Mask tree keeping every weight (all-True kernels, ``None`` elsewhere)."""
    return map_kernels(
        lambda _, w: jnp.ones(np.shape(w), dtype=bool), params, other=lambda _: None
    )


def is_none(x: Any) -> bool:
    return x is None


@jax.jit
def apply_masks(params: Params, masks: Masks) -> Params:
    """Zero the pruned entries: ``W <- W * T`` on every masked leaf.

    Works for any tree with the structure of the params (e.g. gradients, so that
    ``apply_masks(grads, masks)`` freezes pruned weights). ``None`` mask leaves
    leave the corresponding leaf untouched. Usable inside ``jax.jit``.
    """

    def f(m, p):
        if m is None:
            return p
        return jnp.where(m, p, jnp.zeros_like(p))

    return jax.tree.map(f, masks, params, is_leaf=is_none)


def layer_masks(masks: Masks) -> dict[str, np.ndarray]:
    """The kernel masks of a mask tree as ``{layer: bool array}``."""
    out: dict[str, np.ndarray] = {}
    leaves = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)[0]
    for path, leaf in leaves:
        name = layer_name(path)
        if name is not None and leaf is not None:
            out[name] = np.asarray(leaf, dtype=bool)
    return out


def masks_from_layers(params: Params, by_layer: Mapping[str, Any]) -> Masks:
    """Mask tree from a ``{layer: bool array}`` dict; missing layers are all-True."""
    check_layer_keys(by_layer, sorted(kernels(params)), "masks")

    def f(name, w):
        if name not in by_layer:
            return jnp.ones(np.shape(w), dtype=bool)
        m = np.asarray(by_layer[name], dtype=bool)
        if m.shape != tuple(np.shape(w)):
            raise ValueError(f"mask of layer {name!r} has shape {m.shape}, kernel {np.shape(w)}")
        return jnp.asarray(m)

    return map_kernels(f, params, other=lambda _: None)


def mask_or_true(masks: Mapping[str, Any] | None, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """``masks[key]`` as a bool array, or all-True (nothing pruned) where there is none.

    The one lookup every consumer of ``{layer or leaf path: mask}`` dicts uses (k-means
    sharing, the pipeline's stages, the ``.cbx`` exporter).

    Raises:
      ValueError: the mask's shape is not ``shape``.
    """
    m = None if masks is None else masks.get(key)
    if m is None:
        return np.ones(shape, dtype=bool)
    m = np.asarray(m, dtype=bool)
    if m.shape != tuple(shape):
        raise ValueError(f"mask of {key!r} has shape {m.shape}, kernel {tuple(shape)}")
    return m


def check_layer_keys(given: Iterable[str], names: Iterable[str], what: str, *, complete: bool = False) -> None:
    """Check that a ``{layer: ...}`` argument names only layers of the network.

    Raises:
      ValueError: naming the argument ``what``, the keys that are not in ``names``
        and the valid names; with ``complete``, also the names it lacks.
    """
    given, names = list(given), list(names)
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"{what} names unknown layers {unknown}; layers: {names}")
    missing = sorted(set(names) - set(given)) if complete else []
    if missing:
        raise ValueError(f"{what} lacks layers {missing}")
