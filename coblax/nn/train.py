"""One training loop (optax), evaluation, and safe checkpoints of base models.

Checkpoints are ``.npz`` files of the flattened parameter tree read with
``allow_pickle=False`` plus a JSON side file, so loading one never executes code.
A base model is cached under a key hashed from the model, its options, the
training settings, the seed and a digest of the training data
(:func:`data_digest`): a later run with the same settings and data loads it, and
:func:`load_checkpoint` refuses an entry that is unreadable, was written for other
settings, has other shapes or holds non-finite weights.

Training watches its loss: a non-finite loss, or one that grows beyond
``DIVERGENCE_FACTOR`` times its start, stops :func:`fit` with a
:class:`~coblax.util.errors.NumericalError` naming the stage and the step, so that
garbage weights are never returned, evaluated or cached.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from coblax.util import (
    flatten_tree,
    to_numpy_tree,
    unflatten_tree,
    write_bytes_atomic,
    write_json_atomic,
)
from coblax.util.errors import CoblaxError, NumericalError

__all__ = [
    "cross_entropy",
    "make_optimizer",
    "fit",
    "evaluate",
    "mean_loss",
    "save_params",
    "load_params",
]

OPTIMIZERS = ("adam", "sgd", "momentum")
#: Learning-rate schedules of :func:`fit`: constant, or cosine decay to zero over all steps
#: (a constant Adam step does not converge a ResNet: 20 epochs scored below 8 on one seed).
SCHEDULES = ("constant", "cosine")
#: A loss above this multiple of max(first loss, 1) means training diverged.
DIVERGENCE_FACTOR = 1e4


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    """Mean softmax cross-entropy with integer labels."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def make_optimizer(name: str, learning_rate: float, schedule: str = "constant",
                   total_steps: int | None = None) -> optax.GradientTransformation:
    """The optimizer ``name`` at ``learning_rate``, constant or cosine-decayed over ``total_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if schedule == "cosine":
        if not total_steps or total_steps <= 0:
            raise ValueError("a cosine schedule needs the number of training steps (total_steps > 0)")
        learning_rate = optax.cosine_decay_schedule(learning_rate, decay_steps=int(total_steps))
    if name == "adam":
        return optax.adam(learning_rate)
    if name == "sgd":
        return optax.sgd(learning_rate)
    if name == "momentum":
        return optax.sgd(learning_rate, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def fit(
    apply_fn: Callable[[Any, jnp.ndarray], jnp.ndarray],
    params: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    optimizer: str | optax.GradientTransformation = "adam",
    schedule: str = "constant",
    seed: int = 0,
    transform_grads: Callable[[Any, Any], Any] | None = None,
    project: Callable[[Any], Any] | None = None,
    loss_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray] | None = None,
    aux: Any = None,
    desc: str = "train",
    progress: bool = True,
    mutable: Sequence[str] = (),
    rng_streams: Sequence[str] = (),
) -> Any:
    """Minibatch training of ``params`` for ``epochs``; deterministic under ``seed``.

    (One piece at over 80 lines: most of it is the signature and the argument docs;
    the loop itself is one epoch loop around the one cached, jitted step.)

    Args:
      apply_fn: ``apply_fn(params, x) -> logits``.
      transform_grads: ``(grads, params) -> grads`` inside the jitted step, before
        the optimizer (mask pruned weights, sum gradients per cluster...).
      project: ``params -> params`` after each update (re-apply masks, clip...).
      loss_fn: ``(logits, labels) -> scalar``; default cross-entropy. Labels may be
        any array (e.g. soft targets for distillation) batched along axis 0.
      aux: a PyTree of arrays passed to the jitted step as an argument; when given,
        ``transform_grads(grads, params, aux)`` and ``project(params, aux)`` receive
        it. Large index tables belong here: captured in a closure they would be
        baked into the compiled step as constants (slow to compile).

      mutable: variable collections of ``params`` that are state, not trained
        (``"batch_stats"`` of ``nn.BatchNorm``, anything ``sow``n or kept in a
        model's own collection). They are passed to ``apply_fn(variables, x,
        mutable=[...])``, which must return ``(logits, updated)`` as
        ``flax.linen.Module.apply`` does, and carried from step to step; the
        optimizer, ``transform_grads`` and ``project`` see only the other
        collections. ``apply_fn`` must then run the model in training mode
        (e.g. ``functools.partial(model.apply, train=True)``).
      schedule: ``"constant"`` or ``"cosine"`` (the rate decays to zero over the
        ``epochs`` x steps-per-epoch steps); only with an optimizer given by name.
      rng_streams: names of the RNG streams the model draws from in training
        (``"dropout"``); each step passes ``rngs={name: key}`` with keys folded
        from ``seed`` and the step number, so runs are reproducible.

    Returns:
      The trained variables: ``params`` with every collection updated.

    Raises:
      NumericalError: a non-finite or diverging loss (checked once per epoch, the
        error names ``desc`` and the step), or non-finite weights at the end.
    """
    if epochs <= 0:
        return params
    loss_fn = loss_fn or cross_entropy
    n = len(x)
    batch_size = min(batch_size, n)
    steps_per_epoch = max(1, n // batch_size)
    total_steps = epochs * steps_per_epoch
    if isinstance(optimizer, str):
        tx = make_optimizer(optimizer, learning_rate, schedule, total_steps)
    elif schedule != "constant":
        raise ValueError("fit: schedule applies to an optimizer given by name; build the schedule "
                         "into the optax transformation instead")
    else:
        tx = optimizer
    state_names = tuple(mutable)
    streams = tuple(rng_streams)
    if state_names:
        missing = [k for k in state_names if k not in params]
        if missing:
            raise ValueError(f"fit: mutable collections {missing} are not in the variables "
                             f"(collections: {', '.join(params)})")
        state = {k: params[k] for k in state_names}
        params = {k: v for k, v in params.items() if k not in state_names}
    else:
        state = {}
    opt_state = tx.init(params)

    extra = () if aux is None else (aux,)
    # a schedule's step count is part of the optimizer, so it is part of the cache key
    opt_key = optimizer if schedule == "constant" or not isinstance(optimizer, str) else \
        (optimizer, schedule, total_steps)
    step = _cached_step(apply_fn, tx, opt_key, learning_rate, loss_fn, transform_grads, project,
                        state_names, streams)
    rng = np.random.default_rng(seed)
    base_key = jax.random.PRNGKey(seed)
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not progress, leave=False)
    watch = LossWatch(desc, bar)
    for epoch in range(epochs):
        order = rng.permutation(n)
        losses = []
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            key = jax.random.fold_in(base_key, epoch * steps_per_epoch + i)
            params, state, opt_state, loss = step(params, state, opt_state, x[idx], y[idx], key, extra)
            losses.append(loss)
            bar.update(1)
        watch.epoch(losses)  # one transfer per epoch; raises NumericalError
        bar.set_postfix(loss=f"{float(loss):.4f}")
    bar.close()
    if not tree_all_finite(params):
        raise NumericalError(desc, watch.steps, float("nan"), "the weights are not finite at the end")
    return {**params, **state} if state_names else params


#: Compiled training steps kept for reuse, most recent last (see :func:`_cached_step`).
_STEPS: collections.OrderedDict = collections.OrderedDict()
STEP_CACHE_SIZE = 32


def _make_step(apply_fn, tx, loss_fn, transform_grads, project, state_names, streams):
    """The jitted update ``(params, state, opt_state, xb, yb, key, aux) -> (params, state, opt_state, loss)``."""

    def forward(p, state, xb, key):
        kwargs: dict[str, Any] = {}
        if streams:
            kwargs["rngs"] = {name: jax.random.fold_in(key, i) for i, name in enumerate(streams)}
        if not state_names:
            return apply_fn(p, xb, **kwargs), state
        logits, updated = apply_fn({**p, **state}, xb, mutable=list(state_names), **kwargs)
        return logits, {k: updated.get(k, state[k]) for k in state_names}

    @jax.jit
    def step(params, state, opt_state, xb, yb, key, aux):
        def objective(p):
            logits, new_state = forward(p, state, xb, key)
            return loss_fn(logits, yb), new_state

        (loss, state), grads = jax.value_and_grad(objective, has_aux=True)(params)
        if transform_grads is not None:
            grads = transform_grads(grads, params, *aux)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if project is not None:
            params = project(params, *aux)
        return params, state, opt_state, loss

    return step


def _cached_step(apply_fn, tx, optimizer, learning_rate, loss_fn, transform_grads, project, state_names,
                 streams):
    """One jitted step per (apply function, optimizer, loss, hooks), reused across :func:`fit` calls.

    The weights, optimizer state and batches are arguments of the step, so jax's own
    cache then compiles once per shape: fine-tuning two factored networks of equal
    shapes (an :func:`~coblax.lowrank.decompose.apply_fn_for` of equal models and
    layer layouts compares equal) compiles once. An optimizer given as an object,
    or anything unhashable, gets a fresh step (compiled on its first call) as before.
    """
    key = None
    if isinstance(optimizer, (str, tuple)):
        key = (apply_fn, optimizer, float(learning_rate), loss_fn, transform_grads, project, state_names, streams)
        try:
            hash(key)
        except TypeError:
            key = None
    if key is not None and key in _STEPS:
        _STEPS.move_to_end(key)
        return _STEPS[key]
    step = _make_step(apply_fn, tx, loss_fn, transform_grads, project, state_names, streams)
    if key is not None:
        _STEPS[key] = step
        while len(_STEPS) > STEP_CACHE_SIZE:
            _STEPS.popitem(last=False)
    return step


def compiled_steps() -> int:
    """Compiled variants held by the cached training steps (one per step and input shapes)."""
    return sum(int(step._cache_size()) for step in _STEPS.values())


__all__ += ["compiled_steps"]


class LossWatch:
    """Checks each epoch's losses: the first non-finite or diverged one stops training.

    Step k's loss is that of the weights before update k; a loss above
    ``DIVERGENCE_FACTOR * max(|first loss|, 1)`` counts as diverged.
    """

    def __init__(self, stage: str, bar: Any = None) -> None:
        self.stage, self.bar, self.steps, self.first = stage, bar, 0, None

    def epoch(self, losses: list) -> None:
        values = np.asarray(jax.device_get(losses), dtype=np.float64).reshape(-1)
        if self.first is None and values.size:
            self.first = float(values[0]) if np.isfinite(values[0]) else 1.0
        limit = DIVERGENCE_FACTOR * max(abs(self.first or 1.0), 1.0)
        bad = np.flatnonzero(~np.isfinite(values) | (values > limit))
        if bad.size:
            if self.bar is not None:
                self.bar.close()
            k = int(bad[0])
            raise NumericalError(self.stage, self.steps + k + 1, float(values[k]),
                                 "lower the learning rate (or check the data)")
        self.steps += int(values.size)


def tree_all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of ``tree`` is finite."""
    leaves = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(jax.device_get(tree))]
    return all(np.all(np.isfinite(a)) for a in leaves if np.issubdtype(a.dtype, np.inexact))


__all__ += ["tree_all_finite", "DIVERGENCE_FACTOR"]


def batched_apply(fn, x, batch_size):
    """``fn`` over ``x`` in batches of ``batch_size``, outputs concatenated.

    The last batch is zero-padded to full size (when there is more than one batch), so
    a jitted ``fn`` compiles once for one shape.
    """
    outs = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        pad = batch_size - len(xb)
        if pad and len(x) > batch_size:  # keep one compiled shape
            xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
        out = np.asarray(fn(xb))
        outs.append(out[: batch_size - pad] if pad and len(x) > batch_size else out)
    return np.concatenate(outs)


@functools.partial(jax.jit, static_argnums=0)
def _apply_jit(apply_fn, params, xb):
    return apply_fn(params, xb)


def predict(apply_fn, params, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Logits for ``x`` in fixed-size batches.

    The weights are an argument of the compiled function, not constants baked into
    it, so one compilation serves every call with the same ``apply_fn`` and shapes
    (the same network before and after fine-tuning, every evaluation of a base
    model); baking them in compiled anew on each call and slowly for large layers.
    An ``apply_fn`` that cannot be hashed falls back to one compilation per call.
    """
    try:
        hash(apply_fn)
    except TypeError:
        fn = jax.jit(lambda xb: apply_fn(params, xb))
    else:
        fn = functools.partial(_apply_jit, apply_fn, params)
    return batched_apply(fn, x, batch_size)


def evaluate(apply_fn, params, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy in [0, 1]."""
    logits = predict(apply_fn, params, x, batch_size)
    return float(np.mean(np.argmax(logits, -1) == np.asarray(y)))


def mean_loss(apply_fn, params, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
    """Mean cross-entropy over ``x``."""
    logits = predict(apply_fn, params, x, batch_size)
    return float(cross_entropy(jnp.asarray(logits), jnp.asarray(y)))


__all__ += ["batched_apply", "predict"]


# ---------------------------------------------------------------- checkpoints


def save_params(path: str | os.PathLike, params: Any, meta: dict | None = None) -> None:
    """Write params as .npz (no pickle) + ``path.json`` metadata, each atomically."""
    path = Path(path)
    buf = io.BytesIO()
    np.savez(buf, **flatten_tree(to_numpy_tree(params)))
    write_bytes_atomic(path, buf.getvalue())
    if meta is not None:
        write_json_atomic(path.with_suffix(".json"), meta, indent=2)


def load_params(path: str | os.PathLike) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return jax.tree.map(jnp.asarray, unflatten_tree({k: data[k] for k in data.files}))


def cache_key(settings: dict) -> str:
    """Stable hash of the settings that determine a trained base model."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def data_digest(*arrays: np.ndarray) -> str:
    """SHA-256 of arrays' dtypes, shapes and bytes: identifies the training data itself."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


class CheckpointError(CoblaxError):
    """A checkpoint that cannot be used: unreadable, for other settings, other shapes, or not finite."""


def load_checkpoint(path: str | os.PathLike, like: Any, meta: dict | None = None) -> Any:
    """Load ``path`` and check it against ``like`` (the params it must replace).

    Args:
      path: an ``.npz`` written by :func:`save_params`.
      like: a params tree (arrays or ``jax.ShapeDtypeStruct``) giving the expected
        structure, shapes and dtypes.
      meta: if given, the side file ``path.json`` must hold these items.
    Returns:
      The params (jax arrays).
    Raises:
      CheckpointError: with the reason; never anything else for a damaged file.
    """
    path = Path(path)
    try:
        loaded = load_params(path)
    except Exception as err:  # noqa: BLE001 - a damaged zip fails in many ways; all mean "unreadable"
        raise CheckpointError(f"{path} is unreadable ({type(err).__name__}: {err})") from None
    if meta is not None:
        side = path.with_suffix(".json")
        try:
            stored = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{side} is missing or unreadable ({type(err).__name__})") from None
        expected = json.loads(json.dumps(meta, sort_keys=True, default=str))
        if not isinstance(stored, dict) or any(stored.get(k) != v for k, v in expected.items()):
            raise CheckpointError(f"{path} was written for other settings or data")
    want = jax.tree_util.tree_flatten_with_path(like)
    got = jax.tree_util.tree_flatten_with_path(loaded)
    if want[1] != got[1]:
        raise CheckpointError(f"{path} holds other parameters than the model has")
    for (key, a), (_, b) in zip(want[0], got[0]):
        if tuple(np.shape(a)) != tuple(np.shape(b)) or np.dtype(a.dtype) != np.dtype(b.dtype):
            raise CheckpointError(
                f"{path}: {jax.tree_util.keystr(key)} is {np.dtype(b.dtype).name}{tuple(np.shape(b))}, "
                f"the model needs {np.dtype(a.dtype).name}{tuple(np.shape(a))}"
            )
    if not tree_all_finite(loaded):
        raise CheckpointError(f"{path} holds non-finite weights")
    return loaded


__all__ += ["cache_key", "data_digest", "CheckpointError", "load_checkpoint"]
