"""Where the jobs of a parallel run execute: local ``spawn`` processes or Ray tasks.

A backend has ``capacity``, ``free()``, ``submit(job_id, job)``, ``poll(timeout)``
(finished jobs as ``(id, "ok", result)`` or ``(id, "died", cause)``) and ``close()``;
:class:`~coblax.app.sweep.ParallelSweep` drives it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
import warnings
from multiprocessing.connection import wait as wait_for
from typing import Any

from coblax.app.sweep_jobs import Job, run_job
from coblax.app.sweep_spec import SweepError

__all__ = ["LocalBackend", "RayBackend"]


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
