"""Shared plumbing of the figures: reading saved results, grayscale styles, PNG + PDF output.

Figures are rebuilt from result files only: ``coblax run`` results (records with
``model``, ``method``, ``budget_mac``, accuracies...) and ``coblax study`` results
(a top-level ``study`` key). Nothing here trains or allocates.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from coblax.app.report import REQUIRED_KEYS  # noqa: E402

__all__ = ["MissingRecords", "load_results", "run_records", "study_records", "save", "style", "mean_std", "slug",
           "label_axes", "plt"]

# Grayscale-readable: each series differs by marker and line style, colours are shades of gray.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_LINES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
_GRAYS = ("0.0", "0.45", "0.25", "0.6", "0.1", "0.35", "0.5", "0.7")
HATCHES = ("", "///", "...", "xx", "\\\\", "++", "oo", "--")


class MissingRecords(ValueError):
    """The loaded results lack what a figure needs; the message names the study and what."""


def load_results(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """Every ``results.json`` under the given paths (a file, a run directory, or a folder of runs).

    Each payload gets ``_source`` (its path). Unreadable JSON raises ValueError naming the file.
    """
    payloads = []
    for path in paths:
        path = Path(path)
        if path.is_file():
            files = [path]
        elif (path / "results.json").is_file():
            files = [path / "results.json"]
        elif path.is_dir():
            files = sorted(path.glob("*/results.json"))
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
        if not files:
            raise FileNotFoundError(f"{path}: no results.json in it or in its sub-folders")
        for file in files:
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}: not valid JSON ({err})") from None
            if not isinstance(data, dict) or not isinstance(data.get("records"), list):
                raise ValueError(f"{file}: expected a JSON object with a 'records' list")
            payloads.append(dict(data, _source=str(file)))
    return payloads


def run_records(payloads: Sequence[dict]) -> list[dict]:
    """Records of ``coblax run`` results (those with every key a comparison table needs)."""
    return [r for p in payloads if "study" not in p for r in p["records"]
            if all(k in r for k in REQUIRED_KEYS)]


def study_records(payloads: Sequence[dict], study: str) -> list[dict]:
    """Records of ``coblax study`` results of kind ``study``."""
    return [r for p in payloads if p.get("study") == study for r in p["records"]]


def style(i: int) -> dict[str, Any]:
    """Marker, line style and gray of series ``i``."""
    return {"marker": _MARKERS[i % len(_MARKERS)], "linestyle": _LINES[i % len(_LINES)],
            "color": _GRAYS[i % len(_GRAYS)], "markerfacecolor": "white" if i % 2 else _GRAYS[i % len(_GRAYS)],
            "markeredgecolor": "black"}


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count of non-missing values."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def label_axes(ax, xlabel: str, ylabel: str, title: str, *, xlog: bool = False, legend: bool = True) -> None:
    """Axis labels (with units), a small title, a light grid, optional log x and legend."""
    if xlog:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def slug(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(str(p) for p in parts)).strip("_")


def save(fig, out_dir: str | os.PathLike, stem: str) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` in ``out_dir``; close the figure."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
