"""Planning a run: every check before any work, and the keys of its records.

:func:`plan_run` reads a config file and :func:`plan_from_config` checks every
config value, the model and method options, every budget against every model and
scheme (:func:`preflight`), the output, cache and data folders, and reports all
problems together; the :class:`RunPlan` it returns holds the records an earlier
run of the same config already finished (:func:`config_fingerprint` tells the
configs apart).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from coblax.app.base_model import default_cache_dir, train_settings
from coblax.app.config import (
    INT_MAX,
    ConfigError,
    ModelConfig,
    Problems,
    RunConfig,
    load_run_config,
    read_config_text,
)
from coblax.app.record import decomposable_layers
from coblax.app.results import ResultsError, read_results
from coblax.lowrank.allocation import BudgetError
from coblax.lowrank.costs import make_problem, network_cost
from coblax.lowrank.decompose import trace_layers
from coblax.lowrank.rank_multiple import check_rank_multiple, multiple_floor
from coblax.nn import train as T
from coblax.nn.data import DataError, Dataset, load_dataset
from coblax.nn.models import build_model
from coblax.util import jsonable

__all__ = ["PARTIAL", "RESULTS", "RunPlan", "config_fingerprint", "plan_from_config", "plan_run",
           "preflight", "record_key", "sweep_keys", "writable_problem"]

RESULTS = "results.json"
PARTIAL = "results.partial.json"


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
        _check_slices(cfg, chosen, mc.label, own)
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


def _check_slices(cfg: RunConfig, chosen, label: str, problems: Problems) -> None:
    """ALDS's ``slices = k`` must divide the input channels of every decomposed conv layer,
    and sliced layers have no latency tables (the records would fail one by one)."""
    slices = dict(cfg.method_options.get("alds", {})).get("slices", 1)
    if "alds" not in cfg.methods or slices == 1:
        return
    where = "method_options.alds.slices"
    if cfg.budgets.latency is not None:
        problems.add(where, f"{where} = {slices!r}: the sliced form has no latency tables; use slices = 1 "
                            f"with budgets.latency")
    if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:  # "search", or named already
        return
    for layer in chosen:
        if layer.kind == "conv" and int(layer.kernel_shape[-2]) % slices:
            problems.add(where, f"{where} = {slices} does not divide the {int(layer.kernel_shape[-2])} input "
                                f"channels of layer {layer.name!r} (model {label}); use a divisor of every "
                                f"decomposed conv layer's input channels or slices = 'search'")
            return


def _full_rank(layer, scheme: str) -> int:
    if layer.kind == "dense":
        return min(layer.kernel_shape)
    X, Y, C, N = layer.kernel_shape
    return min(X * Y * C, N) if scheme == "zhang" else min(C * X, Y * N)


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
    if isinstance(conf.get("train"), dict):  # keys added later, left out at their default
        conf["train"] = train_settings(conf["train"])
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

