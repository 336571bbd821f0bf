"""How often and how long JAX compiles: counts and seconds from ``jax.monitoring``.

JAX reports each compilation's stages as duration events (tracing to a jaxpr,
lowering to MLIR, the XLA backend compile). :func:`compile_stats` sums them for
the whole process since the first call; :class:`CompileClock` measures a block
(``with CompileClock() as clock: ...; clock.count, clock.seconds``). The runner
reports the compile seconds of each record with it, and the tests assert that a
second fine-tuning with equal shapes compiles nothing.
"""

from __future__ import annotations

import threading
from typing import Self

import jax

__all__ = ["COMPILE_EVENTS", "CompileClock", "compile_stats"]

#: Duration events that make up one compilation; the backend compile counts it.
BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    BACKEND_EVENT,
)

_lock = threading.Lock()
_totals = {"count": 0, "seconds": 0.0}
_installed = False


def _listener(event: str, duration: float, **kwargs) -> None:
    if event in COMPILE_EVENTS:
        with _lock:
            _totals["seconds"] += float(duration)
            if event == BACKEND_EVENT:
                _totals["count"] += 1


def _install() -> None:
    global _installed
    with _lock:
        if not _installed:
            jax.monitoring.register_event_duration_secs_listener(_listener)
            _installed = True


def compile_stats() -> tuple[int, float]:
    """(backend compilations, seconds spent tracing, lowering and compiling) in this process so far.

    Counting starts at the first call of this function (or of :class:`CompileClock`).
    """
    _install()
    with _lock:
        return _totals["count"], _totals["seconds"]


class CompileClock:
    """Compilations and compile seconds inside a ``with`` block (every thread of the process)."""

    def __enter__(self) -> Self:
        self._start = compile_stats()
        self.count, self.seconds = 0, 0.0
        return self

    def __exit__(self, *exc) -> None:
        count, seconds = compile_stats()
        self.count, self.seconds = count - self._start[0], seconds - self._start[1]
