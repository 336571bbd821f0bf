"""BatchNorm recalibration for flax.nnx models: :mod:`coblax.nn.bn`'s "adaptive BN" on an nnx module.

The estimate is the linen one's: every ``nnx.BatchNorm`` normalizes by its batch's own
statistics (training-mode behaviour, so each later layer sees what it would see in
training), and its running mean and variance become the averages over N batches of
the batch mean and biased batch variance,

    mu_hat = 1/N sum_b mean_b(x),   var_hat = 1/N sum_b var_b(x).

How: each BatchNorm is called with ``use_running_average=False`` and momentum 0, so
that after the call its stored statistics are exactly the batch's, computed by flax's
own code (dtype promotion, ``use_fast_variance``); they are read and averaged. The
call is redirected at the class (``nnx.BatchNorm.__call__``) for the duration of the
estimate, because a model may pass ``use_running_average`` at the call site
(``self.bn(x, use_running_average=not train)``), which an attribute set on the
instance would not override. Everything else runs in eval mode (``Module.eval()``):
no dropout is drawn and no other variable changes. A BatchNorm called several times
(shared) averages its calls, as in linen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from coblax.nn.bn import check_batches, draw_batches, resolve_batches

__all__ = ["batch_norms", "recalibrate_bn_nnx", "resolve_batches_nnx"]


def batch_norms(model: nnx.Module) -> list[nnx.BatchNorm]:
    """Every ``nnx.BatchNorm`` of ``model`` (each once, in graph order)."""
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.BatchNorm)]


def resolve_batches_nnx(value: Any, model: nnx.Module, key: str = "recalibrate_bn") -> int:
    """``value`` as a number of batches: ``"auto"`` is :data:`~coblax.nn.bn.AUTO_BATCHES` where
    ``model`` has a BatchNorm and 0 elsewhere (the linen rule, :func:`coblax.nn.bn.resolve_batches`)."""
    return resolve_batches(value, None, key, has_statistics=bool(batch_norms(model)))


@contextlib.contextmanager
def _batch_statistics_calls(norms: list[nnx.BatchNorm], seen: dict[int, list]) -> Iterator[None]:
    """Within the context, the BatchNorms in ``norms`` normalize by batch statistics and record them."""
    ours = {id(bn) for bn in norms}
    original = nnx.BatchNorm.__call__

    def call(self, x, use_running_average=None, *, mask=None):
        if id(self) not in ours:
            return original(self, x, use_running_average, mask=mask)
        momentum = self.momentum
        self.momentum = 0.0  # the stored statistics become exactly this batch's
        try:
            out = original(self, x, False, mask=mask)
        finally:
            self.momentum = momentum
        seen.setdefault(id(self), []).append((np.asarray(self.mean[...], np.float64),
                                              np.asarray(self.var[...], np.float64)))
        return out

    nnx.BatchNorm.__call__ = call
    try:
        yield
    finally:
        nnx.BatchNorm.__call__ = original


def recalibrate_bn_nnx(
    model: nnx.Module,
    x: np.ndarray,
    *,
    batches: int,
    batch_size: int = 128,
    seed: int = 0,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> nnx.Module:
    """A copy of ``model`` (eval mode) with every BatchNorm's running statistics re-estimated on ``x``.

    Args:
      model: any nnx module; not changed.
      x: training inputs.
      batches: N (0, or a model without BatchNorm, returns ``model`` itself).
      batch_size, seed: the batch draw, :func:`coblax.nn.bn.batch_statistics`'s: batches
        without replacement from a permutation seeded by ``seed``, as many full ones as fit.
      apply_kwargs: keyword arguments of the model's call in eval mode.
    Returns:
      The copy, its BatchNorms' ``mean`` / ``var`` replaced (dtype kept), nothing else changed.
    """
    batches = check_batches(batches, "batches")
    if batches == 0 or not batch_norms(model):
        return model
    copy = nnx.clone(model)
    copy.eval()
    norms = batch_norms(copy)
    dtypes = {id(bn): (bn.mean[...].dtype, bn.var[...].dtype) for bn in norms}  # the calls may promote them
    calls: dict[int, list] = {}
    totals: dict[int, list] = {}
    chosen = draw_batches(len(x), batches, batch_size, seed)
    kwargs = dict(apply_kwargs or {})
    with _batch_statistics_calls(norms, calls):
        for idx in chosen:
            calls.clear()
            copy(jnp.asarray(x[idx]), **kwargs)
            for key, moments in calls.items():  # a shared BatchNorm: the mean of its calls
                mean = sum(m for m, _ in moments) / len(moments)
                var = sum(v for _, v in moments) / len(moments)
                acc = totals.setdefault(key, [0.0, 0.0])
                acc[0], acc[1] = acc[0] + mean, acc[1] + var
    for bn in norms:  # a BatchNorm the network never called was never touched: it keeps its statistics
        if id(bn) in totals:
            bn.mean[...] = jnp.asarray(totals[id(bn)][0] / len(chosen), dtypes[id(bn)][0])
            bn.var[...] = jnp.asarray(totals[id(bn)][1] / len(chosen), dtypes[id(bn)][1])
    return copy
