"""Atomic file output and JSON-safe conversion.

Every file coblax writes goes through :func:`write_bytes_atomic`: the data is
written to a temporary file beside the target, flushed, and renamed over it, so a
crash or kill at any point leaves either the old file or the new one, never a torn
one under the final name.

* The file gets the permissions the process umask gives (``0666 & ~umask``, as
  ``open`` would), not ``mkstemp``'s 0600.
* The temporary file's name carries the writer's PID (``.NAME.PID-XXXX.tmp``), so a
  clean-up removes only the temporaries of processes that are gone
  (:func:`remove_stale_temporaries`), never another live run's.
* An ``OSError`` while writing (disk full, ``ulimit -f``, permissions) raises
  :class:`WriteError`, which names the file; the old file is kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from coblax.util.errors import CoblaxError

__all__ = ["jsonable", "write_bytes_atomic", "write_text_atomic", "write_json_atomic", "WriteError",
           "remove_stale_temporaries", "file_mode"]

_UMASK_LOCK = threading.Lock()
_TEMP_PID = re.compile(r"\.(\d+)-[^.]*\.tmp$")


class WriteError(CoblaxError, OSError):
    """A file could not be written (disk full, file size limit, permissions); names the file."""

    def __str__(self) -> str:
        return str(self.strerror)


def file_mode() -> int:
    """``0o666`` less the process umask: the mode ``open()`` gives a new file."""
    with _UMASK_LOCK:  # reading the umask means setting it; keep that instant private
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def jsonable(obj: Any) -> Any:
    """``obj`` with NumPy arrays/scalars, tuples and dataclasses turned into JSON types."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    return obj


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename.

    Raises:
      WriteError: (an ``OSError`` and a ``CoblaxError``) naming ``path`` when it cannot
        be written; whatever was at ``path`` before is kept.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), file_mode())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _discard(tmp)
        if isinstance(err, WriteError):
            raise
        raise WriteError(err.errno, f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: str | None) -> None:
    if tmp is not None:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def remove_stale_temporaries(folder: str | os.PathLike, pattern: str, min_age_s: float = 0.0) -> int:
    """Delete the ``write_bytes_atomic`` temporaries in ``folder`` whose writer is gone.

    A temporary named with a PID (``.NAME.PID-XXXX.tmp``) is removed only when that
    process no longer runs on this host and it is at least ``min_age_s`` old; one
    without a PID (written before PIDs were recorded) only by age. Returns the count.
    """
    from coblax.util.runlock import pid_alive

    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed, now = 0, time.time()
    for tmp in folder.glob(pattern):
        match = _TEMP_PID.search(tmp.name)
        try:
            if match and int(match.group(1)) != os.getpid() and pid_alive(int(match.group(1))):
                continue
            if now - tmp.stat().st_mtime >= min_age_s:
                tmp.unlink()
                removed += 1
        except OSError:
            pass
    return removed


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text through :func:`write_bytes_atomic`."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, payload: Any, *, indent: int | None = 1) -> None:
    """``payload`` (made :func:`jsonable`) as JSON through :func:`write_bytes_atomic`."""
    write_text_atomic(path, json.dumps(jsonable(payload), indent=indent, sort_keys=False))
