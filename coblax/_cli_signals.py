"""Early signal handling of the ``coblax`` command (standard library only).

Before ``coblax run`` installs its own handlers, the process spends seconds
importing JAX. Python's default SIGINT handler raises ``KeyboardInterrupt``
wherever the main thread is, and there it is either uncaught (a traceback, the
process killed by SIGINT), swallowed where Python ignores exceptions (a ``__del__``
or weakref callback: the message "Exception ignored", and the run then went on to
exit 0), or it leaves a half-imported XLA runtime whose threads crash the
interpreter's shutdown (SIGSEGV, exit 139). Measured with
``tests/test_safe_run.py::test_early_sigint_exits_130``.

:func:`install_early_exit` is called first thing when the ``coblax`` package is
imported by the command line (the ``coblax`` console script or ``python -m
coblax.app.cli``; never when the package is imported as a library): until the run
installs its own handlers, SIGINT / SIGTERM end the process at once with status
130 / 143 through ``os._exit`` -- nothing has been written yet, and no interpreter
teardown runs. A signal that the parent set to be ignored (a background job's
SIGINT) stays ignored.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys

__all__ = ["hard_exit", "install_early_exit", "finish", "is_command_line"]

_final_code: int | None = None  # the finished command's exit status (see finish)


def is_command_line() -> bool:
    """Whether this process is the ``coblax`` command (not a library import, not the tests)."""
    if os.path.basename(sys.argv[0] or "") == "coblax":  # the console script
        return True
    argv = list(getattr(sys, "orig_argv", []) or [])
    return any(a == "-m" and b == "coblax.app.cli" for a, b in zip(argv, argv[1:]))


def hard_exit(code: int) -> None:
    """Flush the standard streams and end the process now (no interpreter teardown)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _say_and_exit(signum: int, when: str) -> None:
    try:
        os.write(2, f"coblax: interrupted by {signal.Signals(signum).name} {when}\n".encode())
    except OSError:
        pass
    hard_exit(128 + signum)


def _early(signum, frame) -> None:
    _say_and_exit(signum, "while starting; nothing was written")


def install_early_exit() -> None:
    """SIGINT/SIGTERM end the command at once (130/143) until the run sets its own handlers."""
    if not is_command_line():
        return
    # Registered before JAX (and Ray) are imported, so it runs last among the exit
    # functions: after theirs, and before the interpreter resets the signal handlers.
    atexit.register(_exit_at_teardown)
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) in (signal.default_int_handler, signal.SIG_DFL):
            signal.signal(sig, _early)


def _late(signum, frame) -> None:
    _say_and_exit(signum, "after the command finished; everything was already saved")


def finish(code: int) -> None:
    """The command is done with status ``code``: a SIGINT/SIGTERM from now on ends it at once.

    After the command, the interpreter joins threads and runs the exit functions (JAX's,
    Ray's), then resets the signal handlers to their defaults and tears down; a signal
    there killed the process by the signal itself (a parent saw -2; the fault probe,
    ``benchmarks/probe_entry_points.py``: 2 of 5 SIGINTs at ~4 s, as a small run ended on
    an idle machine). So the late handler exits 128 + signum, and the last exit function
    ends the process with ``code`` before the handlers are reset.
    """
    global _final_code
    _final_code = int(code)
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _late)


def _exit_at_teardown() -> None:
    if _final_code is not None:
        hard_exit(_final_code)
