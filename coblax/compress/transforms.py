"""Pruning masks and shared weights as ``optax.GradientTransformation`` s.

Two transforms that plug into any optax training loop (``coblax.nn.train.fit`` or a
hand-written ``tx.update`` loop), composed with ``optax.chain``:

* :func:`keep_pruned` zeroes the updates of pruned entries, so weights that are 0
  stay exactly 0 whatever the optimizer (Adam, momentum, weight decay) before it:
  ``optax.chain(optax.add_decayed_weights(1e-4), optax.adam(1e-3), keep_pruned(masks))``.
* :func:`share_by_cluster` replaces each shared weight's gradient by the sum of
  the gradients of its cluster (Deep Compression, Eq. 3):
      ∂L/∂c_k = Σ_{i: a_i = k} ∂L/∂W_i,
  so every member of a cluster gets the same update and the weights stay tied
  (under SGD that is c_k <- c_k - lr ∂L/∂c_k; under Adam the per-element moments
  are then identical within a cluster). Put it *before* the optimizer.

Masks and assignments are PyTrees with the structure of the params, holding an
array for every leaf they act on and ``None`` for the others. They travel in the
transform's state (a NamedTuple), not in a closure, so that a jitted step receives
them as arguments instead of baking large index tables in as constants.

Reference: Han, Mao & Dally (2016) "Deep Compression", ICLR, Sec. 3.3, Eq. 3;
Han, Pool, Tran & Dally (2015) "Learning both Weights and Connections", NIPS.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "KeepPrunedState",
    "keep_pruned",
    "ShareByClusterState",
    "share_by_cluster",
]


def _is_none(x: Any) -> bool:
    return x is None


class KeepPrunedState(NamedTuple):
    """The keep-masks (True = kept), a tree with ``None`` for unmasked leaves."""

    masks: Any


def keep_pruned(masks: Any) -> optax.GradientTransformation:
    """Zero the updates of pruned entries: u_i <- u_i · T_i.

    Args:
      masks: tree with the params' structure; a bool array (True = kept) for every
        masked leaf, ``None`` for leaves left alone.

    Returns:
      a stateless-in-effect ``GradientTransformation`` (its state holds the masks).
    """
    frozen = jax.tree.map(lambda m: None if m is None else jnp.asarray(m, bool), masks,
                          is_leaf=_is_none)

    def init(params: Any) -> KeepPrunedState:
        del params
        return KeepPrunedState(frozen)

    def update(updates: Any, state: KeepPrunedState, params: Any = None):
        del params

        def f(m, u):
            return u if m is None else jnp.where(m, u, jnp.zeros_like(u))

        return jax.tree.map(f, state.masks, updates, is_leaf=_is_none), state

    return optax.GradientTransformation(init, update)


class ShareByClusterState(NamedTuple):
    """Cluster index of every entry (-1: not shared, gradient 0); ``None`` leaves untouched."""

    assignments: Any


def share_by_cluster(assignments: Any) -> optax.GradientTransformation:
    """Replace every shared weight's gradient by its cluster's summed gradient.

    g_i <- Σ_{j: a_j = a_i} g_j for a_i >= 0 and g_i <- 0 for a_i = -1 (entries that
    belong to no cluster, e.g. pruned ones). Leaves whose assignment is ``None``
    pass unchanged (biases, layers kept in float).

    Args:
      assignments: tree with the params' structure; an int array of cluster
        indices in [-1, k) for every shared leaf, ``None`` elsewhere. The number of
        clusters of a leaf is its largest index + 1 (fixed when the transform is
        built, so the segment sums have static sizes).
    """
    leaves, treedef = jax.tree.flatten(assignments, is_leaf=_is_none)
    sizes = tuple(None if a is None else int(np.max(np.asarray(a), initial=-1)) + 1
                  for a in leaves)
    frozen = jax.tree.unflatten(
        treedef, [None if a is None else jnp.asarray(a, jnp.int32) for a in leaves])

    def init(params: Any) -> ShareByClusterState:
        del params
        return ShareByClusterState(frozen)

    def update(updates: Any, state: ShareByClusterState, params: Any = None):
        del params
        assigned = treedef.flatten_up_to(state.assignments)
        grads = treedef.flatten_up_to(updates)
        out = []
        for a, g, k in zip(assigned, grads, sizes, strict=True):
            if a is None:
                out.append(g)
                continue
            shared = a >= 0
            safe = jnp.where(shared, a, 0)
            gm = jnp.where(shared, g, jnp.zeros_like(g))
            sums = jax.ops.segment_sum(gm.ravel(), safe.ravel(), num_segments=max(k, 1))
            out.append(jnp.where(shared, sums[safe], jnp.zeros_like(g)))
        return jax.tree.unflatten(treedef, out), state

    return optax.GradientTransformation(init, update)
