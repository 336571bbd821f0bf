"""Running a study: checks before any work, one seed at a time, resumable, locked, atomic."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from coblax.app.config import (
    ConfigError,
    read_config_text,
)
from coblax.app.experiment import (
    config_fingerprint,
    stop_on_signals,
    versions,
    writable_problem,
)
from coblax.app.results import ResultsError
from coblax.app.studies.config import (
    StudyConfig,
    load_study_config,
    study_model,
)
from coblax.app.studies.kd import study_kd
from coblax.app.studies.pieces import Pieces
from coblax.app.studies.prune_quant import study_prune_quant
from coblax.app.studies.small_arch import study_small_arch
from coblax.app.studies.svd_fc import study_svd_fc
from coblax.nn.data import Dataset, load_dataset
from coblax.nn.models import build_model
from coblax.util import write_json_atomic
from coblax.util.errors import RunInterrupted
from coblax.util.runlock import run_lock

__all__ = ["RUNNERS", "PARTIAL", "preflight_study", "run_study", "run_study_file"]

#: study -> runner(cfg, data, seed, progress, pieces=None) -> the seed's records.
RUNNERS: dict[str, Callable[..., list[dict]]] = {
    "kd": study_kd,
    "small_arch": study_small_arch,
    "svd_fc": study_svd_fc,
    "prune_quant": study_prune_quant,
}


PARTIAL = "results.partial.json"


def _model_tables(cfg: StudyConfig) -> list[tuple[str, Any]]:
    """(config key, model table) of every bundled model the study builds."""
    if cfg.study == "kd":
        return [("kd.teacher", cfg.kd.teacher), ("kd.student", cfg.kd.student)]
    if cfg.study in ("svd_fc", "prune_quant"):
        return [(f"{cfg.study}.model", cfg.settings().model)]
    return []


def preflight_study(cfg: StudyConfig, data: Dataset) -> None:
    """Check, before anything is trained, what the config asks of the data and the models.

    Every model table is built abstractly (``jax.eval_shape``) on the data's input
    shape, the KD transfer set against the training images; raises ConfigError.
    The student is checked here, so that a bad student no longer wastes the
    teacher's training.
    """
    x = jax.ShapeDtypeStruct((1, *data.input_shape), jnp.float32)
    for where, table in _model_tables(cfg):
        mc = study_model(table, where)
        try:
            model = build_model(mc.name, num_classes=data.num_classes, input_shape=data.input_shape,
                                **dict(mc.options))
            jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
        except Exception as err:  # noqa: BLE001 - whatever the options break, report it as theirs
            raise ConfigError(f"{where} ({mc.label}) cannot be built for inputs {tuple(data.input_shape)}: "
                              f"{type(err).__name__}: {err}") from None
    kd = cfg.kd
    if cfg.study == "kd" and kd.transfer_size is not None and kd.transfer_size > len(data.x_train):
        raise ConfigError(f"kd.transfer_size = {kd.transfer_size} exceeds the {len(data.x_train)} training images")


def _previous_partial(out: Path, fingerprint: dict, force: bool) -> dict | None:
    """The partial payload of an interrupted run of the same config in ``out``, or None."""
    path = out / PARTIAL
    if force or not path.exists():
        return None
    try:
        payload = _read_study_payload(path)
    except ResultsError as err:
        raise ConfigError(f"{err}; move it away or pass --force to start over") from None
    if payload.get("fingerprint") != fingerprint:
        raise ConfigError(f"{path} holds results of a different study config; pass --force to start over "
                          "or choose another --out")
    return payload


def _read_study_payload(path: Path) -> dict:
    from coblax.util.errors import FileLoadError
    from coblax.util.limits import parse_json

    try:
        data = parse_json(path.read_bytes(), str(path))
    except (OSError, FileLoadError) as err:
        raise ResultsError(f"{path}: not a valid study results file ({err})") from None
    ok = (isinstance(data, dict) and isinstance(data.get("records"), list)
          and all(isinstance(r, dict) for r in data["records"])
          and isinstance(data.get("done_seeds", []), list))
    if not ok:
        raise ResultsError(f"{path}: expected a study results object with 'records' and 'done_seeds' lists")
    pieces = data.get("pieces", {})
    ok = isinstance(pieces, dict) and all(
        isinstance(seed_pieces, dict) and all(
            isinstance(recs, list) and all(isinstance(r, dict) for r in recs) for recs in seed_pieces.values())
        for seed_pieces in pieces.values())
    if not ok:
        raise ResultsError(f"{path}: 'pieces' must map each seed to an object of piece -> list of records")
    return data


def _resume(payload: dict, previous: dict, cfg: StudyConfig, out: Path, log: Callable[[str], None]) -> None:
    """Carry an interrupted run's finished seeds and pieces into ``payload``, and say so."""
    done = [s for s in previous["done_seeds"] if s in cfg.seeds]
    payload["records"] = [r for r in previous["records"] if r.get("seed") in done]
    payload["done_seeds"] = done
    payload["pieces"] = {k: v for k, v in previous.get("pieces", {}).items()
                         if k in map(str, cfg.seeds) and int(k) not in done}
    payload["started"] = previous.get("started", payload["started"])
    n_pieces = sum(map(len, payload["pieces"].values()))
    log(f"resuming {out}: seed(s) {', '.join(map(str, done)) or '(none)'} and {n_pieces} piece(s) of the "
        "others already finished with this config; skipping them")


def run_study(cfg: StudyConfig, out_dir: str | Path, *, config_text: str = "", progress: bool = True,
              force: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Run every seed of the study; write ``out_dir/results.json`` atomically and return it.

    Each record carries ``study`` and ``seed``; the payload carries the config (and its
    text), the seeds, the package versions, the dataset sizes and the wall time.

    Checked before any work: the output folder (writable, not a file), the data (a
    config for absent data names the folder and the files expected), every model
    table built on the data's input shape and the KD transfer set
    (:func:`preflight_study`). Then, like ``coblax run``:

    * each piece of a seed (:mod:`coblax.app.studies.pieces`: a part of
      ``prune_quant``, a network of ``small_arch``, a layer of ``svd_fc``, a student
      of ``kd``) is saved in ``results.partial.json`` as soon as it is finished, and
      each finished seed; a rerun of the same config skips the finished seeds and
      pieces (``force`` starts over; a partial file of another config is refused);
    * SIGINT / SIGTERM raise :class:`RunInterrupted` with every finished seed saved
      (a signal during a save waits for it);
    * the folder is locked for the run (:mod:`coblax.util.runlock`).
    """
    log = log or (lambda m: print(f"coblax: {m}", flush=True, file=sys.stderr))
    start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    reason = writable_problem(out)
    if reason:
        raise ConfigError(f"--out {out}: {reason}")
    datasets = {s: load_dataset(cfg.data.name, cfg.data.dir, seed=s, limit_train=cfg.data.limit_train,
                                limit_test=cfg.data.limit_test) for s in cfg.seeds}
    preflight_study(cfg, datasets[cfg.seeds[0]])
    fingerprint = config_fingerprint(dataclasses.asdict(cfg), None)
    previous = _previous_partial(out, fingerprint, force)
    payload: dict = {
        "study": cfg.study,
        "name": cfg.name,
        "config": dataclasses.asdict(cfg),
        "config_text": config_text,
        "fingerprint": fingerprint,
        "seed": cfg.seeds[0],  # as in ``coblax run`` results; every record names its own seed
        "seeds": list(cfg.seeds),
        "versions": versions(),
        "dataset": {"name": cfg.data.name, "train": len(datasets[cfg.seeds[0]].x_train),
                    "test": len(datasets[cfg.seeds[0]].x_test)},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "records": [],
        "done_seeds": [],
        "pieces": {},  # seed -> piece -> records, for the seeds not finished yet
    }
    if previous is not None:
        _resume(payload, previous, cfg, out, log)
    partial = out / PARTIAL
    with stop_on_signals() as signals, run_lock(out, log):

        def save() -> None:
            with signals.saving():
                write_json_atomic(partial, payload)

        try:
            for seed in cfg.seeds:
                if seed in payload["done_seeds"]:
                    continue
                done = payload["pieces"].setdefault(str(seed), {})

                def save_piece(key: str, records: list[dict], done: dict = done) -> None:
                    done[key] = records
                    save()

                pieces = Pieces(done=dict(done), save=save_piece)
                recs = [{"study": cfg.study, "seed": seed} | rec
                        for rec in RUNNERS[cfg.study](cfg, datasets[seed], seed, progress, pieces=pieces)]
                payload["records"] += recs
                payload["done_seeds"].append(seed)
                del payload["pieces"][str(seed)]
                save()
            signals.check()  # a signal whose exception a gc callback swallowed still stops the run
        except RunInterrupted as err:
            in_pieces = sum(len(r) for seed in payload["pieces"].values() for r in seed.values())
            err.saved = len(payload["records"]) + in_pieces if partial.exists() else 0
            err.partial = partial
            raise
        payload.pop("pieces")
        payload["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        payload["wall_seconds"] = time.perf_counter() - start
        write_json_atomic(out / "results.json", payload)
        partial.unlink(missing_ok=True)
    return payload


def run_study_file(config: str | Path, out: str | Path | None = None, *, force: bool = False,
                   progress: bool = True) -> dict:
    """``coblax study CONFIG [--out DIR] [--force]``: check everything, refuse to overwrite unless forced, run.

    The output folder defaults to ``runs/<config file stem>``; the returned payload
    also names the ``results_file`` written. An existing ``results.json`` is refused
    (ConfigError, exit 2) unless ``force``.
    """
    text = read_config_text(config)
    cfg = load_study_config(config)
    target = Path(out or Path("runs") / Path(config).stem) / "results.json"
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; pass --force to overwrite or choose another --out")
    payload = run_study(cfg, target.parent, config_text=text, progress=progress, force=force)
    return payload | {"results_file": str(target)}
