"""Magnitude pruning with retraining (Han et al. 2015).

Drop the weights of smallest |w| (per layer or globally), retrain with the pruned
weights held at zero, and repeat with a higher sparsity.

Reference: Han, Pool, Tran & Dally (2015) "Learning both Weights and Connections for
Efficient Neural Networks", NIPS.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import optax

from coblax.compress.prune.masks import (
    Masks,
    Params,
    Sparsity,
    apply_masks,
    check_layer_keys,
    kernels,
    layer_masks,
    masks_from_layers,
)
from coblax.compress.prune.report import PruneReport, mask_report
from coblax.compress.transforms import keep_pruned
from coblax.nn.train import make_optimizer

SCOPES = ("layer", "global")

__all__ = [
    "SCOPES",
    "check_scope",
    "check_fraction",
    "layer_sparsity",
    "n_pruned",
    "score_masks",
    "magnitude_masks",
    "MagnitudeSpec",
    "magnitude_prune",
    "sparsity_schedule",
    "iterative_magnitude_prune",
]


def check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def check_fraction(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{what} must be a float in [0, 1), got {value!r}")
    v = float(value)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{what} must be in [0, 1), got {v}")
    return v


def layer_sparsity(sparsity: Sparsity, names: list[str], scope: str) -> dict[str, float]:
    """Per-layer target sparsities (missing layers of a dict: 0)."""
    if isinstance(sparsity, Mapping):
        if scope == "global":
            raise ValueError(
                "sparsity must be a single float with scope='global' (a per-layer dict "
                "needs scope='layer')"
            )
        check_layer_keys(sparsity, names, "sparsity")
        return {n: check_fraction(sparsity.get(n, 0.0), f"sparsity[{n!r}]") for n in names}
    s = check_fraction(sparsity, "sparsity")
    return {n: s for n in names}


def n_pruned(fraction: float, size: int) -> int:
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
    check_scope(scope)
    names = list(scores)
    fractions = layer_sparsity(sparsity, names, scope)
    flat = {}
    for n in names:
        s = np.asarray(scores[n], dtype=np.float64).ravel().copy()
        if prior is not None and n in prior:
            s[~np.asarray(prior[n], dtype=bool).ravel()] = -np.inf
        flat[n] = s
    keep = {n: np.ones(flat[n].shape, dtype=bool) for n in names}
    if scope == "layer":
        for n in names:
            k = n_pruned(fractions[n], flat[n].size)
            keep[n][np.argsort(flat[n], kind="stable")[:k]] = False
    elif names:
        allscores = np.concatenate([flat[n] for n in names])
        k = n_pruned(fractions[names[0]], allscores.size)
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
    s = check_fraction(sparsity, "sparsity")
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


def _checked_training(retrain_epochs: Any, train_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``train_kwargs`` once the epochs and the keys are checked."""
    if not isinstance(retrain_epochs, int) or retrain_epochs < 0:
        raise ValueError(f"retrain_epochs must be an int >= 0, got {retrain_epochs!r}")
    train_kwargs = dict(train_kwargs or {})
    bad = [k for k in _RESERVED_TRAIN_KEYS if k in train_kwargs]
    if bad:
        raise ValueError(f"train_kwargs may not set {bad}: iterative_magnitude_prune sets them")
    return train_kwargs


def _stage_record(i: int, target: Sparsity, masks: Masks) -> dict[str, Any]:
    """The report entry of pruning stage ``i`` (counted from 0)."""
    rep = mask_report(masks)
    return {
        "stage": i + 1,
        "target_sparsity": target if isinstance(target, float) else dict(target),
        "kept_fraction": rep.kept_fraction,
        "layer_kept_fraction": {k: v.kept_fraction for k, v in rep.layers.items()},
    }


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
    check_scope(scope)
    train_kwargs = _checked_training(retrain_epochs, train_kwargs)
    names = list(kernels(params))
    targets = layer_sparsity(sparsity, names, scope)
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
        stages.append(_stage_record(i, s_i, masks))
    report = mask_report(masks, stages=tuple(stages), extra={"method": "magnitude", "scope": scope})
    return params, masks, report


