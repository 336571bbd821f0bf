"""Training shared weights: per-cluster gradients and centroid fine-tuning (Deep
Compression, Sec. 3.3, Eq. 3).

∂L/∂c_j = Σ_{i: idx_i = j} ∂L/∂w_i: every member of a cluster receives its cluster's
summed gradient, so shared weights stay tied, and pruned ones stay 0.

Reference: Han, Mao & Dally (2016) "Deep Compression", ICLR.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from coblax.compress.prune.masks import check_layer_keys, kernels, map_kernels, replace_kernels
from coblax.compress.quantize.kmeans import dequantize, kernel_mask, masks_by_layer
from coblax.compress.transforms import keep_pruned, share_by_cluster

Params = Any

__all__ = [
    "cluster_gradient",
    "share_gradients",
    "snap_to_clusters",
    "finetune_shared",
    "finetune_centroids",
    "cluster_means",
]


@functools.partial(jax.jit, static_argnames=("k",))
def cluster_gradient(grad: Any, indices: Any, k: int, mask: Any = None) -> jax.Array:
    """Per-centroid gradient ∂L/∂c_j = Σ_{i: idx_i = j, kept} ∂L/∂w_i (Han et al. Eq. 3).

    A segment sum of the (masked) weight gradients over the cluster indices.
    """
    g = jnp.asarray(grad)
    if mask is not None:
        g = jnp.where(jnp.asarray(mask, bool), g, jnp.zeros_like(g))
    return jax.ops.segment_sum(g.ravel(), jnp.asarray(indices).ravel(), num_segments=k)


def _cluster_tables(
    codebooks_or_k: Mapping[str, Any] | None,
    indices: Mapping[str, Any],
    masks: Any,
    shapes: Mapping[str, Any],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, int]]:
    """Validated ``{layer: indices}``, ``{layer: mask}`` and ``{layer: k}`` tables."""
    check_layer_keys(indices, shapes, "indices")
    idx, msk, ks = {}, {}, {}
    for n, i in indices.items():
        i = np.asarray(i, dtype=np.int32)
        if i.shape != tuple(np.shape(shapes[n])):
            raise ValueError(f"indices of layer {n!r} have shape {i.shape}, kernel "
                             f"{np.shape(shapes[n])}")
        idx[n] = i
        msk[n] = kernel_mask(masks, n, i.shape)
        if codebooks_or_k is not None and n in codebooks_or_k:
            c = codebooks_or_k[n]
            ks[n] = int(c) if np.ndim(c) == 0 else int(np.shape(c)[0])
        else:
            ks[n] = int(i.max(initial=0)) + 1
        if msk[n].any() and int(i[msk[n]].max()) >= ks[n]:
            raise ValueError(f"indices of layer {n!r} exceed its {ks[n]} centroids")
    return idx, msk, ks


def share_gradients(
    grads: Params,
    indices: Mapping[str, Any],
    masks: Any = None,
    num_clusters: Mapping[str, int] | None = None,
) -> Params:
    """Replace each shared weight's gradient by its cluster's summed gradient.

    All weights of a cluster then receive the same update — the centroid update
    c_j <- c_j - lr Σ_{i in j} g_i under SGD, and the same under Adam, whose
    per-element state is identical within a cluster. Pruned entries get 0;
    leaves of layers without indices are unchanged. Usable inside ``jit``
    (``indices`` / ``masks`` / ``num_clusters`` are constants).

    Args:
      grads: gradient tree (structure of the params).
      indices: ``{layer: int array}`` cluster index of every kernel entry.
      masks: mask tree, ``{layer: bool array}`` or ``None`` (nothing pruned).
      num_clusters: ``{layer: k}`` (default: max index + 1).
    """
    idx, msk, _ = _cluster_tables(num_clusters, indices, masks, kernels(grads))
    tx = share_by_cluster(_assignment_tree(grads, idx, msk))
    return tx.update(grads, tx.init(grads))[0]


def _assignment_tree(tree: Params, idx, msk) -> Params:
    """Tree of cluster indices (-1 where pruned) for :func:`share_by_cluster`."""
    return map_kernels(
        lambda n, _: np.where(msk[n], idx[n], -1).astype(np.int32) if n in idx else None,
        tree, other=lambda _: None)


def snap_to_clusters(
    params: Params,
    indices: Mapping[str, Any],
    masks: Any = None,
    num_clusters: Mapping[str, int] | None = None,
) -> Params:
    """Project: set every shared weight to its cluster mean, pruned entries to 0.

    Keeps at most k distinct nonzero values per kernel exactly, whatever
    round-off the optimizer introduced. Arguments as :func:`share_gradients`.
    """
    idx, msk, ks = _cluster_tables(num_clusters, indices, masks, kernels(params))
    return _snap_to_clusters(params, idx, msk, ks)


def _snap_to_clusters(params: Params, idx, msk, ks: Mapping[str, int]) -> Params:
    """snap_to_clusters on validated tables; idx/msk may be traced (jit arguments)."""

    def f(name, w):
        if name not in idx:
            return w
        i, m = jnp.asarray(idx[name]), jnp.asarray(msk[name])
        wm = jnp.where(m, w, jnp.zeros_like(w)).ravel()
        sums = jax.ops.segment_sum(wm, i.ravel(), num_segments=ks[name])
        counts = jax.ops.segment_sum(m.ravel().astype(w.dtype), i.ravel(), num_segments=ks[name])
        means = sums / jnp.maximum(counts, 1)
        return jnp.where(m, means[i], jnp.zeros_like(w))

    return map_kernels(f, params)


def finetune_shared(
    apply_fn: Callable[[Params, Any], Any],
    params: Params,
    assignments: Any,
    masks: Any,
    x: Any,
    y: Any,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int = 128,
    seed: int = 0,
    optimizer: str | Any = "adam",
    fit_fn: Callable[..., Any] | None = None,
    progress: bool = False,
) -> Params:
    """Train shared weights: ``optax.chain(share_by_cluster, optimizer, keep_pruned)``.

    Each shared entry's gradient becomes its cluster's sum (Deep Compression Eq. 3),
    the optimizer runs, and the updates of pruned entries are zeroed, so shared
    weights stay tied and pruned ones stay 0 (in every masked leaf, shared or not).

    Args:
      assignments: tree like ``params``: int cluster indices (-1: none) or None.
      masks: tree like ``params``: bool keep-masks or None (or None for no masks).
      optimizer: an optimizer name of ``coblax.nn.train.make_optimizer`` or an
        ``optax.GradientTransformation``.
      fit_fn: training function with ``coblax.nn.train.fit``'s signature; it
        receives the chained transform as ``optimizer``.
    """

    from coblax.nn.train import fit, make_optimizer

    fit_fn = fit_fn or fit
    tx = make_optimizer(optimizer, learning_rate) if isinstance(optimizer, str) else optimizer
    parts = [share_by_cluster(assignments), tx]
    if masks is not None:
        parts.append(keep_pruned(masks))
    return fit_fn(apply_fn, params, x, y, epochs=epochs, batch_size=batch_size,
                  learning_rate=learning_rate, optimizer=optax.chain(*parts), seed=seed,
                  progress=progress)


def finetune_centroids(
    apply_fn: Callable[[Params, Any], Any],
    params: Params,
    codebooks: Mapping[str, Any],
    indices: Mapping[str, Any],
    masks: Any,
    x: Any,
    y: Any,
    **train: Any,
) -> tuple[Params, dict[str, np.ndarray]]:
    """Fine-tune the shared centroids (Deep Compression, Sec. 3.3, Eq. 3).

    The kernels are rebuilt from the codebooks, then trained by
    :func:`finetune_shared`: gradients summed per cluster
    (∂L/∂c_j = Σ_{idx_i = j} ∂L/∂W_i, applied to all members), and the updates of
    every pruned weight zeroed -- also in masked layers without a codebook (kept in
    float32), which would otherwise grow back. Indices and masks never change;
    other parameters (biases) train normally. The new centroids are the cluster
    means of the trained kernels.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits``.
      params: parameter tree.
      codebooks, indices: from :func:`kmeans_share`.
      masks: mask tree, ``{layer: bool array}`` or ``None``.
      x, y: training data.
      train: keywords of :func:`finetune_shared` (epochs, learning_rate, batch_size,
        seed, optimizer, fit_fn, progress).

    Returns:
      (params, updated codebooks ``{layer: float32 (k,)}``).
    """
    ks = kernels(params)
    check_layer_keys(codebooks, ks, "codebooks")
    missing = sorted(set(codebooks) - set(indices))
    if missing:
        raise ValueError(f"indices lack layers {missing} that have codebooks")
    idx, msk, _ = _cluster_tables(codebooks, {n: indices[n] for n in codebooks}, masks, ks)
    rebuilt = {n: dequantize(codebooks[n], idx[n], msk[n]).astype(ks[n].dtype) for n in codebooks}
    params = replace_kernels(params, rebuilt)
    by_layer = masks_by_layer(masks) or {}
    keep = map_kernels(lambda n, _: by_layer.get(n), params, other=lambda _: None)
    params = finetune_shared(
        apply_fn, params, _assignment_tree(params, idx, msk), keep if by_layer else None, x, y,
        **train,
    )
    ks = kernels(params)
    return params, {n: cluster_means(ks[n], idx[n], msk[n], c) for n, c in codebooks.items()}


def cluster_means(w: Any, indices: Any, mask: Any, codebook: Any) -> np.ndarray:
    """New centroids c_j = mean of the kept w_i with index j; an empty cluster keeps c_j."""
    w = np.asarray(w, dtype=np.float64)
    i = np.asarray(indices)
    m = np.ones(w.shape, bool) if mask is None else np.asarray(mask, bool)
    c = np.asarray(codebook)
    sums = np.bincount(i[m], weights=w[m], minlength=c.size)
    counts = np.bincount(i[m], minlength=c.size)
    return np.where(counts > 0, sums / np.maximum(counts, 1), c).astype(np.float32)


