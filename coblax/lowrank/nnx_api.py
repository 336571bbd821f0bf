"""``allocate`` / ``finetune`` for flax.nnx models (reached from :mod:`coblax.lowrank.api`).

    result = allocate(model, (x, y), rules=[("conv.*", "tai"), ("fc.*", "dense")], mac=0.5, param=0.5)
    logits = result.model(x)                                    # the factored nnx module
    result = finetune(result, x_train, y_train, epochs=2)       # nnx.Optimizer (optax)

The nnx model is described by the same :class:`~coblax.lowrank.decompose.TracedLayer` s,
factors, cost vectors and allocation problem as a linen model
(:mod:`coblax.lowrank.nnx_adapter` traces it), so every allocator, the rules, the
budgets and their errors are the linen path's. What differs is what comes back:
``result.model`` is an nnx module whose selected layers are
:class:`~coblax.lowrank.nnx_adapter.Factored` (two plain nnx layers each),
``result.variables`` its ``nnx.State`` (every variable type), and ``result.apply_fn``
``nnx.merge(graphdef, variables)(x, **kwargs)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coblax.lowrank.allocation import Allocation
from coblax.lowrank.api import (
    Compressed,
    budget_problem,
    compressed_result,
    needs_loss,
    resolve_method,
    run_allocator,
    select_layers,
    table_schemes,
)
from coblax.lowrank.costs import network_cost
from coblax.lowrank.decompose import SCHEMES, Factors, factorize
from coblax.lowrank.factored import truncate_allocation
from coblax.lowrank.latency_api import float_dtype
from coblax.lowrank.latency_check import check_latency, network_measure
from coblax.lowrank.latency_measure import latency_model
from coblax.lowrank.nnx_adapter import (
    build_factored,
    factored_calls,
    find_layers,
    hooked_copy,
    is_nnx_module,
    trace_nnx,
)
from coblax.lowrank.objective import NetworkLoss, batch_stack, masked_metrics
from coblax.lowrank.slicing import refuse_sliced
from coblax.nn.bn import AUTO
from coblax.nn.bn_nnx import recalibrate_bn_nnx, resolve_batches_nnx
from coblax.nn.train_nnx import NnxApply, fit_nnx

__all__ = ["NnxNetworkLoss", "allocate_nnx", "check_model_args", "finetune_nnx"]


def _is_pair(obj: Any) -> bool:
    return isinstance(obj, (tuple, list)) and len(obj) == 2


def check_model_args(model: Any, variables: Any, data: Any) -> tuple[Any, Any]:
    """(variables, data) for ``allocate``; ``variables`` is None for an nnx model.

    An nnx model carries its state: ``allocate(model, (x, y), ...)`` (or
    ``data=(x, y)``). A linen model needs its variables:
    ``allocate(model, variables, (x, y), ...)``.

    Raises:
      ValueError: naming ``variables`` (given for an nnx model, missing for a linen
        one) or ``data`` (missing).
    """
    if is_nnx_module(model):
        if data is None:
            if not _is_pair(variables):
                raise ValueError("data: an nnx model is allocated as allocate(model, (x, y), ...); "
                                 f"got {type(variables).__name__} where (x, y) belongs")
            return None, variables
        if variables is not None:
            raise ValueError(f"variables: {type(model).__name__} is a flax.nnx module, which carries its own "
                             "state; call allocate(model, (x, y), ...) without variables")
        return None, data
    if isinstance(model, nn.Module) and (data is None or variables is None):
        raise ValueError(f"variables: {type(model).__name__} is a flax.linen module, which needs its variables: "
                         "allocate(model, variables, (x, y), ...)")
    if data is None:
        raise ValueError("data: missing; allocate(model, variables, (x, y), ...)")
    return variables, data


class NnxNetworkLoss(NetworkLoss):
    """COBLA's objective E(m) over an nnx model: :class:`~coblax.lowrank.objective.NetworkLoss`'s
    oracle (same batching, same one compiled value-and-grad, same methods) with the
    masked network run by :func:`~coblax.lowrank.nnx_adapter.factored_calls`.

    Args:
      model: the original nnx model (copied, not changed).
      factors: layer name -> full SVD :class:`Factors`, in the problem's layer order.
      objective_data, validation_data, batch_size: as ``NetworkLoss``.
      apply_kwargs: keyword arguments of the model's call in eval mode (the copy is
        also put in eval mode with ``Module.eval()``).
    """

    def __init__(
        self,
        model: nnx.Module,
        factors: Mapping[str, Factors],
        objective_data: tuple[np.ndarray, np.ndarray],
        validation_data: tuple[np.ndarray, np.ndarray] | None = None,
        batch_size: int = 250,
        apply_kwargs: Mapping[str, Any] | None = None,
    ):
        self.names = list(factors)
        self.sizes = [int(factors[n].sigma.shape[0]) for n in self.names]
        self.dtype = jnp.asarray(next(iter(factors.values())).sigma).dtype
        self.mesh = None
        graphdef, self._params = nnx.split(hooked_copy(model, self.names))
        self._factors = dict(factors)
        self._obj = batch_stack(*objective_data, batch_size)
        self._val = batch_stack(*validation_data, batch_size) if validation_data else None
        splits = np.cumsum(self.sizes)[:-1].tolist()
        kwargs = dict(apply_kwargs or {})

        def logits(state, factors, xb, scales):
            with factored_calls(factors, scales):
                return nnx.merge(graphdef, state)(xb, **kwargs)

        self._compile(masked_metrics(logits, self.names, splits, self.dtype))


def allocate_nnx(
    model: nnx.Module,
    objective_data: tuple[np.ndarray, np.ndarray],
    *,
    rules,
    mac: float,
    param: float,
    method: Any = "cobla",
    basis: str = "decomposed",
    validation_data: tuple[np.ndarray, np.ndarray] | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    min_rank: int = 1,
    batch_size: int = 250,
    rank_multiple: int = 1,
    method_options: Mapping[str, Any] | None = None,
    latency: float | None = None,
    latency_batch: int = 64,
    latency_tables: Any = None,
    latency_checks: int = 0,
    recalibrate_bn: int | str = AUTO,
) -> Compressed:
    """:func:`coblax.allocate` for an nnx model (see there for the arguments).

    Returns a :class:`~coblax.lowrank.api.Compressed` whose ``model`` is the factored
    nnx module (eval mode), ``variables`` its ``nnx.State`` and ``apply_fn`` an
    :class:`~coblax.nn.train_nnx.NnxApply`; ``model`` is not changed. With
    ``recalibrate_bn = N`` its BatchNorm statistics are re-estimated on N batches of the
    objective data (:func:`coblax.nn.bn_nnx.recalibrate_bn_nnx`; ``"auto"``: 20 where it
    has a BatchNorm).
    """
    recalibrate_bn = resolve_batches_nnx(recalibrate_bn, model)
    apply_kwargs = dict(apply_kwargs or {})
    x_obj = np.asarray(objective_data[0])
    traced = trace_nnx(model, x_obj[:1], apply_kwargs)
    schemes = select_layers(traced, rules)
    if not schemes:
        raise ValueError("the rules select no layer to decompose")
    refuse_sliced(schemes, "a flax.nnx model")
    by_name = {layer.name: layer for layer in traced}
    layers = find_layers(model)
    full = {
        name: factorize(layers[name].kernel[...], by_name[name], scheme if scheme in SCHEMES else SCHEMES[0])
        for name, scheme in schemes.items()
    }
    net = network_cost(traced, {"params": nnx.state(model, nnx.Param)},
                       {n: np.asarray(f.sigma) for n, f in full.items()}, {n: f.scheme for n, f in full.items()})
    timing = None
    if latency is not None:  # per-layer tables and the network's time (coblax.lowrank.latency_measure)
        graphdef, state = nnx.split(hooked_copy(model, ()))  # an eval-mode copy, no layer hooked

        def apply(state, x):
            return nnx.merge(graphdef, state)(x, **apply_kwargs)

        def factored(ranks):  # the in-network calibration's networks (coblax.lowrank.latency_measure)
            kept, _ = truncate_allocation(net, full, Allocation(ranks=dict(ranks)))
            g, st = nnx.split(build_factored(model, kept))
            return (lambda s, x: nnx.merge(g, s)(x, **apply_kwargs)), st

        timing = latency_model(apply, state, x_obj, traced, net.layers, table_schemes(full),
                               batch=latency_batch, tables=latency_tables, factored=factored)
    problem, k = budget_problem(net, mac, param, basis, min_rank, rank_multiple, seed, latency, timing)
    net = dataclasses.replace(net, layers=problem.layers)  # with their tables: "original" includes "not faster"
    allocator = resolve_method(method, method_options)
    if needs_loss(allocator):  # the objective copies the data to the device and compiles: only when read
        loss = NnxNetworkLoss(model, full, (x_obj, np.asarray(objective_data[1])),
                              None if validation_data is None else tuple(np.asarray(a) for a in validation_data),
                              batch_size=batch_size, apply_kwargs=apply_kwargs)
        problem = dataclasses.replace(problem, loss=loss)
    allocation = run_allocator(allocator, problem, k, timing)
    if timing is not None and latency_checks:  # measured end to end (coblax.lowrank.latency_check)
        measure = network_measure((apply, state), factored, x_obj.shape[1:], timing.batch, dtype=float_dtype(x_obj))
        allocation = check_latency(allocation, problem, lambda p: run_allocator(allocator, p, k, timing), timing,
                                   latency, measure, checks=latency_checks)
    kept, ranks = truncate_allocation(net, full, allocation)
    factored = recalibrate_bn_nnx(build_factored(model, kept), x_obj, batches=recalibrate_bn,
                                  batch_size=batch_size, seed=seed, apply_kwargs=apply_kwargs)
    graphdef, variables = nnx.split(factored)
    return compressed_result(factored, variables, NnxApply(graphdef), net, kept, ranks, allocation, schemes,
                             apply_kwargs, basis, allocator.name)


def finetune_nnx(
    result: Compressed,
    x: np.ndarray,
    y: np.ndarray,
    *,
    train_kwargs: Mapping[str, Any] | None = None,
    epochs: int = 1,
    batch_size: int = 64,
    learning_rate: float = 1e-4,
    optimizer: str = "adam",
    seed: int = 0,
    progress: bool = False,
    recalibrate_bn: int | str = AUTO,
) -> Compressed:
    """:func:`coblax.finetune` for an nnx result: :func:`~coblax.nn.train_nnx.fit_nnx`
    (``nnx.Optimizer``) on the network ``result.apply_fn`` / ``result.variables`` describe.

    Every ``nnx.Param`` is trained (factors and the rest); BatchNorm statistics and every
    other variable are updated by the model in training mode; dropout draws from the
    model's own ``Rngs``. ``recalibrate_bn = N`` then re-estimates the BatchNorm
    statistics on N batches of ``x`` (``"auto"``: 20 where it has a BatchNorm), as the
    linen path does. Returns the result with the new module, state and apply_fn.
    """
    start = nnx.merge(result.apply_fn.graphdef, result.variables)
    recalibrate_bn = resolve_batches_nnx(recalibrate_bn, start)
    model = fit_nnx(start, x, y, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                    optimizer=optimizer, seed=seed, train_kwargs=train_kwargs,
                    desc=f"finetune {result.method}", progress=progress)
    model = recalibrate_bn_nnx(model, np.asarray(x), batches=recalibrate_bn, batch_size=batch_size, seed=seed,
                               apply_kwargs=result.apply_kwargs)
    graphdef, variables = nnx.split(model)
    return dataclasses.replace(result, model=model, variables=variables, apply_fn=NnxApply(graphdef))
