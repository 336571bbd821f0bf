"""``coblax run``: base model -> every method at every budget -> results.json.

Intentionally thin: each step calls a library module (data, models, train,
decompose, costs, objective, allocators, finetune). Budgets are checked for every
model and scheme before any training so that a bad budget fails fast with
nothing written.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from coblax.nn import train as T
from coblax.lowrank.allocation import Allocation, is_feasible
from coblax.app.config import ModelConfig, RunConfig
from coblax.lowrank.costs import NetworkCost, make_problem, network_cost
from coblax.nn.data import Dataset, load_dataset
from coblax.lowrank.decompose import Factors, apply_fn_for, factorize, get_kernel, trace_layers
from coblax.lowrank.factored import factored_variables, truncate_allocation
from coblax.nn.models import build_model, training_options
from coblax.lowrank.objective import NetworkLoss
from coblax.lowrank.registry import get_allocator
from coblax.util import jsonable, write_json_atomic

__all__ = ["run_experiment", "BaseModel", "train_base_model", "decomposable_layers", "factored_variables", "versions"]


def versions() -> dict[str, str]:
    """Versions of the packages that determine results."""
    import flax
    import optax
    import scipy

    from coblax import __version__

    return {
        "coblax": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


@dataclasses.dataclass(frozen=True)
class BaseModel:
    model: Any
    params: Any
    accuracy: float
    cached: bool


def default_cache_dir() -> Path:
    return Path(os.environ.get("COBLAX_CACHE", Path.home() / ".cache" / "coblax"))


def train_base_model(cfg: RunConfig, mc: ModelConfig, data: Dataset, cache_dir: Path | None, progress: bool = True) -> BaseModel:
    """Train the base model, or load it from the cache when settings match."""
    model = build_model(mc.name, num_classes=data.num_classes, input_shape=data.input_shape, **dict(mc.options))
    params = model.init(jax.random.PRNGKey(cfg.seed), jnp.asarray(data.x_train[:1]))
    settings = {
        "model": mc.name,
        "options": mc.options,
        "data": dataclasses.asdict(cfg.data) | {"dir": None},
        "train": dataclasses.asdict(cfg.train),
        "seed": cfg.seed,
        "n_train": int(len(data.x_train)),
    }
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "models" / f"{mc.name}-{T.cache_key(settings)}.npz"
        if path.is_file():
            try:
                loaded = T.load_params(path)
                if jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(params):
                    acc = T.evaluate(model.apply, loaded, data.x_test, data.y_test)
                    return BaseModel(model, loaded, acc, True)
            except (OSError, ValueError, KeyError):
                pass  # unreadable cache entry: retrain and overwrite it
    train_kw, fit_kw = training_options(model, params)
    params = T.fit(
        functools.partial(model.apply, **train_kw), params, data.x_train, data.y_train,
        epochs=cfg.train.epochs, batch_size=cfg.train.batch_size,
        learning_rate=cfg.train.learning_rate, optimizer=cfg.train.optimizer,
        seed=cfg.seed, desc=f"train {mc.label}", progress=progress, **fit_kw,
    )
    acc = T.evaluate(model.apply, params, data.x_test, data.y_test)
    if path is not None:
        T.save_params(path, params, meta=settings | {"test_accuracy": acc})
    return BaseModel(model, params, acc, False)


def decomposable_layers(traced, cfg: RunConfig) -> list:
    """Traced layers selected for decomposition by ``decompose.layers/exclude``."""
    chosen = []
    names = {l.name for l in traced}
    for wanted in cfg.decompose.layers + cfg.decompose.exclude:
        if wanted not in names:
            raise ValueError(f"decompose: no layer named {wanted!r}; layers: {', '.join(sorted(names))}")
    for layer in traced:
        if not layer.decomposable:
            continue
        if cfg.decompose.layers and layer.name not in cfg.decompose.layers:
            continue
        if layer.name in cfg.decompose.exclude:
            continue
        chosen.append(layer)
    return chosen


def preflight(cfg: RunConfig, data_shape: tuple, num_classes: int) -> None:
    """Check every budget against every model/scheme before anything runs."""
    for mc in cfg.models:
        model = build_model(mc.name, num_classes=num_classes, input_shape=data_shape, **dict(mc.options))
        x = jnp.zeros((1,) + tuple(data_shape), jnp.float32)
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
        traced = trace_layers(model, params, x)
        chosen = decomposable_layers(traced, cfg)
        if not chosen:
            raise ValueError(f"model {mc.label}: no decomposable layer selected")
        for scheme in cfg.decompose.schemes:
            sig = {l.name: np.ones(_full_rank(l, scheme)) for l in chosen}
            net = network_cost(traced, params, sig, scheme)
            for mac, par in cfg.budgets.pairs():
                make_problem(net, mac, par, cfg.budgets.basis, min_rank=cfg.budgets.min_rank)


def _full_rank(layer, scheme: str) -> int:
    if layer.kind == "dense":
        return min(layer.kernel_shape)
    X, Y, C, N = layer.kernel_shape
    return min(X * Y * C, N) if scheme == "zhang" else min(C * X, Y * N)


def _split(data: Dataset, cfg: RunConfig):
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(data.x_train))
    n_obj = min(cfg.cobla.objective_size, len(order))
    n_val = min(cfg.cobla.validation_size, max(0, len(order) - n_obj))
    obj, val = order[:n_obj], order[n_obj:n_obj + n_val]
    return (data.x_train[obj], data.y_train[obj]), (data.x_train[val], data.y_train[val]) if n_val else None


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
    options = dict(cfg.method_options.get(method, {}))
    if method == "cobla":
        defaults = {k: getattr(cfg.cobla, k) for k in ("max_iter", "ftol", "roundings", "warm_start", "saturation_rounds")}
        options = defaults | {"progress": progress} | options
    allocator = get_allocator(method, **options)
    problem = make_problem(net, budget[0], budget[1], cfg.budgets.basis,
                           min_rank=cfg.budgets.min_rank, loss=loss, seed=cfg.seed)
    start = time.perf_counter()
    allocation: Allocation = allocator(problem)
    solve_seconds = time.perf_counter() - start
    if not is_feasible(problem, allocation.ranks):
        raise AssertionError(f"method {method} returned ranks that break the budget: {allocation.ranks}")
    kept, ranks = truncate_allocation(net, full, allocation)
    variables = factored_variables(base.params, kept)
    apply = apply_fn_for(base.model, kept)
    acc_before = T.evaluate(apply, variables, data.x_test, data.y_test)
    ft_start = time.perf_counter()
    train_kw, fit_kw = training_options(base.model, variables)
    variables = T.fit(
        functools.partial(apply, **train_kw), variables, data.x_train, data.y_train,
        epochs=cfg.finetune.epochs, batch_size=cfg.finetune.batch_size,
        learning_rate=cfg.finetune.learning_rate, optimizer=cfg.finetune.optimizer,
        seed=cfg.seed + 1, desc=f"finetune {method}", progress=progress, **fit_kw,
    )
    finetune_seconds = time.perf_counter() - ft_start
    acc_after = T.evaluate(apply, variables, data.x_test, data.y_test)
    macs, params = net.cost(ranks)
    mac_ratio, param_ratio = net.ratios(ranks, cfg.budgets.basis)
    stats = dict(allocation.stats)
    trace = stats.pop("objective_trace", None)
    stats.pop("trace", None)
    return {
        "method": method,
        "status": allocation.status,
        "budget_mac": budget[0],
        "budget_param": budget[1],
        "basis": cfg.budgets.basis,
        "ranks": ranks,
        "full_ranks": {l.name: l.full_rank for l in net.layers},
        "original_layers": sorted(l.name for l in net.layers if l.is_original(ranks[l.name])),
        "macs": macs,
        "params": params,
        "mac_ratio": mac_ratio,
        "param_ratio": param_ratio,
        "network_mac_ratio": macs / net.total_macs,
        "network_param_ratio": params / net.total_params,
        "acc_before_finetune": acc_before,
        "acc_after_finetune": acc_after,
        "base_acc": base.accuracy,
        "objective_trace": trace,
        "solver_iterations": stats.pop("solver_iterations", None),
        "solve_seconds": solve_seconds,
        "finetune_seconds": finetune_seconds,
        "diagnostics": jsonable(stats),
    }


def run_experiment(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    config_text: str = "",
    progress: bool = True,
    on_record: Callable[[dict], None] | None = None,
) -> dict:
    """Run every model x scheme x budget x method; write ``out_dir/results.json``.

    Partial results are kept in ``results.partial.json`` while running (so a
    crash loses nothing finished) and replaced by ``results.json`` at the end.
    """
    data = load_dataset(cfg.data.name, cfg.data.dir, seed=cfg.seed,
                        limit_train=cfg.data.limit_train, limit_test=cfg.data.limit_test)
    preflight(cfg, data.input_shape, data.num_classes)
    out_dir = Path(out_dir)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    payload: dict = {
        "config": dataclasses.asdict(cfg),
        "config_text": config_text,
        "seed": cfg.seed,
        "versions": versions(),
        "dataset": {"name": data.name, "train": len(data.x_train), "test": len(data.x_test)},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "records": [],
    }
    partial = out_dir / "results.partial.json"
    objective_data, validation_data = _split(data, cfg)
    for mc in cfg.models:
        base = train_base_model(cfg, mc, data, cache_dir, progress)
        x1 = jnp.asarray(data.x_train[:1])
        traced = trace_layers(base.model, base.params, x1)
        chosen = decomposable_layers(traced, cfg)
        for scheme in cfg.decompose.schemes:
            full = {l.name: factorize(get_kernel(base.params, l.name), l, scheme) for l in chosen}
            net = network_cost(traced, base.params, {n: np.asarray(f.sigma) for n, f in full.items()}, scheme)
            loss = None
            if "cobla" in cfg.methods:
                loss = NetworkLoss(base.model, base.params, full, objective_data, validation_data,
                                   batch_size=cfg.cobla.batch_size)
            for budget in cfg.budgets.pairs():
                for method in cfg.methods:
                    record = run_method(method, cfg, base, data, traced, net, full, loss, budget, progress)
                    record = {"model": mc.label, "scheme": scheme, "base_cached": base.cached} | record
                    payload["records"].append(record)
                    write_json_atomic(partial, payload)
                    if on_record is not None:
                        on_record(record)
    payload["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json_atomic(out_dir / "results.json", payload)
    partial.unlink(missing_ok=True)
    return payload
