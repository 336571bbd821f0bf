"""One run per output folder: a lock file holding the owner's PID and host.

Two ``coblax run`` (or ``coblax study``) processes on one ``--out`` would write the
same partial results and remove each other's temporary files. :func:`run_lock`
creates ``OUT/.coblax.lock`` atomically (a hard link of a fully written temporary
file, so the lock never exists half written) and removes it when the run ends:

* another live process holds it: :class:`LockError` at once (exit 2), naming the
  holder's PID, host, start time and command;
* its process is gone on this host (a run killed with ``-9``, a crash): the stale
  lock is taken over and the takeover reported through ``log``;
* held from another host (a shared file system): refused, since its process cannot
  be checked from here; the message says to remove the file if no run uses it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from coblax.util.errors import CoblaxError

__all__ = ["LOCK_NAME", "LockError", "pid_alive", "read_lock", "run_lock"]

LOCK_NAME = ".coblax.lock"


class LockError(CoblaxError):
    """The output folder is in use by another run (or its lock cannot be read)."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    try:  # a zombie (exited, not yet reaped) holds nothing
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def read_lock(path: Path) -> dict | None:
    """The lock's content, or None when it is unreadable or not a lock written by coblax."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("pid"), int) and isinstance(data.get("host"), str)
    return data if ok else None


def _describe(info: dict) -> str:
    return (f"PID {info['pid']} on host {info['host']} (since {info.get('started', '?')}: "
            f"{info.get('command', '?')})")


def _try_create(lock: Path, content: bytes) -> bool:
    tmp = lock.with_name(f"{lock.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, lock)  # atomic: fails if the lock exists
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold ``folder/.coblax.lock`` for the duration of the ``with`` block.

    Raises:
      LockError: another live run holds it, or it is held from another host, or
        it cannot be read (the message names the file and what to do).
    """
    log = log or (lambda m: print(f"coblax: {m}", file=sys.stderr, flush=True))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    host = socket.gethostname()
    mine = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(sys.argv)[:300]}
    content = json.dumps(mine).encode("utf-8")
    for _ in range(3):
        try:
            created = _try_create(lock, content)
        except OSError as err:
            raise LockError(f"cannot create the lock file {lock}: {err.strerror or err}") from None
        if created:
            break
        info = read_lock(lock)
        if info is None:
            if not lock.exists():  # released meanwhile: try again
                continue
            raise LockError(f"{lock}: an unreadable lock file; if no coblax run uses {folder}, remove it")
        if info["host"] != host:
            raise LockError(f"{folder} is in use by {_describe(info)}: refused (its process cannot be checked "
                            f"from this host); if no run uses it, remove {lock}")
        if pid_alive(info["pid"]) and info["pid"] != os.getpid():
            raise LockError(f"{folder} is in use by another coblax run, {_describe(info)}; wait for it to "
                            "finish or choose another --out")
        # stale: its process is gone. Remove it only if it is still that same stale lock.
        if read_lock(lock) == info:
            lock.unlink(missing_ok=True)
            log(f"took over the stale lock of {_describe(info)}, which is no longer running")
    else:
        raise LockError(f"{lock}: could not take the lock (other runs keep taking it); try again")
    try:
        yield lock
    finally:
        if (read_lock(lock) or {}).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)
