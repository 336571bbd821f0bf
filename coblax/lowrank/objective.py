"""COBLA's objective E(m): the network's mean cross-entropy as a function of the masks.

One ``jax.jit(jax.value_and_grad(E))`` is compiled per problem; the data subset is
split into equal batches and scanned inside the jitted function, so the solver's
every call is one dispatch with no recompilation (tested).

Data parallelism (``data_parallel=True``): the objective subset is sharded along
the within-batch axis over a 1-D mesh of all devices (``jax.sharding.Mesh`` with
axis ``"batch"``, ``NamedSharding(mesh, P(None, "batch"))``); m, the parameters and
the factors are replicated. The jitted function is the same SPMD program: XLA
partitions each scanned batch across the devices and inserts the all-reduce of
the loss sum and of ∂E/∂m, so E and its gradient equal the one-device values up
to summation order (tested under ``--xla_force_host_platform_device_count=2``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from coblax.lowrank.decompose import Factors, factored_apply

__all__ = ["NetworkLoss", "batch_stack", "masked_metrics"]


def batch_stack(x: np.ndarray, y: np.ndarray, batch_size: int, mesh: Mesh | None = None):
    """(nb, bs, ...) stacks with zero-weight padding so every batch has one shape.

    The number of batches is ceil(n / batch_size) and the batches are as even as
    possible (bs = ceil(n / nb) ≤ batch_size), so the padding is below nb rows
    (600 examples at batch_size 250: 3 × 200, not 3 × 250 with 150 padded rows).
    With a ``mesh`` the batch size is rounded up to a multiple of its size and the
    stacks are sharded along the batch axis (axis 1).
    """
    n = len(x)
    nb = -(-n // max(1, min(batch_size, n)))
    bs = -(-n // nb)
    if mesh is not None:
        k = mesh.devices.size
        bs = -(-bs // k) * k
    nb = -(-n // bs)
    pad = nb * bs - n
    w = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
    yp = np.concatenate([y, np.zeros(pad, y.dtype)]) if pad else y
    stacks = (xp.reshape((nb, bs) + x.shape[1:]), yp.reshape(nb, bs), w.reshape(nb, bs))
    if mesh is None:
        return tuple(jnp.asarray(a) for a in stacks)
    sharding = NamedSharding(mesh, PartitionSpec(None, "batch"))
    # from a callback so that a multi-process mesh (TPU slice, several hosts) works too
    return tuple(jax.make_array_from_callback(a.shape, sharding, lambda idx, a=a: a[idx]) for a in stacks)


def masked_metrics(logits: Callable, names: Sequence[str], splits: Sequence[int], dtype: Any) -> Callable:
    """``metrics(m, params, factors, xs, ys, ws)``: (mean cross-entropy, accuracy) of the
    masked network on the stacked batches, the masks m split per layer at ``splits`` and
    scaled by σ; ``logits(params, factors, xb, scales)`` runs the network (linen or nnx)."""

    def metrics(m, params, factors, xs, ys, ws):
        blocks = jnp.split(m.astype(dtype), splits)
        scales = {n: b * factors[n].sigma for n, b in zip(names, blocks)}

        def body(carry, batch):
            xb, yb, wb = batch
            out = logits(params, factors, xb, scales)
            ce = optax.softmax_cross_entropy_with_integer_labels(out, yb)
            hit = (jnp.argmax(out, -1) == yb).astype(dtype)
            return (carry[0] + jnp.sum(ce * wb), carry[1] + jnp.sum(hit * wb)), None

        zero = jnp.zeros((), dtype)
        (total, hits), _ = lax.scan(body, (zero, zero), (xs, ys, ws))
        return total / jnp.sum(ws), hits / jnp.sum(ws)

    return metrics


class NetworkLoss:
    """A :class:`~coblax.lowrank.allocation.LossOracle` over a Flax model.

    Args:
      model, params: the original network.
      factors: layer name -> full SVD :class:`Factors`, in the problem's layer order.
      objective_data: (x, y) of the fixed objective subset of the training data.
      validation_data: (x, y) held out from the training data for picking roundings.
      batch_size: batch size inside the scan (memory vs. speed).
      data_parallel: shard the objective (and validation) subset over all devices
        (``jax.devices()``) along the batch axis; E and ∂E/∂m are unchanged.
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
        data_parallel: bool = False,
        apply_kwargs: Mapping[str, Any] | None = None,
    ):
        self.names: Sequence[str] = list(factors)
        self.sizes = [int(factors[n].sigma.shape[0]) for n in self.names]
        self.dtype = jnp.asarray(next(iter(factors.values())).sigma).dtype
        self.mesh = Mesh(np.array(jax.devices()), ("batch",)) if data_parallel else None
        self._params = params
        self._factors = dict(factors)
        if self.mesh is not None:
            replicated = NamedSharding(self.mesh, PartitionSpec())
            self._params, self._factors = jax.device_put((params, self._factors), replicated)
        self._obj = batch_stack(*objective_data, batch_size, self.mesh)
        self._val = batch_stack(*validation_data, batch_size, self.mesh) if validation_data else None
        splits = np.cumsum(self.sizes)[:-1].tolist()
        apply_kwargs = dict(apply_kwargs or {})

        def logits(params, factors, xb, scales):
            return factored_apply(model, params, factors, xb, scales, **apply_kwargs)

        self._compile(masked_metrics(logits, self.names, splits, self.dtype))

    def _compile(self, metrics: Callable) -> None:
        """The jitted value-and-grad, value and metrics of ``metrics(m, params, factors, xs, ys, ws)``."""

        def loss(m, params, factors, xs, ys, ws):
            return metrics(m, params, factors, xs, ys, ws)[0]

        self._value_and_grad = jax.jit(jax.value_and_grad(loss))
        self._value = jax.jit(loss)
        self._metrics = jax.jit(metrics)

    @property
    def size(self) -> int:
        return int(sum(self.sizes))

    def value_and_grad(self, m: np.ndarray) -> tuple[float, np.ndarray]:
        """E(m) and ∂E/∂m on the objective subset (float, float64 vector).

        The float64 NumPy boundary the solvers see: one host-to-device copy of m,
        one dispatch of the compiled function, one device-to-host copy of both
        results (``benchmarks/bench_callbacks.py`` measures its overhead).
        """
        out = self._value_and_grad(jnp.asarray(m, self.dtype), self._params, self._factors, *self._obj)
        value, grad = jax.device_get(out)
        return float(value), np.asarray(grad, dtype=np.float64)

    def device_value_and_grad(self, m: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The bare jitted value-and-grad on device-resident m (no host transfers)."""
        return self._value_and_grad(m, self._params, self._factors, *self._obj)

    def value(self, m: np.ndarray) -> float:
        return float(self._value(jnp.asarray(m, self.dtype), self._params, self._factors, *self._obj))

    def validation_loss(self, m: np.ndarray) -> float:
        """E(m) on the validation split (falls back to the objective subset)."""
        data = self._val if self._val is not None else self._obj
        return float(self._value(jnp.asarray(m, self.dtype), self._params, self._factors, *data))

    def validation_metrics(self, m: np.ndarray) -> tuple[float, float]:
        """(cross-entropy, accuracy) on the validation split (falls back to the objective subset)."""
        data = self._val if self._val is not None else self._obj
        loss, acc = self._metrics(jnp.asarray(m, self.dtype), self._params, self._factors, *data)
        return float(loss), float(acc)

    def compiled_count(self) -> int:
        """Number of compiled variants of the value-and-grad callback (should stay 1)."""
        return int(self._value_and_grad._cache_size())
