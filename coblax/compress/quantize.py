"""Weight quantization: fixed point, k-means weight sharing, PQ/RQ codebooks, binarization.

Same conventions as :mod:`coblax.compress.prune`: kernels (leaves named ``kernel``) are the
layer weights, keyed by their ``/``-joined module path; biases stay in float.

* Fixed point ⟨IL, FL⟩ (Gupta et al. 2015): step ε = 2^-FL, range
  [-2^(IL-1), 2^(IL-1) - ε], round to nearest or stochastically (unbiased), and
  saturate outside the range; a MAC of ⟨IL, FL⟩ operands accumulates in
  ⟨2 IL, 2 FL⟩ and is rounded back.
* k-means weight sharing (Han et al. 2016, "Deep Compression", Sec. 3): each layer's
  kept weights share k = 2^bits centroids; the centroids are fine-tuned with the
  gradients summed per cluster.
* Product and residual quantization of a weight matrix (Gong et al. 2014).
* BinaryConnect (Courbariaux et al. 2015) and binarized networks (Courbariaux et
  al. 2016): binary weights (and activations) in the forward/backward passes, a
  real-valued copy updated by the optimizer, straight-through gradients.

Training with a quantized forward pass reuses ``coblax.nn.train.fit``: the helpers here
return an ``apply_fn`` that quantizes the kernels on the fly (the optimizer keeps
updating the float copy) and ``transform_grads`` / ``project`` functions.

References: Gupta, Agrawal, Gopalakrishnan & Narayanan (2015) "Deep Learning with
Limited Numerical Precision", ICML; Han, Mao & Dally (2016) "Deep Compression",
ICLR; Gong, Liu, Yang & Bourdev (2014) "Compressing Deep Convolutional Networks
using Vector Quantization", arXiv:1412.6115; Courbariaux, Bengio & David (2015)
"BinaryConnect", NIPS; Courbariaux, Hubara, Soudry, El-Yaniv & Bengio (2016)
"Binarized Neural Networks", arXiv:1602.02830.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from coblax.compress.prune import kernels, layer_masks, map_kernels, replace_kernels
from coblax.compress.transforms import keep_pruned, share_by_cluster

__all__ = [
    # fixed point
    "validate_bits",
    "fixed_point",
    "fixed_point_mac",
    "fixed_point_apply_fn",
    "FixedPointSpec",
    "fixed_point_quantize",
    # k-means weight sharing
    "KMeansInfo",
    "kmeans_codebook",
    "dequantize",
    "LayerCodebook",
    "WeightSharingReport",
    "kmeans_share",
    "WeightSharingSpec",
    "weight_share",
    "cluster_gradient",
    "share_gradients",
    "snap_to_clusters",
    "finetune_shared",
    "finetune_centroids",
    "cluster_means",
    # codebook quantization of matrices
    "kmeans_compression_ratio",
    "pq_compression_ratio",
    "rq_compression_ratio",
    "ProductQuantization",
    "product_quantize",
    "ResidualQuantization",
    "residual_quantize",
    # binarization
    "hard_sigmoid",
    "binarize",
    "binaryconnect_apply_fn",
    "clip_project",
    "glorot_lr_factor",
    "glorot_lr_scale",
    "BinaryConnectMLP",
    "binarize_params",
    "sign_ste",
    "BinaryDense",
    "BinarizedMLP",
]

Params = Any
ROUNDINGS = ("nearest", "stochastic")
INITS = ("linear", "density", "random")
BINARY_MODES = ("det", "stoch")


# ---------------------------------------------------------------------- fixed point


def validate_bits(il: Any, fl: Any) -> None:
    """Check a ⟨IL, FL⟩ format: ints with il >= 1, fl >= 0, il + fl <= 32."""
    if isinstance(il, bool) or not isinstance(il, (int, np.integer)) or il < 1:
        raise ValueError(f"il (integer bits, sign included) must be an int >= 1, got {il!r}")
    if isinstance(fl, bool) or not isinstance(fl, (int, np.integer)) or fl < 0:
        raise ValueError(f"fl (fractional bits) must be an int >= 0, got {fl!r}")
    if il + fl > 32:
        raise ValueError(f"il + fl (word length) must be <= 32, got il={il}, fl={fl}")


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


@functools.partial(jax.jit, static_argnames=("il", "fl", "rounding"))
def _round_fixed(x: Any, il: int, fl: int, rounding: str, key: Any) -> jax.Array:
    # Work in units of ε = 2^-fl: scaling by a power of two is exact in floating
    # point, so the grid points are represented exactly (up to the word length
    # the float mantissa holds: 24 bits in float32, 53 in float64).
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    scale = 2.0**fl
    lo = -(2.0 ** (il - 1 + fl))
    hi = 2.0 ** (il - 1 + fl) - 1.0
    # Saturate first: the limits are on the grid, so rounding keeps them in range.
    u = jnp.clip(x * scale, lo, hi)
    if rounding == "nearest":
        # ⌊x⌋ if x - ⌊x⌋ < ε/2 else ⌊x⌋ + ε (ties go up).
        q = jnp.floor(u + 0.5)
    else:
        fl_u = jnp.floor(u)
        p = u - fl_u  # (x - ⌊x⌋) / ε in [0, 1)
        q = fl_u + (jax.random.uniform(key, u.shape, dtype=u.dtype) < p).astype(u.dtype)
    return (q / scale).astype(x.dtype)


def fixed_point(
    x: Any,
    il: int,
    fl: int,
    *,
    rounding: str = "nearest",
    key: jax.Array | None = None,
) -> jax.Array:
    """Round ``x`` to the fixed-point format ⟨IL, FL⟩ (Gupta et al. 2015, Sec. 3).

    ε = 2^-FL; values are first saturated to [-2^(IL-1), 2^(IL-1) - ε], then
      nearest:     ⌊x⌋ if ⌊x⌋ <= x < ⌊x⌋ + ε/2, else ⌊x⌋ + ε (ties round up);
      stochastic:  ⌊x⌋ + ε with probability (x - ⌊x⌋)/ε, else ⌊x⌋ (unbiased:
                   E[Round(x)] = x inside the range),
    where ⌊x⌋ is the largest integer multiple of ε <= x. IL counts the sign bit.

    Args:
      x: array to quantize (float).
      il, fl: integer and fractional bits (il >= 1, fl >= 0, il + fl <= 32).
      rounding: ``"nearest"`` or ``"stochastic"`` (needs ``key``).
      key: PRNG key for stochastic rounding.

    Returns:
      array of the same shape and dtype on the ⟨IL, FL⟩ grid.
    """
    validate_bits(il, fl)
    _check_rounding(rounding)
    if rounding == "stochastic" and key is None:
        raise ValueError("key must be a PRNG key when rounding='stochastic'")
    return _round_fixed(x, int(il), int(fl), rounding, key)


def fixed_point_mac(
    a: Any,
    b: Any,
    il: int,
    fl: int,
    *,
    rounding: str = "nearest",
    key: jax.Array | None = None,
) -> jax.Array:
    """Fixed-point multiply-accumulate z = Σ_i a_i b_i of ⟨IL, FL⟩ vectors.

    Gupta et al. (2015): the operands are ⟨IL, FL⟩ numbers, their products are
    accumulated in ⟨2 IL, 2 FL⟩ (exact products, saturation at that wider range),
    and the sum is rounded back to ⟨IL, FL⟩ once with ``rounding``. ``a`` and
    ``b`` are quantized to ⟨IL, FL⟩ (nearest) first; the last axis is summed, so
    matrix arguments give a matrix product. The wide accumulator is exact as long
    as its 2 (IL + FL) bits (plus log2 of the length) fit the float mantissa.
    """
    validate_bits(il, fl)
    _check_rounding(rounding)
    if rounding == "stochastic" and key is None:
        raise ValueError("key must be a PRNG key when rounding='stochastic'")
    return _mac(a, b, int(il), int(fl), rounding, key)


@functools.partial(jax.jit, static_argnames=("il", "fl", "rounding"))
def _mac(a: Any, b: Any, il: int, fl: int, rounding: str, key: Any) -> jax.Array:
    aq = _round_fixed(a, il, fl, "nearest", None)
    bq = _round_fixed(b, il, fl, "nearest", None)
    z = jnp.matmul(aq, bq) if jnp.ndim(bq) > 1 else jnp.sum(aq * bq, axis=-1)
    z = jnp.clip(z, -(2.0 ** (2 * il - 1)), 2.0 ** (2 * il - 1) - 2.0 ** (-2 * fl))
    return _round_fixed(z, il, fl, rounding, key)


def _ste(w: jax.Array, q: jax.Array) -> jax.Array:
    # Forward value q, gradient d/dw = identity (straight-through estimator).
    return w + jax.lax.stop_gradient(q - w)


def _content_key(base: jax.Array, params: Params, x: Any) -> jax.Array:
    """A PRNG key that changes whenever the params or the batch change.

    ``fit``'s ``apply_fn(params, x)`` carries no key; folding a hash of the
    current values into a fixed seed gives fresh, reproducible randomness at
    every training step without extra state.
    """
    total = jnp.float32(0.0)
    for w in kernels(params).values():
        total = total + jnp.sum(jnp.asarray(w, jnp.float32))
    total = total + jnp.sum(jnp.asarray(x, jnp.float32))
    bits = jax.lax.bitcast_convert_type(jax.lax.stop_gradient(total), jnp.int32)
    return jax.random.fold_in(base, bits)


def fixed_point_apply_fn(
    apply_fn: Callable[[Params, Any], Any],
    il: int,
    fl: int,
    rounding: str = "nearest",
    *,
    seed: int = 0,
) -> Callable[..., Any]:
    """Wrap ``apply_fn`` so that every kernel is ⟨IL, FL⟩-quantized in the forward.

    Quantized training with a full-precision copy: the forward uses
    W_q = fixed_point(W); the backward passes the gradient straight through
    (∂L/∂W := ∂L/∂W_q), so the optimizer keeps updating the float W. Use with
    ``coblax.nn.train.fit(q_apply, ...)``; deploy ``fixed_point_quantize(params)``.

    The returned ``q_apply(params, x, key=None)``: with stochastic rounding and
    no key, the key is derived from ``seed`` and a hash of the params and batch,
    so every training step draws fresh roundings, deterministically.
    """
    validate_bits(il, fl)
    _check_rounding(rounding)
    base = jax.random.key(seed)

    def q_apply(params: Params, x: Any, key: jax.Array | None = None) -> Any:
        if rounding == "stochastic" and key is None:
            key = _content_key(base, params, x)
        names = {n: i for i, n in enumerate(kernels(params))}

        def q(name, w):
            k = jax.random.fold_in(key, names[name]) if key is not None else None
            return _ste(w, _round_fixed(w, il, fl, rounding, k))

        return apply_fn(map_kernels(q, params), x)

    return q_apply


@dataclasses.dataclass(frozen=True)
class FixedPointSpec:
    """Quantize every kernel to ⟨il, fl⟩ with ``rounding``."""

    il: int
    fl: int
    rounding: str = "nearest"
    seed: int = 0


def fixed_point_quantize(params: Params, spec: FixedPointSpec) -> tuple[Params, dict[str, Any]]:
    """Stage form: ``(params, spec) -> (params with ⟨IL, FL⟩ kernels, report)``.

    The report has per-layer max |error| and saturated counts, the word length
    and the storage ratio 32 / (IL + FL) of the kernels.
    """
    validate_bits(spec.il, spec.fl)
    _check_rounding(spec.rounding)
    key = jax.random.key(spec.seed)
    names = {n: i for i, n in enumerate(kernels(params))}
    layers: dict[str, Any] = {}
    lo, hi = -(2.0 ** (spec.il - 1)), 2.0 ** (spec.il - 1) - 2.0**-spec.fl

    def q(name, w):
        wq = fixed_point(w, spec.il, spec.fl, rounding=spec.rounding,
                         key=jax.random.fold_in(key, names[name]))
        wn = np.asarray(w, dtype=np.float64)
        layers[name] = {
            "max_abs_error": float(np.max(np.abs(np.asarray(wq, np.float64) - wn), initial=0.0)),
            "saturated": int(np.sum((wn < lo) | (wn > hi))),
        }
        return wq

    out = map_kernels(q, params)
    report = {
        "method": "fixed_point",
        "il": spec.il,
        "fl": spec.fl,
        "word_length": spec.il + spec.fl,
        "compression_ratio": 32.0 / (spec.il + spec.fl),
        "layers": layers,
    }
    return out, report


# ------------------------------------------------------------- k-means weight sharing


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
    for it in range(1, iters + 1):
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


def _masks_by_layer(masks: Any) -> dict[str, np.ndarray] | None:
    """A mask tree or a ``{layer: bool array}`` dict as ``{layer: array}``."""
    if masks is None:
        return None
    if isinstance(masks, Mapping) and all(
        not isinstance(v, Mapping) and v is not None for v in masks.values()
    ):
        return {n: np.asarray(v, dtype=bool) for n, v in masks.items()}
    return layer_masks(masks)


def _kernel_mask(masks: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    by_layer = _masks_by_layer(masks)
    m = None if by_layer is None else by_layer.get(name)
    if m is None:
        return np.ones(shape, dtype=bool)
    if m.shape != tuple(shape):
        raise ValueError(f"mask of layer {name!r} has shape {m.shape}, kernel {tuple(shape)}")
    return m


def _bits_per_layer(bits: int | Mapping[str, int], names: list[str]) -> dict[str, int]:
    def check(b, what):
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= 16:
            raise ValueError(f"{what} must be an int in [1, 16], got {b!r}")
        return int(b)

    if isinstance(bits, Mapping):
        unknown = sorted(set(bits) - set(names))
        if unknown:
            raise ValueError(f"bits names unknown layers {unknown}; layers: {names}")
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
    per_layer = _bits_per_layer(bits, list(ks))
    codebooks: dict[str, np.ndarray] = {}
    indices: dict[str, np.ndarray] = {}
    stats: dict[str, LayerCodebook] = {}
    new = {}
    for i, (name, b) in enumerate(per_layer.items()):
        w = np.asarray(ks[name])
        m = _kernel_mask(masks, name, w.shape)
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
    unknown = sorted(set(indices) - set(shapes))
    if unknown:
        raise ValueError(f"indices name unknown layers {unknown}; layers: {list(shapes)}")
    idx, msk, ks = {}, {}, {}
    for n, i in indices.items():
        i = np.asarray(i, dtype=np.int32)
        if i.shape != tuple(np.shape(shapes[n])):
            raise ValueError(f"indices of layer {n!r} have shape {i.shape}, kernel "
                             f"{np.shape(shapes[n])}")
        idx[n] = i
        msk[n] = _kernel_mask(masks, n, i.shape)
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
    import optax

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
    unknown = sorted(set(codebooks) - set(ks))
    if unknown:
        raise ValueError(f"codebooks name unknown layers {unknown}; layers: {list(ks)}")
    missing = sorted(set(codebooks) - set(indices))
    if missing:
        raise ValueError(f"indices lack layers {missing} that have codebooks")
    idx, msk, _ = _cluster_tables(codebooks, {n: indices[n] for n in codebooks}, masks, ks)
    rebuilt = {n: dequantize(codebooks[n], idx[n], msk[n]).astype(ks[n].dtype) for n in codebooks}
    params = replace_kernels(params, rebuilt)
    by_layer = _masks_by_layer(masks) or {}
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


# ---------------------------------------------------- codebook quantization (Gong)


def kmeans_compression_ratio(k: int) -> float:
    """32 / log2 k: scalar k-means on 32-bit floats, codebook neglected (Gong et al.)."""
    if k < 2:
        raise ValueError(f"k must be >= 2 for a finite ratio, got {k}")
    return 32.0 / math.log2(k)


def pq_compression_ratio(m: int, n: int, k: int, s: int) -> float:
    """32 m n / (32 k n + log2(k) m s) for product quantization (Gong et al. Sec. 3.2).

    W is m x n, split column-wise into s blocks of n/s columns; every block has its
    own k centroids of length n/s (32 k n codebook bits in all) and each of the m
    rows stores one log2(k)-bit code per block.
    """
    return 32.0 * m * n / (32.0 * k * n + math.log2(k) * m * s)


def rq_compression_ratio(m: int, n: int, k: int, t: int) -> float:
    """m / (t k + log2(k) t n) for residual quantization, as printed by Gong et al.

    W is m x n, t stages of k centroids. This is the formula of the paper and of
    the course (kept verbatim so tables match); it is *not* the exact bit ratio of
    coding the m rows (vectors of length n) with t codebooks, which is
    32 m n / (32 t k n + t m log2 k) — see ``ResidualQuantization.storage_ratio``.
    """
    return m / (t * k + math.log2(k) * t * n)


def _nearest(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    d = (X**2).sum(1)[:, None] - 2.0 * X @ C.T + (C**2).sum(1)[None, :]
    return np.argmin(d, axis=1)


def _kmeans_vectors(X: np.ndarray, k: int, iters: int, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on the rows of X with k-means++ seeding.

    Ends with centroids = means of the previous assignment (empty clusters keep
    theirs) and codes = nearest centroid, so the result never has a larger error
    than coding every row by the zero vector (what residual quantization needs to
    be monotone).
    """
    N = X.shape[0]
    C = np.empty((k, X.shape[1]))
    C[0] = X[rng.integers(N)]
    d2 = ((X - C[0]) ** 2).sum(1)
    for j in range(1, k):
        tot = d2.sum()
        p = d2 / tot if tot > 0 else np.full(N, 1.0 / N)
        C[j] = X[rng.choice(N, p=p)]
        d2 = np.minimum(d2, ((X - C[j]) ** 2).sum(1))
    a = _nearest(X, C)
    for _ in range(iters):
        counts = np.bincount(a, minlength=k)
        sums = np.zeros_like(C)
        np.add.at(sums, a, X)
        C = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], C)
        a_new = _nearest(X, C)
        if np.array_equal(a_new, a):
            break
        a = a_new
    return C, _nearest(X, C)


def _check_matrix_k(W: Any, k: int, rows: int | None = None) -> np.ndarray:
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"W must be a 2-D matrix (m, n), got shape {W.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"k must be an int >= 2, got {k!r}")
    if k > W.shape[0]:
        raise ValueError(f"k={k} exceeds the number of rows m={W.shape[0]} to cluster")
    return W


@dataclasses.dataclass(frozen=True, eq=False)
class ProductQuantization:
    """Product quantization of W (m x n) into s column blocks (Gong et al. 2014).

    Attributes:
      codebooks: (s, k, n/s) — block i's centroids.
      codes: (m, s) int — row r of block i is codebooks[i, codes[r, i]].
      reconstruction: (m, n) float32.
      error: ||W - Ŵ||_F^2.
      compression_ratio: :func:`pq_compression_ratio` (exact bit count).
    """

    codebooks: np.ndarray
    codes: np.ndarray
    reconstruction: np.ndarray
    error: float
    compression_ratio: float


def product_quantize(W: Any, n_blocks: int, k: int, *, iters: int = 50, seed: int = 0
                     ) -> ProductQuantization:
    """Product quantization (Gong et al. 2014, Sec. 3.2).

    W ∈ R^{m x n} is split column-wise into s = ``n_blocks`` submatrices
    W = [W^1, ..., W^s], W^i ∈ R^{m x (n/s)}; k-means on the m rows of each W^i
    gives its codebook; each row segment is replaced by its nearest centroid.
    For a flax Dense kernel (in, out), m = in and n = out.

    Args:
      W: (m, n) matrix; n must be divisible by ``n_blocks``.
      n_blocks: s >= 1.
      k: centroids per block, 2 <= k <= m.
      iters, seed: k-means iterations and seeding.
    """
    W = _check_matrix_k(W, k)
    m, n = W.shape
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, (int, np.integer)) or n_blocks < 1:
        raise ValueError(f"n_blocks must be an int >= 1, got {n_blocks!r}")
    if n % n_blocks:
        raise ValueError(f"n_blocks={n_blocks} must divide the number of columns n={n}")
    rng = np.random.default_rng(seed)
    width = n // n_blocks
    books = np.empty((n_blocks, k, width))
    codes = np.empty((m, n_blocks), dtype=np.int32)
    recon = np.empty_like(W)
    for i in range(n_blocks):
        block = W[:, i * width:(i + 1) * width]
        C, a = _kmeans_vectors(block, k, iters, rng)
        books[i], codes[:, i] = C, a
        recon[:, i * width:(i + 1) * width] = C[a]
    return ProductQuantization(
        codebooks=books.astype(np.float32),
        codes=codes,
        reconstruction=recon.astype(np.float32),
        error=float(np.sum((W - recon) ** 2)),
        compression_ratio=pq_compression_ratio(m, n, k, n_blocks),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class ResidualQuantization:
    """Residual quantization of W (m x n) with t stages (Gong et al. 2014).

    Attributes:
      codebooks: (t, k, n) — stage j's centroids (vectors of length n).
      codes: (m, t) int — Ŵ_r = Σ_j codebooks[j, codes[r, j]].
      reconstruction: (m, n) float32.
      errors: ||W - Ŵ||_F^2 after each stage (non-increasing).
      compression_ratio: :func:`rq_compression_ratio` (the paper's formula).
      storage_ratio: exact 32 m n / (32 t k n + t m log2 k).
    """

    codebooks: np.ndarray
    codes: np.ndarray
    reconstruction: np.ndarray
    errors: tuple[float, ...]
    compression_ratio: float
    storage_ratio: float

    @property
    def error(self) -> float:
        return self.errors[-1]


def residual_quantize(W: Any, n_stages: int, k: int, *, iters: int = 50, seed: int = 0
                      ) -> ResidualQuantization:
    """Residual quantization (Gong et al. 2014, Sec. 3.3).

    The m rows of W ∈ R^{m x n} (vectors of length n) are quantized into k
    centres; the residuals are quantized again, recursively, for t = ``n_stages``
    stages: Ŵ_r = Σ_{j=1..t} c^j_{a_j(r)}. The error never increases with t,
    because each stage's centroids are cluster means (never worse than 0).

    Args:
      W: (m, n) matrix.
      n_stages: t >= 1.
      k: centroids per stage, 2 <= k <= m.
      iters, seed: k-means iterations and seeding.
    """
    W = _check_matrix_k(W, k)
    if isinstance(n_stages, bool) or not isinstance(n_stages, (int, np.integer)) or n_stages < 1:
        raise ValueError(f"n_stages must be an int >= 1, got {n_stages!r}")
    m, n = W.shape
    rng = np.random.default_rng(seed)
    books = np.empty((n_stages, k, n))
    codes = np.empty((m, n_stages), dtype=np.int32)
    residual = W.copy()
    errors = []
    for j in range(n_stages):
        C, a = _kmeans_vectors(residual, k, iters, rng)
        books[j], codes[:, j] = C, a
        residual = residual - C[a]
        errors.append(float(np.sum(residual**2)))
    recon = W - residual
    return ResidualQuantization(
        codebooks=books.astype(np.float32),
        codes=codes,
        reconstruction=recon.astype(np.float32),
        errors=tuple(errors),
        compression_ratio=rq_compression_ratio(m, n, k, n_stages),
        storage_ratio=32.0 * m * n / (32.0 * n_stages * k * n + n_stages * m * math.log2(k)),
    )


# ------------------------------------------------------------------------ binarization


def hard_sigmoid(x: Any) -> jax.Array:
    """σ(x) = clip((x + 1) / 2, 0, 1) (Courbariaux et al. 2015, Eq. 3)."""
    return jnp.clip((jnp.asarray(x) + 1.0) / 2.0, 0.0, 1.0)


def binarize(w: Any, mode: str = "det", key: jax.Array | None = None) -> jax.Array:
    """BinaryConnect binarization (Courbariaux et al. 2015, Eq. 1-2).

    det:   w_b = +1 if w >= 0 else -1;
    stoch: w_b = +1 with probability p = hard_sigmoid(w), else -1 (needs ``key``).
    """
    if mode not in BINARY_MODES:
        raise ValueError(f"mode must be one of {BINARY_MODES}, got {mode!r}")
    if mode == "stoch" and key is None:
        raise ValueError("key must be a PRNG key when mode='stoch'")
    return _binarize(jnp.asarray(w), mode, key)


@functools.partial(jax.jit, static_argnames=("mode",))
def _binarize(w: jax.Array, mode: str, key: Any) -> jax.Array:
    one = jnp.ones_like(w)
    if mode == "det":
        return jnp.where(w >= 0, one, -one)
    return jnp.where(jax.random.uniform(key, w.shape, dtype=w.dtype) < hard_sigmoid(w), one, -one)


def binaryconnect_apply_fn(
    apply_fn: Callable[[Params, Any], Any], mode: str = "det", *, seed: int = 0
) -> Callable[..., Any]:
    """Wrap ``apply_fn`` so the forward (and backward) use binarized kernels.

    BinaryConnect Algorithm 1: w_b = binarize(w) in the forward pass; the
    gradient ∂C/∂w_b is applied to the real-valued w (straight-through), and
    w is clipped to [-1, 1] after each update (:func:`clip_project` as ``fit``'s
    ``project``). Biases stay real. The returned ``q_apply(params, x, key=None,
    **kwargs)`` derives its key from ``seed`` and the current params/batch in
    "stoch" mode and passes ``kwargs`` (``train=True``, ``mutable=[...]`` of a
    BatchNorm model such as :class:`BinaryConnectMLP`) on to ``apply_fn``.
    """
    if mode not in BINARY_MODES:
        raise ValueError(f"mode must be one of {BINARY_MODES}, got {mode!r}")
    base = jax.random.key(seed)

    def q_apply(params: Params, x: Any, key: jax.Array | None = None, **kwargs: Any) -> Any:
        if mode == "stoch" and key is None:
            key = _content_key(base, params, x)
        names = {n: i for i, n in enumerate(kernels(params))}

        def q(name, w):
            k = jax.random.fold_in(key, names[name]) if key is not None else None
            return _ste(w, binarize(w, mode, k))

        return apply_fn(map_kernels(q, params), x, **kwargs)

    return q_apply


def clip_project(params: Params) -> Params:
    """Clip every kernel to [-1, 1] (BinaryConnect's clip(w) after each update)."""
    return map_kernels(lambda _, w: jnp.clip(w, -1.0, 1.0), params)


def glorot_lr_factor(shape: Sequence[int]) -> float:
    """1/H with H = sqrt(1.5 / (fan_in + fan_out)), Glorot & Bengio's uniform-init bound.

    BinaryConnect scales each layer's learning rate by 1/H ("Glorot" W_LR_scale in
    Courbariaux et al.'s code): with weights clipped to [-1, 1] instead of [-H, H], the
    steps of a wide layer's real-valued weights then match their range. A dense kernel
    (in, out) has fan_in = in, fan_out = out; a conv kernel (*window, c_in, c_out) has
    fan_in = c_in · window size, fan_out = c_out · window size.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(f"a kernel has at least 2 dimensions, got shape {shape}")
    window = math.prod(shape[:-2])
    return math.sqrt((shape[-2] + shape[-1]) * window / 1.5)


def glorot_lr_scale() -> optax.GradientTransformation:
    """Multiply every kernel's update by :func:`glorot_lr_factor` (other leaves unchanged).

    Chain it after the optimizer, ``optax.chain(optax.adam(lr), glorot_lr_scale())``:
    layer l then steps with learning rate lr / H_l (Courbariaux et al. 2015).
    Stateless; the factors come from the kernels' static shapes.
    """

    def init(params: Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates: Params, state: optax.EmptyState, params: Params | None = None) -> tuple[Params, Any]:
        del params
        return map_kernels(lambda _, u: u * glorot_lr_factor(np.shape(u)), updates), state

    return optax.GradientTransformation(init, update)


def binarize_params(params: Params, mode: str = "det", *, seed: int = 0) -> Params:
    """Replace every kernel by its binarization (deployment of a BinaryConnect net)."""
    key = jax.random.key(seed)
    names = {n: i for i, n in enumerate(kernels(params))}
    return map_kernels(
        lambda n, w: binarize(w, mode, jax.random.fold_in(key, names[n])).astype(w.dtype), params)


@jax.custom_vjp
def sign_ste(x: jax.Array) -> jax.Array:
    """Sign with the straight-through estimator through hard tanh (BNN, Sec. 1.1).

    Forward q = Sign(x) (+1 for x >= 0, -1 otherwise); backward
    g_x = g_q · 1_{|x| <= 1}, the derivative of Htanh(x) = clip(x, -1, 1).
    """
    return jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)


def _sign_fwd(x):
    return sign_ste(x), x


def _sign_bwd(x, g):
    return (jnp.where(jnp.abs(x) <= 1.0, g, jnp.zeros_like(g)),)


sign_ste.defvjp(_sign_fwd, _sign_bwd)


def _uniform_pm1(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    # U[-1, 1): BinaryConnect's clip range, so every sign starts equally likely.
    return jax.random.uniform(key, shape, dtype, -1.0, 1.0)


class BinaryDense(nn.Module):
    """Dense layer y = x · Sign(W) with a real-valued ``kernel`` (STE in backward)."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _uniform_pm1, (x.shape[-1], self.features))
        y = x @ sign_ste(kernel)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


class BinarizedMLP(nn.Module):
    """Binarized MLP (Courbariaux et al. 2016): binary weights and activations.

    x (flattened, real-valued input as in the paper) -> [BinaryDense -> LayerNorm
    -> sign_ste] per hidden width -> BinaryDense -> LayerNorm -> logits.
    LayerNorm stands in for the paper's batch norm: it needs no running
    statistics, so the model fits ``apply_fn(params, x)`` training. Layers are
    named fc1, fc2, ...; clip the kernels to [-1, 1] with :func:`clip_project`.
    """

    hidden: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            h = BinaryDense(width, name=f"fc{i + 1}")(h)
            h = nn.LayerNorm(name=f"norm{i + 1}")(h)
            h = sign_ste(h)
        n = len(self.hidden) + 1
        h = BinaryDense(self.num_classes, name=f"fc{n}")(h)
        return nn.LayerNorm(name=f"norm{n}")(h)


class BinaryConnectMLP(nn.Module):
    """BinaryConnect's batch-normalised MLP (Courbariaux et al. 2015, the MNIST net).

    x (flattened) -> [Dense -> BatchNorm -> ReLU] per hidden width -> Dense ->
    BatchNorm -> logits: batch normalisation after every layer, the output layer
    included, as in the paper. With ±1 weights a d-input unit's pre-activation has scale √d, which an
    unnormalised net cannot absorb (stochastic BinaryConnect then stays at chance).
    Dense layers carry no bias (BatchNorm's offset is the bias); kernels start
    U[-1, 1) (the paper's H = 1), so each sign is equally likely. Train the kernels
    binarized with :func:`binaryconnect_apply_fn` on ``apply(..., train=True,
    mutable=["batch_stats"])``, clipped with :func:`clip_project`, at Glorot-scaled
    learning rates (:func:`glorot_lr_scale`); evaluate with ``train=False``. Layers are
    named fc1, fc2, ... and bn1, bn2, ...
    """

    hidden: Sequence[int]
    num_classes: int
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        h = x.reshape((x.shape[0], -1))
        widths = (*self.hidden, self.num_classes)
        for i, width in enumerate(widths):
            h = nn.Dense(width, use_bias=False, kernel_init=_uniform_pm1, name=f"fc{i + 1}")(h)
            h = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, epsilon=1e-4,
                             name=f"bn{i + 1}")(h)
            if i < len(self.hidden):
                h = nn.relu(h)
        return h
