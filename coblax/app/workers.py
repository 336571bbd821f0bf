"""How a parallel sweep shares the machine: the order of its jobs and each worker's cores (issue 19).

A sweep of N records on W workers ends when its last record does. Handing the
records out in the serial run's order (budget by budget, each budget's methods
in turn) leaves the long records (a COBLA solve is 5-20x a baseline record:
the objective E(m) is evaluated on real images in every solver iteration) spread
over the whole sweep, and the last one may start when the other workers have
little left to do. This module orders the jobs instead as the *longest
processing time first* rule does (Graham 1969: the makespan is then within
4/3 of the optimum), within blocks that keep each worker's state useful:

1. every base model first: the base jobs of all (seed, model) pairs are ready
   at the start and train side by side, so no record waits on a base model
   that could have been trained while another one was;
2. then the records of one (seed, model) after another, and within them one
   scheme after another (a worker keeps the data set, base model and
   decomposition of the last record it ran, :class:`coblax.app.sweep`'s
   ``_Context``: records of the same block reuse them and the compiled
   fine-tuning and evaluation steps);
3. within one (seed, model, scheme) block the slow methods (:data:`SLOW_METHODS`)
   first, then the others, each group in the serial order.

The order changes nothing in the records (each is computed from its own config,
data, seed and cached base model); the driver still writes them in the serial
order.

Cores. Each worker confines itself to its share of the cores (:func:`pin_worker`)
after its XLA client has sized its thread pool from all of them, so that workers
do not wait on each other's threads and the records stay equal to a serial run's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence

__all__ = ["SLOW_METHODS", "base_priority", "record_priority"]

#: Methods whose records take much longer than a fine-tuning: an allocator that
#: evaluates the network's loss in every iteration (``cobla``) or trains the
#: network while it allocates (``lc``). Allocators that declare ``needs_loss``
#: count as slow too (:func:`is_slow`).
SLOW_METHODS = frozenset({"cobla", "lc"})


def is_slow(method: str) -> bool:
    """Whether records of ``method`` go out before the other records of their block."""
    if method in SLOW_METHODS:
        return True
    from coblax.lowrank.registry import allocator_factory

    try:  # a factory that is a class may say it needs the loss (registered plugins)
        return bool(getattr(allocator_factory(method), "needs_loss", False))
    except Exception:  # noqa: BLE001 - an unknown method is the planner's error, not the scheduler's
        return False


def base_priority(position: int) -> tuple:
    """Priority of the base job of the (seed, model) block that starts at serial ``position``: before any record."""
    return (0, position, 0, 0)


def record_priority(key: tuple, position: int, block: int, schemes: Sequence[str]) -> tuple:
    """Priority of the record ``key`` (smaller goes out first).

    Args:
      key: the record key ``(model label, scheme, mac, param, method, seed)``.
      position: its index in the serial run's order.
      block: the index of its (seed, model) block in the serial order.
      schemes: the config's schemes, in their order.
    """
    scheme, method = key[1], key[4]
    scheme_index = list(schemes).index(scheme) if scheme in schemes else len(schemes)
    return (1, block, scheme_index, 0 if is_slow(method) else 1, position)


def dispatch_order(keys: Iterable[tuple], schemes: Sequence[str]) -> list[tuple]:
    """``keys`` (one (seed, model) block, serial order) in the order they go out."""
    keys = list(keys)
    return sorted(keys, key=lambda k: record_priority(k, keys.index(k), 0, schemes))


__all__ += ["dispatch_order", "is_slow"]


# -- one share of the cores per worker

#: ``"<folder>:<n>"``: the slot folder of this run and its number of workers (set by the driver).
SLOTS_ENV = "COBLAX_WORKER_SLOTS"
#: Set to ``0`` to leave the workers unpinned.
PIN_ENV = "COBLAX_PIN_WORKERS"
_slot: dict = {}  # this process's claimed slot: {"index": i, "fd": open lock file}


def make_slots(n: int) -> tuple[str, str]:
    """A fresh slot folder for ``n`` workers: the ``(name, value)`` of :data:`SLOTS_ENV` for the jobs."""
    folder = tempfile.mkdtemp(prefix="coblax-slots-")
    return SLOTS_ENV, f"{folder}:{int(n)}"


def remove_slots(env: Sequence[tuple[str, str]]) -> None:
    """Remove the slot folder named in a job environment (the driver, after the run)."""
    for name, value in env:
        if name == SLOTS_ENV:
            shutil.rmtree(value.rsplit(":", 1)[0], ignore_errors=True)


def _claim(folder: str, n: int) -> int | None:
    """The first free slot of ``folder`` (an flock held for this process's life, released at its death)."""
    import fcntl

    for i in range(n):
        fd = os.open(os.path.join(folder, f"slot-{i}"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _slot.update(index=i, fd=fd)
        return i
    return None


def cores_of(index: int, n: int, cores: Sequence[int]) -> list[int]:
    """The cores of worker ``index`` of ``n``: a contiguous 1/n share, or one core when n > cores."""
    cores = sorted(cores)
    if n > len(cores):
        return [cores[index % len(cores)]]
    return cores[index * len(cores) // n:(index + 1) * len(cores) // n]


def pin_worker() -> list[int] | None:
    """Confine this worker process to its share of the cores, once; returns them (None: not pinned).

    Why: each worker's XLA runs its operations on a pool of threads sized by the
    machine's cores, so W workers on C cores run W x C busy threads, and a
    parallel operation waits for its slowest piece whenever another worker's
    thread holds that core. Each worker claims a slot (``n`` of them, named by
    :data:`SLOTS_ENV`) and every thread of it is moved onto the slot's cores.
    The XLA CPU client is created first, with every core in view, so that its
    thread pool, and with it the split of every operation and the order of its
    sums, is the driver's: the records stay bit-equal to a serial run's (a pool
    sized by one core changes the last bits of the fine-tuned weights).
    Does nothing where the platform cannot pin threads, when no slot is free,
    without :data:`SLOTS_ENV`, or with ``COBLAX_PIN_WORKERS=0`` (:data:`PIN_ENV`).
    """
    if "tried" in _slot:
        return _slot.get("cores")
    _slot["tried"] = True
    spec = os.environ.get(SLOTS_ENV, "")
    if os.environ.get(PIN_ENV, "1") == "0" or ":" not in spec or not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task"):
        return None
    folder, n = spec.rsplit(":", 1)
    if not os.path.isdir(folder):
        return None
    index = _claim(folder, int(n))
    if index is None:
        return None
    import jax.numpy as jnp

    jnp.ones(3).block_until_ready()  # the CPU client and its thread pool, sized with every core in view
    mine = cores_of(index, int(n), os.sched_getaffinity(0))
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), mine)
        except OSError:  # a thread that ended meanwhile
            pass
    _slot["cores"] = mine
    return mine


__all__ += ["PIN_ENV", "SLOTS_ENV", "cores_of", "make_slots", "pin_worker", "remove_slots"]
