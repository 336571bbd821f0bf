"""k-means weight sharing: one scalar codebook per layer (Deep Compression, Sec. 3.1-3.2).

Each layer's kept weights share k = 2^bits centroids fitted by 1-D k-means (Lloyd)
with linear, density or random initialization; kernels are rebuilt as c[index] with
pruned entries exactly 0. Training the shared centroids is :mod:`.sharing`.

Reference: Han, Mao & Dally (2016) "Deep Compression", ICLR.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from coblax.compress.prune.masks import (
    check_layer_keys,
    kernels,
    layer_masks,
    mask_or_true,
    replace_kernels,
)
from coblax.compress.quantize.codebooks import kmeans_compression_ratio

Params = Any
INITS = ("linear", "density", "random")

__all__ = [
    "INITS",
    "KMeansInfo",
    "kmeans_codebook",
    "dequantize",
    "LayerCodebook",
    "WeightSharingReport",
    "masks_by_layer",
    "kernel_mask",
    "bits_per_layer",
    "kmeans_share",
    "WeightSharingSpec",
    "weight_share",
]


@dataclasses.dataclass(frozen=True)
class KMeansInfo:
    """Diagnostics of one k-means run (objective = Σ (w - c_{a(w)})^2 over kept w)."""

    objective_init: float
    objective: float
    iterations: int
    converged: bool
    n_weights: int


def _assign_1d(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    # Centroids sorted ascending: the nearest one is found from the midpoints
    # between neighbours (O(n log k) instead of an n x k distance table).
    mid = (centroids[1:] + centroids[:-1]) / 2.0
    return np.searchsorted(mid, values, side="left").astype(np.int64)


def kmeans_codebook(
    w: Any,
    k: int,
    *,
    init: str = "linear",
    mask: Any = None,
    iters: int = 50,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, KMeansInfo]:
    """Scalar k-means weight sharing of one layer (Han et al. 2016, Sec. 3.1-3.2).

    min_C Σ_{i kept} min_j (w_i - c_j)^2 by Lloyd's iterations over the kept
    weights only (``mask`` True; pruned weights are not clustered). Initialization:
      linear:  c_j evenly spaced over [min w, max w] (Han et al.'s best choice:
               it keeps the rare large weights represented);
      density: c_j at the quantiles j/(k-1) of the weights' CDF;
      random:  k distinct weights drawn at random (Forgy), with ``seed``.
    An empty cluster keeps its previous centroid. The objective is non-increasing.

    Args:
      w: weights (any shape).
      k: number of centroids, 1 <= k <= number of kept weights.
      init: ``"linear"``, ``"density"`` or ``"random"``.
      mask: keep-mask of ``w``'s shape (default: all kept).
      iters: maximum Lloyd iterations (stops early once assignments are stable).
      seed: for ``init="random"``.

    Returns:
      (centroids float32 (k,) ascending, indices int32 of ``w``'s shape — 0 at
      pruned positions, use :func:`dequantize` with the mask —, info).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    w = np.asarray(w)
    m = np.ones(w.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if m.shape != w.shape:
        raise ValueError(f"mask shape {m.shape} does not match w shape {w.shape}")
    values = w[m].astype(np.float64)
    n = values.size
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if k > n:
        raise ValueError(f"k={k} exceeds the number of kept weights ({n})")
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if init == "linear":
        c = np.linspace(values.min(), values.max(), k)
    elif init == "density":
        c = np.quantile(values, np.linspace(0.0, 1.0, k))
    else:
        c = np.sort(np.random.default_rng(seed).choice(values, size=k, replace=False))

    def objective(c, a):
        return float(np.sum((values - c[a]) ** 2))

    a = _assign_1d(values, c)
    obj0 = objective(c, a)
    converged = False
    it = 0
    for it in range(1, iters + 1):  # noqa: B007 - the count is read after the loop
        sums = np.bincount(a, weights=values, minlength=k)
        counts = np.bincount(a, minlength=k)
        c = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), c))
        a_new = _assign_1d(values, c)
        if np.array_equal(a_new, a):
            a = a_new
            converged = True
            break
        a = a_new
    info = KMeansInfo(objective_init=obj0, objective=objective(c, a), iterations=it,
                      converged=converged, n_weights=n)
    idx = np.zeros(w.shape, dtype=np.int32)
    idx[m] = a
    return c.astype(np.float32), idx, info


@jax.jit
def dequantize(centroids: Any, indices: Any, mask: Any = None) -> jax.Array:
    """Rebuild weights from a codebook: W = c[indices], 0 where ``mask`` is False."""
    w = jnp.asarray(centroids)[jnp.asarray(indices)]
    if mask is None:
        return w
    return jnp.where(jnp.asarray(mask, bool), w, jnp.zeros_like(w))


@dataclasses.dataclass(frozen=True)
class LayerCodebook:
    """Weight-sharing result of one layer."""

    bits: int
    k: int
    n_weights: int
    n_kept: int
    objective_init: float
    objective: float

    @property
    def compression_ratio(self) -> float:
        """32 / log2 k (Gong et al. 2014; the codebook itself is neglected)."""
        return kmeans_compression_ratio(self.k)


@dataclasses.dataclass(frozen=True)
class WeightSharingReport:
    """Per-layer codebook statistics of :func:`kmeans_share`."""

    layers: Mapping[str, LayerCodebook]
    init: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "kmeans",
            "init": self.init,
            "layers": {
                n: {**dataclasses.asdict(v), "compression_ratio": v.compression_ratio}
                for n, v in self.layers.items()
            },
        }


def masks_by_layer(masks: Any) -> dict[str, np.ndarray] | None:
    """A mask tree or a ``{layer: bool array}`` dict as ``{layer: array}``."""
    if masks is None:
        return None
    if isinstance(masks, Mapping) and all(
        not isinstance(v, Mapping) and v is not None for v in masks.values()
    ):
        return {n: np.asarray(v, dtype=bool) for n, v in masks.items()}
    return layer_masks(masks)


def kernel_mask(masks: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Layer ``name``'s mask from a mask tree or ``{layer: mask}`` dict; all-True if none."""
    return mask_or_true(masks_by_layer(masks), name, shape)


def bits_per_layer(bits: int | Mapping[str, int], names: list[str]) -> dict[str, int]:
    """``{layer: bits}`` from an int (every layer) or a dict (only the layers named), checked.

    Raises:
      ValueError: a bit width is not an int in [1, 16] or a dict names an unknown layer.
    """

    def check(b, what):
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= 16:
            raise ValueError(f"{what} must be an int in [1, 16], got {b!r}")
        return int(b)

    if isinstance(bits, Mapping):
        check_layer_keys(bits, names, "bits")
        return {n: check(bits[n], f"bits[{n!r}]") for n in names if n in bits}
    b = check(bits, "bits")
    return {n: b for n in names}


def kmeans_share(
    params: Params,
    bits: int | Mapping[str, int],
    *,
    masks: Any = None,
    init: str = "linear",
    iters: int = 50,
    seed: int = 0,
) -> tuple[Params, dict[str, np.ndarray], dict[str, np.ndarray], WeightSharingReport]:
    """k-means weight sharing of every kernel (Deep Compression, Sec. 3).

    Layer l gets k_l = 2^bits_l centroids (capped at its number of kept weights,
    so tiny layers never fail; the report records the k used) fitted by
    :func:`kmeans_codebook` on its kept weights; kernels are rebuilt as
    c[index] with pruned entries exactly 0. With a ``bits`` dict, layers not in
    it are left unquantized (and absent from the codebooks).

    Args:
      params: parameter tree.
      bits: bits per index, an int or ``{layer: int}`` (1..16).
      masks: mask tree or ``{layer: bool array}`` (default: nothing pruned).
      init, iters, seed: passed to :func:`kmeans_codebook`.

    Returns:
      (params, codebooks ``{layer: float32 (k,)}``, indices ``{layer: int32
      kernel-shaped}``, report).
    """
    ks = kernels(params)
    per_layer = bits_per_layer(bits, list(ks))
    codebooks: dict[str, np.ndarray] = {}
    indices: dict[str, np.ndarray] = {}
    stats: dict[str, LayerCodebook] = {}
    new = {}
    for i, (name, b) in enumerate(per_layer.items()):
        w = np.asarray(ks[name])
        m = kernel_mask(masks, name, w.shape)
        n_kept = int(m.sum())
        if n_kept == 0:
            continue
        k = min(2**b, n_kept)
        c, idx, info = kmeans_codebook(w, k, init=init, mask=m, iters=iters, seed=seed + i)
        codebooks[name], indices[name] = c, idx
        new[name] = dequantize(c, idx, m).astype(ks[name].dtype)
        stats[name] = LayerCodebook(bits=b, k=k, n_weights=int(w.size), n_kept=n_kept,
                                    objective_init=info.objective_init, objective=info.objective)
    return replace_kernels(params, new), codebooks, indices, WeightSharingReport(stats, init)


@dataclasses.dataclass(frozen=True)
class WeightSharingSpec:
    """k-means weight sharing with ``bits`` per index (int or ``{layer: int}``)."""

    bits: int | Mapping[str, int]
    init: str = "linear"
    iters: int = 50
    seed: int = 0


def weight_share(params: Params, spec: WeightSharingSpec) -> tuple[Params, dict[str, Any]]:
    """Stage form of :func:`kmeans_share`: ``(params, spec) -> (params, report)``.

    Exact zeros are treated as pruned (what a pruning stage leaves behind). The
    report dict carries ``codebooks``, ``indices`` and ``masks`` ({layer: array})
    for the encoder, plus the per-layer statistics.
    """
    masks = {n: np.asarray(w) != 0 for n, w in kernels(params).items()}
    out, cb, idx, rep = kmeans_share(params, spec.bits, masks=masks, init=spec.init,
                                     iters=spec.iters, seed=spec.seed)
    return out, {**rep.to_dict(), "codebooks": cb, "indices": idx, "masks": masks}


