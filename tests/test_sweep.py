"""Parallel records (issue 19): 2 local workers and Ray equal the serial run; faults; bad input.

A tiny sweep (an MLP on 300 bundled digits, 2 seeds x 2 methods = 4
records, seconds each) is run once serially in-process as the reference.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from coblax.app.cli import main
from coblax.app.experiment import VOLATILE_KEYS, plan_run, run_experiment
from coblax.app.sweep import LocalBackend, ParallelSpec, ParallelSweep, parallel_spec, run_job
from helpers import tiny_run_config


def _config(folder: Path) -> Path:
    path = tiny_run_config(folder, "sweep.toml")
    path.write_text(path.read_text().replace("seed = 0\n", "seeds = [0, 1]\n", 1))
    return path


def _stable(record: dict) -> dict:
    out = {k: v for k, v in record.items() if k not in VOLATILE_KEYS}
    if isinstance(out.get("diagnostics"), dict):
        out["diagnostics"] = {k: v for k, v in out["diagnostics"].items() if k not in VOLATILE_KEYS}
    return out


def _records(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["records"]


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """(config path, serial records) with a model cache of its own."""
    folder = tmp_path_factory.mktemp("serial")
    cfg = _config(folder)
    old = os.environ.get("COBLAX_CACHE")
    os.environ["COBLAX_CACHE"] = str(folder / "cache")
    try:
        assert main(["run", str(cfg), "--out", str(folder / "run"), "--quiet"]) == 0
    finally:
        if old is None:
            os.environ.pop("COBLAX_CACHE", None)
        else:
            os.environ["COBLAX_CACHE"] = old
    records = _records(folder / "run")
    assert len(records) == 4 and all(r["status"] != "failed" for r in records)
    return cfg, records


@pytest.mark.slow  # the kill -9 test below also checks 2 workers against the serial records
def test_two_workers_equal_serial_record_by_record(serial, tmp_path, monkeypatch, capsys):
    cfg, reference = serial
    monkeypatch.setenv("COBLAX_CACHE", str(tmp_path / "cache"))  # base models trained anew, once
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet", "--workers", "2"]) == 0
    records = _records(out)
    assert [_stable(r) for r in records] == [_stable(r) for r in reference]
    assert len(list((tmp_path / "cache" / "models").glob("*.npz"))) == 2  # one base model per seed
    assert not (out / "results.partial.json").exists()
    # a second run finds everything done
    assert main(["run", str(cfg), "--out", str(out), "--quiet", "--workers", "2"]) == 0
    assert "nothing to run" in capsys.readouterr().err


def test_killed_worker_loses_only_its_record(serial, tmp_path, monkeypatch):
    """kill -9 of the worker holding one record: that record is run again, every record equals serial."""
    cfg, reference = serial
    monkeypatch.setenv("COBLAX_CACHE", str(tmp_path / "cache"))
    victim = ("mlp(hidden=[16])", "tai", 0.5, 0.5, "cptv", 0)
    kills: list[tuple] = []

    def kill_on_dispatch(job_id, job, backend):
        if job.kind == "record" and job.keys[0] == victim and not kills:
            kills.append(job.keys[0])
            os.kill(backend.pids()[job_id], signal.SIGKILL)  # the record is in flight in that worker

    out = tmp_path / "run"
    plan = plan_run(cfg, out)
    notes: list[str] = []
    sweep = ParallelSweep(ParallelSpec(workers=2), LocalBackend(2), on_dispatch=kill_on_dispatch)
    payload = run_experiment(plan.cfg, out, plan=plan, progress=False, sweep=sweep, log=notes.append)
    assert kills == [victim] and sweep.retried == [victim]
    assert [_stable(r) for r in payload["records"]] == [_stable(r) for r in reference]
    assert [_stable(r) for r in _records(out)] == [_stable(r) for r in reference]
    assert any("killed by SIGKILL" in n and "running it again" in n for n in notes)


class _DyingBackend:
    """Runs jobs in this process; the worker holding ``victim`` dies every time."""

    capacity = 1

    def __init__(self, victim):
        self.victim, self.queue = victim, []

    def free(self):
        return 1 - len(self.queue)

    def submit(self, job_id, job):
        self.queue.append((job_id, job))

    def poll(self, timeout):
        job_id, job = self.queue.pop()
        if job.kind == "record" and job.keys[0] == self.victim:
            return [(job_id, "died", "the worker process was killed by SIGKILL")]
        return [(job_id, "ok", run_job(job))]

    def close(self):
        pass


def test_worker_dying_twice_marks_its_record_failed(serial, tmp_path, monkeypatch):
    cfg, reference = serial
    monkeypatch.setenv("COBLAX_CACHE", str(tmp_path / "cache"))
    victim = ("mlp(hidden=[16])", "tai", 0.5, 0.5, "uniform", 1)
    out = tmp_path / "run"
    plan = plan_run(cfg, out)
    sweep = ParallelSweep(ParallelSpec(workers=2), _DyingBackend(victim))
    records = run_experiment(plan.cfg, out, plan=plan, progress=False, sweep=sweep, log=lambda _: None)["records"]
    assert sweep.retried == [victim]
    assert len(records) == len(reference) == 4
    for got, want in zip(records, reference):
        key = (got["model"], got["scheme"], got["budget_mac"], got["budget_param"], got["method"], got["seed"])
        if key == victim:
            assert got["status"] == "failed" and got["failed_stage"] == "worker"
            assert got["error"] == "the worker process was killed by SIGKILL (twice: the first time and once more)"
        else:
            assert _stable(got) == _stable(want)


def test_exception_in_a_worker_becomes_the_records_failure(serial, tmp_path, monkeypatch):
    """A job never raises: what user code raises is the record's failed entry, with its traceback."""
    from coblax.app import experiment
    from coblax.app.config import load_run_config
    from coblax.app.sweep import Job

    cfg, _ = serial

    def broken(*args, **kwargs):
        raise RuntimeError("the model raised")

    monkeypatch.setattr(experiment, "run_method", broken)
    run_cfg = load_run_config(cfg)
    key = ("mlp(hidden=[16])", "tai", 0.5, 0.5, "uniform", 0)
    out = run_job(Job("record", run_cfg, 0, (key,), str(tmp_path / "cache")))
    (record,) = out["records"]
    assert record["status"] == "failed" and record["error"] == "RuntimeError: the model raised"
    assert "Traceback" in record["traceback"] and "the model raised" in record["traceback"]
    assert (record["method"], record["budget_mac"], record["seed"]) == ("uniform", 0.5, 0)


@pytest.mark.parametrize("value", ["0", "-3"])
def test_bad_worker_count_exits_2(tmp_path, capsys, value):
    assert main(["run", str(tiny_run_config(tmp_path)), "--out", str(tmp_path / "o"), "--workers", value]) == 2
    assert "--workers must be a whole number >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_ray_missing_names_the_pip_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert main(["run", str(tiny_run_config(tmp_path)), "--ray"]) == 2
    assert "pip install 'coblax[ray]'" in capsys.readouterr().err


def test_unreachable_ray_address_exits_2_quickly(tmp_path, capsys):
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    assert main(["run", str(tiny_run_config(tmp_path)), "--ray", f"127.0.0.1:{port}"]) == 2
    assert time.monotonic() - start < 30
    assert f"cannot reach 127.0.0.1:{port}" in capsys.readouterr().err


def test_parallel_spec():
    assert parallel_spec().serial and parallel_spec(1).serial
    assert parallel_spec(3) == ParallelSpec(workers=3)
    with pytest.raises(ValueError, match="--workers"):
        parallel_spec(True)


@pytest.mark.slow
def test_ray_local_equals_serial_record_by_record(serial, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    cfg, reference = serial
    monkeypatch.setenv("COBLAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet", "--ray", "--workers", "2"]) == 0
    assert [_stable(r) for r in _records(out)] == [_stable(r) for r in reference]
