"""Reading saved experiment results: ``results.json`` files and their records, checked.

Each experiment directory holds a ``results.json`` of the form ``{"records": [...]}``;
a record describes one (model, method, scheme, budget) run with at least the keys of
:data:`REQUIRED_KEYS`. :func:`read_results` checks one file's records (types and
required keys, the record schema); :func:`load_records` reads several folders.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from coblax.util.errors import CoblaxError, FileLoadError
from coblax.util.limits import parse_json

__all__ = ["REQUIRED_KEYS", "ResultsError", "ResultsNotFoundError", "is_number", "load_records", "read_results"]

REQUIRED_KEYS = (
    "model",
    "method",
    "scheme",
    "budget_mac",
    "budget_param",
    "mac_ratio",
    "param_ratio",
    "acc_before_finetune",
    "acc_after_finetune",
    "base_acc",
)
_TEXT_KEYS = ("model", "method", "scheme")
_NUMBER_KEYS = ("budget_mac", "budget_param")
_OPTIONAL_NUMBER_KEYS = ("mac_ratio", "param_ratio", "acc_before_finetune", "acc_after_finetune", "base_acc")


class ResultsError(CoblaxError, ValueError):
    """A results file or folder that cannot be read; the message names it and why."""


class ResultsNotFoundError(ResultsError, FileNotFoundError):
    """A results path that does not exist, or a folder without results.json."""


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_results(file: str | os.PathLike) -> dict[str, Any]:
    """The payload of one results file, its records checked (types and required keys).

    Raises:
      ResultsNotFoundError: no such file.
      ResultsError: unreadable, not JSON, no ``records`` list, or a bad record.
    """
    file = os.fspath(file)
    try:
        with open(file, "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        raise ResultsNotFoundError(f"{file}: no such file") from None
    except OSError as err:
        raise ResultsError(f"{file}: cannot read ({err.strerror or err})") from None
    try:
        data = parse_json(blob, file)
    except FileLoadError as err:
        reason = str(err).removeprefix(f"{file}: ")
        raise ResultsError(f"{file}: not a valid results file ({reason})") from None
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise ResultsError(f"{file}: expected a JSON object with a 'records' list")
    for i, rec in enumerate(data["records"]):
        if not isinstance(rec, dict):
            raise ResultsError(f"{file}: record {i} is not a JSON object")
        missing = [k for k in REQUIRED_KEYS if k not in rec]
        if missing:
            raise ResultsError(f"{file}: record {i} lacks the keys {', '.join(missing)}")
        bad = [k for k in _TEXT_KEYS if not isinstance(rec[k], str)]
        bad += [k for k in _NUMBER_KEYS if not is_number(rec[k])]
        bad += [k for k in _OPTIONAL_NUMBER_KEYS if rec[k] is not None and not is_number(rec[k])]
        seed = rec.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            bad.append("seed")
        bad += _schema_problems(rec)
        if bad:
            raise ResultsError(f"{file}: record {i} has values of the wrong type for {', '.join(bad)}")
    return data


def _is_rank_map(value: Any, allow_none: bool) -> bool:
    """A {layer: rank} object with non-negative integer ranks."""
    return isinstance(value, dict) and all(
        (isinstance(r, int) and not isinstance(r, bool) and r >= 0) or (allow_none and r is None)
        for r in value.values())


def _schema_problems(rec: dict[str, Any]) -> list[str]:
    """Fields of a record, beyond :data:`REQUIRED_KEYS`, whose type breaks the record schema.

    ``ranks`` and ``full_ranks`` are {layer: int} objects (or null); ``status``,
    ``error``, ``basis`` strings; accuracies within [0, 1]; ratios and budgets >= 0.
    """
    bad = []
    for key in ("ranks", "full_ranks"):
        if rec.get(key) is not None and not _is_rank_map(rec[key], key == "ranks"):
            bad.append(key)
    for key in ("status", "error", "basis", "spectrum", "failed_stage"):
        if rec.get(key) is not None and not isinstance(rec[key], str):
            bad.append(key)
    for key in ("acc_before_finetune", "acc_after_finetune", "base_acc"):
        if is_number(rec.get(key)) and not 0.0 <= rec[key] <= 1.0:
            bad.append(f"{key} (outside [0, 1])")
    for key in ("budget_mac", "budget_param", "mac_ratio", "param_ratio"):
        if is_number(rec.get(key)) and rec[key] < 0:
            bad.append(f"{key} (negative)")
    if rec.get("original_layers") is not None and not (
            isinstance(rec["original_layers"], list) and all(isinstance(x, str) for x in rec["original_layers"])):
        bad.append("original_layers")
    return bad


def load_records(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Read the records of ``DIR/results.json`` for each path (a directory or the file).

    A folder that holds only ``results.partial.json`` (an unfinished run) is an
    error that says how to finish it; the partial file itself may be given.

    Raises:
      ResultsNotFoundError: a path that does not exist or a folder without results.
      ResultsError: an unreadable file, one without a ``records`` list, or a bad record.
    """
    if isinstance(paths, str):
        raise ValueError("paths must be a list of paths, not a single string")
    records: list[dict[str, Any]] = []
    for path in paths:
        if not os.path.exists(path):
            raise ResultsNotFoundError(f"{path}: no such file or folder")
        file = path
        if os.path.isdir(path):
            file = os.path.join(path, "results.json")
            partial = os.path.join(path, "results.partial.json")
            if not os.path.exists(file) and os.path.exists(partial):
                raise ResultsNotFoundError(
                    f"{path} holds no results.json, only results.partial.json (an unfinished run): "
                    f"run the same `coblax run` again to finish it, or give {partial} to tabulate "
                    "what is finished"
                )
            if not os.path.exists(file):
                raise ResultsNotFoundError(f"{path}: no results.json in this folder")
        records.extend(dict(rec) for rec in read_results(file)["records"])
    return records

