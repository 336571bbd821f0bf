"""The order in which a parallel sweep hands out its jobs (issue 19).

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
"""

from __future__ import annotations

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
