"""Training and evaluating flax.nnx models: ``nnx.Optimizer`` (optax) on a functional step.

The loop is :func:`coblax.nn.train.fit` 's: the same shuffling from ``seed``, the same
optimizers by name, the same per-epoch loss watch (a non-finite or diverging loss
raises :class:`~coblax.util.errors.NumericalError` naming the stage and step) and
the same check that the final weights are finite. The step is one ``jax.jit`` of
``nnx.merge`` → ``nnx.value_and_grad`` → ``Optimizer.update`` → ``nnx.split``, the
pattern the Flax documentation recommends for speed: the graph is traversed at trace
time only. Every ``nnx.Param`` is trained; every other variable (``BatchStat`` of
BatchNorm, the ``Rngs`` of Dropout, a model's own variable types) is state the model
updates in training mode and that is carried from step to step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from coblax.nn.train import LossWatch, cross_entropy, evaluate, make_optimizer, tree_all_finite
from coblax.util.errors import NumericalError

__all__ = ["NnxApply", "eval_apply", "evaluate_nnx", "fit_nnx"]


@dataclasses.dataclass(frozen=True)
class NnxApply:
    """``apply_fn(variables, x, **kwargs)`` of an nnx network: ``nnx.merge(graphdef, variables)(x)``.

    Hashable by value (the graph definition), so :func:`coblax.nn.train.predict`
    compiles once per network structure. ``variables`` is the network's
    ``nnx.State`` (every variable type); nothing is mutated.
    """

    graphdef: Any

    def __call__(self, variables: Any, x: Any, **kwargs: Any) -> Any:
        return nnx.merge(self.graphdef, variables)(x, **kwargs)


def fit_nnx(
    model: nnx.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    optimizer: str | optax.GradientTransformation = "adam",
    seed: int = 0,
    train_kwargs: Mapping[str, Any] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> nnx.Module:
    """Minibatch training of an nnx model with ``nnx.Optimizer``; deterministic under ``seed``.

    Args:
      model: the network; not changed (a trained copy is returned).
      x, y: training examples and integer labels.
      epochs, batch_size, learning_rate, optimizer, seed: as :func:`coblax.nn.train.fit`.
      train_kwargs: keyword arguments of the model's call in training mode; the copy is
        also put in training mode with ``Module.train()`` (BatchNorm batch statistics,
        dropout on, drawing from the model's own ``Rngs``).
      desc, progress: progress-bar label (also names the stage in errors) and switch.

    Returns:
      The trained copy, in eval mode (``Module.eval()``).

    Raises:
      NumericalError: a non-finite or diverging loss, or non-finite weights at the end.
    """
    model = nnx.clone(model)
    if epochs <= 0:
        model.eval()
        return model
    kwargs = dict(train_kwargs or {})
    model.train()
    tx = make_optimizer(optimizer, learning_rate) if isinstance(optimizer, str) else optimizer
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))

    @jax.jit
    def step(state, xb, yb):
        net, opt = nnx.merge(graphdef, state)

        def objective(net):
            return cross_entropy(net(xb, **kwargs), yb)

        loss, grads = nnx.value_and_grad(objective)(net)
        opt.update(net, grads)
        return nnx.split((net, opt))[1], loss

    n = len(x)
    batch_size = min(batch_size, n)
    steps_per_epoch = max(1, n // batch_size)
    rng = np.random.default_rng(seed)
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not progress, leave=False)
    watch = LossWatch(desc, bar)
    for _ in range(epochs):
        order = rng.permutation(n)
        losses = []
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            state, loss = step(state, x[idx], y[idx])
            losses.append(loss)
            bar.update(1)
        watch.epoch(losses)  # one transfer per epoch; raises NumericalError
        bar.set_postfix(loss=f"{float(loss):.4f}")
    bar.close()
    model, _ = nnx.merge(graphdef, state)
    if not tree_all_finite(nnx.state(model, nnx.Param)):
        raise NumericalError(desc, watch.steps, float("nan"), "the weights are not finite at the end")
    model.eval()
    return model


def eval_apply(model: nnx.Module) -> tuple[Any, Any]:
    """(``apply_fn``, ``variables``) of an eval-mode copy of ``model``, for
    :func:`coblax.nn.train.evaluate` / ``predict``."""
    copy = nnx.clone(model)
    copy.eval()
    graphdef, state = nnx.split(copy)
    return NnxApply(graphdef), state


def evaluate_nnx(model: nnx.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1000, **call_kwargs: Any
                 ) -> float:
    """Top-1 accuracy of an nnx model in eval mode (``call_kwargs`` go to its call)."""
    apply, state = eval_apply(model)
    fn = apply if not call_kwargs else _Bound(apply, tuple(sorted(call_kwargs.items())))
    return evaluate(fn, state, x, y, batch_size)


class _Bound:
    """``apply`` with fixed call keyword arguments, hashable (one compilation per network)."""

    def __init__(self, apply: Any, kwargs: tuple):
        self.apply, self.kwargs = apply, kwargs

    def __hash__(self) -> int:
        return hash((self.apply, self.kwargs))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Bound) and (self.apply, self.kwargs) == (other.apply, other.kwargs)

    def __call__(self, variables: Any, x: Any) -> Any:
        return self.apply(variables, x, **dict(self.kwargs))
