"""Dynamic network surgery (Guo et al. 2016).

Masks T_k = h_k(W_k) are re-evaluated during training, so wrongly pruned weights can
be spliced back.

Reference: Guo, Yao & Chen (2016) "Dynamic Network Surgery for Efficient DNNs", NIPS.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from coblax.compress.prune.masks import (
    Masks,
    Params,
    apply_masks,
    check_layer_keys,
    full_masks,
    is_none,
    kernels,
    layer_masks,
    map_kernels,
)
from coblax.compress.prune.report import PruneReport, mask_report
from coblax.nn.train import cross_entropy, make_optimizer

__all__ = ["dns_thresholds", "dns_mask_update", "dns_update_probability", "dns"]


def _per_layer(value: Any, names: list[str], what: str) -> dict[str, float]:
    if isinstance(value, Mapping):
        check_layer_keys(value, names, what, complete=True)
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
    thr = dns_thresholds(params, rate, margin)
    a_tree = map_kernels(lambda n, w: jnp.asarray(thr[n][0], w.dtype), params, other=lambda _: None)
    b_tree = map_kernels(lambda n, w: jnp.asarray(thr[n][1], w.dtype), params, other=lambda _: None)
    update_masks = functools.partial(_update_masks, a_tree, b_tree)
    masks = update_masks(params, full_masks(params))
    initial = layer_masks(masks)
    tx = make_optimizer(optimizer, learning_rate)
    step = _dns_step(apply_fn, loss_fn or cross_entropy, tx, update_masks, gamma, power)
    params, masks, it, n_updates = _train(step, params, masks, tx.init(params), np.asarray(x),
                                          np.asarray(y), epochs, batch_size, seed)
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


def _update_masks(a_tree: Params, b_tree: Params, params: Params, masks: Masks) -> Masks:
    """T_k <- h_k(W_k, T_k) on every masked leaf (:func:`dns_mask_update`)."""

    def f(mm, a, b, w):
        return None if mm is None else dns_mask_update(w, mm, a, b)

    return jax.tree.map(f, masks, a_tree, b_tree, params, is_leaf=is_none)


def _dns_step(apply_fn, loss_fn, tx, update_masks, gamma: float, power: float):
    """One jitted DNS step: maybe re-evaluate the masks, then train the dense W on W ⊙ T."""

    @jax.jit
    def step(params, masks, opt_state, xb, yb, it, key):
        do_update = jax.random.uniform(key) < dns_update_probability(it, gamma, power)
        proposed = update_masks(params, masks)
        masks = jax.tree.map(
            lambda new, old: None if old is None else jnp.where(do_update, new, old),
            proposed,
            masks,
            is_leaf=is_none,
        )
        # Straight-through: the gradient w.r.t. W ⊙ T updates the dense W.
        grads = jax.grad(lambda q: loss_fn(apply_fn(q, xb), yb))(apply_masks(params, masks))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), masks, opt_state, do_update

    return step


def _train(step, params, masks, opt_state, x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int,
           seed: int) -> tuple[Params, Masks, int, int]:
    """``epochs`` shuffled passes of ``step``; (params, masks, iterations, mask updates)."""
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
    return params, masks, it, n_updates
