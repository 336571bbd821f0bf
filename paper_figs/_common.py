"""Shared plumbing of the figures: reading saved results, grayscale styles, PNG + PDF output.

Figures are rebuilt from result files only: ``coblax run`` results (records with
``model``, ``method``, ``budget_mac``, accuracies...) and ``coblax study`` results
(a top-level ``study`` key). Nothing here trains or allocates.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from coblax.app.report import REQUIRED_KEYS, read_results  # noqa: E402
from coblax.app.tables import mean_std  # noqa: E402  (re-exported: the figures' one mean ± std)
from coblax.util.limits import parse_json  # noqa: E402

__all__ = ["MissingRecords", "load_results", "run_records", "failed_records", "study_records", "save", "style",
           "mean_std", "slug", "safe_name", "label_axes", "plt"]

# Grayscale-readable: each series differs by marker and line style, colours are shades of gray.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_LINES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
_GRAYS = ("0.0", "0.45", "0.25", "0.6", "0.1", "0.35", "0.5", "0.7")
HATCHES = ("", "///", "...", "xx", "\\\\", "++", "oo", "--")


class MissingRecords(ValueError):
    """The loaded results lack what a figure needs; the message names the study and what."""


def load_results(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """Every ``results.json`` under the given paths (a file, a run directory, or a folder of runs).

    Each payload gets ``_source`` (its path). A file is read within the JSON caps of
    :mod:`coblax.util.limits`; ``coblax run`` results have every record checked
    against the record schema (:func:`coblax.app.report.read_results`). A file that
    is unreadable, too large, too deep or breaks the schema raises a ``ValueError``
    (a ``CoblaxError``) naming the file and the field.
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
            data = parse_json(file.read_bytes(), str(file))
            if not isinstance(data, dict) or not isinstance(data.get("records"), list):
                raise ValueError(f"{file}: expected a JSON object with a 'records' list")
            if "study" not in data:
                data = read_results(file)  # the run record schema, every record
            elif not all(isinstance(r, dict) for r in data["records"]):
                raise ValueError(f"{file}: every record must be a JSON object")
            payloads.append(dict(data, _source=str(file)))
    return payloads


def _drawable(record: dict) -> bool:
    return (record.get("status") != "failed" and all(k in record for k in REQUIRED_KEYS)
            and record["acc_before_finetune"] is not None and record["acc_after_finetune"] is not None)


def run_records(payloads: Sequence[dict]) -> list[dict]:
    """Records of ``coblax run`` results that can be drawn: every key a table needs, not failed.

    Failed records (``status = "failed"``, accuracies null) are a normal outcome of a
    run; :func:`failed_records` lists them so that the command line can say which
    were left out.
    """
    return [r for p in payloads if "study" not in p for r in p["records"] if _drawable(r)]


def failed_records(payloads: Sequence[dict]) -> list[str]:
    """One line per ``coblax run`` record left out of the figures, with its file and error."""
    out = []
    for p in payloads:
        if "study" in p:
            continue
        for i, r in enumerate(p["records"]):
            if not _drawable(r):
                what = ", ".join(str(r.get(k)) for k in ("model", "scheme", "method", "budget_mac"))
                out.append(f"{p.get('_source', '?')} record {i} ({what}): {r.get('error') or 'no accuracy'}")
    return out


def study_records(payloads: Sequence[dict], study: str) -> list[dict]:
    """Records of ``coblax study`` results of kind ``study``."""
    return [r for p in payloads if p.get("study") == study for r in p["records"]]


def style(i: int) -> dict[str, Any]:
    """Marker, line style and gray of series ``i``."""
    return {"marker": _MARKERS[i % len(_MARKERS)], "linestyle": _LINES[i % len(_LINES)],
            "color": _GRAYS[i % len(_GRAYS)], "markerfacecolor": "white" if i % 2 else _GRAYS[i % len(_GRAYS)],
            "markeredgecolor": "black"}


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


def safe_name(name: Any, taken: set[str] | None = None, limit: int = 80) -> str:
    """``name`` as one safe folder or file name below the output folder.

    Only ``A-Za-z0-9_.-`` survive, leading dots are removed (no ``..``, no hidden
    files), the length is capped, and an empty result becomes ``run``; a name already
    in ``taken`` gets ``-2``, ``-3``... (``taken`` is updated). ``../../x`` and
    ``/abs/x`` become ``x``-like names in the output folder, never paths out of it.
    """
    base = re.sub(r"^[._-]+", "", slug(name))[:limit].rstrip("._-") or "run"
    out, i = base, 1
    while taken is not None and out in taken:
        i += 1
        out = f"{base}-{i}"
    if taken is not None:
        taken.add(out)
    return out


def save(fig, out_dir: str | os.PathLike, stem: str) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` in ``out_dir``; close the figure.

    ``stem`` is made a safe name (:func:`safe_name`), so that nothing drawn from a
    results file's text can name a path outside ``out_dir``.
    """
    out_dir = Path(out_dir)
    stem = safe_name(stem, limit=160)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
