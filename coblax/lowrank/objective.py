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

BatchNorm statistics (``bn_stats``, issue 18). Truncating layers changes what every
later BatchNorm sees, so the original network's running statistics are stale at
any m (EagleEye, Li et al., ECCV 2020, Sec. 3.2). Three ways to normalize:

* ``"running"`` — eval mode with the stored running statistics (the original's);
* ``"batch"`` — each batch of the scan normalized by its own statistics, as in
  training: for a BatchNorm input x_b of batch b (zero-weight padding excluded)
  y = (x − μ_b)/√(σ²_b + ε)·γ + β with μ_b, σ²_b the batch mean and biased
  variance over every axis but the features (:func:`coblax.nn.bn.batch_moments`);
* ``"recalibrated"`` — two passes inside the one jitted function: the first runs
  the masked network at m over the objective subset in the ``"batch"`` way and
  averages each BatchNorm's batch moments over its batches, weighted by their
  examples, μ̂(m) = Σ_b n_b μ_b(m) / Σ_b n_b (likewise σ̂²), as
  :func:`coblax.nn.bn.recalibrate_bn` re-estimates running statistics; the second
  evaluates in eval mode with (μ̂(m), σ̂²(m)). ∂E/∂m flows through both passes.
  Validation metrics use the statistics re-estimated on the objective subset at
  the same m.

Both new modes call the model in its eval mode (``apply_kwargs``) and replace only
the BatchNorm calls (``flax.linen.intercept_methods``): dropout stays off whatever
the model's ``train`` flag also switches, and the running statistics are never
written. A model without BatchNorm gives the same E in all three modes (tested).
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
from coblax.nn.bn import batch_moments, has_batch_stats, override_batch_norm

__all__ = ["BN_STATS", "NetworkLoss", "batch_stack", "masked_metrics"]

BN_STATS = ("running", "batch", "recalibrated")


def check_bn_stats(value: Any, key: str = "bn_stats") -> str:
    """``value`` if it is one of :data:`BN_STATS`, else a ValueError naming ``key``."""
    if value not in BN_STATS:
        raise ValueError(f"{key} = {value!r}; valid: {', '.join(BN_STATS)}")
    return value


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


def masked_metrics(logits: Callable, names: Sequence[str], splits: Sequence[int], dtype: Any,
                   weighted: bool = False) -> Callable:
    """``metrics(m, params, factors, xs, ys, ws)``: (mean cross-entropy, accuracy) of the
    masked network on the stacked batches, the masks m split per layer at ``splits`` and
    scaled by σ; ``logits(params, factors, xb, scales)`` runs the network (linen or nnx),
    ``logits(params, factors, xb, scales, wb)`` with the batch's example weights when
    ``weighted``."""

    def metrics(m, params, factors, xs, ys, ws):
        blocks = jnp.split(m.astype(dtype), splits)
        scales = {n: b * factors[n].sigma for n, b in zip(names, blocks)}

        def body(carry, batch):
            xb, yb, wb = batch
            out = logits(params, factors, xb, scales, wb) if weighted else logits(params, factors, xb, scales)
            ce = optax.softmax_cross_entropy_with_integer_labels(out, yb)
            hit = (jnp.argmax(out, -1) == yb).astype(dtype)
            return (carry[0] + jnp.sum(ce * wb), carry[1] + jnp.sum(hit * wb)), None

        zero = jnp.zeros((), dtype)
        (total, hits), _ = lax.scan(body, (zero, zero), (xs, ys, ws))
        return total / jnp.sum(ws), hits / jnp.sum(ws)

    return metrics


def recalibrated_metrics(logits: Callable, names: Sequence[str], splits: Sequence[int], dtype: Any) -> Callable:
    """``metrics(m, params, factors, xs, ys, ws, sx, sw)``: :func:`masked_metrics` with every
    BatchNorm normalized by statistics re-estimated at m on the stacked batches (sx, sw).

    ``logits(params, factors, xb, scales)`` runs the masked network in eval mode; pass 1
    runs it with batch moments (zero-weight rows excluded) and averages each layer's
    moments over the batches weighted by their examples; pass 2 scans (xs, ys, ws)
    with those moments in place of the running statistics (see the module docstring).
    """

    def estimate(params, factors, scales, sx, sw):
        def body(_, batch):
            xb, wb = batch
            found: dict = {}
            with override_batch_norm(lambda mod, x: batch_moments(mod, x, wb), found):
                logits(params, factors, xb, scales)
            # a BatchNorm called several times (shared) averages its calls, as recalibrate_bn does
            per = {k: (sum(mu for mu, _ in v) / len(v), sum(var for _, var in v) / len(v)) for k, v in found.items()}
            return None, (per, jnp.sum(wb))

        _, (per, counts) = lax.scan(body, None, (sx, sw))
        total = jnp.sum(counts)
        return {k: (jnp.tensordot(counts.astype(mu.dtype), mu, 1) / total,
                    jnp.tensordot(counts.astype(var.dtype), var, 1) / total) for k, (mu, var) in per.items()}

    def metrics(m, params, factors, xs, ys, ws, sx, sw):
        blocks = jnp.split(m.astype(dtype), splits)
        scales = {n: b * factors[n].sigma for n, b in zip(names, blocks)}
        stats = estimate(params, factors, scales, sx, sw)

        def run(p, f, xb, s):
            with override_batch_norm(lambda mod, x: stats[tuple(mod.path)]):
                return logits(p, f, xb, s)

        inner = masked_metrics(lambda p, f, xb, s: run(p, f, xb, s), names, splits, dtype)
        return inner(m, params, factors, xs, ys, ws)

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
        eval mode (e.g. ``{"train": False}``): no dropout; ``params`` holds every collection.
      bn_stats: how BatchNorm normalizes, ``"running"`` (the stored statistics),
        ``"batch"`` or ``"recalibrated"`` (see the module docstring); E, its gradient
        and the validation metrics all use it.
    """

    bn_stats = "running"  # class defaults: subclasses (nnx) that build their own oracle
    model = None
    apply_kwargs: Mapping[str, Any] = {}
    objective_data = validation_data = None
    _stat_args: tuple = ()

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
        bn_stats: str = "running",
    ):
        self.bn_stats = check_bn_stats(bn_stats)
        self._init = dict(model=model, params=params, factors=factors, objective_data=objective_data,
                          validation_data=validation_data, batch_size=batch_size, data_parallel=data_parallel,
                          apply_kwargs=apply_kwargs)
        self._variants: dict[str, NetworkLoss] = {bn_stats: self}
        self.names: Sequence[str] = list(factors)
        self.sizes = [int(factors[n].sigma.shape[0]) for n in self.names]
        self.dtype = jnp.asarray(next(iter(factors.values())).sigma).dtype
        self.mesh = Mesh(np.array(jax.devices()), ("batch",)) if data_parallel else None
        self.model = model
        self.objective_data, self.validation_data = objective_data, validation_data
        self._params = params
        # BatchNorm statistics in the variables: what cobla's bn_stats = "auto" switches on
        self.has_batch_norm = has_batch_stats(params)
        self._factors = dict(factors)
        if self.mesh is not None:
            replicated = NamedSharding(self.mesh, PartitionSpec())
            self._params, self._factors = jax.device_put((params, self._factors), replicated)
        self._obj = batch_stack(*objective_data, batch_size, self.mesh)
        self._val = batch_stack(*validation_data, batch_size, self.mesh) if validation_data else None
        splits = np.cumsum(self.sizes)[:-1].tolist()
        apply_kwargs = self.apply_kwargs = dict(apply_kwargs or {})

        def logits(params, factors, xb, scales):
            return factored_apply(model, params, factors, xb, scales, **apply_kwargs)

        if self.bn_stats == "batch":
            def batch_logits(params, factors, xb, scales, wb):
                with override_batch_norm(lambda mod, x: batch_moments(mod, x, wb)):
                    return logits(params, factors, xb, scales)

            self._compile(masked_metrics(batch_logits, self.names, splits, self.dtype, weighted=True))
        elif self.bn_stats == "recalibrated":
            self._stat_args = (self._obj[0], self._obj[2])
            self._compile(recalibrated_metrics(logits, self.names, splits, self.dtype), statistics=True)
        else:
            self._compile(masked_metrics(logits, self.names, splits, self.dtype))

    def _compile(self, metrics: Callable, statistics: bool = False) -> None:
        """The jitted value-and-grad, value and metrics of ``metrics(m, params, factors, xs, ys, ws)``
        (``statistics``: ``metrics(..., sx, sw)`` also takes the batches its BatchNorm statistics
        come from; E takes them from its own batches)."""

        def loss(m, params, factors, xs, ys, ws):
            if statistics:
                return metrics(m, params, factors, xs, ys, ws, xs, ws)[0]
            return metrics(m, params, factors, xs, ys, ws)[0]

        self._value_and_grad = jax.jit(jax.value_and_grad(loss))
        self._value = jax.jit(loss)
        self._metrics = jax.jit(metrics)

    def with_bn_stats(self, bn_stats: str) -> NetworkLoss:
        """This oracle with BatchNorm normalized the ``bn_stats`` way (built once per mode, then reused:
        the records that share an oracle share its compiled variants)."""
        check_bn_stats(bn_stats, "cobla bn_stats")
        if bn_stats == self.bn_stats:
            return self
        if not hasattr(self, "_init"):
            raise ValueError(f"cobla bn_stats = {bn_stats!r} needs a linen model's NetworkLoss; "
                             f"{type(self).__name__} evaluates only with the model's own statistics")
        if bn_stats not in self._variants:
            variant = NetworkLoss(**self._init, bn_stats=bn_stats)
            variant._variants = self._variants
            self._variants[bn_stats] = variant
        return self._variants[bn_stats]

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
        return self.validation_metrics(m)[0]

    def validation_metrics(self, m: np.ndarray) -> tuple[float, float]:
        """(cross-entropy, accuracy) on the validation split (falls back to the objective subset)."""
        data = self._val if self._val is not None else self._obj
        loss, acc = self._metrics(jnp.asarray(m, self.dtype), self._params, self._factors, *data, *self._stat_args)
        return float(loss), float(acc)

    def compiled_count(self) -> int:
        """Number of compiled variants of the value-and-grad callback (should stay 1)."""
        return int(self._value_and_grad._cache_size())
