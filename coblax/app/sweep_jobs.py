"""The jobs of a parallel run and what a worker runs for one: :func:`run_job`.

A job is the base model of one (seed, model) or one record; a worker keeps the
last data set, base model and decomposition it built between jobs (:class:`_Context`).
See :mod:`coblax.app.sweep` for the scheduling.
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from pathlib import Path
from typing import Any

__all__ = ["ENV_KEYS", "Job", "crash_record", "run_job"]

#: Environment variables a worker needs to see as the driver does.
ENV_KEYS = ("COBLAX_DATA", "COBLAX_CACHE")


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of work: the base model of (seed, model) or one record.

    ``cfg`` carries the record's seed (``cfg.seed``); ``keys`` are the record keys
    the job answers for (every unfinished key of the model for a base job).
    """

    kind: str  # "base" or "record"
    cfg: Any  # RunConfig
    model_index: int
    keys: tuple
    cache_dir: str
    env: tuple = ()


def _data_seed(cfg, seed: int) -> int:
    # the runner loads the first seed's data once and reloads it per seed only when
    # limit_* subsets depend on the seed
    return seed if (cfg.data.limit_train or cfg.data.limit_test) else cfg.seed_list[0]


class _Context:
    """What a worker keeps between jobs: the last data set, base models and decomposition."""

    def __init__(self) -> None:
        self.data: tuple | None = None  # (key, Dataset, digest)
        self.bases: dict = {}
        self.scheme: tuple | None = None  # (key, value)
        self.logs: list[str] = []

    def dataset(self, cfg):
        from coblax.nn import train as T
        from coblax.nn.data import load_dataset

        key = (cfg.data.name, cfg.data.dir, _data_seed(cfg, cfg.seed), cfg.data.limit_train, cfg.data.limit_test)
        if self.data is None or self.data[0] != key:
            data = load_dataset(cfg.data.name, cfg.data.dir, seed=key[2], limit_train=cfg.data.limit_train,
                                limit_test=cfg.data.limit_test)
            self.data = (key, data, T.data_digest(data.x_train, data.y_train))
        return self.data[1], self.data[2]

    def base(self, cfg, mi: int, cache_dir: str):
        from coblax.app.experiment import train_base_model

        key = (repr(cfg), mi, cache_dir)  # the whole config: a Ray worker may outlive one run
        if key not in self.bases:
            data, digest = self.dataset(cfg)
            self.bases = {key: train_base_model(cfg, cfg.models[mi], data, Path(cache_dir), False,
                                                log=self.logs.append, digest=digest)}
        return self.bases[key]

    def decomposition(self, cfg, mi: int, scheme: str, cache_dir: str):
        """(traced, net, full factors, loss) of (seed, model, scheme), as the serial runner builds them."""
        import jax.numpy as jnp

        from coblax.app import experiment as E
        from coblax.lowrank.decompose import trace_layers

        key = (repr(cfg), mi, scheme, cache_dir)
        if self.scheme is None or self.scheme[0] != key:
            self.scheme = None  # free the previous one first
            data, _ = self.dataset(cfg)
            base = self.base(cfg, mi, cache_dir)
            objective_data, validation_data = E.split_objective_data(data, cfg)
            traced = trace_layers(base.model, base.params, jnp.asarray(data.x_train[:1]))
            chosen = E.decomposable_layers(traced, cfg)
            full, net, loss = E.scheme_inputs(cfg, base, traced, chosen, scheme, objective_data, validation_data)
            self.scheme = (key, (traced, net, full, loss))
        return self.scheme[1]


_CONTEXT: _Context | None = None


def _context() -> _Context:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = _Context()
    return _CONTEXT


def crash_record(key: tuple, cfg, err: BaseException | None, cause: str, tb: str | None = None) -> dict:
    from coblax.app.experiment import failed_record

    record = failed_record(key, cfg, err or RuntimeError(cause), None)
    record["error"] = cause
    record["failed_stage"] = "worker"
    if tb:
        record["traceback"] = tb
    return record


def run_job(job: Job) -> dict:
    """Run one job in a worker; never raises.

    Returns ``{"records": [...], "log": [...]}``: a base job returns the failed
    records of its model when training fails (none when it succeeds); a record job
    returns its record (a ``"failed"`` one, with the traceback, for any exception).
    """
    from coblax.app.experiment import failed_record, run_method
    from coblax.lowrank.allocation import BudgetError
    from coblax.util.errors import NumericalError

    for name, value in job.env:
        os.environ[name] = value
    from coblax.app.workers import pin_worker

    pin_worker()  # this worker's share of the cores, once
    ctx = _context()
    ctx.logs = []
    cfg, mi = job.cfg, job.model_index
    mc = cfg.models[mi]
    records: list[dict] = []
    try:
        if job.kind == "base":
            try:
                ctx.base(cfg, mi, job.cache_dir)
            except NumericalError as err:
                ctx.logs.append(f"{mc.label}: {err}; its records are marked failed")
                records = [failed_record(k, cfg, err, None) for k in job.keys]
        else:
            (key,) = job.keys
            _, scheme, mac, par, method, _ = key
            try:
                base = ctx.base(cfg, mi, job.cache_dir)
            except NumericalError as err:  # only if the cache lost the base model in between
                return {"records": [failed_record(key, cfg, err, None)], "log": ctx.logs}
            traced, net, full, loss = ctx.decomposition(cfg, mi, scheme, job.cache_dir)
            data, _ = ctx.dataset(cfg)
            try:
                record = run_method(method, cfg, base, data, traced, net, full, loss, (mac, par), False)
            except (NumericalError, BudgetError) as err:
                ctx.logs.append(f"{mc.label}, {scheme}, {mac:g}/{par:g}, {method}: failed: {err}")
                records = [failed_record(key, cfg, err, base)]
            else:
                records = [{"model": mc.label, "scheme": scheme, "seed": cfg.seed,
                            "spectrum": cfg.decompose.spectrum, "base_cached": base.cached} | record]
    except Exception as err:  # noqa: BLE001 - whatever user code raises becomes the records' failure
        tb = traceback.format_exc()
        cause = f"{type(err).__name__}: {err}"
        ctx.logs.append(f"{mc.label}: {job.kind} job failed: {cause}")
        records = [crash_record(k, cfg, err, cause, tb) for k in job.keys]
    from coblax.util import jsonable

    return {"records": jsonable(records), "log": list(ctx.logs)}


# ------------------------------------------------------------------------ backends
