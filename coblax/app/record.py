"""One record of a run: a (model, scheme, budget, method) allocation, fine-tuned and measured.

:func:`run_method` builds the allocation problem of one budget, runs the method's
allocator, truncates the factors to its ranks and fine-tunes the factored
network (:func:`finetune_factored`); :func:`failed_record` is the record of one
that failed. The helpers here (:func:`decomposable_layers`,
:func:`split_objective_data`, :func:`decompose_layers`) give the serial and the
parallel runner the same inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import numpy as np

from coblax.app.base_model import BaseModel
from coblax.app.budget_extras import checked_latency, record_problem, restricted, with_latency_stats
from coblax.app.config import ConfigError, RunConfig, _allocator_options
from coblax.lowrank.allocation import Allocation, has_room, is_feasible
from coblax.lowrank.costs import NetworkCost, network_cost
from coblax.lowrank.decompose import (
    Factors,
    factorize,
    factorize_whitened,
    get_kernel,
    input_grams,
)
from coblax.lowrank.factored import truncate_allocation
from coblax.lowrank.joint import trained_start
from coblax.lowrank.objective import NetworkLoss
from coblax.lowrank.padding import finetune_layout, pad_to_full_rank  # noqa: F401 - pad_to_full_rank: benchmarks replace it
from coblax.lowrank.registry import allocator_factory, get_allocator
from coblax.lowrank.slicing import plan_slices
from coblax.lowrank.spectra import allocator_spectrum
from coblax.lowrank.training import attach_trainer
from coblax.nn import train as T
from coblax.nn.bn import recalibrate_bn, resolve_batches
from coblax.nn.compiles import compile_stats
from coblax.nn.data import Dataset
from coblax.nn.models import training_options
from coblax.util import jsonable
from coblax.util.errors import NumericalError

__all__ = ["COBLA_KEYS", "decomposable_layers", "decompose_layers", "failed_record",
           "finetune_factored", "run_method", "scheme_inputs", "sliced_layers", "split_objective_data"]

def decomposable_layers(traced, cfg: RunConfig) -> list:
    """Traced layers selected for decomposition by ``decompose.layers/exclude``."""
    chosen = []
    names = {l.name for l in traced}
    for key, wanted_list in (("layers", cfg.decompose.layers), ("exclude", cfg.decompose.exclude)):
        for wanted in wanted_list:
            if wanted not in names:
                raise ConfigError(
                    f"decompose.{key}: no layer named {wanted!r}; layers: {', '.join(sorted(names))}"
                )
    for layer in traced:
        if not layer.decomposable:
            continue
        if cfg.decompose.layers and layer.name not in cfg.decompose.layers:
            continue
        if layer.name in cfg.decompose.exclude:
            continue
        chosen.append(layer)
    return chosen


def split_objective_data(data: Dataset, cfg: RunConfig):
    """(objective (x, y), validation (x, y) or None): disjoint random draws from the train split."""
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(data.x_train))
    n_obj = min(cfg.cobla.objective_size, len(order))
    n_val = min(cfg.cobla.validation_size, max(0, len(order) - n_obj))
    obj, val = order[:n_obj], order[n_obj:n_obj + n_val]
    return (data.x_train[obj], data.y_train[obj]), (data.x_train[val], data.y_train[val]) if n_val else None


COBLA_KEYS = ("max_iter", "tol", "rtol", "atol", "roundings", "warm_start", "extra_warm_starts",
              "saturation_rounds", "monotone", "continuation", "local_search", "select", "mask_values",
              "polish", "solver", "window", "bn_stats", "finetune_candidates", "finetune_steps",
              "finetune_learning_rate", "joint", "joint_lr", "joint_mask_lr", "joint_hard", "joint_schedule",
              "joint_average")


def decompose_layers(cfg: RunConfig, base: BaseModel, chosen, scheme: str, objective_x) -> dict[str, Factors]:
    """Full factors of every chosen layer, in the spectrum ``decompose.spectrum`` names."""
    if cfg.decompose.spectrum == "weight":
        return {l.name: factorize(get_kernel(base.params, l.name), l, scheme) for l in chosen}
    grams = input_grams(base.model, base.params, chosen, objective_x, scheme, batch_size=cfg.cobla.batch_size)
    return {
        l.name: factorize_whitened(get_kernel(base.params, l.name), l, scheme, grams[l.name], cfg.decompose.whiten_eps)
        for l in chosen
    }


def scheme_inputs(cfg: RunConfig, base: BaseModel, traced, chosen, scheme: str, objective_data: tuple,
                  validation_data: tuple | None) -> tuple[dict[str, Factors], NetworkCost, NetworkLoss | None]:
    """(full factors, cost model, COBLA's objective or None) of one (model, scheme): what its records share.

    The objective E(m) is built only when the run has ``cobla`` among its methods.
    """
    full = decompose_layers(cfg, base, chosen, scheme, objective_data[0])
    net = network_cost(traced, base.params, {n: np.asarray(f.sigma) for n, f in full.items()}, scheme)
    loss = None
    if "cobla" in cfg.methods:
        loss = NetworkLoss(base.model, base.params, full, objective_data, validation_data,
                           batch_size=cfg.cobla.batch_size, data_parallel=cfg.cobla.data_parallel)
    return full, net, loss


def sliced_layers(allocator: Any, cfg: RunConfig, base: BaseModel, net: NetworkCost, full: dict[str, Factors],
                  x: np.ndarray, budget: tuple[float, float]) -> tuple[dict[str, Factors], NetworkCost]:
    """(full factors, cost model) with each conv layer cut into the input-channel slices the
    allocator's ``slice_plan`` picks (ALDS's ``slices``, :mod:`coblax.lowrank.slicing`), as
    ``coblax.allocate`` does; unchanged for every other allocator. The budgets are those of
    the unsliced layers (they depend on the original layers only)."""
    if getattr(allocator, "slice_plan", None) is None:
        return full, net
    schemes = {n: f.scheme for n, f in full.items()}
    _, full, net = plan_slices(allocator, base.model, base.params, np.asarray(x[:1]), {}, schemes, full, net,
                               budgets=net.budgets(budget[0], budget[1], cfg.budgets.basis),
                               min_rank=cfg.budgets.min_rank, seed=cfg.seed)
    return full, net


def finetune_factored(cfg: RunConfig, base: BaseModel, data: Dataset, kept: dict[str, Factors],
                      desc: str = "finetune", progress: bool = False,
                      extra: dict | None = None, full: dict[str, Factors] | None = None) -> tuple[float, float, float]:
    """Test accuracy of the factored network ``kept`` before and after ``cfg.finetune``, and its seconds.

    The fine-tuning is seeded with ``cfg.seed + 1`` on ``data``'s training images, so a
    record's numbers can be re-measured from its masks alone. With
    ``finetune.recalibrate_bn`` the BatchNorm statistics are re-estimated before
    fine-tuning and before the final evaluation; the accuracy before fine-tuning stays
    the stale one and ``extra["acc_before_finetune_recalibrated"]`` gets the other.
    ``full`` (every decomposable layer's factors) lets all records of a (model, scheme)
    share one layout (:func:`~coblax.lowrank.padding.finetune_layout`).
    """
    # one layout, one compiled step for the records of a (model, scheme) when the extra work is small (issue 19)
    layout = finetune_layout(kept, full or {}, base.params, len(data.x_train) * cfg.finetune.epochs)
    variables = layout.variables(base.params)
    apply = layout.apply_fn(base.model)
    acc_before = T.evaluate(apply, variables, data.x_test, data.y_test)
    batches = resolve_batches(cfg.finetune.recalibrate_bn, base.params, "finetune.recalibrate_bn")
    recal = functools.partial(recalibrate_bn, apply, x=data.x_train, batches=batches,
                              batch_size=cfg.finetune.batch_size, seed=cfg.seed + 1)
    if batches:
        variables = recal(variables)
        if extra is not None:
            extra["acc_before_finetune_recalibrated"] = T.evaluate(apply, variables, data.x_test, data.y_test)
    start = time.perf_counter()
    train_kw, fit_kw = training_options(base.model, variables)
    variables = T.fit(  # an apply_fn_for value, not a partial: the compiled step is reused (issue 19)
        layout.apply_fn(base.model, **train_kw), variables, data.x_train, data.y_train,
        epochs=cfg.finetune.epochs, batch_size=cfg.finetune.batch_size,
        learning_rate=cfg.finetune.learning_rate, optimizer=cfg.finetune.optimizer,
        seed=cfg.seed + 1, desc=desc, progress=progress, **fit_kw,
    )
    if batches and cfg.finetune.epochs:
        variables = recal(variables)
    seconds = time.perf_counter() - start
    return acc_before, T.evaluate(apply, variables, data.x_test, data.y_test), seconds


def run_method(
    method: str,
    cfg: RunConfig,
    base: BaseModel,
    data: Dataset,
    traced,
    net: NetworkCost,
    full: dict[str, Factors],
    loss: NetworkLoss | None,
    budget: tuple[float, float],
    progress: bool,
) -> dict:
    """One (model, scheme, budget, method) record."""
    compiled_before = compile_stats()  # compiles and their seconds in this record: issue 19
    options = dict(cfg.method_options.get(method, {}))
    if method == "cobla":
        options = {k: getattr(cfg.cobla, k) for k in COBLA_KEYS} | options
    if "progress" in _allocator_options(allocator_factory(method))[0]:  # COBLA's solve, LC's L steps
        options = {"progress": progress} | options
    allocator = get_allocator(method, **options)
    spectrum = allocator_spectrum(allocator, cfg.decompose.spectrum)
    if spectrum != cfg.decompose.spectrum:  # an allocator defined on its own spectrum (BALF: whitened)
        own = dataclasses.replace(cfg, decompose=dataclasses.replace(cfg.decompose, spectrum=spectrum))
        scheme = next(iter(full.values())).scheme
        full = decompose_layers(own, base, [l for l in traced if l.name in full], scheme, split_objective_data(data, cfg)[0][0])
        net = network_cost(traced, base.params, {n: np.asarray(f.sigma) for n, f in full.items()}, scheme)
    slicing_start = time.perf_counter()
    full, net = sliced_layers(allocator, cfg, base, net, full, data.x_train, budget)  # ALDS's slices
    slicing_seconds = time.perf_counter() - slicing_start
    # budgets.latency and budgets.rank_multiple (coblax.app.budget_extras)
    problem, net, timing = record_problem(cfg, base, traced, net, full, data.x_train, budget,
                                          loss=None if loss is None else _FiniteLoss(loss), seed=cfg.seed)
    allocator = restricted(cfg, allocator)
    problem = attach_trainer(problem, base.model, base.params, {n: (f.kind, f.scheme) for n, f in full.items()},
                             (data.x_train, data.y_train), seed=cfg.seed)
    start = time.perf_counter()
    allocation: Allocation = allocator(problem)
    if not is_feasible(problem, allocation.ranks):
        raise AssertionError(f"method {method} returned ranks that break the budget: {allocation.ranks}")
    allocation = with_latency_stats(allocation, problem, timing)
    allocation = checked_latency(cfg, allocation, problem, allocator, timing, base, net, full, data.x_train)
    solve_seconds = time.perf_counter() - start  # the end-to-end latency checks are the allocator's time
    if getattr(allocator, "slice_plan", None) is not None:  # ALDS's search for k is its own cost too
        allocation = dataclasses.replace(allocation, stats={**allocation.stats, "slice_plan_seconds": slicing_seconds})
        solve_seconds += slicing_seconds
    full, params = trained_start(allocation, full, base.params, net.layers)  # COBLA's joint: trained weights
    start_from = base if params is base.params else dataclasses.replace(base, params=params)
    kept, ranks = truncate_allocation(net, full, allocation)
    extra: dict = {}
    acc_before, acc_after, finetune_seconds = finetune_factored(cfg, start_from, data, kept, f"finetune {method}",
                                                                progress, extra, full)
    macs, params = net.cost(ranks)
    mac_ratio, param_ratio = net.ratios(ranks, cfg.budgets.basis)
    stats = dict(allocation.stats)
    trace = stats.pop("objective_trace", None)
    stats.pop("trace", None)
    return {
        "method": method,
        "spectrum": spectrum,
        "status": allocation.status,
        "budget_mac": budget[0],
        "budget_param": budget[1],
        "budget_latency": cfg.budgets.latency,
        "rank_multiple": cfg.budgets.rank_multiple,
        "basis": cfg.budgets.basis,
        "ranks": ranks,
        "full_ranks": {l.name: l.full_rank for l in net.layers},
        "original_layers": sorted(l.name for l in net.layers if l.is_original(ranks[l.name])),
        "room_for_one_more_rank": has_room(problem, allocation.ranks),
        "macs": macs,
        "params": params,
        "mac_ratio": mac_ratio,
        "param_ratio": param_ratio,
        "network_mac_ratio": macs / net.total_macs,
        "network_param_ratio": params / net.total_params,
        "acc_before_finetune": acc_before,
        "acc_after_finetune": acc_after,
        **extra,
        "base_acc": base.accuracy,
        "objective_trace": trace,
        "solver_iterations": stats.pop("solver_iterations", None),
        "solve_seconds": solve_seconds,
        "finetune_seconds": finetune_seconds,
        "compiles": compile_stats()[0] - compiled_before[0],
        "compile_seconds": compile_stats()[1] - compiled_before[1],
        "diagnostics": jsonable(stats),
    }


class _FiniteLoss:
    """A loss oracle that stops the solve when the objective or its gradient is not finite.

    ``step`` in the error is the number of the objective evaluation (1-based).
    """

    stage = "cobla objective"

    def __init__(self, loss: Any) -> None:
        self._loss, self.calls = loss, 0

    def _checked(self, value: float, grad: np.ndarray | None = None) -> None:
        self.calls += 1
        if not math.isfinite(value):
            raise NumericalError(self.stage, self.calls, value, "the network's loss is not finite")
        if grad is not None and not np.all(np.isfinite(grad)):
            raise NumericalError(self.stage, self.calls, float("nan"), "its gradient is not finite")

    def value_and_grad(self, m: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = self._loss.value_and_grad(m)
        self._checked(value, grad)
        return value, grad

    def value(self, m: np.ndarray) -> float:
        value = self._loss.value(m)
        self._checked(value)
        return value

    def validation_loss(self, m: np.ndarray) -> float:
        value = self._loss.validation_loss(m)
        self._checked(value)
        return value

    def with_bn_stats(self, bn_stats: str) -> _FiniteLoss:
        return _FiniteLoss(self._loss.with_bn_stats(bn_stats))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loss, name)

def failed_record(key: tuple, cfg: RunConfig, err: Exception, base: BaseModel | None) -> dict:
    label, scheme, mac, par, method, seed = key
    return {
        "model": label,
        "scheme": scheme,
        "seed": seed,
        "base_cached": None if base is None else base.cached,
        "method": method,
        "status": "failed",
        "error": str(err),
        "failed_stage": getattr(err, "stage", f"allocate {method}"),
        "failed_step": getattr(err, "step", None),
        "budget_mac": mac,
        "budget_param": par,
        "basis": cfg.budgets.basis,
        "ranks": None,
        "mac_ratio": None,
        "param_ratio": None,
        "acc_before_finetune": None,
        "acc_after_finetune": None,
        "base_acc": None if base is None else base.accuracy,
    }

