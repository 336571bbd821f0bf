"""Records of a run in parallel: local worker processes or Ray tasks.

``coblax run CONFIG --workers N`` hands the records of a sweep to N local worker
processes (started with ``spawn``: JAX is not fork-safe); ``--ray [ADDRESS]``
hands them to Ray tasks, on a local Ray instance by default or on the cluster at
ADDRESS (``pip install 'coblax[ray]'``). :func:`run_experiment` stays the driver:
it plans the run, keeps the finished records, and alone writes
``results.partial.json`` (atomically, after each finished record) and
``results.json``; this module only replaces its loop over records
(:func:`~coblax.app.experiment._sweep_records`) by :class:`ParallelSweep`.

Scheduling. The work is a small graph: one *base job* per (seed, model) trains
the base model (or loads it) into the model cache, and each record of that model
becomes ready when its base job has finished, so a base model is never trained
twice at once; a worker that runs a record loads it from the cache. Ready jobs
go out base models first, then block by block (seed, model, scheme) with the
slow methods of each block first (:mod:`coblax.app.workers`: longest processing
time first). Each worker keeps the last data set, base model and decomposition
it built (records of one (model, scheme) mostly land on workers that already
hold them).

Faults. A job never raises: an exception in a worker (a model that raises, a
bug) becomes that record's ``"failed"`` entry with the exception and its
traceback. A worker that dies (``kill -9``, out of memory) loses only the record
it was running: the driver starts a new worker and runs the record once more; a
second death records it as failed with the cause. SIGINT / SIGTERM stop the
workers (the finished records are already saved) and end the run as a serial
run does. Records equal a serial run's, timings aside: each is computed from the
same config, data, seed and cached base model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import multiprocessing
import os
import signal
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from typing import Any

from coblax.util.errors import CoblaxError

__all__ = ["RAY_INSTALL", "ParallelSpec", "ParallelSweep", "SweepError", "parallel_spec", "run_job"]

RAY_INSTALL = "pip install 'coblax[ray]'"
#: Times a record is started before a worker death marks it failed (one retry).
ATTEMPTS = 2
#: Seconds to wait for a connection to a Ray address before giving up.
CONNECT_TIMEOUT_S = 10.0
#: Environment variables a worker needs to see as the driver does.
_ENV_KEYS = ("COBLAX_DATA", "COBLAX_CACHE")


class SweepError(CoblaxError, ValueError):
    """Bad ``--workers`` / ``--ray`` arguments, Ray not installed, or a Ray address not reachable."""


@dataclasses.dataclass(frozen=True)
class ParallelSpec:
    """How records run: ``workers`` local processes, or Ray tasks when ``ray``.

    Attributes:
      workers: local worker processes (1: the serial runner); with Ray the number
        of records in flight (None: the cluster's CPU count, or the local cores).
      ray: run records as Ray tasks.
      address: the Ray cluster's address (``host:port``, ``ray://host:port``,
        ``auto``); None starts a local Ray instance.
    """

    workers: int | None = 1
    ray: bool = False
    address: str | None = None

    @property
    def serial(self) -> bool:
        return not self.ray and (self.workers or 1) == 1


def parallel_spec(workers: int | None = None, ray: str | bool | None = None) -> ParallelSpec:
    """Check ``--workers`` and ``--ray`` before anything runs; a :class:`SweepError` names the problem.

    Args:
      workers: ``--workers`` (None: not given).
      ray: ``--ray``: None/False (not given), True or ``"local"`` (local instance), or an address.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise SweepError(f"--workers must be a whole number >= 1 (1 runs records one at a time), got {workers!r}")
    if ray is None or ray is False:
        return ParallelSpec(workers=1 if workers is None else workers)
    try:
        import ray as _ray  # noqa: F401
    except ImportError:
        raise SweepError(f"--ray needs Ray, which is not installed; install it with: {RAY_INSTALL}") from None
    address = None if ray is True or ray in ("", "local") else str(ray)
    if address is not None:
        _check_reachable(address)
    return ParallelSpec(workers=workers, ray=True, address=address)


def _check_reachable(address: str) -> None:
    """A TCP connection to ``host:port`` of ``address`` (``auto`` is left to Ray)."""
    if address == "auto":
        return
    target = address.split("://", 1)[1] if "://" in address else address
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise SweepError(f"--ray {address}: expected host:port, ray://host:port or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise SweepError(f"--ray {address}: cannot reach {host}:{port} ({err.strerror or err}); "
                         "is the Ray head running there?") from None


# ------------------------------------------------------------------------ the jobs


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
        import numpy as np

        from coblax.app import experiment as E
        from coblax.lowrank.costs import network_cost
        from coblax.lowrank.decompose import trace_layers
        from coblax.lowrank.objective import NetworkLoss

        key = (repr(cfg), mi, scheme, cache_dir)
        if self.scheme is None or self.scheme[0] != key:
            self.scheme = None  # free the previous one first
            data, _ = self.dataset(cfg)
            base = self.base(cfg, mi, cache_dir)
            objective_data, validation_data = E.split_objective_data(data, cfg)
            traced = trace_layers(base.model, base.params, jnp.asarray(data.x_train[:1]))
            chosen = E.decomposable_layers(traced, cfg)
            full = E.decompose_layers(cfg, base, chosen, scheme, objective_data[0])
            net = network_cost(traced, base.params, {n: np.asarray(f.sigma) for n, f in full.items()}, scheme)
            loss = None
            if "cobla" in cfg.methods:
                loss = NetworkLoss(base.model, base.params, full, objective_data, validation_data,
                                   batch_size=cfg.cobla.batch_size, data_parallel=cfg.cobla.data_parallel)
            self.scheme = (key, (traced, net, full, loss))
        return self.scheme[1]


_CONTEXT: _Context | None = None


def _context() -> _Context:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = _Context()
    return _CONTEXT


def _crash_record(key: tuple, cfg, err: BaseException | None, cause: str, tb: str | None = None) -> dict:
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
        records = [_crash_record(k, cfg, err, cause, tb) for k in job.keys]
    from coblax.util import jsonable

    return {"records": jsonable(records), "log": list(ctx.logs)}


# ------------------------------------------------------------------------ backends


def _worker_main(conn) -> None:
    """A local worker: run the jobs that arrive on ``conn`` until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver stops the workers itself
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        result = run_job(job)
        try:
            conn.send(result)
        except (BrokenPipeError, OSError):
            return


def _death_cause(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"the worker process was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            pass
    return f"the worker process died (exit code {exitcode})"


class _LocalWorker:
    def __init__(self, ctx) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="coblax-worker")
        self.proc.start()
        child.close()
        self.job: int | None = None


class LocalBackend:
    """``n`` worker processes started with ``spawn``, one job each at a time."""

    def __init__(self, n: int) -> None:
        self.capacity = n
        self._ctx = multiprocessing.get_context("spawn")
        self.workers = [_LocalWorker(self._ctx) for _ in range(n)]

    def pids(self) -> dict[int, int]:
        """job id -> pid of the worker running it."""
        return {w.job: w.proc.pid for w in self.workers if w.job is not None}

    def free(self) -> int:
        return sum(w.job is None for w in self.workers)

    def submit(self, job_id: int, job: Job) -> None:
        worker = next(w for w in self.workers if w.job is None)
        worker.job = job_id
        worker.conn.send(job)

    def poll(self, timeout: float) -> list[tuple[int, str, Any]]:
        """Finished jobs: (id, "ok", result) or (id, "died", cause)."""
        busy = [w for w in self.workers if w.job is not None]
        if not busy:
            time.sleep(min(timeout, 0.05))
            return []
        ready = set(wait_for([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout))
        out = []
        for i, w in enumerate(self.workers):
            if w.job is None or (w.conn not in ready and w.proc.sentinel not in ready):
                continue
            try:
                if w.conn not in ready:
                    raise EOFError
                out.append((w.job, "ok", w.conn.recv()))
                w.job = None
            except (EOFError, OSError):
                w.proc.join(5)
                out.append((w.job, "died", _death_cause(w.proc.exitcode)))
                w.conn.close()
                self.workers[i] = _LocalWorker(self._ctx)
        return out

    def close(self) -> None:
        for w in self.workers:
            try:
                if w.job is None:
                    w.conn.send(None)
            except OSError:
                pass
        for w in self.workers:
            if w.job is not None:
                w.proc.terminate()
        for w in self.workers:
            w.proc.join(10)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(5)
            w.conn.close()


def _thread_env() -> dict[str, str]:
    """The BLAS / OpenMP thread settings of this process, as environment variables."""
    env = {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


class RayBackend:
    """Jobs as Ray tasks (one CPU each), on a local instance or the cluster at ``address``."""

    def __init__(self, address: str | None, workers: int | None) -> None:
        import ray

        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            kwargs: dict[str, Any] = {"address": address} if address else {"num_cpus": workers or os.cpu_count()}
            # Ray gives each worker OMP_NUM_THREADS=1; NumPy's BLAS then sums in another order
            # than the driver's (the COBLA solver's iterates drift by rounding): give the
            # workers the driver's thread settings so that records equal a serial run's
            kwargs["runtime_env"] = {"env_vars": _thread_env()}
            try:
                with warnings.catch_warnings():  # Ray starts its daemons with fork+exec: harmless
                    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
                    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False, **kwargs)
            except Exception as err:  # noqa: BLE001 - Ray raises several types for an unusable address
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise SweepError(f"--ray: cannot start or join {where}: {type(err).__name__}: {err}") from None
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.capacity = max(1, workers or cpus)
        # worker deaths are retried by the driver (once), not by Ray
        self._task = ray.remote(num_cpus=1, max_retries=0)(run_job)
        self._refs: dict[Any, int] = {}

    def free(self) -> int:
        return self.capacity - len(self._refs)

    def submit(self, job_id: int, job: Job) -> None:
        self._refs[self._task.remote(job)] = job_id

    def poll(self, timeout: float) -> list[tuple[int, str, Any]]:
        if not self._refs:
            time.sleep(min(timeout, 0.05))
            return []
        ready, _ = self._ray.wait(list(self._refs), num_returns=len(self._refs), timeout=timeout)
        out = []
        for ref in ready:
            job_id = self._refs.pop(ref)
            try:
                out.append((job_id, "ok", self._ray.get(ref)))
            except self._ray.exceptions.RayError as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                out.append((job_id, "died", f"the Ray task failed: {type(err).__name__}: {first}"))
        return out

    def close(self) -> None:
        for ref in list(self._refs):
            with contextlib.suppress(Exception):  # best effort on the way out
                self._ray.cancel(ref, force=True)
        self._refs.clear()
        if self._started:
            self._ray.shutdown()


# ------------------------------------------------------------------------ the driver


class ParallelSweep:
    """A drop-in for the runner's loop over records that runs them on a backend.

    Called by :func:`~coblax.app.experiment.run_experiment` as
    ``sweep(plan, cfg, data, progress, done, add, log)``: ``add(record, new)``
    saves a record (the driver's only writer of ``results.partial.json``).

    Args:
      spec: from :func:`parallel_spec`.
      backend: a ready backend (tests); default one made from ``spec`` when called.
      on_dispatch: ``(job_id, job)`` after each job was handed out (tests).
    """

    def __init__(self, spec: ParallelSpec, backend: Any = None,
                 on_dispatch: Callable[[int, Job, Any], None] | None = None) -> None:
        self.spec = spec
        self._backend = backend
        self.on_dispatch = on_dispatch
        self.retried: list[tuple] = []

    def _make_backend(self):
        if self._backend is not None:
            return self._backend
        if self.spec.ray:
            return RayBackend(self.spec.address, self.spec.workers)
        return LocalBackend(self.spec.workers or 1)

    def __call__(self, plan, cfg, data, progress: bool, done: dict,
                 add: Callable[[dict, bool], None], log: Callable[[str], None]) -> None:
        from tqdm.auto import tqdm

        from coblax.app.experiment import sweep_keys
        from coblax.app.workers import base_priority, make_slots, record_priority, remove_slots

        env = tuple((k, os.environ[k]) for k in _ENV_KEYS if k in os.environ)
        if not self.spec.address:  # workers on this machine: one share of the cores each
            env += (make_slots(self.spec.workers or os.cpu_count() or 1),)
        if cfg.data.dir:  # workers may start elsewhere (Ray): absolute paths only
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir=str(Path(cfg.data.dir).resolve())))
        cache_dir = str(Path(plan.cache_dir).expanduser().resolve())
        jobs: dict[int, Job] = {}
        order: dict[int, tuple] = {}
        waiting: dict[int, list[int]] = {}  # base job id -> its record job ids
        ids = itertools.count()
        position = block = 0
        for seed in cfg.seed_list:
            seed_cfg = dataclasses.replace(cfg, seed=seed)
            for mi, mc in enumerate(cfg.models):
                keys = sweep_keys(seed_cfg, mc)
                todo = [k for k in keys if k not in done]
                for k in keys:
                    if k in done:
                        add(done[k], False)
                if not todo:
                    position += len(keys)
                    continue
                base_id = next(ids)
                jobs[base_id] = Job("base", seed_cfg, mi, tuple(todo), cache_dir, env)
                order[base_id] = base_priority(position)  # longest first, in blocks: app.workers
                waiting[base_id] = []
                for k in keys:
                    if k not in done:
                        rid = next(ids)
                        jobs[rid] = Job("record", seed_cfg, mi, (k,), cache_dir, env)
                        order[rid] = record_priority(k, position, block, cfg.decompose.schemes)
                        waiting[base_id].append(rid)
                    position += 1
                block += 1
        if not jobs:
            remove_slots(env)
            return
        remaining = sum(len(j.keys) for j in jobs.values() if j.kind == "record")
        ready = [(order[i], i) for i in waiting]
        heapq.heapify(ready)
        attempts = dict.fromkeys(jobs, 0)
        try:
            backend = self._make_backend()
        except BaseException:
            remove_slots(env)
            raise
        bar = tqdm(total=plan.total, initial=plan.total - remaining, desc="records", disable=not progress,
                   unit="record")
        running = 0

        def finish(job: Job, records: list[dict]) -> None:
            nonlocal remaining
            for record in records:
                add(record, True)
                remaining -= 1
                bar.update(1)

        try:
            while remaining > 0:
                while ready and backend.free() > 0:
                    _, job_id = heapq.heappop(ready)
                    attempts[job_id] += 1
                    backend.submit(job_id, jobs[job_id])
                    running += 1
                    if self.on_dispatch is not None:
                        self.on_dispatch(job_id, jobs[job_id], backend)
                if running == 0 and not ready:
                    raise RuntimeError("parallel sweep: records left but nothing to run (a scheduling bug)")
                for job_id, status, value in backend.poll(0.25):
                    running -= 1
                    job = jobs[job_id]
                    if status == "ok":
                        for line in value["log"]:
                            log(line)
                        failed = value["records"]
                        if job.kind == "base":
                            dependents = waiting.pop(job_id)
                            if failed:  # the base model failed: so do all its records
                                finish(job, failed)
                            else:
                                for rid in dependents:
                                    heapq.heappush(ready, (order[rid], rid))
                        else:
                            finish(job, failed)
                        continue
                    if attempts[job_id] < ATTEMPTS:
                        log(f"{value} while running {self._describe(job)}; running it again")
                        self.retried.append(job.keys[0] if job.kind == "record" else ("base",) + job.keys[0][:1])
                        heapq.heappush(ready, (order[job_id], job_id))
                        continue
                    cause = f"{value} (twice: the first time and once more)"
                    log(f"{self._describe(job)}: failed: {cause}")
                    if job.kind == "base":
                        waiting.pop(job_id, None)
                    finish(job, [_crash_record(k, job.cfg, None, cause) for k in job.keys])
        finally:
            bar.close()
            backend.close()
            remove_slots(env)

    @staticmethod
    def _describe(job: Job) -> str:
        if job.kind == "base":
            return f"the base model {job.cfg.models[job.model_index].label} (seed {job.cfg.seed})"
        label, scheme, mac, par, method, seed = job.keys[0]
        return f"{label}, {scheme}, {mac:g}/{par:g}, {method}, seed {seed}"


def sweep_for(spec: ParallelSpec) -> ParallelSweep | None:
    """The runner's loop for ``spec``: None (the serial loop) or a :class:`ParallelSweep`."""
    return None if spec.serial else ParallelSweep(spec)


__all__ += ["Job", "LocalBackend", "RayBackend", "sweep_for"]


def record_order(cfg) -> dict[tuple, int]:
    """Record key -> position in the serial run's order (seed, model, scheme, budget, method)."""
    from coblax.app.experiment import sweep_keys

    keys = [k for seed in cfg.seed_list for mc in cfg.models for k in sweep_keys(dataclasses.replace(cfg, seed=seed), mc)]
    return {k: i for i, k in enumerate(keys)}


def in_serial_order(cfg, records: list[dict]) -> list[dict]:
    """``records`` sorted as a serial run writes them (records finish out of order in parallel)."""
    from coblax.app.experiment import record_key

    pos = record_order(cfg)
    return sorted(records, key=lambda r: pos.get(record_key(r), len(pos)))


__all__ += ["in_serial_order", "record_order"]
