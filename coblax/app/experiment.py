"""``coblax run``: base model -> every method at every budget -> results.json.

Intentionally thin: each step calls a library module (data, models, train,
decompose, costs, objective, allocators, finetune). :func:`plan_run` checks
everything before any work — every config value, the model and method options,
every budget against every model and scheme, the output, cache and data folders —
and reports all problems together. :func:`run_experiment` then never loses
finished work:

* every finished record is saved at once (``results.partial.json``, atomically);
* a rerun with the same config and output folder skips the finished records and
  says so; results of a different config are refused unless ``force``;
* SIGINT / SIGTERM stop the run with every finished record saved
  (:class:`RunInterrupted`); a signal that arrives while a record is being saved
  waits until it is on disk; leftover temporary files of runs that are gone are
  removed on the next run;
* one run per output folder: ``--out/.coblax.lock`` (PID and host,
  :mod:`coblax.util.runlock`) refuses a second run at once and is taken over,
  with a message, when its process is gone;
* a file that cannot be written (disk full, ``ulimit -f``) is a
  :class:`~coblax.util.io.WriteError` naming it (exit 2), with every finished
  record kept;
* a record whose training, fine-tuning or COBLA objective produces a non-finite
  or diverging loss, or whose allocator cannot meet the budget, is saved as a
  ``"failed"`` record naming the stage and step, and the run goes on.

A run is deterministic given its config and data, so a resumed run's records equal
an uninterrupted run's (except the timings and ``base_cached``). With ``seeds`` every
record is repeated per seed (seed outermost) and carries its ``seed``, which is part
of the record key that resuming matches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from coblax.app.budget_extras import record_problem, restricted, with_latency_stats
from coblax.app.config import (
    INT_MAX,
    ConfigError,
    ModelConfig,
    Problems,
    RunConfig,
    load_run_config,
    read_config_text,
)
from coblax.app.report import ResultsError, read_results
from coblax.lowrank.allocation import Allocation, BudgetError, has_room, is_feasible
from coblax.lowrank.costs import NetworkCost, make_problem, network_cost
from coblax.lowrank.decompose import (
    Factors,
    apply_fn_for,
    factorize,
    factorize_whitened,
    get_kernel,
    input_grams,
    trace_layers,
)
from coblax.lowrank.factored import factored_variables, truncate_allocation
from coblax.lowrank.objective import NetworkLoss
from coblax.lowrank.padding import pad_to_full_rank
from coblax.lowrank.rank_multiple import check_rank_multiple, multiple_floor
from coblax.lowrank.registry import get_allocator
from coblax.lowrank.spectra import allocator_spectrum
from coblax.lowrank.training import attach_trainer
from coblax.nn import train as T
from coblax.nn.bn import recalibrate_bn
from coblax.nn.compiles import compile_stats
from coblax.nn.data import DataError, Dataset, load_dataset
from coblax.nn.models import build_model, training_options
from coblax.util import jsonable, write_json_atomic
from coblax.util.errors import NumericalError, RunInterrupted
from coblax.util.io import WriteError, remove_stale_temporaries
from coblax.util.runlock import run_lock

__all__ = [
    "run_experiment",
    "plan_run",
    "plan_from_config",
    "RunPlan",
    "RunInterrupted",
    "stop_on_signals",
    "writable_problem",
    "record_key",
    "BaseModel",
    "train_base_model",
    "decomposable_layers",
    "factored_variables",
    "finetune_factored",
    "versions",
]

RESULTS = "results.json"
PARTIAL = "results.partial.json"
#: Record fields that legitimately differ between two runs of the same config.
VOLATILE_KEYS = ("solve_seconds", "finetune_seconds", "base_cached", "compiles", "compile_seconds")


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


def _stderr(message: str) -> None:
    print(f"coblax: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class BaseModel:
    model: Any
    params: Any
    accuracy: float
    cached: bool


def default_cache_dir() -> Path:
    return Path(os.environ.get("COBLAX_CACHE", Path.home() / ".cache" / "coblax"))


def cache_settings(cfg: RunConfig, mc: ModelConfig, data: Dataset, digest: str | None = None) -> dict:
    """What determines a trained base model: model, options, training, seed and the data itself."""
    return {
        "model": mc.name,
        "options": mc.options,
        "train": dataclasses.asdict(cfg.train),
        "seed": cfg.seed,
        "data": {
            "name": data.name,
            "n_train": int(len(data.x_train)),
            "digest": digest or T.data_digest(data.x_train, data.y_train),
        },
    }


def train_base_model(
    cfg: RunConfig,
    mc: ModelConfig,
    data: Dataset,
    cache_dir: Path | None,
    progress: bool = True,
    *,
    log: Callable[[str], None] | None = None,
    digest: str | None = None,
) -> BaseModel:
    """Train the base model, or load it from the cache when settings and data match.

    A cache entry that is unreadable, was written for other settings or data, has
    other shapes or holds non-finite weights is reported through ``log`` and
    replaced by a freshly trained model. A model whose training loss is not finite
    raises :class:`NumericalError` and is never cached; a cache that cannot be
    written is reported and the trained model used anyway.
    """
    log = log or _stderr
    model = build_model(mc.name, num_classes=data.num_classes, input_shape=data.input_shape,
                        **dict(mc.options))
    params = model.init(jax.random.PRNGKey(cfg.seed), jnp.asarray(data.x_train[:1]))
    settings = jsonable(cache_settings(cfg, mc, data, digest))
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "models" / f"{mc.name}-{T.cache_key(settings)}.npz"
        if path.exists():
            try:
                loaded = T.load_checkpoint(path, params, meta=settings)
            except T.CheckpointError as err:
                log(f"cache: {err}; retraining {mc.label}")
            else:
                acc = T.evaluate(model.apply, loaded, data.x_test, data.y_test)
                return BaseModel(model, loaded, acc, True)
    train_kw, fit_kw = training_options(model, params)
    params = T.fit(
        functools.partial(model.apply, **train_kw), params, data.x_train, data.y_train,
        epochs=cfg.train.epochs, batch_size=cfg.train.batch_size,
        learning_rate=cfg.train.learning_rate, optimizer=cfg.train.optimizer,
        seed=cfg.seed, desc=f"train {mc.label}", progress=progress, **fit_kw,
    )
    acc = T.evaluate(model.apply, params, data.x_test, data.y_test)
    if path is not None:
        try:
            T.save_params(path, params, meta=settings | {"test_accuracy": acc})
        except OSError as err:
            log(f"cache: cannot write {path} ({err.strerror or err}); {mc.label} is used but not cached")
    return BaseModel(model, params, acc, False)


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


def preflight(cfg: RunConfig, data_shape: tuple, num_classes: int, problems: Problems | None = None) -> None:
    """Check every model and every budget against every scheme before anything runs.

    Each model is built abstractly (``jax.eval_shape``, nothing computed) on the
    data's input shape with its options, its decomposed layers are selected and
    every budget pair is checked against what the layers that are not decomposed
    already cost. Problems go to ``problems`` (raised together if None).
    """
    own = Problems() if problems is None else problems
    for i, mc in enumerate(cfg.models):
        where = f"models[{i}]"
        x = jnp.zeros((1,) + tuple(data_shape), jnp.float32)
        try:
            model = build_model(mc.name, num_classes=num_classes, input_shape=data_shape, **dict(mc.options))
            params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
        except Exception as err:  # noqa: BLE001 - whatever the options break, report it as theirs
            own.add("models", f"{where} ({mc.label}) cannot be built for inputs {tuple(data_shape)}: "
                              f"{type(err).__name__}: {err}")
            continue
        n_params = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))
        if n_params > INT_MAX:
            own.add("models", f"{where} ({mc.label}) has {n_params:,} parameters, more than {INT_MAX:,}")
            continue
        traced = trace_layers(model, params, x)
        try:
            chosen = decomposable_layers(traced, cfg)
        except ConfigError as err:
            own.add("decompose", f"{err} (model {mc.label})")
            continue
        if not chosen:
            own.add("decompose", f"model {mc.label}: no decomposable layer selected")
            continue
        for scheme in cfg.decompose.schemes:
            sig = {l.name: np.ones(_full_rank(l, scheme)) for l in chosen}
            net = network_cost(traced, params, sig, scheme)
            for mac, par in cfg.budgets.pairs():
                try:
                    k = check_rank_multiple(cfg.budgets.rank_multiple, net.layers)
                    make_problem(net, mac, par, cfg.budgets.basis, min_rank=multiple_floor(cfg.budgets.min_rank, k))
                except (BudgetError, ValueError) as err:  # ValueError: rank_multiple above a full rank
                    own.add("budgets", f"budgets ({mc.label}, {scheme}): {err}")
    if problems is None and own:
        raise own.error()


def _full_rank(layer, scheme: str) -> int:
    if layer.kind == "dense":
        return min(layer.kernel_shape)
    X, Y, C, N = layer.kernel_shape
    return min(X * Y * C, N) if scheme == "zhang" else min(C * X, Y * N)


def split_objective_data(data: Dataset, cfg: RunConfig):
    """(objective (x, y), validation (x, y) or None): disjoint random draws from the train split."""
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(data.x_train))
    n_obj = min(cfg.cobla.objective_size, len(order))
    n_val = min(cfg.cobla.validation_size, max(0, len(order) - n_obj))
    obj, val = order[:n_obj], order[n_obj:n_obj + n_val]
    return (data.x_train[obj], data.y_train[obj]), (data.x_train[val], data.y_train[val]) if n_val else None


COBLA_KEYS = ("max_iter", "tol", "rtol", "atol", "roundings", "warm_start", "saturation_rounds", "monotone",
              "continuation", "local_search", "select", "mask_values", "solver", "window")


def decompose_layers(cfg: RunConfig, base: BaseModel, chosen, scheme: str, objective_x) -> dict[str, Factors]:
    """Full factors of every chosen layer, in the spectrum ``decompose.spectrum`` names."""
    if cfg.decompose.spectrum == "weight":
        return {l.name: factorize(get_kernel(base.params, l.name), l, scheme) for l in chosen}
    grams = input_grams(base.model, base.params, chosen, objective_x, scheme, batch_size=cfg.cobla.batch_size)
    return {
        l.name: factorize_whitened(get_kernel(base.params, l.name), l, scheme, grams[l.name], cfg.decompose.whiten_eps)
        for l in chosen
    }


def finetune_factored(cfg: RunConfig, base: BaseModel, data: Dataset, kept: dict[str, Factors],
                      desc: str = "finetune", progress: bool = False,
                      extra: dict | None = None) -> tuple[float, float, float]:
    """Test accuracy of the factored network ``kept`` before and after ``cfg.finetune``, and its seconds.

    The fine-tuning is seeded with ``cfg.seed + 1`` on ``data``'s training images, so a
    record's numbers can be re-measured from its masks alone. With
    ``finetune.recalibrate_bn`` the BatchNorm statistics are re-estimated before
    fine-tuning and before the final evaluation; the accuracy before fine-tuning stays
    the stale one and ``extra["acc_before_finetune_recalibrated"]`` gets the other.
    """
    # equal shapes across records share one compiled step when the extra work is small (issue 19)
    kept = pad_to_full_rank(kept, len(data.x_train) * cfg.finetune.epochs)
    variables = factored_variables(base.params, kept)
    apply = apply_fn_for(base.model, kept)
    acc_before = T.evaluate(apply, variables, data.x_test, data.y_test)
    recal = functools.partial(recalibrate_bn, apply, x=data.x_train, batches=cfg.finetune.recalibrate_bn,
                              batch_size=cfg.finetune.batch_size, seed=cfg.seed + 1)
    if cfg.finetune.recalibrate_bn:
        variables = recal(variables)
        if extra is not None:
            extra["acc_before_finetune_recalibrated"] = T.evaluate(apply, variables, data.x_test, data.y_test)
    start = time.perf_counter()
    train_kw, fit_kw = training_options(base.model, variables)
    variables = T.fit(  # an apply_fn_for value, not a partial: the compiled step is reused (issue 19)
        apply_fn_for(base.model, kept, **train_kw), variables, data.x_train, data.y_train,
        epochs=cfg.finetune.epochs, batch_size=cfg.finetune.batch_size,
        learning_rate=cfg.finetune.learning_rate, optimizer=cfg.finetune.optimizer,
        seed=cfg.seed + 1, desc=desc, progress=progress, **fit_kw,
    )
    if cfg.finetune.recalibrate_bn and cfg.finetune.epochs:
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
        defaults = {k: getattr(cfg.cobla, k) for k in COBLA_KEYS}
        options = defaults | {"progress": progress} | options
    allocator = get_allocator(method, **options)
    spectrum = allocator_spectrum(allocator, cfg.decompose.spectrum)
    if spectrum != cfg.decompose.spectrum:  # an allocator defined on its own spectrum (BALF: whitened)
        own = dataclasses.replace(cfg, decompose=dataclasses.replace(cfg.decompose, spectrum=spectrum))
        scheme = next(iter(full.values())).scheme
        full = decompose_layers(own, base, [l for l in traced if l.name in full], scheme, split_objective_data(data, cfg)[0][0])
        net = network_cost(traced, base.params, {n: np.asarray(f.sigma) for n, f in full.items()}, scheme)
    # budgets.latency and budgets.rank_multiple (coblax.app.budget_extras)
    problem, net, timing = record_problem(cfg, base, traced, net, full, data.x_train, budget,
                                          loss=None if loss is None else _FiniteLoss(loss), seed=cfg.seed)
    allocator = restricted(cfg, allocator)
    problem = attach_trainer(problem, base.model, base.params, {n: (f.kind, f.scheme) for n, f in full.items()},
                             (data.x_train, data.y_train), seed=cfg.seed)
    start = time.perf_counter()
    allocation: Allocation = allocator(problem)
    solve_seconds = time.perf_counter() - start
    if not is_feasible(problem, allocation.ranks):
        raise AssertionError(f"method {method} returned ranks that break the budget: {allocation.ranks}")
    allocation = with_latency_stats(allocation, problem, timing)
    kept, ranks = truncate_allocation(net, full, allocation)
    extra: dict = {}
    acc_before, acc_after, finetune_seconds = finetune_factored(cfg, base, data, kept, f"finetune {method}", progress,
                                                                extra)
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

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loss, name)


# ------------------------------------------------------------------ planning a run


def record_key(record: dict) -> tuple:
    """What identifies a record within a run: (model, scheme, mac, param, method, seed)."""
    seed = record.get("seed")
    return (str(record["model"]), str(record["scheme"]), float(record["budget_mac"]),
            float(record["budget_param"]), str(record["method"]),
            None if seed is None else int(seed))


def sweep_keys(cfg: RunConfig, mc: ModelConfig, scheme: str | None = None) -> list[tuple]:
    """The record keys of one model (and scheme) at ``cfg.seed``."""
    schemes = cfg.decompose.schemes if scheme is None else (scheme,)
    return [(mc.label, s, float(mac), float(par), method, cfg.seed)
            for s in schemes for mac, par in cfg.budgets.pairs() for method in cfg.methods]


def config_fingerprint(config: dict, digest: str | None) -> dict:
    """The part of a config (as JSON) and data that determines the records."""
    conf = json.loads(json.dumps(jsonable(config)))
    if not isinstance(conf, dict):
        return {"config": conf, "data_digest": digest}
    for key in ("name", "cache_dir"):
        conf.pop(key, None)
    if isinstance(conf.get("data"), dict):
        conf["data"].pop("dir", None)
    return {"config": conf, "data_digest": digest}


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [prefix or "(all)"]


def writable_problem(folder: Path) -> str | None:
    """Why files cannot be created in ``folder`` (created on demand), or None."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        return f"cannot write in {probe} ({err.strerror or err})"
    return None


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A validated run: config, data, folders and the records already finished.

    Attributes:
      previous: the payload of an earlier run of the same config in ``out_dir``
        (its finished records are kept), or None.
      complete: ``results.json`` of the same config already holds every record.
      total: number of records of the sweep.
    """

    cfg: RunConfig
    config_text: str
    data: Dataset
    digest: str
    out_dir: Path
    cache_dir: Path
    force: bool
    previous: dict | None
    complete: bool
    total: int

    @property
    def finished(self) -> int:
        return 0 if self.previous is None else len(self.previous["records"])


def _check_out_dir(out: Path, fingerprint: dict | None, force: bool, problems: Problems):
    """(previous payload or None, complete) for ``out``; problems added."""
    if out.exists() and not out.is_dir():
        problems.add("--out", f"output folder {out} is a file, not a folder")
        return None, False
    reason = writable_problem(out)
    if reason:
        problems.add("--out", f"output folder {out}: {reason}")
        return None, False
    for name, complete in ((RESULTS, True), (PARTIAL, False)):
        path = out / name
        if not path.exists() or force:
            continue
        try:
            payload = read_results(path)
        except ResultsError as err:
            problems.add("--out", f"{err}; move it away or pass --force to start over")
            return None, False
        if fingerprint is None:  # the config has problems: nothing to compare yet
            return None, False
        stored = payload.get("fingerprint")
        if not isinstance(stored, dict):  # written before fingerprints: compare the config
            stored = config_fingerprint(payload.get("config"), None)
        diff = _differences(fingerprint["config"], stored.get("config"))
        if stored.get("data_digest") and stored.get("data_digest") != fingerprint["data_digest"]:
            diff.append("the training data")
        if diff:
            more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
            problems.add(
                "--out",
                f"{path} holds results of a different config (differs in {', '.join(diff[:6])}{more}); "
                "pass --force to start over or choose another --out",
            )
            return None, False
        return payload, complete
    return None, False


def plan_from_config(
    cfg: RunConfig,
    out_dir: str | os.PathLike,
    config_text: str = "",
    *,
    force: bool = False,
    problems: Problems | None = None,
    source: str | None = None,
) -> RunPlan:
    """Check data, folders, models and budgets of a parsed config; raise every problem together."""
    problems = Problems() if problems is None else problems
    config_ok = not problems
    out = Path(out_dir)
    data = digest = None
    if "data" not in problems.keys:
        try:
            data = load_dataset(cfg.data.name, cfg.data.dir, seed=cfg.seed_list[0],
                                limit_train=cfg.data.limit_train, limit_test=cfg.data.limit_test)
        except DataError as err:
            problems.add("data", f"data: {err}")
        else:
            digest = T.data_digest(data.x_train, data.y_train)
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    reason = writable_problem(cache_dir / "models")
    if reason:
        key = "cache_dir" if cfg.cache_dir else "cache folder ($COBLAX_CACHE or ~/.cache/coblax)"
        problems.add("cache_dir", f"{key} {cache_dir}: {reason}")
    fingerprint = config_fingerprint(dataclasses.asdict(cfg), digest) if config_ok and data is not None else None
    previous, complete = _check_out_dir(out, fingerprint, force, problems)
    if data is not None and not problems.keys & {"models", "decompose", "budgets"}:
        preflight(cfg, data.input_shape, data.num_classes, problems)
    if problems:
        raise problems.error(source)
    total = sum(len(sweep_keys(cfg, mc)) for mc in cfg.models) * len(cfg.seed_list)
    return RunPlan(cfg, config_text, data, digest, out, cache_dir, force, previous, complete, total)


def plan_run(config_path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
             force: bool = False) -> RunPlan:
    """Read and check a config file and everything a run of it needs, before any work.

    ``out_dir`` defaults to ``runs/<config name>``. Raises one :class:`ConfigError`
    listing every problem (config values, model and method options, budgets,
    output, cache and data folders).
    """
    text = read_config_text(config_path)
    problems = Problems()
    cfg = load_run_config(config_path, problems)
    out = Path(out_dir) if out_dir else Path("runs") / Path(config_path).stem
    return plan_from_config(cfg, out, text, force=force, problems=problems, source=str(config_path))


# ------------------------------------------------------------------------- running


class _Signals:
    """SIGINT/SIGTERM as :class:`RunInterrupted`, except inside :meth:`saving`.

    A signal that arrives while a finished record is being saved is held until the
    save is complete, then raised: a record never dies half written.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None

    def handler(self, signum, frame) -> None:
        if self.depth:
            self.pending = signum
            return
        raise RunInterrupted(signum)

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending is not None:
            signum, self.pending = self.pending, None
            raise RunInterrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[_Signals]:
    """Turn SIGINT/SIGTERM into :class:`RunInterrupted` (main thread only), held during saves.

    The handlers in place before are restored on exit, whatever they were (the
    default, ``SIG_IGN`` when a shell started the run in the background, a caller's).
    """
    state = _Signals()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    old = {sig: signal.signal(sig, state.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


_stop_on_signals = stop_on_signals  # the name used before


def _remove_temp_files(folder: Path, pattern: str, min_age_s: float = 0.0) -> int:
    """Delete leftover ``write_bytes_atomic`` temporaries of processes that are gone."""
    return remove_stale_temporaries(folder, pattern, min_age_s)


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


def run_experiment(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    config_text: str = "",
    progress: bool = True,
    on_record: Callable[[dict], None] | None = None,
    plan: RunPlan | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    sweep: Callable[..., None] | None = None,
) -> dict:
    """Run every model x scheme x budget x method; write ``out_dir/results.json``.

    Finished records are saved in ``results.partial.json`` as they come (so a crash
    or a signal loses nothing finished) and the file is replaced by
    ``results.json`` at the end. Records already finished by an earlier run of the
    same config in ``out_dir`` are kept and skipped; ``force`` starts over.

    Args:
      plan: a plan from :func:`plan_run` (else one is made from ``cfg``).
      log: where notes go (resumed records, cache repairs); default stderr.
      sweep: runs the records instead of the serial loop, e.g. in parallel
        (:class:`coblax.app.sweep.ParallelSweep`); same arguments as ``_sweep_records``.
    Raises:
      ConfigError: anything :func:`plan_from_config` finds.
      RunInterrupted: SIGINT / SIGTERM (after saving every finished record).
    """
    log = log or _stderr
    if plan is None:
        plan = plan_from_config(cfg, out_dir, config_text, force=force)
    if plan.complete:
        log(f"all {len(plan.previous['records'])} records of this config are already in "
            f"{plan.out_dir / RESULTS}; nothing to run (pass --force to redo them)")
        return plan.previous
    with stop_on_signals() as signals, run_lock(plan.out_dir, log):
        return _run_locked(plan, config_text, progress, on_record, log, signals, sweep)


def _run_locked(plan: RunPlan, config_text: str, progress: bool, on_record: Callable[[dict], None] | None,
                log: Callable[[str], None], signals: _Signals, sweep: Callable[..., None] | None = None) -> dict:
    """:func:`run_experiment` once ``plan.out_dir`` is locked for this process."""
    cfg, data, out = plan.cfg, plan.data, plan.out_dir
    partial = out / PARTIAL
    if plan.force:
        for name in (RESULTS, PARTIAL):
            (out / name).unlink(missing_ok=True)
    removed = _remove_temp_files(out, ".results*.json.*.tmp")
    removed += _remove_temp_files(plan.cache_dir / "models", ".*.tmp", min_age_s=600.0)
    if removed:
        log(f"removed {removed} leftover temporary file(s) of an interrupted run")
    previous = plan.previous or {}
    old_seed = previous.get("seed", cfg.seed_list[0])  # for records written without their seed
    done = {record_key(r): r for r in ({"seed": old_seed} | r for r in previous.get("records", []))}
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    payload: dict = {
        "config": dataclasses.asdict(cfg),
        "config_text": plan.config_text or config_text,
        "fingerprint": config_fingerprint(dataclasses.asdict(cfg), plan.digest),
        "seed": cfg.seed_list[0],
        "seeds": list(cfg.seed_list),
        "versions": versions(),
        "dataset": {"name": data.name, "train": len(data.x_train), "test": len(data.x_test)},
        "started": previous.get("started", now),
        "records": [],
    }
    if done:
        payload["resumed"] = list(previous.get("resumed", [])) + [now]
        log(f"resuming {out}: {len(done)} of {plan.total} records already finished with this config; "
            "skipping them")

    def saved_count() -> int:
        try:  # what is on disk, whichever instant the run stopped
            return len(read_results(partial)["records"])
        except ResultsError:
            return 0

    def add(record: dict, new: bool) -> None:
        payload["records"].append(record)
        if new:
            with signals.saving():  # a signal now waits until the record is on disk
                write_json_atomic(partial, payload)
            if on_record is not None:
                on_record(record)

    try:
        (sweep or _sweep_records)(plan, cfg, data, progress, done, add, log)
        if sweep is not None:  # parallel records finish out of order
            from coblax.app.sweep import in_serial_order
            payload["records"] = in_serial_order(cfg, payload["records"])
        payload["compile_seconds"] = sum(r.get("compile_seconds") or 0.0 for r in payload["records"])
        payload["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        # not held: a signal here leaves the partial file whole, and a rerun completes it
        write_json_atomic(out / RESULTS, payload)
        partial.unlink(missing_ok=True)
    except RunInterrupted as err:
        err.saved, err.partial = saved_count(), partial
        raise
    except WriteError as err:
        raise WriteError(err.errno, f"{err}; {saved_count()} finished record(s) are kept in {partial}; "
                         "free space and run the same command again to resume") from None
    return jsonable(payload)


def _sweep_records(plan: RunPlan, cfg: RunConfig, data: Dataset, progress: bool, done: dict,
                   add: Callable[[dict, bool], None], log: Callable[[str], None]) -> None:
    """Every seed's records, seed outermost (each seed's data subsets are loaded once)."""
    for seed in cfg.seed_list:
        seed_cfg = dataclasses.replace(cfg, seed=seed)
        keys = [k for mc in cfg.models for k in sweep_keys(seed_cfg, mc)]
        if all(k in done for k in keys):
            for k in keys:
                add(done[k], False)
            continue
        seed_data, digest = data, plan.digest
        if seed != cfg.seed_list[0] and (cfg.data.limit_train or cfg.data.limit_test):
            limits = {"limit_train": cfg.data.limit_train, "limit_test": cfg.data.limit_test}
            seed_data = load_dataset(cfg.data.name, cfg.data.dir, seed=seed, **limits)
            digest = None
        _sweep_seed(plan, seed_cfg, seed_data, digest, progress, done, add, log)


def _sweep_seed(plan: RunPlan, cfg: RunConfig, data: Dataset, digest: str | None, progress: bool,
                done: dict, add: Callable[[dict, bool], None], log: Callable[[str], None]) -> None:
    """The records of one seed (``cfg.seed``) on that seed's ``data``."""
    objective_data, validation_data = split_objective_data(data, cfg)
    for mc in cfg.models:
        keys = sweep_keys(cfg, mc)
        if all(k in done for k in keys):
            for k in keys:
                add(done[k], False)
            continue
        try:
            base = train_base_model(cfg, mc, data, plan.cache_dir, progress, log=log, digest=digest)
        except NumericalError as err:
            log(f"{mc.label}: {err}; its records are marked failed")
            for k in keys:
                if k in done:
                    add(done[k], False)
                else:
                    add(failed_record(k, cfg, err, None), True)
            continue
        x1 = jnp.asarray(data.x_train[:1])
        traced = trace_layers(base.model, base.params, x1)
        chosen = decomposable_layers(traced, cfg)
        for scheme in cfg.decompose.schemes:
            keys = sweep_keys(cfg, mc, scheme)
            if all(k in done for k in keys):
                for k in keys:
                    add(done[k], False)
                continue
            full = decompose_layers(cfg, base, chosen, scheme, objective_data[0])
            net = network_cost(traced, base.params, {n: np.asarray(f.sigma) for n, f in full.items()}, scheme)
            loss = None
            if "cobla" in cfg.methods:
                loss = NetworkLoss(base.model, base.params, full, objective_data, validation_data,
                                   batch_size=cfg.cobla.batch_size, data_parallel=cfg.cobla.data_parallel)
            for key in keys:
                if key in done:
                    add(done[key], False)
                    continue
                method, budget = key[4], (key[2], key[3])
                try:
                    record = run_method(method, cfg, base, data, traced, net, full, loss, budget, progress)
                except (NumericalError, BudgetError) as err:
                    log(f"{mc.label}, {scheme}, {budget[0]:g}/{budget[1]:g}, {method}: failed: {err}")
                    add(failed_record(key, cfg, err, base), True)
                    continue
                add({"model": mc.label, "scheme": scheme, "seed": cfg.seed,
                     "spectrum": cfg.decompose.spectrum, "base_cached": base.cached} | record, True)
