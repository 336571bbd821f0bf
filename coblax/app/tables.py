"""Table code shared by ``coblax report`` (:mod:`coblax.app.report`), ``coblax study``
(:mod:`coblax.app.studies`) and the paper figures (:mod:`paper_figs`).

* :func:`mean_std`: the one mean / sample standard deviation / count of a list of
  measurements (seeds), with the standard error s/√n;
* :func:`format_mean_std`: that as text, ``m ± s (n=k)``;
* :func:`markdown_table`: one Markdown table from a header and rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["MeanStd", "mean_std", "format_mean_std", "markdown_table"]


class MeanStd(NamedTuple):
    """Mean, sample standard deviation (0 for one value) and count of some measurements."""

    mean: float
    std: float
    n: int

    @property
    def se(self) -> float:
        """The standard error s/√n (0 for fewer than two values)."""
        return self.std / math.sqrt(self.n) if self.n > 1 else 0.0


def mean_std(values: Sequence[float | None]) -> MeanStd:
    """Mean, sample standard deviation and count of the values that are not None or NaN.

    mean = Σv / n (``math.fsum``), s = √(Σ(v − mean)² / (n − 1)), s = 0 for n = 1;
    no values give (nan, nan, 0).
    """
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(vals)
    if not n:
        return MeanStd(math.nan, math.nan, 0)
    mean = math.fsum(vals) / n
    if n < 2:
        return MeanStd(mean, 0.0, 1)
    return MeanStd(mean, math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1)), n)


def format_mean_std(values: Sequence[float | None], scale: float = 100.0, digits: int = 2) -> str:
    """``m`` for one value, ``m ± s (n=k)`` for several (both × ``scale``), ``-`` for none."""
    ms = mean_std(values)
    if not ms.n:
        return "-"
    m = ms.mean * scale
    if ms.n == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {ms.std * scale:.{digits}f} (n={ms.n})"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *,
                   right_from: int | None = None) -> str:
    """A Markdown table; columns from index ``right_from`` on are right-aligned (``---:``)."""
    n = len(headers) if right_from is None else right_from
    rule = ["---" if i < n else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
