"""The project's own error types.

Every error that a user can cause with a config, a command-line argument, a data
file or a ``.cbx`` file derives from :class:`CoblaxError`; the CLI turns exactly
these into exit status 2 and one message, and lets every other exception (a bug)
keep its traceback. The subclasses live next to the code that raises them
(``ConfigError`` in :mod:`coblax.util.schema`, ``DataError`` in
:mod:`coblax.nn.data`, ``BudgetError`` in :mod:`coblax.lowrank.allocation`,
``CbxError`` in :mod:`coblax.compress.cbx`...) and also derive from ``ValueError``
where they did before, so existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations

__all__ = ["CoblaxError", "FileLoadError", "NumericalError", "RunInterrupted"]


class CoblaxError(Exception):
    """Base of every error caused by input (config, arguments, files), not by a bug."""


class FileLoadError(CoblaxError, ValueError):
    """A file coblax reads is damaged, too large or not what it should be.

    The message names the file and the field (JSON key, array name, zip member)
    at fault. Raised by the bounded readers of :mod:`coblax.util.limits` and
    :mod:`coblax.util.npz` before anything large is allocated.
    """


class NumericalError(CoblaxError, ArithmeticError):
    """A non-finite or diverging quantity (loss, objective, weights).

    Attributes:
      stage: where it happened (``"train mlp"``, ``"finetune cobla"``, ``"cobla objective"``).
      step: the step (optimizer step or objective evaluation) at which it was seen.
      value: the offending value (NaN, inf or the diverged loss).
    """

    def __init__(self, stage: str, step: int, value: float, hint: str = "") -> None:
        self.stage, self.step, self.value = stage, int(step), float(value)
        what = "is not finite" if value != value or abs(value) == float("inf") else "diverged"
        text = f"{stage}: loss {what} ({value:.4g}) at step {step}"
        super().__init__(text + (f"; {hint}" if hint else ""))


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a run after every finished record was saved.

    A ``KeyboardInterrupt`` (not a :class:`CoblaxError`), so that no ``except
    Exception`` on the way swallows it. Attributes: ``signum``; ``saved``, the
    number of records in ``partial``, the file that holds them (set by the runner).
    """

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = int(signum)
        self.saved = 0
        self.partial = None
        super().__init__(signal.Signals(signum).name)
