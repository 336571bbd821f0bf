"""Fault injection into real (tiny) runs: signals, kill -9, resume, damaged caches, NaN losses.

Tiny MLPs on the bundled digits, one or two epochs: every run here takes seconds.
Each test names the case of issue 11 it covers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from coblax.app.cli import main
from coblax.app.experiment import VOLATILE_KEYS
from coblax.util.errors import NumericalError
from helpers import tiny_run_config

REPO = Path(__file__).resolve().parents[1]

def _config(tmp_path: Path, name: str = "cfg.toml", *, methods=("uniform", "cptv"), macs=(0.5, 0.7),
            train_lr=1e-2, ft_lr=1e-3) -> Path:
    return tiny_run_config(
        tmp_path, name, methods="[" + ", ".join(f'"{m}"' for m in methods) + "]",
        budgets__mac="[" + ", ".join(map(str, macs)) + "]",
        train__learning_rate=repr(train_lr), finetune__learning_rate=repr(ft_lr),
    )


def _records(path: Path) -> list[dict]:
    return json.loads(path.read_text())["records"]


def _stable(record: dict) -> dict:
    """A record without what legitimately differs between two runs (timings, cache hits)."""
    out = {k: v for k, v in record.items() if k not in VOLATILE_KEYS}
    if isinstance(out.get("diagnostics"), dict):
        out["diagnostics"] = {k: v for k, v in out["diagnostics"].items() if k not in VOLATILE_KEYS}
    return out


def _start(cfg: Path, out: Path, cache: Path) -> subprocess.Popen:
    env = dict(os.environ, COBLAX_CACHE=str(cache), PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "coblax.app.cli", "run", str(cfg), "--out", str(out), "--quiet"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for_records(proc: subprocess.Popen, partial: Path, n: int, timeout: float = 240.0) -> int:
    """Poll until the partial file holds >= n records; return how many it holds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()}")
        if partial.exists():
            count = len(_records(partial))
            if count >= n:
                return count
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no records appeared in time")


# --------------------------------------------------------- signals, kill -9, resume


def test_sigterm_then_kill9_then_resume_equals_an_uninterrupted_run(tmp_path, capsys, monkeypatch):
    """Issue: an interrupted run redid everything and overwrote results.partial.json.

    SIGTERM stops the run after saving every finished record (exit 143); a resumed
    run killed with -9 mid-sweep loses nothing finished; the next resume skips the
    finished records, says so, removes leftover temporary files, and ends with
    records identical to an uninterrupted run's (timings and cache hits aside).
    """
    cfg = _config(tmp_path, methods=("uniform", "cptv"), macs=(0.4, 0.5, 0.6, 0.7))
    total = 8
    out, cache = tmp_path / "run", tmp_path / "cache"
    partial = out / "results.partial.json"

    proc = _start(cfg, out, cache)
    _wait_for_records(proc, partial, 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    after_term = _records(partial)
    assert 1 <= len(after_term) < total and not (out / "results.json").exists()
    assert not list(out.glob(".*.tmp"))

    proc = _start(cfg, out, cache)  # resume, then kill -9 once it has added a record
    _wait_for_records(proc, partial, len(after_term) + 1)
    proc.kill()
    proc.communicate(timeout=60)
    after_kill = _records(partial)
    assert len(after_kill) < total, "the run finished before it could be killed"
    assert after_kill[: len(after_term)] == after_term  # nothing finished was lost or rewritten
    (out / ".results.partial.json.leftover.tmp").write_text("{")  # as a kill during a write leaves

    monkeypatch.setenv("COBLAX_CACHE", str(cache))
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"{len(after_kill)} of {total} records already finished with this config; skipping them" in err
    assert "removed 1 leftover temporary file" in err
    assert not list(out.glob(".*.tmp")) and not partial.exists()
    resumed = _records(out / "results.json")
    assert resumed[: len(after_kill)] == after_kill

    monkeypatch.setenv("COBLAX_CACHE", str(tmp_path / "fresh-cache"))
    assert main(["run", str(cfg), "--out", str(tmp_path / "reference"), "--quiet"]) == 0
    reference = _records(tmp_path / "reference" / "results.json")
    assert len(reference) == len(resumed) == total
    assert [_stable(r) for r in resumed] == [_stable(r) for r in reference]


def test_sigint_saves_finished_records_and_restores_handlers(tmp_path, capsys, monkeypatch):
    """SIGINT right after a record was saved: exit 130, the record is kept, handlers restored."""
    from coblax.app import experiment

    real = experiment.write_json_atomic

    def write_then_interrupt(path, payload, **kwargs):
        real(path, payload, **kwargs)
        if Path(path).name == "results.partial.json":
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(experiment, "write_json_atomic", write_then_interrupt)
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a shell's background job, not always Python's
    assert main(["run", str(_config(tmp_path)), "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "interrupted by SIGINT; 1 finished record(s) are saved" in err and "Traceback" not in err
    assert len(_records(out / "results.partial.json")) == 1 and not (out / "results.json").exists()
    assert signal.getsignal(signal.SIGINT) is before


def test_partial_of_other_config_or_corrupt_is_never_overwritten(tmp_path, capsys):
    """Issue: rerunning turned 8 finished records into 1; a different config needs --force."""
    out = tmp_path / "run"
    out.mkdir()
    cfg = _config(tmp_path)
    partial = out / "results.partial.json"
    partial.write_bytes(b'{"records": [')  # torn by hand: refuse, do not overwrite
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{partial}: not a valid results file" in err and "pass --force" in err
    assert partial.read_bytes() == b'{"records": ['
    other = {"config": {"seed": 5}, "records": [
        {"model": "m", "method": "uniform", "scheme": "tai", "budget_mac": 0.5, "budget_param": 0.5,
         "mac_ratio": 0.4, "param_ratio": 0.4, "acc_before_finetune": 0.5, "acc_after_finetune": 0.6,
         "base_acc": 0.9}]}
    partial.write_text(json.dumps(other))
    before = partial.read_bytes()
    assert main(["check", str(cfg), "--out", str(out)]) == 2
    assert "holds results of a different config" in capsys.readouterr().err
    assert partial.read_bytes() == before
    models = Path(os.environ["COBLAX_CACHE"]) / "models"
    models.mkdir(parents=True, exist_ok=True)
    stale, young = models / ".mlp-x.npz.old.tmp", models / ".mlp-y.npz.new.tmp"
    stale.write_bytes(b"PK")
    young.write_bytes(b"PK")  # may be another run's write in progress: kept
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert main(["run", str(cfg), "--out", str(out), "--quiet", "--force"]) == 0
    assert len(_records(out / "results.json")) == 4 and not partial.exists()
    assert not stale.exists() and young.exists()
    young.unlink()
    capsys.readouterr()
    assert main(["check", str(cfg), "--out", str(out)]) == 0
    assert "ok; 4 records" in (printed := capsys.readouterr().out) and ": complete (4 records" in printed


# ------------------------------------------------------------------------- caches


def _base(tmp_path, limit=200, lr=1e-2, log=None):
    from coblax.app.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from coblax.app.experiment import train_base_model
    from coblax.nn.data import load_dataset

    cfg = RunConfig(data=DataConfig(limit_train=limit), train=TrainConfig(epochs=1, learning_rate=lr))
    data = load_dataset("digits", limit_train=limit)
    messages = [] if log is None else log
    base = train_base_model(cfg, ModelConfig("mlp", {"hidden": [8]}), data, tmp_path, progress=False,
                            log=messages.append)
    return base, messages


def _entry(tmp_path) -> Path:
    (entry,) = (tmp_path / "models").glob("*.npz")
    return entry


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def _empty(path):
    path.write_bytes(b"")


def _bitflip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _wrong_shapes(path):
    with np.load(path) as z:
        arrays = {k: np.zeros(tuple(d + 1 for d in z[k].shape), z[k].dtype) for k in z.files}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _nan_weights(path):
    with np.load(path) as z:
        arrays = {k: np.full(z[k].shape, np.nan, z[k].dtype) for k in z.files}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _other_settings(path):
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta["seed"] = 12345
    side.write_text(json.dumps(meta))


def _no_meta(path):
    path.with_suffix(".json").unlink()


@pytest.mark.parametrize(
    "damage,reason",
    [
        (_truncate, "is unreadable"),
        (_empty, "is unreadable"),
        (_bitflip, "is unreadable"),
        (_wrong_shapes, "the model needs float32("),
        (_nan_weights, "holds non-finite weights"),
        (_other_settings, "was written for other settings or data"),
        (_no_meta, "is missing or unreadable"),
    ],
)
def test_damaged_cache_entry_is_reported_and_retrained(tmp_path, damage, reason):
    """Issue: a truncated, empty, bit-flipped or mis-shaped cached model crashed every later run."""
    first, _ = _base(tmp_path)
    damage(_entry(tmp_path))
    second, log = _base(tmp_path)
    assert not second.cached
    assert any(reason in m and "retraining" in m for m in log), log
    assert second.accuracy == first.accuracy
    third, log = _base(tmp_path)  # the entry was healed
    assert third.cached and not log


def test_cache_is_keyed_by_the_data(tmp_path):
    """Issue: the cache key ignored data.dir and the data, reusing a model for other data."""
    from coblax.nn.train import data_digest

    first, _ = _base(tmp_path, limit=200)
    other, _ = _base(tmp_path, limit=150)
    assert not other.cached
    assert len(list((tmp_path / "models").glob("*.npz"))) == 2
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = np.arange(3)
    assert data_digest(x, y) == data_digest(x.copy(), y.copy())  # the data, not where it lives
    x2 = x.copy()
    x2[0, 0] += 1
    assert data_digest(x2, y) != data_digest(x, y)


def test_nan_is_never_cached_and_unwritable_cache_is_not_fatal(tmp_path, monkeypatch):
    """Issue: NaN weights were written to the cache; an unwritable cache lost the trained model."""
    with pytest.raises(NumericalError, match=r"train mlp\(hidden=\[8\]\): loss .* at step \d+"):
        _base(tmp_path, lr=1e6)
    assert not list(tmp_path.rglob("*.npz"))

    from coblax.nn import train as T

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(T, "save_params", refuse)
    base, log = _base(tmp_path)
    assert not base.cached and base.params is not None
    assert any("cannot write" in m and "not cached" in m for m in log), log


# ------------------------------------------------------------- numerical faults


def test_fit_stops_on_non_finite_loss_naming_stage_and_step():
    from coblax.nn import train as T

    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    params = {"w": jax.numpy.zeros((4, 2))}
    apply = lambda p, xb: xb @ p["w"]  # noqa: E731
    # step 1's loss is that of the initial weights; the NaN update shows in step 2's
    with pytest.raises(NumericalError, match=r"finetune x: loss is not finite \(nan\) at step 2"):
        T.fit(apply, params, x, y, epochs=2, batch_size=16, learning_rate=float("nan"), desc="finetune x",
              progress=False)
    x_bad = x.copy()
    x_bad[40] = np.inf  # the third batch of the first epoch holds it (fixed shuffle)
    with pytest.raises(NumericalError, match=r"at step \d+") as info:
        T.fit(apply, params, x_bad, y, epochs=1, batch_size=16, desc="train y", progress=False)
    assert info.value.stage == "train y" and 1 <= info.value.step <= 4


def test_diverging_finetune_fails_its_records_and_the_run_goes_on(tmp_path, capsys):
    """Issue: finetune.learning_rate = 1e6 exited 0 with a loss of 2e12 recorded as a result."""
    cfg = _config(tmp_path, methods=("uniform",), macs=(0.5, 0.7), ft_lr=1e6)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    captured = capsys.readouterr()
    records = _records(out / "results.json")
    assert len(records) == 2 and all(r["status"] == "failed" for r in records)
    for r in records:
        assert r["failed_stage"] == "finetune uniform" and r["failed_step"] >= 1
        assert "finetune uniform: loss" in r["error"] and r["acc_after_finetune"] is None
    assert "| uniform | failed | failed | failed | failed |" in captured.out
    assert "2 of 2 records failed" in captured.err and "Traceback" not in captured.err


def test_diverging_base_training_fails_that_models_records_and_caches_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COBLAX_CACHE", str(tmp_path / "cache"))
    cfg = _config(tmp_path, methods=("uniform",), macs=(0.5,), train_lr=1e6)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    (record,) = _records(out / "results.json")
    assert record["status"] == "failed" and record["failed_stage"] == "train mlp(hidden=[16])"
    assert not list((tmp_path / "cache").rglob("*.npz"))
    assert "Traceback" not in capsys.readouterr().err


def test_non_finite_cobla_objective_fails_that_record_only(tmp_path, capsys, monkeypatch):
    """A NaN in E(m) stops COBLA's record naming the stage and evaluation; uniform's goes on."""
    from coblax.lowrank.objective import NetworkLoss

    real = NetworkLoss.value_and_grad
    calls = {"n": 0}

    def poisoned(self, m):
        calls["n"] += 1
        value, grad = real(self, m)
        return (float("nan"), grad) if calls["n"] >= 3 else (value, grad)

    monkeypatch.setattr(NetworkLoss, "value_and_grad", poisoned)
    cfg = _config(tmp_path, methods=("cobla", "uniform"), macs=(0.5,))
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    captured = capsys.readouterr()
    cobla, uniform = _records(out / "results.json")
    assert cobla["status"] == "failed" and cobla["failed_stage"] == "cobla objective"
    assert cobla["failed_step"] == 3 and "at step 3" in cobla["error"]
    assert uniform["status"] == "ok" and uniform["acc_after_finetune"] > 0
    assert "| cobla | failed |" in captured.out and "1 of 2 records failed" in captured.err
