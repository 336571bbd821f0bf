"""Weight pruning: magnitude (+ retraining), dynamic network surgery, OBD and OBS.

Everything works over a flax parameter PyTree. A *layer weight* is any leaf named
``kernel``; its layer name is the ``/``-joined path of the module that owns it, with
a leading ``params`` collection dropped (``{"params": {"fc1": {"kernel": ...}}}`` ->
``"fc1"``; ``"Fire_0/squeeze"``). A *mask tree* has the structure of the params with
a boolean array (True = kept) for every kernel and ``None`` for every other leaf
(biases are never pruned: they are few and cost nothing to keep).

Methods:

* Magnitude pruning with retraining (Han et al. 2015): drop the weights of smallest
  |w| (per layer or globally), retrain with the pruned weights held at zero, and
  repeat with a higher sparsity.
* Dynamic network surgery (Guo et al. 2016): masks T_k = h_k(W_k) re-evaluated
  during training, so wrongly pruned weights can be spliced back.
* Optimal Brain Damage (LeCun et al. 1989): saliency s_k = 1/2 H_kk w_k^2 with the
  diagonal of the Gauss-Newton (Levenberg-Marquardt) approximation of the loss Hessian,
  as in the paper, or of the Hessian itself (exact, or Hutchinson's estimator).
* Optimal Brain Surgeon (Hassibi & Stork 1993), layer-wise: the quadratic layer
  reconstruction error with the inverse Hessian of the layer inputs gives both the
  saliency w_q^2 / (2 [H^-1]_qq) and the compensating update of the other weights.

References: Han, Pool, Tran & Dally (2015) "Learning both Weights and Connections
for Efficient Neural Networks", NIPS; Guo, Yao & Chen (2016) "Dynamic Network
Surgery for Efficient DNNs", NIPS; LeCun, Denker & Solla (1989) "Optimal Brain
Damage", NIPS; Hassibi & Stork (1993) "Second order derivatives for network
pruning: Optimal Brain Surgeon", NIPS.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from coblax.compress.transforms import keep_pruned
from coblax.nn.train import cross_entropy, make_optimizer

__all__ = [
    # tree helpers
    "layer_name",
    "kernels",
    "map_kernels",
    "replace_kernels",
    "full_masks",
    "apply_masks",
    "layer_masks",
    "masks_from_layers",
    # reports and specs
    "LayerSparsity",
    "PruneReport",
    "mask_report",
    "MagnitudeSpec",
    # magnitude pruning
    "score_masks",
    "magnitude_masks",
    "magnitude_prune",
    "sparsity_schedule",
    "iterative_magnitude_prune",
    # dynamic network surgery
    "dns_thresholds",
    "dns_mask_update",
    "dns_update_probability",
    "dns",
    # OBD
    "OBD_HESSIANS",
    "gauss_newton_diag",
    "hessian_diag_exact",
    "hessian_diag_hutchinson",
    "obd_saliency",
    "obd_prune",
    # OBS
    "layer_hessian",
    "obs_saliency",
    "obs_prune_layer",
    "obs_prune",
]

Params = Any
Masks = Any
Sparsity = float | Mapping[str, float]
SCOPES = ("layer", "global")
OBD_HESSIANS = ("gauss_newton", "exact", "hutchinson")


# ------------------------------------------------------------------------ tree helpers


def _key_str(entry: Any) -> str:
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
    keys = [_key_str(k) for k in path]
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


def _is_none(x: Any) -> bool:
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

    return jax.tree.map(f, masks, params, is_leaf=_is_none)


def layer_masks(masks: Masks) -> dict[str, np.ndarray]:
    """The kernel masks of a mask tree as ``{layer: bool array}``."""
    out: dict[str, np.ndarray] = {}
    leaves = jax.tree_util.tree_flatten_with_path(masks, is_leaf=_is_none)[0]
    for path, leaf in leaves:
        name = layer_name(path)
        if name is not None and leaf is not None:
            out[name] = np.asarray(leaf, dtype=bool)
    return out


def masks_from_layers(params: Params, by_layer: Mapping[str, Any]) -> Masks:
    """Mask tree from a ``{layer: bool array}`` dict; missing layers are all-True."""
    unknown = sorted(set(by_layer) - set(kernels(params)))
    if unknown:
        raise ValueError(f"masks for unknown layers {unknown}; layers: {sorted(kernels(params))}")

    def f(name, w):
        if name not in by_layer:
            return jnp.ones(np.shape(w), dtype=bool)
        m = np.asarray(by_layer[name], dtype=bool)
        if m.shape != tuple(np.shape(w)):
            raise ValueError(f"mask of layer {name!r} has shape {m.shape}, kernel {np.shape(w)}")
        return jnp.asarray(m)

    return map_kernels(f, params, other=lambda _: None)


# ------------------------------------------------------------------------------ reports


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    """How many weights a layer has and how many it keeps."""

    weights: int
    kept: int

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.weights if self.weights else 1.0


@dataclasses.dataclass(frozen=True, eq=False)
class PruneReport:
    """Per-layer kept counts of a pruning result (plus stage history and extras).

    Attributes:
      layers: ``{layer: LayerSparsity}`` in tree order.
      stages: one dict per pruning stage / event (method specific).
      extra: method-specific diagnostics (thresholds, saliencies...).
      masks: the mask tree itself (not part of :meth:`to_dict`).
    """

    layers: Mapping[str, LayerSparsity]
    stages: tuple[Mapping[str, Any], ...] = ()
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    masks: Any = None

    @property
    def total_weights(self) -> int:
        return sum(s.weights for s in self.layers.values())

    @property
    def total_kept(self) -> int:
        return sum(s.kept for s in self.layers.values())

    @property
    def kept_fraction(self) -> float:
        return self.total_kept / self.total_weights if self.total_weights else 1.0

    @property
    def compression(self) -> float:
        """Weight-count reduction total / kept (Han et al.'s "compression rate")."""
        return self.total_weights / max(self.total_kept, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no arrays)."""
        return {
            "layers": {
                k: {"weights": v.weights, "kept": v.kept, "kept_fraction": v.kept_fraction}
                for k, v in self.layers.items()
            },
            "total_weights": self.total_weights,
            "total_kept": self.total_kept,
            "kept_fraction": self.kept_fraction,
            "compression": self.compression,
            "stages": [dict(s) for s in self.stages],
            **{k: v for k, v in self.extra.items() if _jsonable(v)},
        }


def _jsonable(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool, list, tuple, dict)) or v is None


def mask_report(
    masks: Masks,
    stages: tuple[Mapping[str, Any], ...] = (),
    extra: Mapping[str, Any] | None = None,
) -> PruneReport:
    """:class:`PruneReport` counting the kept entries of every kernel mask."""
    layers = {
        name: LayerSparsity(weights=int(m.size), kept=int(m.sum()))
        for name, m in layer_masks(masks).items()
    }
    return PruneReport(layers=layers, stages=tuple(stages), extra=dict(extra or {}), masks=masks)


# --------------------------------------------------------------------- magnitude pruning


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def _check_fraction(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{what} must be a float in [0, 1), got {value!r}")
    v = float(value)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{what} must be in [0, 1), got {v}")
    return v


def _layer_sparsity(sparsity: Sparsity, names: list[str], scope: str) -> dict[str, float]:
    """Per-layer target sparsities (missing layers of a dict: 0)."""
    if isinstance(sparsity, Mapping):
        if scope == "global":
            raise ValueError(
                "sparsity must be a single float with scope='global' (a per-layer dict "
                "needs scope='layer')"
            )
        unknown = sorted(set(sparsity) - set(names))
        if unknown:
            raise ValueError(f"sparsity names unknown layers {unknown}; layers: {names}")
        return {n: _check_fraction(sparsity.get(n, 0.0), f"sparsity[{n!r}]") for n in names}
    s = _check_fraction(sparsity, "sparsity")
    return {n: s for n in names}


def _n_prune(fraction: float, size: int) -> int:
    # The epsilon keeps e.g. 0.9 * 1000 (= 900.0000000000001 or 899.999...) at 900.
    return min(size, int(math.floor(fraction * size + 1e-9)))


def score_masks(
    scores: Mapping[str, Any],
    sparsity: Sparsity,
    *,
    scope: str = "layer",
    prior: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Keep-masks that drop the lowest-scoring entries, per layer or globally.

    Exactly ``floor(s * n)`` entries are pruned (n: layer size for scope
    ``"layer"``, total size for ``"global"``); ties are broken by flat index
    (stable sort), so the result is deterministic. Entries already pruned in
    ``prior`` score -inf and stay pruned even when ``prior`` is sparser than the
    target (masks only shrink across stages): then more than ``floor(s * n)``
    entries are pruned.

    Args:
      scores: ``{layer: array}`` (|w| for magnitude pruning, saliency for OBD).
      sparsity: fraction to prune, a float or ``{layer: float}`` (scope "layer").
      scope: ``"layer"`` (one threshold per layer) or ``"global"``.
      prior: optional ``{layer: bool array}`` of previous masks.

    Returns:
      ``{layer: bool array}`` of the same shapes (True = kept).
    """
    _check_scope(scope)
    names = list(scores)
    fractions = _layer_sparsity(sparsity, names, scope)
    flat = {}
    for n in names:
        s = np.asarray(scores[n], dtype=np.float64).ravel().copy()
        if prior is not None and n in prior:
            s[~np.asarray(prior[n], dtype=bool).ravel()] = -np.inf
        flat[n] = s
    keep = {n: np.ones(flat[n].shape, dtype=bool) for n in names}
    if scope == "layer":
        for n in names:
            k = _n_prune(fractions[n], flat[n].size)
            keep[n][np.argsort(flat[n], kind="stable")[:k]] = False
    elif names:
        allscores = np.concatenate([flat[n] for n in names])
        k = _n_prune(fractions[names[0]], allscores.size)
        drop = np.zeros(allscores.size, dtype=bool)
        drop[np.argsort(allscores, kind="stable")[:k]] = True
        offset = 0
        for n in names:
            size = flat[n].size
            keep[n] = ~drop[offset:offset + size]
            offset += size
    if prior is not None:  # a prior pruned more than this target: its zeros stay pruned
        for n in names:
            if n in prior:
                keep[n] &= np.asarray(prior[n], dtype=bool).ravel()
    return {n: keep[n].reshape(np.shape(scores[n])) for n in names}


def magnitude_masks(
    params: Params,
    sparsity: Sparsity,
    *,
    scope: str = "layer",
    prior_masks: Masks | None = None,
) -> Masks:
    """Masks pruning the smallest-|w| fraction ``sparsity`` of the kernels.

    Han et al. (2015) prune w with |w| < tau; choosing tau as the ``sparsity``
    quantile of |w| (per layer, or over all kernels for ``scope="global"``) gives
    exactly ``floor(sparsity * n)`` pruned weights.

    Args:
      params: parameter tree.
      sparsity: float in [0, 1) or ``{layer: float}`` (missing layers: 0).
      scope: ``"layer"`` or ``"global"``.
      prior_masks: weights pruned here stay pruned.

    Returns:
      mask tree (bool kernels, ``None`` elsewhere).
    """
    scores = {n: np.abs(np.asarray(w)) for n, w in kernels(params).items()}
    prior = layer_masks(prior_masks) if prior_masks is not None else None
    return masks_from_layers(params, score_masks(scores, sparsity, scope=scope, prior=prior))


@dataclasses.dataclass(frozen=True)
class MagnitudeSpec:
    """One-shot magnitude pruning: fraction ``sparsity`` per layer or globally."""

    sparsity: float | Mapping[str, float]
    scope: str = "layer"


def magnitude_prune(params: Params, spec: MagnitudeSpec) -> tuple[Params, PruneReport]:
    """Stage form of one-shot magnitude pruning: ``(params, spec) -> (params, report)``.

    ``report.masks`` holds the mask tree.
    """
    masks = magnitude_masks(params, spec.sparsity, scope=spec.scope)
    return apply_masks(params, masks), mask_report(masks)


def sparsity_schedule(sparsity: float, steps: int, schedule: str = "geometric") -> list[float]:
    """Increasing per-stage sparsities ending at ``sparsity``.

    ``"geometric"``: the kept fraction shrinks by the same factor each stage,
    d_i = (1 - s)^(i / steps) (each stage prunes the same share of the survivors);
    ``"linear"``: s_i = s * i / steps.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    s = _check_fraction(sparsity, "sparsity")
    if schedule == "geometric":
        return [1.0 - (1.0 - s) ** (i / steps) for i in range(1, steps + 1)]
    if schedule == "linear":
        return [s * i / steps for i in range(1, steps + 1)]
    raise ValueError(f"schedule must be 'geometric' or 'linear', got {schedule!r}")


def _resolve_fit(fit_fn: Callable[..., Any] | None) -> Callable[..., Any]:
    if fit_fn is not None:
        return fit_fn
    from coblax.nn.train import fit  # lazy: keep prune importable without the trainer

    return fit


_RESERVED_TRAIN_KEYS = ("epochs", "transform_grads", "project")


def iterative_magnitude_prune(
    apply_fn: Callable[[Params, Any], Any],
    params: Params,
    x: Any,
    y: Any,
    *,
    sparsity: Sparsity,
    steps: int,
    retrain_epochs: int,
    scope: str = "layer",
    train_kwargs: Mapping[str, Any] | None = None,
    schedule: str = "geometric",
    fit_fn: Callable[..., Any] | None = None,
) -> tuple[Params, Masks, PruneReport]:
    """Iterative magnitude pruning with retraining (Han et al. 2015, Sec. 3).

    For i = 1..steps: prune to sparsity s_i (see :func:`sparsity_schedule`; already
    pruned weights stay pruned), then retrain ``retrain_epochs`` with
    ``coblax.nn.train.fit`` whose optimizer is ``optax.chain(optimizer,
    keep_pruned(masks))``: the updates of pruned weights are zeroed, so they stay
    exactly zero throughout (also under Adam, momentum or weight decay).

    Args:
      apply_fn: ``apply_fn(params, x) -> logits``.
      sparsity: final fraction pruned, float or ``{layer: float}``.
      steps: number of prune/retrain rounds.
      retrain_epochs: epochs of retraining after each pruning (0: prune only).
      scope: ``"layer"`` or ``"global"`` thresholds.
      train_kwargs: extra keywords for ``fit`` (learning_rate, batch_size, seed,
        optimizer -- a name or an ``optax.GradientTransformation`` --, progress...).
        Stage i trains with seed ``seed + i``.
      schedule: ``"geometric"`` or ``"linear"`` sparsity schedule.
      fit_fn: training function with ``fit``'s signature (default
        ``coblax.nn.train.fit``).

    Returns:
      (params with masks applied, mask tree, report) — the report lists per-layer
      weights / kept fraction and one entry per stage.
    """
    _check_scope(scope)
    if not isinstance(retrain_epochs, int) or retrain_epochs < 0:
        raise ValueError(f"retrain_epochs must be an int >= 0, got {retrain_epochs!r}")
    train_kwargs = dict(train_kwargs or {})
    bad = [k for k in _RESERVED_TRAIN_KEYS if k in train_kwargs]
    if bad:
        raise ValueError(f"train_kwargs may not set {bad}: iterative_magnitude_prune sets them")
    names = list(kernels(params))
    targets = _layer_sparsity(sparsity, names, scope)
    per_layer = {n: sparsity_schedule(targets[n], steps, schedule) for n in names}
    base_seed = int(train_kwargs.pop("seed", 0))
    opt = train_kwargs.pop("optimizer", "adam")
    if isinstance(opt, str):
        opt = make_optimizer(opt, train_kwargs.get("learning_rate", 1e-3))
    fit = _resolve_fit(fit_fn) if retrain_epochs > 0 else None

    masks = None
    stages = []
    for i in range(steps):
        s_i: Sparsity
        if scope == "global":  # one fraction over all kernels (every layer's target is it)
            s_i = per_layer[names[0]][i] if names else 0.0
        else:
            s_i = {n: per_layer[n][i] for n in names}
        masks = magnitude_masks(params, s_i, scope=scope, prior_masks=masks)
        params = apply_masks(params, masks)
        if fit is not None:
            params = fit(
                apply_fn,
                params,
                x,
                y,
                epochs=retrain_epochs,
                optimizer=optax.chain(opt, keep_pruned(masks)),
                seed=base_seed + i,
                **train_kwargs,
            )
        rep = mask_report(masks)
        stages.append(
            {
                "stage": i + 1,
                "target_sparsity": s_i if isinstance(s_i, float) else dict(s_i),
                "kept_fraction": rep.kept_fraction,
                "layer_kept_fraction": {k: v.kept_fraction for k, v in rep.layers.items()},
            }
        )
    report = mask_report(masks, stages=tuple(stages), extra={"method": "magnitude", "scope": scope})
    return params, masks, report


# ------------------------------------------------------------ dynamic network surgery


def _per_layer(value: Any, names: list[str], what: str) -> dict[str, float]:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"{what} names unknown layers {unknown}; layers: {names}")
        missing = sorted(set(names) - set(value))
        if missing:
            raise ValueError(f"{what} lacks layers {missing}")
        return {n: float(value[n]) for n in names}
    return {n: float(value) for n in names}


def dns_thresholds(
    params: Params,
    rate: float | Mapping[str, float],
    margin: float | Mapping[str, float] | None = None,
) -> dict[str, tuple[float, float]]:
    """Per-layer DNS thresholds (a_k, b_k).

    a_k = max(mean|W_k| + rate_k * std|W_k|, 0)   (Guo et al.'s "crate" rule)
    b_k = a_k + t_k, with t_k = ``margin`` (absolute) or 0.1 * a_k when ``None``
    (the reference code's 0.9/1.1 band around the threshold has the same width
    relative to its centre).

    Returns:
      ``{layer: (a_k, b_k)}``.
    """
    ks = {n: np.abs(np.asarray(w, dtype=np.float64)) for n, w in kernels(params).items()}
    names = list(ks)
    rates = _per_layer(rate, names, "rate")
    margins = _per_layer(margin, names, "margin") if margin is not None else None
    out = {}
    for n in names:
        a = max(float(ks[n].mean() + rates[n] * ks[n].std()), 0.0)
        t = margins[n] if margins is not None else 0.1 * a
        if t < 0:
            raise ValueError(f"margin must be >= 0, got {t} for layer {n!r}")
        out[n] = (a, a + t)
    return out


def dns_mask_update(w: jax.Array, t: jax.Array, a: Any, b: Any) -> jax.Array:
    """Guo et al. (2016) Eq. (2): the new mask h_k(W) given the old mask T.

    h(w) = 0 if |w| < a;  T if a <= |w| < b;  1 if |w| >= b.
    """
    aw = jnp.abs(w)
    return jnp.where(aw < a, False, jnp.where(aw >= b, True, t))


def dns_update_probability(iteration: Any, gamma: float = 1e-4, power: float = 1.0) -> Any:
    """Probability of re-evaluating the masks at ``iteration``: (1 + gamma * it)^-power.

    Guo et al. update T with a probability that decays over training (the
    reference code uses Caffe's "inv" schedule), so the masks settle.
    """
    return (1.0 + gamma * iteration) ** (-power)


def dns(
    apply_fn: Callable[[Params, Any], Any],
    params: Params,
    x: Any,
    y: Any,
    *,
    rate: float | Mapping[str, float],
    epochs: int,
    margin: float | Mapping[str, float] | None = None,
    learning_rate: float = 1e-3,
    batch_size: int = 128,
    optimizer: str = "momentum",
    gamma: float = 1e-4,
    power: float = 1.0,
    seed: int = 0,
    loss_fn: Callable[[Any, Any], Any] | None = None,
) -> tuple[Params, Masks, PruneReport]:
    """Dynamic network surgery (Guo et al. 2016, Eq. (1)-(3), Algorithm 1).

    min_{W,T} L(W ⊙ T)  s.t.  T_k = h_k(W_k)  (:func:`dns_mask_update`).
    Each step: with probability :func:`dns_update_probability` re-evaluate every
    T_k = h_k(W_k, T_k); compute the loss on W ⊙ T; update the *dense* W with the
    gradient with respect to W ⊙ T (straight-through on the mask, Eq. (3)), so a
    pruned weight keeps learning and is spliced back once |w| >= b_k.
    Thresholds (a_k, b_k) come from :func:`dns_thresholds` on the initial weights.

    Args:
      apply_fn: ``apply_fn(params, x) -> outputs``.
      rate: per-layer or global crate (larger -> more pruning).
      epochs: passes over (x, y).
      margin: t in b_k = a_k + t (absolute; default 0.1 * a_k).
      learning_rate, batch_size, optimizer: the training loop ("sgd",
        "momentum" or "adam").
      gamma, power: the mask-update probability schedule.
      seed: drives the batch order and the mask-update coin flips.
      loss_fn: ``(outputs, y) -> scalar``; default softmax cross-entropy.

    Returns:
      (W ⊙ T, final mask tree, report). ``report.extra`` holds the thresholds,
      the number of mask updates and ``spliced``: weights pruned by the initial
      masks that are kept at the end.
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    loss_fn = loss_fn or cross_entropy
    thr = dns_thresholds(params, rate, margin)
    a_tree = map_kernels(lambda n, w: jnp.asarray(thr[n][0], w.dtype), params, other=lambda _: None)
    b_tree = map_kernels(lambda n, w: jnp.asarray(thr[n][1], w.dtype), params, other=lambda _: None)

    def update_masks(p, m):
        def f(mm, a, b, w):
            return None if mm is None else dns_mask_update(w, mm, a, b)

        return jax.tree.map(f, m, a_tree, b_tree, p, is_leaf=_is_none)

    masks = update_masks(params, full_masks(params))
    initial = layer_masks(masks)
    tx = make_optimizer(optimizer, learning_rate)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, masks, opt_state, xb, yb, it, key):
        do_update = jax.random.uniform(key) < dns_update_probability(it, gamma, power)
        proposed = update_masks(params, masks)
        masks = jax.tree.map(
            lambda new, old: None if old is None else jnp.where(do_update, new, old),
            proposed,
            masks,
            is_leaf=_is_none,
        )
        # Straight-through: the gradient w.r.t. W ⊙ T updates the dense W.
        grads = jax.grad(lambda q: loss_fn(apply_fn(q, xb), yb))(apply_masks(params, masks))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), masks, opt_state, do_update

    x = np.asarray(x)
    y = np.asarray(y)
    n = len(x)
    bs = min(batch_size, n)
    steps_per_epoch = max(1, n // bs)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    it = 0
    n_updates = 0
    for _ in range(epochs):
        order = rng.permutation(n)
        for i in range(steps_per_epoch):
            idx = order[i * bs:(i + 1) * bs]
            params, masks, opt_state, upd = step(
                params, masks, opt_state, x[idx], y[idx], it, jax.random.fold_in(key, it)
            )
            n_updates += int(upd)
            it += 1
    final = layer_masks(masks)
    spliced = {k: int(np.sum(~initial[k] & final[k])) for k in final}
    extra = {
        "method": "dns",
        "thresholds": {k: [a, b] for k, (a, b) in thr.items()},
        "mask_updates": n_updates,
        "iterations": it,
        "spliced": spliced,
        "initial_kept": {k: int(v.sum()) for k, v in initial.items()},
    }
    return apply_masks(params, masks), masks, mask_report(masks, extra=extra)


# -------------------------------------------------------------- optimal brain damage


def _hvp(f: Callable[..., Any], x: jax.Array, args: tuple) -> Callable[[Any], Any]:
    # Forward-over-reverse: H v = d/de grad f(x + e v).
    return lambda v: jax.jvp(lambda u: jax.grad(f)(u, *args), (x,), (v,))[1]


def _flat_loss(loss_fn: Callable[..., Any], shape: tuple[int, ...]) -> Callable[..., Any]:
    return lambda v, *args: loss_fn(v.reshape(shape), *args)


def hessian_diag_exact(
    loss_fn: Callable[..., Any], w: Any, *args: Any, batch_size: int = 64
) -> jax.Array:
    """Exact diagonal of the Hessian of ``loss_fn(w, *args)`` w.r.t. w (w's shape).

    H_kk = e_k^T H e_k, one Hessian-vector product per coordinate (n products
    for n entries, ``batch_size`` at a time): use for small layers only. ``args``
    (data, other parameters) are traced arguments rather than closure constants,
    which keeps XLA from constant-folding the network on them.
    """
    shape = tuple(np.shape(w))
    f = _flat_loss(loss_fn, shape)

    @jax.jit
    def run(flat, args):
        hvp = _hvp(f, flat, args)
        n = flat.size

        def one(i):
            return hvp(jax.nn.one_hot(i, n, dtype=flat.dtype))[i]

        return jax.lax.map(one, jnp.arange(n), batch_size=min(batch_size, n))

    return run(jnp.ravel(jnp.asarray(w)), args).reshape(shape)


def hessian_diag_hutchinson(
    loss_fn: Callable[..., Any],
    w: Any,
    key: jax.Array,
    *args: Any,
    n_samples: int = 64,
    batch_size: int = 16,
) -> jax.Array:
    """Hutchinson estimate of diag(H) of ``loss_fn(w, *args)``: mean of z ⊙ (H z).

    z has i.i.d. Rademacher (±1) entries, so E[z ⊙ Hz]_k = Σ_j H_kj E[z_k z_j]
    = H_kk; the variance of one probe at k is Σ_{j≠k} H_kj^2.
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
    shape = tuple(np.shape(w))
    f = _flat_loss(loss_fn, shape)
    flat = jnp.ravel(jnp.asarray(w))

    @jax.jit
    def run(flat, key, args):
        hvp = _hvp(f, flat, args)
        z = jax.random.rademacher(key, (n_samples, flat.size), dtype=flat.dtype)
        est = jax.lax.map(lambda v: v * hvp(v), z, batch_size=min(batch_size, n_samples))
        return jnp.mean(est, axis=0)

    return run(flat, key, args).reshape(shape)


def gauss_newton_diag(
    apply_fn: Callable[[Params, Any], Any], params: Params, x: Any, *, batch_size: int = 16
) -> dict[str, jax.Array]:
    """Diagonal of the Gauss-Newton matrix of the mean softmax cross-entropy, per kernel.

    G = (1/N) Σ_n J_n^T (diag(p_n) - p_n p_n^T) J_n, with J_n = ∂z_n/∂w the Jacobian of
    example n's logits z_n = ``apply_fn(params, x_n)`` and p_n = softmax(z_n). This is
    the Levenberg-Marquardt (Gauss-Newton) approximation LeCun, Denker & Solla (1989)
    use for OBD: the Hessian without the terms in the network's second derivatives, so
    G_kk >= 0 (they also drop cross terms while back-propagating; this is G's exact
    diagonal). It does not depend on the labels; for a model linear in w (softmax
    regression) G is the Hessian. With diag(p) - p p^T = L L^T, L = diag(√p) - p √p^T
    (column c is √p_c (e_c - p); Σ p = 1 makes L L^T exact),

        G_kk = (1/N) Σ_n Σ_c ((J_n^T L_c)_k)^2,

    K vector-Jacobian products per example (vmapped over examples, ``batch_size`` at a
    time: memory ~ batch_size · K · the number of kernel weights).

    Args:
      apply_fn: ``apply_fn(params, x) -> logits (N, K)``, in inference mode (each
        example is passed alone, as a batch of one).
      params: parameter tree; ``params`` and ``x`` are traced arguments, not constants.
      x: inputs (N, ...).
      batch_size: examples per vmapped chunk.

    Returns:
      ``{layer: G diagonal}`` in kernel shape (the kernels' dtype).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    x = jnp.asarray(x)
    n = int(x.shape[0])
    if n < 1:
        raise ValueError("gauss_newton_diag needs at least one example")
    bs = min(batch_size, n)
    chunks = -(-n // bs)
    pad = chunks * bs - n
    xp = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    weight = (jnp.arange(chunks * bs) < n).astype(jnp.float32)  # padded examples count 0

    @jax.jit
    def run(params, xp, weight):
        kern = kernels(params)

        def example(xi, wi):
            def logits(k):
                z = apply_fn(replace_kernels(params, k), xi[None])
                return jnp.reshape(z, (-1,))

            z, vjp = jax.vjp(logits, kern)
            p = jax.nn.softmax(z.astype(jnp.float32))
            # Row c of L^T: √p_c (e_c - p).
            lt = jnp.sqrt(p)[:, None] * (jnp.eye(p.size, dtype=p.dtype) - p[None, :])
            g = jax.vmap(lambda v: vjp(v.astype(z.dtype))[0])(lt)
            return jax.tree.map(lambda a: wi * jnp.sum(jnp.square(a.astype(jnp.float32)), axis=0), g)

        def chunk(args):
            xb, wb = args
            return jax.tree.map(lambda a: jnp.sum(a, axis=0), jax.vmap(example)(xb, wb))

        parts = jax.lax.map(chunk, (xp.reshape(chunks, bs, *xp.shape[1:]), weight.reshape(chunks, bs)))
        return {k: (jnp.sum(parts[k], axis=0) / n).astype(kern[k].dtype) for k in kern}

    return run(params, xp, weight)


def obd_saliency(
    loss_fn: Callable[..., Any] | None,
    params: Params,
    *,
    data: tuple = (),
    hessian: str = "gauss_newton",
    apply_fn: Callable[[Params, Any], Any] | None = None,
    exact_max_size: int = 1024,
    n_samples: int = 256,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, np.ndarray]:
    """OBD saliencies s_k = 1/2 H_kk w_k^2 of every kernel entry (LeCun et al. 1989).

    From the second-order Taylor expansion of the loss at a minimum with the
    cross terms dropped: deleting u_k (δu_k = -u_k) changes E by 1/2 H_kk u_k^2.
    H_kk is, by ``hessian``:

    * ``"gauss_newton"`` (default, the paper's): the diagonal of the Gauss-Newton
      matrix of the mean softmax cross-entropy of ``apply_fn``'s logits
      (:func:`gauss_newton_diag`), computed exactly and never negative.
      ``loss_fn`` is not evaluated (may be None): it must be that loss.
    * ``"exact"``: the exact Hessian diagonal of ``loss_fn`` (:func:`hessian_diag_exact`)
      for kernels with at most ``exact_max_size`` entries and Hutchinson's estimate
      (``n_samples`` probes) for larger ones.
    * ``"hutchinson"``: Hutchinson's estimate (:func:`hessian_diag_hutchinson`) for every kernel.

    The Hessian is of the full loss w.r.t. one layer at a time (the other
    parameters fixed); its diagonal is that of the whole network's. A negative
    H_kk (the Hessian of a non-convex loss, or Hutchinson's noise) gives a
    negative saliency, which this quadratic model ranks as the safest to delete.

    Cost and accuracy: the exact Hessian diagonal takes one Hessian-vector product
    per weight (on CPU a conv layer of 500 weights over 512 images took minutes).
    Hutchinson's estimate is cheap but noisy, and noise scrambles the ranking: on
    a 64-32-10 MLP on sklearn digits, one-shot pruning at 50 % gave training loss
    0.225 with the exact diagonal, 0.272 with magnitude pruning, 0.262 with 1024
    Hutchinson probes and 0.407 with 64; on the 64-300-100-10 MLP (training loss
    0.008) 27-28 % of fc1/fc2's Hutchinson saliencies came out negative. The
    Gauss-Newton diagonal costs K vector-Jacobian products per example, for all
    layers at once.

    Args:
      loss_fn: ``loss_fn(params, *data) -> scalar`` (``"exact"``, ``"hutchinson"``).
      params: parameter tree.
      data: extra arguments of ``loss_fn`` (e.g. ``(x, y)``), passed as traced
        arguments so big arrays are not compiled in as constants; with
        ``"gauss_newton"``, ``data[0]`` is the input x.
      hessian: one of :data:`OBD_HESSIANS`.
      apply_fn: ``apply_fn(params, x) -> logits`` (``"gauss_newton"`` only).
      batch_size: examples per chunk of :func:`gauss_newton_diag`.

    Returns:
      ``{layer: saliency array}`` in kernel shape (float64 numpy).

    Raises:
      ValueError: an unknown ``hessian``, or one whose inputs are missing.
    """
    if hessian not in OBD_HESSIANS:
        raise ValueError(f"hessian must be one of {OBD_HESSIANS}, got {hessian!r}")
    data = tuple(data)
    if hessian == "gauss_newton":
        if apply_fn is None or not data:
            raise ValueError("hessian='gauss_newton' needs apply_fn and data=(x, ...)")
        diag = gauss_newton_diag(apply_fn, params, data[0], batch_size=batch_size)
    else:
        if loss_fn is None:
            raise ValueError(f"hessian={hessian!r} needs loss_fn")
        diag = {}
        key = jax.random.key(seed)
        for i, (name, w) in enumerate(kernels(params).items()):

            def layer_loss(v, p, *d, name=name):
                return loss_fn(replace_kernels(p, {name: v}), *d)

            if hessian == "exact" and int(np.size(w)) <= exact_max_size:
                diag[name] = hessian_diag_exact(layer_loss, w, params, *data)
            else:
                diag[name] = hessian_diag_hutchinson(
                    layer_loss, w, jax.random.fold_in(key, i), params, *data, n_samples=n_samples
                )
    out = {}
    for name, w in kernels(params).items():
        w64 = np.asarray(w, dtype=np.float64)
        out[name] = 0.5 * np.asarray(diag[name], dtype=np.float64) * w64**2
    return out


def obd_prune(
    apply_fn: Callable[[Params, Any], Any],
    params: Params,
    x: Any,
    y: Any,
    *,
    sparsity: Sparsity,
    scope: str = "layer",
    hessian: str = "gauss_newton",
    steps: int = 1,
    exact_max_size: int = 1024,
    n_samples: int = 256,
    seed: int = 0,
    loss_fn: Callable[[Any, Any], Any] | None = None,
) -> tuple[Params, Masks, PruneReport]:
    """OBD deletion of the ``sparsity`` fraction of lowest-saliency weights, in ``steps`` stages.

    The loss is ``loss_fn(apply_fn(params, x), y)`` on the whole of (x, y) (pass a
    subset for big data); ``hessian`` as in :func:`obd_saliency` (``"gauss_newton"``
    is for the default softmax cross-entropy only). With ``steps > 1`` the weights
    are deleted along :func:`sparsity_schedule` (geometric), the saliencies
    recomputed on the pruned net before each stage (LeCun et al.'s "iterate to
    step 2", without the retraining between stages): the second-order model is
    local, and one large deletion leaves it. Retrain afterwards (e.g. with masked
    ``fit``) as LeCun et al. do.

    Returns:
      (masked params, mask tree, report with ``extra["saliency_sum"]`` per layer:
      the predicted loss increase 1/2 sum H_kk w_k^2 over the weights deleted, each
      at the stage that deleted it).
    """
    if hessian == "gauss_newton" and loss_fn not in (None, cross_entropy):
        raise ValueError("hessian='gauss_newton' is the softmax cross-entropy's; "
                         "with another loss_fn use hessian='exact' or 'hutchinson'")
    lf = loss_fn or cross_entropy
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    names = list(kernels(params))
    if isinstance(sparsity, Mapping):
        per_layer = {n: sparsity_schedule(float(v), steps) for n, v in sparsity.items()}
        stages: list[Sparsity] = [{n: v[i] for n, v in per_layer.items()} for i in range(steps)]
    else:
        stages = list(sparsity_schedule(sparsity, steps))
    keep = {n: np.ones(np.shape(w), dtype=bool) for n, w in kernels(params).items()}
    predicted = dict.fromkeys(names, 0.0)
    current = params
    for stage in stages:
        sal = obd_saliency(
            lambda p, xb, yb: lf(apply_fn(p, xb), yb),
            current,
            data=(x, y),
            hessian=hessian,
            apply_fn=apply_fn,
            exact_max_size=exact_max_size,
            n_samples=n_samples,
            seed=seed,
        )
        new = score_masks(sal, stage, scope=scope, prior=keep)
        for n in names:
            predicted[n] += float(sal[n][keep[n] & ~new[n]].sum())
        keep = new
        current = apply_masks(params, masks_from_layers(params, keep))
    masks = masks_from_layers(params, keep)
    report = mask_report(masks, extra={"method": "obd", "scope": scope, "hessian": hessian, "steps": steps,
                                       "saliency_sum": predicted})
    return apply_masks(params, masks), masks, report


# ------------------------------------------------------------ optimal brain surgeon


def layer_hessian(X: Any, damp: float = 1e-4) -> np.ndarray:
    """H = (2/N) X^T X + damp * mean(diag) * I for a linear layer y = x W.

    It is the Hessian of the reconstruction error E(W') = (1/N) ||X W - X W'||_F^2
    w.r.t. any one output column of W' (the same for every column). ``damp`` is
    relative to the mean diagonal so it is scale free; 0 disables it.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (N, d_in), got shape {X.shape}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    H = 2.0 / X.shape[0] * X.T @ X
    if damp > 0:
        H = H + damp * np.mean(np.diag(H)) * np.eye(H.shape[0])
    return H


def _check_obs_inputs(W: Any, X: Any) -> tuple[np.ndarray, np.ndarray]:
    W = np.asarray(W, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (d_in, d_out), got shape {W.shape}")
    if X.ndim != 2 or X.shape[1] != W.shape[0]:
        raise ValueError(f"X must have shape (N, {W.shape[0]}) to match W, got {X.shape}")
    return W, X


def obs_saliency(W: Any, X: Any, damp: float = 1e-4) -> np.ndarray:
    """OBS saliencies L_q = w_q^2 / (2 [H^-1]_qq) of every entry of W (d_in, d_out).

    Hassibi & Stork (1993), Eq. (5) with H from :func:`layer_hessian`; L_q is
    the increase of (1/N) ||X W - X W'||^2 after deleting w_q and applying the
    optimal compensation to the rest of its column.
    """
    W, X = _check_obs_inputs(W, X)
    hinv_diag = np.diag(np.linalg.inv(layer_hessian(X, damp)))
    return W**2 / (2.0 * hinv_diag[:, None])


def obs_prune_layer(
    W: Any, X: Any, n_prune: int, damp: float = 1e-4
) -> tuple[np.ndarray, np.ndarray]:
    """Optimal Brain Surgeon on one dense layer y = x W, one weight at a time.

    With H = (2/N) X^T X (+ damping) shared by all output columns, each step
    deletes the (q, c) of least saliency L = w_qc^2 / (2 [H_c^-1]_qq) over the
    whole layer and updates its column by
        δw_c = -(w_qc / [H_c^-1]_qq) H_c^-1 e_q            (Hassibi & Stork Eq. 5)
    then downdates that column's inverse Hessian to the remaining coordinates,
        H_c^-1 <- H_c^-1 - H_c^-1 e_q e_q^T H_c^-1 / [H_c^-1]_qq,
    which zeroes row/column q, so later updates keep w_qc = 0. For the quadratic
    error this is exact: the result equals the least-squares refit of each column
    on its kept inputs (with the damping as ridge term).

    Cost: O(d_in^2) per deletion plus an O(d_in^2) inverse per touched column
    (memory d_in^2 per touched column) — meant for small layers.

    Args:
      W: weights (d_in, d_out).
      X: layer inputs (N, d_in).
      n_prune: number of weights to delete, 0 <= n_prune <= W.size.
      damp: relative damping (see :func:`layer_hessian`).

    Returns:
      (W_new float64 with the pruned entries exactly 0, keep-mask bool).
    """
    W, X = _check_obs_inputs(W, X)
    if not isinstance(n_prune, (int, np.integer)) or not 0 <= n_prune <= W.size:
        raise ValueError(f"n_prune must be an int in [0, {W.size}], got {n_prune!r}")
    d_in, d_out = W.shape
    hinv0 = np.linalg.inv(layer_hessian(X, damp))
    W = W.copy()
    mask = np.ones(W.shape, dtype=bool)
    col_hinv: dict[int, np.ndarray] = {}  # copy-on-write per touched column

    def column_best(c: int) -> tuple[float, int]:
        hinv = col_hinv.get(c, hinv0)
        d = np.diag(hinv)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = W[:, c] ** 2 / (2.0 * d)
        s[~mask[:, c]] = np.inf
        q = int(np.argmin(s))
        return float(s[q]), q

    best = [column_best(c) for c in range(d_out)]
    for _ in range(int(n_prune)):
        c = int(np.argmin([b[0] for b in best]))
        q = best[c][1]
        hinv = col_hinv.get(c, hinv0)
        col = hinv[:, q].copy()
        W[:, c] -= W[q, c] / col[q] * col
        mask[q, c] = False
        W[~mask[:, c], c] = 0.0  # exact zeros despite round-off in the downdates
        hinv = hinv - np.outer(col, col) / col[q]
        hinv[q, :] = 0.0
        hinv[:, q] = 0.0
        col_hinv[c] = hinv
        if mask[:, c].any():
            best[c] = column_best(c)
        else:
            best[c] = (np.inf, 0)
    return W, mask


def obs_prune(
    params: Params,
    layer_inputs: Mapping[str, Any],
    sparsity: Sparsity,
    *,
    damp: float = 1e-4,
) -> tuple[Params, Masks, PruneReport]:
    """Layer-wise OBS over the kernels named in ``layer_inputs``.

    Each kernel is viewed as a matrix (prod(shape[:-1]), out) (for a conv this
    needs im2col patches as inputs) and :func:`obs_prune_layer` deletes
    ``floor(s * size)`` weights with ``X = layer_inputs[layer]`` (N, rows).
    Other kernels are left dense.

    Returns:
      (params, mask tree, report).
    """
    ks = kernels(params)
    unknown = sorted(set(layer_inputs) - set(ks))
    if unknown:
        raise ValueError(f"layer_inputs names unknown layers {unknown}; layers: {list(ks)}")
    fractions = _layer_sparsity(sparsity, list(ks), "layer")
    new, keep = {}, {}
    for name, X in layer_inputs.items():
        w = np.asarray(ks[name])
        mat = w.reshape(-1, w.shape[-1])
        w_new, m = obs_prune_layer(mat, X, _n_prune(fractions[name], mat.size), damp)
        new[name] = jnp.asarray(w_new.reshape(w.shape), dtype=ks[name].dtype)
        keep[name] = m.reshape(w.shape)
    masks = masks_from_layers(params, keep)
    params = apply_masks(replace_kernels(params, new), masks)
    return params, masks, mask_report(masks, extra={"method": "obs", "damp": damp})
