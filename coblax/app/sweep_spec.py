"""``--workers`` / ``--ray`` checked into a :class:`ParallelSpec` before anything runs.

See :mod:`coblax.app.sweep` for how a parallel run schedules its records.
"""

from __future__ import annotations

import dataclasses
import socket

from coblax.util.errors import CoblaxError

__all__ = ["CONNECT_TIMEOUT_S", "RAY_INSTALL", "ParallelSpec", "SweepError", "parallel_spec"]

RAY_INSTALL = "pip install 'coblax[ray]'"
#: Seconds to wait for a connection to a Ray address before giving up.
CONNECT_TIMEOUT_S = 10.0


class SweepError(CoblaxError, ValueError):
    """Bad ``--workers`` / ``--ray`` arguments, Ray not installed, or a Ray address not reachable."""


@dataclasses.dataclass(frozen=True)
class ParallelSpec:
    """How records run: ``workers`` local processes, or Ray tasks when ``ray``.

    Attributes:
      workers: local worker processes (1: the serial runner); with Ray the number
        of records in flight (None: the cluster's CPU count, or the local cores).
      ray: run records as Ray tasks.
      address: the Ray cluster's address (``host:port``, ``ray://host:port``,
        ``auto``); None starts a local Ray instance.
    """

    workers: int | None = 1
    ray: bool = False
    address: str | None = None

    @property
    def serial(self) -> bool:
        return not self.ray and (self.workers or 1) == 1


def parallel_spec(workers: int | None = None, ray: str | bool | None = None) -> ParallelSpec:
    """Check ``--workers`` and ``--ray`` before anything runs; a :class:`SweepError` names the problem.

    Args:
      workers: ``--workers`` (None: not given).
      ray: ``--ray``: None/False (not given), True or ``"local"`` (local instance), or an address.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise SweepError(f"--workers must be a whole number >= 1 (1 runs records one at a time), got {workers!r}")
    if ray is None or ray is False:
        return ParallelSpec(workers=1 if workers is None else workers)
    try:
        import ray as _ray  # noqa: F401
    except ImportError:
        raise SweepError(f"--ray needs Ray, which is not installed; install it with: {RAY_INSTALL}") from None
    address = None if ray is True or ray in ("", "local") else str(ray)
    if address is not None:
        _check_reachable(address)
    return ParallelSpec(workers=workers, ray=True, address=address)


def _check_reachable(address: str) -> None:
    """A TCP connection to ``host:port`` of ``address`` (``auto`` is left to Ray)."""
    if address == "auto":
        return
    target = address.split("://", 1)[1] if "://" in address else address
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise SweepError(f"--ray {address}: expected host:port, ray://host:port or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise SweepError(f"--ray {address}: cannot reach {host}:{port} ({err.strerror or err}); "
                         "is the Ray head running there?") from None
