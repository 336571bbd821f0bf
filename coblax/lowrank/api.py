"""``allocate``: one call from a user's own Flax model to a factored network.

    result = allocate(model, variables, (x, y), rules=[("conv.*", "tai"), ("fc.*", "dense")],
                      mac=0.5, param=0.5, method=coblax.allocators.cobla(max_iter=50),
                      apply_kwargs={"train": False})
    logits = result.apply(result.variables, x)          # eval mode
    result = finetune(result, x_train, y_train, train_kwargs={"train": True}, epochs=2)

The model's code is not edited: its ``nn.Dense`` / ``nn.Conv`` calls are found by
tracing (:func:`~coblax.lowrank.decompose.trace_layers`) and replaced at apply time
through ``flax.linen.intercept_methods``. Every variable collection is kept
(``batch_stats`` of BatchNorm, the model's own collections); only ``params`` count
as parameters. ``rules`` say which layers to decompose and how: an ordered list of
(regular expression, scheme); a layer's module path (``"block1/conv2"``) is tested
with ``re.fullmatch`` against each expression in turn, the first match wins, and
layers no rule matches keep their original form. Schemes:

* ``"dense"`` — an ``nn.Dense`` layer, W (in x out) factored directly;
* ``"tai"`` / ``"zhang"`` — an ``nn.Conv`` layer (see :mod:`coblax.lowrank.decompose`);
  an ``nn.Dense`` layer matched by them is factored as dense (it has one form);
* ``"alds:k"`` — an ``nn.Conv`` layer cut into k input-channel slices (ALDS): a
  grouped conv then a 1x1 conv, rank r kept in every slice (k must divide the
  layer's input channels; see :mod:`coblax.lowrank.decompose`);
* ``"skip"`` — keep the layer (e.g. depthwise convs before a catch-all rule).

Every registered allocator works through it: ``method="pos_exact"`` (a name of
``coblax methods``, options in ``method_options={...}``) or a configured allocator
object, ``method=coblax.allocators.pos_exact()`` (optax style; see
:mod:`coblax.allocators`). The allocator's options never share ``allocate``'s own
keywords (``seed``, ``batch_size``, ``min_rank``, ``basis``...).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

from coblax.lowrank.allocation import Allocation, AllocationProblem, Allocator, is_feasible
from coblax.lowrank.costs import NetworkCost, make_problem, network_cost
from coblax.lowrank.decompose import (
    SCHEMES,
    Factors,
    TracedLayer,
    apply_fn_for,
    check_slices,
    factorize,
    get_kernel,
    slice_count,
    slice_info,
    trace_layers,
)
from coblax.lowrank.factored import factored_variables, truncate_allocation
from coblax.lowrank.joint import trained_start
from coblax.lowrank.latency_api import (  # noqa: F401 - table_schemes, with_latency_stats: re-exported
    check_latency_arguments,
    factored_builder,
    float_dtype,
    latency_checks_for,
    table_schemes,
    with_latency_stats,
)
from coblax.lowrank.latency_check import check_latency, network_measure
from coblax.lowrank.latency_measure import latency_model
from coblax.lowrank.objective import NetworkLoss
from coblax.lowrank.rank_multiple import check_rank_multiple, multiple_floor, with_rank_multiple
from coblax.lowrank.registry import get_allocator
from coblax.lowrank.slicing import plan_slices, refuse_sliced
from coblax.lowrank.spectra import allocator_spectrum, whitened_factors
from coblax.lowrank.training import attach_trainer
from coblax.lowrank.validate import check_allocate_arguments, check_budget, check_finetune_arguments
from coblax.nn.bn import AUTO as _AUTO
from coblax.nn.bn import has_batch_stats, resolve_batches
from coblax.nn.bn import recalibrate_bn as _recalibrate
from coblax.nn.train import fit
from coblax.util.frozen import FrozenMap, frozen

__all__ = ["RULE_SCHEMES", "Compressed", "select_layers", "resolve_method", "needs_loss", "allocate", "finetune",
           "compressed_result"]

RULE_SCHEMES = ("dense", "tai", "zhang", "skip")


def select_layers(traced: Sequence[TracedLayer], rules: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Layer name -> scheme for the layers the rules decompose (first match wins).

    Raises:
      ValueError: a rule with an unknown scheme or a regular expression that is
        invalid or matches no layer; a rule asking to decompose a layer that
        cannot be (grouped/depthwise, dilated...) or a conv under ``"dense"``.
    """
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise ValueError(f"rule {i}: expected (regex, scheme), got {rule!r}")
        pattern, scheme = rule
        if scheme not in RULE_SCHEMES and not slice_count(scheme):  # "alds:k": slice_count checks k
            raise ValueError(f"rule {i} ({pattern!r}): unknown scheme {scheme!r}; valid: {', '.join(RULE_SCHEMES)}")
        try:
            compiled.append((re.compile(pattern), pattern, scheme))
        except re.error as err:
            raise ValueError(f"rule {i}: invalid regular expression {pattern!r}: {err}") from None
    names = [layer.name for layer in traced]
    for regex, pattern, _ in compiled:
        if not any(regex.fullmatch(n) for n in names):
            raise ValueError(f"rule {pattern!r} matches no layer; layers: {', '.join(names)}")
    chosen: dict[str, str] = {}
    for layer in traced:
        hit = next(((p, s) for r, p, s in compiled if r.fullmatch(layer.name)), None)
        if hit is None or hit[1] == "skip":
            continue
        pattern, scheme = hit
        if not layer.decomposable:
            raise ValueError(f"layer {layer.name!r} cannot be decomposed ({layer.reason}) but rule "
                             f"{pattern!r} asks for {scheme!r}; add a ({layer.name!r}, 'skip') rule before it")
        if layer.kind == "conv" and scheme == "dense":
            raise ValueError(f"layer {layer.name!r} is a convolution but rule {pattern!r} asks for 'dense'; "
                             f"use 'tai' or 'zhang'")
        if layer.kind == "conv" and slice_count(scheme):
            check_slices(layer, slice_count(scheme), f"rule {pattern!r} ({scheme!r})")
        chosen[layer.name] = scheme
    return chosen


_STATIC = {"pytree_node": False}


@dataclasses.dataclass(frozen=True, eq=False)
class HeldAllocation(Allocation):
    """An :class:`Allocation` compared by identity, so that it can be static PyTree
    metadata: its arrays (masks, relaxed m) have no single truth value to compare."""

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    @classmethod
    def of(cls, allocation: Allocation) -> HeldAllocation:
        return cls(**{f.name: getattr(allocation, f.name) for f in dataclasses.fields(Allocation)})


@struct.dataclass(eq=False)
class Compressed:
    """A factored network and what it costs: a PyTree whose only leaves are ``variables``.

    ``jax.tree.map(f, result)`` maps over the variables and keeps everything else;
    ``jax.jit(fn)(result, x)`` traces the variables and treats the rest as static
    (hashable: the mappings are read-only :class:`~coblax.util.frozen.FrozenMap`).

    Attributes:
      variables: the factored network's variables: ``params`` (without the
        factored kernels), ``factors`` ({layer: {first, second}}), and every other
        collection of the original. The PyTree's leaves.
      model: the user's (unchanged) Flax model.
      apply_fn: ``apply_fn(variables, x, **model_apply_kwargs)`` of the factored
        network (pass ``train=True, mutable=[...], rngs=...`` to train it).
      apply_kwargs: the keyword arguments that put the model in eval mode.
      ranks: layer -> rank (full rank = original form kept); ``full_ranks`` alike.
      schemes: layer -> scheme as the rules chose it.
      factors: layer -> :class:`Factors` metadata (kind, scheme, strides) of the
        layers in factored form (arrays are in ``variables["factors"]``).
      macs, params: whole-network MACs per example and parameters (``params``
        collection only).
      mac_ratio, param_ratio: on the budget ``basis``; ``network_*`` always of
        the whole network.
      method: the allocator's name.
      allocation: what the allocator returned (status, stats...).
      cost: the network's cost model.
    """

    variables: dict
    model: Any = struct.field(**_STATIC)
    apply_fn: Callable = struct.field(**_STATIC)
    apply_kwargs: FrozenMap = struct.field(**_STATIC)
    ranks: FrozenMap = struct.field(**_STATIC)
    full_ranks: FrozenMap = struct.field(**_STATIC)
    schemes: FrozenMap = struct.field(**_STATIC)
    factors: FrozenMap = struct.field(**_STATIC)
    macs: float = struct.field(**_STATIC)
    params: float = struct.field(**_STATIC)
    mac_ratio: float = struct.field(**_STATIC)
    param_ratio: float = struct.field(**_STATIC)
    network_mac_ratio: float = struct.field(**_STATIC)
    network_param_ratio: float = struct.field(**_STATIC)
    basis: str = struct.field(**_STATIC)
    method: str = struct.field(**_STATIC)
    allocation: Allocation = struct.field(**_STATIC)
    cost: NetworkCost = struct.field(**_STATIC)

    def apply(self, variables: Any, x: jnp.ndarray) -> jnp.ndarray:
        """Logits of the factored network in eval mode."""
        return self.apply_fn(variables, x, **self.apply_kwargs)


def resolve_method(method: str | Allocator, method_options: Mapping[str, Any] | None = None) -> Allocator:
    """The allocator ``allocate`` runs: a registered name built with ``method_options``,
    or a configured allocator object (``coblax.allocators.cobla(max_iter=50)``) as is.

    Raises:
      UnknownMethodError: a name that is not registered.
      TypeError: ``method_options`` beside an allocator object (configure the object),
        or a ``method`` that is neither a name nor an allocator.
    """
    if isinstance(method, str):
        return get_allocator(method, **dict(method_options or {}))
    if not (callable(method) and isinstance(getattr(method, "name", None), str)):
        raise TypeError(f"method must be an allocator name or an allocator object (callable with a "
                        f"name, e.g. coblax.allocators.cobla(max_iter=50)), got {method!r}")
    if method_options:
        raise TypeError(f"method_options={dict(method_options)!r} given with an allocator object; "
                        f"configure the object instead, e.g. coblax.allocators.{method.name}(...)")
    return method


def needs_loss(allocator: Allocator) -> bool:
    """Whether ``allocator`` reads ``problem.loss`` (class attribute ``needs_loss``, default False).

    ``allocate`` builds the network objective E(m) -- which copies the objective and
    validation data to the device and compiles the loss -- only for such allocators.
    """
    return bool(getattr(allocator, "needs_loss", False))


def budget_problem(net: NetworkCost, mac: float, param: float, basis: str, min_rank: int, rank_multiple: int,
                   seed: int, latency: float | None = None, timing: Any = None) -> tuple[AllocationProblem, int]:
    """(the allocation problem of ``net`` under the budgets, the rank multiple k) for linen and nnx models.

    Ranks come in multiples of k (:mod:`coblax.lowrank.rank_multiple`), so ``min_rank``
    is rounded up to one; no loss is attached (see :func:`needs_loss`). ``latency`` with
    ``timing`` (the measured tables) adds the third budget row.
    """
    k = check_rank_multiple(rank_multiple, net.layers)
    return make_problem(net, float(mac), float(param), basis, min_rank=multiple_floor(min_rank, k), seed=seed,
                        latency=latency, timing=timing), k


def run_allocator(allocator: Allocator, problem: AllocationProblem, k: int, timing: Any = None) -> Allocation:
    """``allocator``'s ranks for ``problem`` in multiples of ``k``, checked against the budgets
    (with ``stats["latency"]`` when ``timing`` is given)."""
    allocation = with_rank_multiple(allocator, k)(problem)
    if not is_feasible(problem, allocation.ranks):
        raise AssertionError(f"method {allocator.name} returned ranks that break the budget: {allocation.ranks}")
    return with_latency_stats(allocation, problem, timing)


def _legacy_options_error(options: Mapping[str, Any]) -> TypeError:
    names = ", ".join(sorted(options))
    return TypeError(
        f"allocate() got unexpected keyword argument(s) {names}: allocator options no longer share "
        f"allocate's keywords. Pass them as method_options={dict(options)!r}, or configure the "
        f"allocator: method=coblax.allocators.<name>(...)"
    )


def allocate(
    model: Any,
    variables: Mapping[str, Any] | None = None,
    data: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    rules: Sequence[tuple[str, str]],
    mac: float = 1.0,
    param: float = 1.0,
    method: str | Allocator = "cobla",
    method_options: Mapping[str, Any] | None = None,
    basis: str = "decomposed",
    validation_data: tuple[np.ndarray, np.ndarray] | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    min_rank: int = 1,
    batch_size: int = 250,
    recalibrate_bn: int | str = _AUTO,
    rank_multiple: int = 1,
    latency: float | None = None,
    latency_batch: int = 64,
    latency_tables: Any = None,
    latency_checks: int | None = None,
    **unexpected: Any,
) -> Compressed:
    """Allocate per-layer ranks of ``model`` under MAC and parameter budgets.

    Solves  max accuracy  s.t.  N_C(r) <= mac · N_C,O,  N_M(r) <= param · N_M,O
    (seed Eq. 2 relaxed for COBLA; each baseline its own way), with N_C,O, N_M,O
    the decomposed layers' original cost (``basis="decomposed"``, Li & Shi 2018)
    or the whole network's (``basis="network"``).

    (One piece at over 80 lines: the public entry point, whose signature and argument
    list are most of it; the work is in the helpers it calls, about 25 lines.)

    Args:
      model, variables: any Flax linen model and its variables (all collections), or
        a ``flax.nnx`` module with ``variables`` omitted (``allocate(model, (x, y),
        ...)``: it carries its state; see :mod:`coblax.lowrank.nnx_api`).
      data: (x, y) training examples for COBLA's objective E(m); ``x[:1]`` traces
        the network.
      rules: ordered (regex, scheme) pairs, see the module docstring.
      mac, param: budget fractions in (0, 1] (default 1: no budget).
      method: a registered allocator's name (``coblax.allocator_names()``) or a
        configured allocator object (``coblax.allocators.cobla(max_iter=50)``).
      method_options: the options of a ``method`` given by name (``{"max_iter": 50}``);
        never beside an allocator object.
      validation_data: (x, y) held out from the training data to pick COBLA's
        rounding (default: the objective data).
      apply_kwargs: ``model.apply`` keyword arguments for eval mode
        (``{"train": False}``); used for E(m) and by ``result.apply``.
      seed: seeds the allocator's randomness (COBLA's rounding).
      min_rank: the smallest rank any decomposed layer may get.
      batch_size: batch size inside COBLA's jitted objective.
      recalibrate_bn: re-estimate the factored network's BatchNorm statistics on
        this many batches of ``data`` (:func:`coblax.nn.bn.recalibrate_bn`;
        0: keep the original network's, stale once layers are truncated). ``"auto"``
        (the default): 20 batches where the network has BatchNorm statistics, none
        elsewhere (:data:`coblax.nn.bn.AUTO_BATCHES`); nnx models alike, through
        :func:`coblax.nn.bn_nnx.recalibrate_bn_nnx`.
      rank_multiple: every factored rank a multiple of this (full rank excepted), for
        every allocator (:mod:`coblax.lowrank.rank_multiple`); ``min_rank`` is rounded
        up to a multiple. Below 1, or above a decomposed layer's full rank, is a ValueError.
      latency: a third budget, a fraction in (0, 1] of the original network's latency
        measured with ``jax.jit`` on this device at batch ``latency_batch``
        (:mod:`coblax.lowrank.latency`: per-layer tables, cached under
        ``$COBLAX_CACHE/latency``; the rest of the network a constant by difference).
        None: no latency budget. ``result.allocation.stats["latency"]`` reports the
        predicted latency ratio and the tables' line-fit errors.
      latency_batch: the batch size the latency is measured (and budgeted) at.
      latency_checks: how often the allocated network may be measured end to end and
        re-allocated under a corrected budget while it runs slower than ``latency``
        (:mod:`coblax.lowrank.latency_check`; the kept allocation's
        ``stats["latency"]["measured_ratio"]`` and ``["met"]`` say how it measured).
        None: 2 when the tables are measured here, 0 with ``latency_tables``.
      latency_tables: a :class:`~coblax.lowrank.latency.NetworkLatency` measured
        before (or synthetic) to use instead of measuring.

    Returns:
      A :class:`Compressed` network (not fine-tuned; see :func:`finetune`).

    Raises:
      TypeError: a keyword that is not one of these (the allocator options of old,
        ``allocate(..., max_iter=50)``: the message says how to pass them now).
      ValueError: bad rules (see :func:`select_layers`) or budgets;
        :class:`~coblax.lowrank.allocation.BudgetError` naming the smallest
        feasible budget when the layers that are not decomposed already cost more.
    """
    if unexpected:
        raise _legacy_options_error(unexpected)
    from coblax.lowrank import nnx_api  # flax.nnx models: allocate(model, (x, y), ...)

    for label, value in (("mac", mac), ("param", param)):  # both paths, before any work
        check_budget(label, value)
    check_latency_arguments(latency, latency_batch, latency_tables)
    checks = latency_checks_for(latency_checks, latency_tables)
    variables, data = nnx_api.check_model_args(model, variables, data)
    if variables is None:
        return nnx_api.allocate_nnx(model, data, rules=rules, mac=mac, param=param,
                                    method=resolve_method(method, method_options), basis=basis,
                                    validation_data=validation_data, apply_kwargs=apply_kwargs, seed=seed,
                                    min_rank=min_rank, batch_size=batch_size, rank_multiple=rank_multiple,
                                    latency=latency, latency_batch=latency_batch, latency_tables=latency_tables,
                                    latency_checks=checks, recalibrate_bn=recalibrate_bn)
    check_allocate_arguments(locals())  # coblax.lowrank.validate: ValueError naming the argument
    recalibrate_bn = resolve_batches(recalibrate_bn, variables)
    allocator = resolve_method(method, method_options)
    apply_kwargs = dict(apply_kwargs or {})
    data = tuple(np.asarray(a) for a in data)
    schemes, full, net = decompose_selected(model, variables, data[0], rules, apply_kwargs,
                                    allocator_spectrum(allocator), batch_size)
    schemes, full, net = plan_slices(allocator, model, variables, data[0], apply_kwargs, schemes, full, net,
                                     budgets=net.budgets(mac, param, basis), min_rank=min_rank, seed=seed)
    timing = None
    if latency is not None:  # per-layer tables and the network's time (coblax.lowrank.latency_measure)
        refuse_sliced(schemes, "the latency budget")
        traced = trace_layers(model, variables, jnp.asarray(data[0][:1]), apply_kwargs)
        timing = latency_model(lambda v, x: model.apply(v, x, **apply_kwargs), variables, data[0], traced,
                               net.layers, table_schemes(full), batch=latency_batch, tables=latency_tables,
                               factored=factored_builder(model, variables, net, full, apply_kwargs))
    problem, k = budget_problem(net, mac, param, basis, min_rank, rank_multiple, seed, latency, timing)
    net = dataclasses.replace(net, layers=problem.layers)  # with their tables: "original" includes "not faster"
    problem = _with_loss_and_trainer(problem, allocator, model, variables, full, data, validation_data,
                                     batch_size, apply_kwargs, seed)
    allocation = run_allocator(allocator, problem, k, timing)
    if timing is not None and checks:  # measured end to end; re-allocated while slower than the budget
        measure = network_measure((lambda v, x: model.apply(v, x, **apply_kwargs), variables),
                                  factored_builder(model, variables, net, full, apply_kwargs), data[0].shape[1:],
                                  timing.batch, dtype=float_dtype(data[0]))
        allocation = check_latency(allocation, problem, lambda p: run_allocator(allocator, p, k, timing), timing,
                                   latency, measure, checks=checks)
    result = compressed_linen(model, variables, net, full, allocation, schemes, apply_kwargs, basis, allocator.name)
    if recalibrate_bn:
        result = result.replace(variables=_recalibrate(result.apply, result.variables, data[0],
                                                       batches=recalibrate_bn, batch_size=batch_size, seed=seed))
    return result


def _with_loss_and_trainer(problem: AllocationProblem, allocator: Allocator, model: Any,
                           variables: Mapping[str, Any], full: Mapping[str, Factors], data: tuple,
                           validation_data: tuple | None, batch_size: int, apply_kwargs: Mapping[str, Any],
                           seed: int) -> AllocationProblem:
    """``problem`` with the network objective E(m) (only for allocators that read it) and the trainer."""
    if needs_loss(allocator):
        loss = NetworkLoss(model, variables, full, data,
                           None if validation_data is None else tuple(np.asarray(a) for a in validation_data),
                           batch_size=batch_size, apply_kwargs=apply_kwargs)
        problem = dataclasses.replace(problem, loss=loss)
    # Allocators that train the network (lc) find it here; the trainer compiles only when used.
    return attach_trainer(problem, model, variables, {n: (f.kind, f.scheme) for n, f in full.items()}, data,
                          seed=seed)


def decompose_selected(model: Any, variables: Mapping[str, Any], x: np.ndarray, rules: Sequence[tuple[str, str]],
               apply_kwargs: Mapping[str, Any], spectrum: str = "weight",
               batch_size: int = 250) -> tuple[dict[str, str], dict[str, Factors], NetworkCost]:
    """(layer -> scheme, layer -> full SVD factors, cost model) of the layers the rules pick.

    ``spectrum = "whitened"`` (BALF) factors each kernel in the metric of its inputs on ``x``.
    """
    traced = trace_layers(model, variables, jnp.asarray(x[:1]), apply_kwargs)
    schemes = select_layers(traced, rules)
    if not schemes:
        raise ValueError("the rules select no layer to decompose")
    by_name = {layer.name: layer for layer in traced}
    full = {
        name: factorize(get_kernel(variables, name), by_name[name],
                        scheme if scheme in SCHEMES or slice_count(scheme) else SCHEMES[0])
        for name, scheme in schemes.items()
    }
    if spectrum == "whitened":
        full = whitened_factors(model, variables, [by_name[n] for n in full], {n: f.scheme for n, f in full.items()},
                                x, batch_size=batch_size)
    net = network_cost(traced, variables, {n: np.asarray(f.sigma) for n, f in full.items()},
                       {n: f.scheme for n, f in full.items()}, sliced=slice_info(full))
    return schemes, full, net


def compressed_linen(model, variables, net: NetworkCost, full: Mapping[str, Factors], allocation: Allocation,
                schemes: Mapping[str, str], apply_kwargs: Mapping[str, Any], basis: str,
                method: str) -> Compressed:
    """The :class:`Compressed` linen network of an allocation: truncated factors and costs
    (from the allocation's trained weights where it has them: COBLA's ``joint``)."""
    full, variables = trained_start(allocation, full, variables, net.layers)
    kept, ranks = truncate_allocation(net, full, allocation)
    return compressed_result(model, factored_variables(variables, kept), apply_fn_for(model, kept), net, kept,
                             ranks, allocation, schemes, apply_kwargs, basis, method)


def compressed_result(model, variables, apply_fn, net: NetworkCost, kept: Mapping[str, Factors],
                      ranks: Mapping[str, int], allocation: Allocation, schemes: Mapping[str, str],
                      apply_kwargs: Mapping[str, Any], basis: str, method: str) -> Compressed:
    """A :class:`Compressed` from the factored network (``model``, ``variables``, ``apply_fn``:
    linen or nnx) and its allocation: the costs and ratios come from ``net`` at ``ranks``."""
    macs, params = net.cost(ranks)
    mac_ratio, param_ratio = net.ratios(ranks, basis)
    return Compressed(
        variables=variables,
        model=model,
        apply_fn=apply_fn,
        apply_kwargs=frozen(apply_kwargs),
        ranks=frozen(ranks),
        full_ranks=frozen({l.name: l.full_rank for l in net.layers}),
        schemes=frozen(schemes),
        factors=frozen({n: dataclasses.replace(f, first=None, second=None, sigma=None) for n, f in kept.items()}),
        macs=macs,
        params=params,
        mac_ratio=mac_ratio,
        param_ratio=param_ratio,
        network_mac_ratio=macs / net.total_macs,
        network_param_ratio=params / net.total_params,
        basis=basis,
        method=method,
        allocation=HeldAllocation.of(allocation),
        cost=net,
    )


def finetune(
    result: Compressed,
    x: np.ndarray,
    y: np.ndarray,
    *,
    train_kwargs: Mapping[str, Any] | None = None,
    epochs: int = 1,
    batch_size: int = 64,
    learning_rate: float = 1e-4,
    optimizer: str = "adam",
    rng_streams: Sequence[str] = ("dropout",),
    seed: int = 0,
    progress: bool = False,
    recalibrate_bn: int | str = _AUTO,
) -> Compressed:
    """Fine-tune the factored network (factors and every other parameter) with optax.

    ``train_kwargs`` put the model in training mode (``{"train": True}``); every
    collection other than ``params`` and ``factors`` is state updated by the model
    (BatchNorm's running statistics), and ``rng_streams`` get fresh keys each step.
    ``recalibrate_bn = N`` re-estimates the BatchNorm statistics of the fine-tuned
    network on N batches of ``x`` at the end (:func:`coblax.nn.bn.recalibrate_bn`);
    ``"auto"`` (the default) is 20 batches where it has BatchNorm statistics.
    Returns the same result with the fine-tuned variables. An nnx result is trained
    with ``nnx.Optimizer`` (:func:`coblax.lowrank.nnx_api.finetune_nnx`;
    ``rng_streams`` does not apply: dropout draws from the model's own ``Rngs``).
    """
    from coblax.lowrank import nnx_api

    if nnx_api.is_nnx_module(result.model):
        return nnx_api.finetune_nnx(result, x, y, train_kwargs=train_kwargs, epochs=epochs, batch_size=batch_size,
                                    learning_rate=learning_rate, optimizer=optimizer, seed=seed, progress=progress,
                                    recalibrate_bn=recalibrate_bn)
    recalibrate_bn = resolve_batches(recalibrate_bn, result.variables)
    check_finetune_arguments(locals())  # coblax.lowrank.validate
    if train_kwargs is None and has_batch_stats(result.variables):
        # measured: ResNet-20 / Fashion-MNIST at 0.3, 2 epochs, 75.2 % in eval mode against 83.3 %
        warnings.warn("finetune: the network has BatchNorm statistics but no train_kwargs, so it is "
                      "fine-tuned in eval mode (running statistics, frozen); pass the keyword that "
                      "puts it in training mode, e.g. train_kwargs={'train': True}, or "
                      "train_kwargs={} to keep eval mode", UserWarning, stacklevel=2)
    state = tuple(k for k in result.variables if k not in ("params", "factors"))
    apply = functools.partial(result.apply_fn, **dict(train_kwargs or {}))
    variables = fit(apply, result.variables, x, y, epochs=epochs, batch_size=batch_size,
                    learning_rate=learning_rate, optimizer=optimizer, seed=seed, mutable=state,
                    rng_streams=rng_streams, desc=f"finetune {result.method}", progress=progress)
    if recalibrate_bn:
        variables = _recalibrate(result.apply, variables, x, batches=recalibrate_bn, batch_size=batch_size, seed=seed)
    return dataclasses.replace(result, variables=variables)
