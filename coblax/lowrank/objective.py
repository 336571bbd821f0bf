"""COBLA's objective E(m): the network's mean cross-entropy as a function of the masks.

One ``jax.jit(jax.value_and_grad(E))`` is compiled per problem; the data subset is
split into equal batches and scanned inside the jitted function, so SLSQP's every
call is one dispatch with no recompilation (tested).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from coblax.lowrank.decompose import Factors, factored_apply

__all__ = ["NetworkLoss"]


def _batch_stack(x: np.ndarray, y: np.ndarray, batch_size: int):
    """(nb, bs, ...) stacks with zero-weight padding so every batch has one shape."""
    n = len(x)
    bs = min(batch_size, n)
    nb = -(-n // bs)
    pad = nb * bs - n
    w = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
    yp = np.concatenate([y, np.zeros(pad, y.dtype)]) if pad else y
    return (
        jnp.asarray(xp.reshape((nb, bs) + x.shape[1:])),
        jnp.asarray(yp.reshape(nb, bs)),
        jnp.asarray(w.reshape(nb, bs)),
    )


class NetworkLoss:
    """A :class:`~coblax.lowrank.allocation.LossOracle` over a Flax model.

    Args:
      model, params: the original network.
      factors: layer name -> full SVD :class:`Factors`, in the problem's layer order.
      objective_data: (x, y) of the fixed objective subset of the training data.
      validation_data: (x, y) held out from the training data for picking roundings.
      batch_size: batch size inside the scan (memory vs. speed).
      apply_kwargs: keyword arguments of ``model.apply`` that put the network in
        eval mode (e.g. ``{"train": False}``): E(m) is measured with BatchNorm's
        running statistics and without dropout; ``params`` holds every collection.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Any,
        factors: Mapping[str, Factors],
        objective_data: tuple[np.ndarray, np.ndarray],
        validation_data: tuple[np.ndarray, np.ndarray] | None = None,
        batch_size: int = 250,
        apply_kwargs: Mapping[str, Any] | None = None,
    ):
        self.names: Sequence[str] = list(factors)
        self.sizes = [int(factors[n].sigma.shape[0]) for n in self.names]
        self.dtype = jnp.asarray(next(iter(factors.values())).sigma).dtype
        self._params = params
        self._factors = dict(factors)
        self._obj = _batch_stack(*objective_data, batch_size)
        self._val = _batch_stack(*validation_data, batch_size) if validation_data else None
        splits = np.cumsum(self.sizes)[:-1].tolist()
        apply_kwargs = dict(apply_kwargs or {})

        def loss(m, params, factors, xs, ys, ws):
            blocks = jnp.split(m.astype(self.dtype), splits)
            scales = {n: b * factors[n].sigma for n, b in zip(self.names, blocks)}

            def body(total, batch):
                xb, yb, wb = batch
                logits = factored_apply(model, params, factors, xb, scales, **apply_kwargs)
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
                return total + jnp.sum(ce * wb), None

            total, _ = lax.scan(body, jnp.zeros((), self.dtype), (xs, ys, ws))
            return total / jnp.sum(ws)

        self._value_and_grad = jax.jit(jax.value_and_grad(loss))
        self._value = jax.jit(loss)

    @property
    def size(self) -> int:
        return int(sum(self.sizes))

    def value_and_grad(self, m: np.ndarray) -> tuple[float, np.ndarray]:
        """E(m) and ∂E/∂m on the objective subset (float, float64 vector)."""
        value, grad = self._value_and_grad(jnp.asarray(m, self.dtype), self._params, self._factors, *self._obj)
        return float(value), np.asarray(grad, dtype=np.float64)

    def value(self, m: np.ndarray) -> float:
        return float(self._value(jnp.asarray(m, self.dtype), self._params, self._factors, *self._obj))

    def validation_loss(self, m: np.ndarray) -> float:
        """E(m) on the validation split (falls back to the objective subset)."""
        data = self._val if self._val is not None else self._obj
        return float(self._value(jnp.asarray(m, self.dtype), self._params, self._factors, *data))

    def compiled_count(self) -> int:
        """Number of compiled variants of the value-and-grad callback (should stay 1)."""
        return int(self._value_and_grad._cache_size())
