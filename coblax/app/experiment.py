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
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax.numpy as jnp

# the run's parts live in their own modules (plan, base model and cache, one record);
# their names stay importable from here
from coblax.app.base_model import (
    BaseModel,
    cache_settings,
    default_cache_dir,
    log_stderr,
    train_base_model,
    versions,
)
from coblax.app.config import RunConfig
from coblax.app.plan import (
    PARTIAL,
    RESULTS,
    RunPlan,
    config_fingerprint,
    plan_from_config,
    plan_run,
    preflight,
    record_key,
    sweep_keys,
    writable_problem,
)
from coblax.app.record import (
    COBLA_KEYS,
    decomposable_layers,
    decompose_layers,
    failed_record,
    finetune_factored,
    run_method,
    scheme_inputs,
    split_objective_data,
)
from coblax.app.results import ResultsError, read_results
from coblax.lowrank.allocation import BudgetError
from coblax.lowrank.decompose import trace_layers
from coblax.lowrank.factored import factored_variables
from coblax.nn.data import Dataset, load_dataset
from coblax.util import jsonable, write_json_atomic
from coblax.util.errors import NumericalError, RunInterrupted
from coblax.util.io import WriteError, remove_stale_temporaries
from coblax.util.runlock import run_lock

_stderr = log_stderr  # the name used before

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

__all__ += ["COBLA_KEYS", "PARTIAL", "RESULTS", "VOLATILE_KEYS", "cache_settings", "config_fingerprint",
            "decompose_layers", "default_cache_dir", "failed_record", "preflight", "run_method",
            "scheme_inputs", "split_objective_data", "sweep_keys"]

#: Record fields that legitimately differ between two runs of the same config.
VOLATILE_KEYS = ("solve_seconds", "finetune_seconds", "base_cached", "compiles", "compile_seconds")


# ------------------------------------------------------------------------- running


class _Signals:
    """SIGINT/SIGTERM as :class:`RunInterrupted`, except inside :meth:`saving`.

    A signal that arrives while a finished record is being saved is held until the
    save is complete, then raised: a record never dies half written.

    Python runs a handler between any two bytecodes of the main thread, including
    inside a ``__del__`` or a gc callback (JAX's ``_xla_gc_callback``), where the
    exception it raises is printed ("Exception ignored ...") and dropped: the run
    then went on and exited 0 (``test_early_sigint_exits_130``, 1 trial in a CI
    run). So every signal is also remembered in ``received``, and :meth:`check`
    raises it again at the runner's safe points: after each save and before the
    final results file.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None
        self.received: int | None = None

    def handler(self, signum, frame) -> None:
        self.received = signum
        if self.depth:
            self.pending = signum
            return
        raise RunInterrupted(signum)

    def check(self) -> None:
        """Raise :class:`RunInterrupted` for a signal whose exception was swallowed."""
        if self.received is not None and not self.depth:
            raise RunInterrupted(self.received)

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
        self.check()


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
        signals.check()  # a signal whose exception a gc callback swallowed still stops the run
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
            full, net, loss = scheme_inputs(cfg, base, traced, chosen, scheme, objective_data, validation_data)
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
