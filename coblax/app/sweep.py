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

import dataclasses
import heapq
import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the parts of a parallel run live in their own modules; their public names stay importable here
from coblax.app.sweep_backends import LocalBackend, RayBackend
from coblax.app.sweep_jobs import ENV_KEYS, Job, crash_record, run_job
from coblax.app.sweep_spec import (  # noqa: F401 - CONNECT_TIMEOUT_S: kept importable from here
    CONNECT_TIMEOUT_S,
    RAY_INSTALL,
    ParallelSpec,
    SweepError,
    parallel_spec,
)

__all__ = ["RAY_INSTALL", "ParallelSpec", "ParallelSweep", "SweepError", "parallel_spec", "run_job"]

#: Times a record is started before a worker death marks it failed (one retry).
ATTEMPTS = 2


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

        from coblax.app.workers import make_slots, remove_slots

        env = tuple((k, os.environ[k]) for k in ENV_KEYS if k in os.environ)
        if not self.spec.address:  # workers on this machine: one share of the cores each
            env += (make_slots(self.spec.workers or os.cpu_count() or 1),)
        if cfg.data.dir:  # workers may start elsewhere (Ray): absolute paths only
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir=str(Path(cfg.data.dir).resolve())))
        cache_dir = str(Path(plan.cache_dir).expanduser().resolve())
        jobs, order, waiting = _job_graph(cfg, done, add, cache_dir, env)
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
                    finish(job, [crash_record(k, job.cfg, None, cause) for k in job.keys])
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


def _job_graph(cfg, done: dict, add: Callable[[dict, bool], None], cache_dir: str,
               env: tuple) -> tuple[dict[int, Job], dict[int, tuple], dict[int, list[int]]]:
    """(jobs by id, each job's place in the serial order, base job id -> its record job ids).

    One base job per (seed, model) with unfinished records, placed just before them;
    finished records go to ``add`` at once, in order.
    """
    from coblax.app.experiment import sweep_keys
    from coblax.app.workers import base_priority, record_priority

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
    return jobs, order, waiting


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
