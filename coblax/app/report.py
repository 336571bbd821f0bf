"""Comparison tables (Markdown, CSV, LaTeX) built from saved experiment results.

Each experiment directory holds a ``results.json`` of the form ``{"records": [...]}``;
a record describes one (model, method, scheme, budget) run with at least the keys of
:data:`REQUIRED_KEYS`. :func:`format_table` writes one table per (model, scheme):
methods are rows, and each budget ``mac/param`` spans four columns — accuracy before
fine-tuning, accuracy after fine-tuning, achieved MAC ratio, achieved parameter ratio.
The best accuracy of every accuracy column is marked (ratios are constraints, not
scores, so they are never marked). Records of several seeds (their ``seed`` key)
are shown as mean ± standard deviation with the number of seeds, and every method
within one standard error of the best mean is marked. Tables are rebuilt from
saved results only.

:func:`format_ranks` writes the per-layer target ranks instead: one table per (model,
scheme, budget), layers are rows and methods columns (``coblax table RUN --ranks``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from coblax.app.results import (
    REQUIRED_KEYS,
    ResultsError,
    ResultsNotFoundError,
    is_number,
    load_records,
    read_results,
)
from coblax.app.tables import markdown_table, mean_std

__all__ = [
    "REQUIRED_KEYS",
    "FORMATS",
    "ResultsError",
    "ResultsNotFoundError",
    "read_results",
    "load_records",
    "format_table",
    "format_ranks",
]

FORMATS = ("md", "csv", "tex")
_SUBCOLUMNS = ("acc before FT", "acc after FT", "MAC ratio", "param ratio")
_CELL_KEYS = ("acc_before_finetune", "acc_after_finetune", "mac_ratio", "param_ratio")
#: the accuracy before fine-tuning with BatchNorm recalibrated (``finetune.recalibrate_bn``):
#: a column after "acc before FT" in tables whose records have it
_RECAL = ("acc before FT (BN recal.)", "acc_before_finetune_recalibrated")


def _columns(recs: Sequence[dict[str, Any]]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(subcolumn labels, record keys) of one table; the accuracy columns come first."""
    if any(_num(r.get(_RECAL[1])) is not None for r in recs):
        return ((_SUBCOLUMNS[0], _RECAL[0]) + _SUBCOLUMNS[1:], (_CELL_KEYS[0], _RECAL[1]) + _CELL_KEYS[1:])
    return _SUBCOLUMNS, _CELL_KEYS
_MISSING = "-"
_FAILED = "failed"


def _budget_label(rec: dict[str, Any]) -> str:
    return f"{float(rec['budget_mac']):g}/{float(rec['budget_param']):g}"


def _num(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def format_table(
    records: Sequence[dict[str, Any]],
    fmt: str = "md",
    *,
    acc_scale: float = 100.0,
    acc_digits: int = 2,
    ratio_digits: int = 3,
) -> str:
    """Comparison tables, one per (model, scheme), in Markdown, CSV or LaTeX.

    Rows are methods (first-appearance order); budgets are column groups sorted from
    the loosest to the tightest (descending MAC then param budget), labelled
    ``mac/param`` (e.g. ``0.5/0.5``). Accuracies are multiplied by ``acc_scale``
    (records hold fractions; 100 prints percent). The best displayed accuracy of each
    accuracy column is marked — ``**x**`` (md), ``\\textbf{x}`` (tex), ``x*`` (csv) —
    ties all marked. A missing run or a None/NaN value prints ``-``. A record whose
    ``status`` is ``"failed"`` prints ``failed`` in its four cells, and its error is
    listed below the table (Markdown, LaTeX comment). If several records share
    (model, scheme, method, budget, seed), the last one wins.

    **Several seeds.** When a table's records carry more than one ``seed``, each
    accuracy cell is the mean ± sample standard deviation over the seeds, followed by
    ``(n=k)`` when fewer seeds than the method's have a value there (failed seeds are
    listed below the table); a ``seeds`` column after the method gives how many seeds
    the method has records for, ratios are means and the base accuracy is the mean ±
    std of the seeds' base models. Every method whose displayed mean is within one
    standard error of the best displayed mean is marked: mean ≥ best − s/√n, with s
    and n those of the best mean (the largest s/√n if several methods share it).
    With one seed this rule marks the best (ties) exactly as above.

    Args:
      records: as returned by :func:`load_records`.
      fmt: ``"md"``, ``"csv"`` or ``"tex"``.
    Returns:
      The tables, separated by a blank line.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    for rec in records:
        missing = [k for k in REQUIRED_KEYS if k not in rec]
        if missing:
            raise ValueError(f"record {rec!r} lacks the keys {', '.join(missing)}")
    pm = "$\\pm$" if fmt == "tex" else "±"
    tables = []
    for (model, scheme), recs in _by_network(records).items():
        methods = list(dict.fromkeys(str(r["method"]) for r in recs))
        budgets = _budgets(recs)
        labels = [f"{m:g}/{p:g}" for m, p in budgets]
        seeds = list(dict.fromkeys(r.get("seed") for r in recs))
        multi = len(seeds) > 1
        cell: dict[tuple[str, str], dict[Any, dict[str, Any]]] = {}
        bases: dict[Any, float | None] = {}
        for r in recs:
            cell.setdefault((str(r["method"]), _budget_label(r)), {})[r.get("seed")] = r
            if r.get("base_acc") is not None:
                bases[r.get("seed")] = _num(r["base_acc"])
        # Displayed strings first, so "best" is judged on what the reader sees;
        # values[m][col] = (displayed mean, standard error) or None.
        grid: dict[str, list[str]] = {}
        values: dict[str, list[tuple[float, float] | None]] = {}
        n_seeds: dict[str, str] = {}
        failures: list[tuple[str, str, str]] = []
        subcolumns, keys = _columns(recs)
        for method in methods:
            row, vals, count, fails = _method_cells(method, labels, cell, multi, pm,
                                                    (acc_scale, acc_digits, ratio_digits), keys)
            grid[method], values[method], n_seeds[method] = row, vals, count
            failures += fails
        _mark_best(grid, values, methods, len(labels) * len(keys), fmt, len(keys))
        known = [b for b in bases.values() if b is not None]
        base_txt = _base_text(known, acc_scale, acc_digits, pm)
        tables.append(_render(fmt, model, scheme, base_txt, labels, methods, grid,
                              n_seeds if multi else None, len(seeds), subcolumns)
                      + _failure_notes(fmt, failures))
    return "\n\n".join(tables) + ("\n" if tables else "")


def _method_cells(
    method: str,
    labels: list[str],
    cell: dict[tuple[str, str], dict[Any, dict[str, Any]]],
    multi: bool,
    pm: str,
    precision: tuple[float, int, int],
    keys: tuple[str, ...] = _CELL_KEYS,
) -> tuple[list[str], list[tuple[float, float] | None], str, list[tuple[str, str, str]]]:
    """One method's row of :func:`format_table`: displayed cells, (displayed mean, standard
    error) of each cell or None, its seed count and its failures.

    ``precision`` is (accuracy scale, accuracy digits, ratio digits); ``keys`` the
    record keys of each budget's cells (accuracies, then the two ratios).
    """
    n_acc = len(keys) - 2
    acc_scale, acc_digits, ratio_digits = precision
    failures: list[tuple[str, str, str]] = []
    row: list[str] = []
    vals: list[tuple[float, float] | None] = []
    own = {s for label in labels for s in cell.get((method, label), {})}
    for label in labels:
        by_seed = cell.get((method, label), {})
        ok = [r for r in by_seed.values() if r.get("status") != _FAILED]
        for s, r in by_seed.items():
            if r.get("status") == _FAILED:
                where = f"{label}, seed {s}" if multi else label
                failures.append((method, where, str(r.get("error", ""))))
        if by_seed and not ok:
            row += [_FAILED] * len(keys)
            vals += [None] * len(keys)
            continue
        for k, key in enumerate(keys):
            scale, digits = (acc_scale, acc_digits) if k < n_acc else (1.0, ratio_digits)
            present = [v * scale for v in (_num(r.get(key)) for r in ok) if v is not None]
            if not present:
                row.append(_MISSING)
                vals.append(None)
                continue
            ms = mean_std(present)
            mean, std, se = ms.mean, ms.std, ms.se
            text = f"{mean:.{digits}f}"
            if multi and k < n_acc:
                text += f" {pm} {std:.{digits}f}" if len(present) > 1 else ""
                text += f" (n={len(present)})" if len(present) < len(own) else ""
            row.append(text)
            vals.append((float(f"{mean:.{digits}f}"), se))
    return row, vals, str(len(own)), failures


def _mark_best(grid: dict[str, list[str]], values: dict[str, list[tuple[float, float] | None]],
               methods: list[str], n_cols: int, fmt: str, per_budget: int = 4) -> None:
    """Mark, in ``grid``, every accuracy cell within one standard error of its column's best
    (``per_budget`` cells per budget, the last two of them ratios)."""
    for col in range(n_cols):
        if col % per_budget >= per_budget - 2:
            continue  # ratios are not scores
        present = [values[m][col] for m in methods if values[m][col] is not None]
        if not present:
            continue
        best = max(mean for mean, _ in present)
        se_best = max(se for mean, se in present if mean == best)  # the largest, if tied
        reach = best - se_best - 1e-9 * max(1.0, abs(best))
        for m in methods:
            if values[m][col] is not None and values[m][col][0] >= reach:
                grid[m][col] = _mark(grid[m][col], fmt)


def format_ranks(records: Sequence[dict[str, Any]], fmt: str = "md") -> str:
    """Per-layer target ranks, one table per (model, scheme, budget): layers x methods.

    Rows are the decomposed layers in network order (the order of the records'
    ``ranks``), then a ``full`` column gives each layer's full rank
    (``full_ranks``); each method (first-appearance order) has one column holding
    the number of singular triplets it keeps. Tables follow the model and scheme
    order of the records and, within them, budgets from the loosest to the
    tightest. With several seeds a cell is the rank when every seed chose the same,
    else ``mean ± std`` (one decimal); ``(n=k)`` follows when fewer seeds than the
    method has there hold ranks. A method whose every record there failed prints
    ``failed``; a method without a record, or a layer without a rank, prints ``-``.

    Args:
      records: as returned by :func:`load_records` (``ranks`` and ``full_ranks`` are
        read when present).
      fmt: ``"md"``, ``"csv"`` or ``"tex"``.
    Returns:
      The tables, separated by a blank line ("" when no record has ranks).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    pm = "$\\pm$" if fmt == "tex" else "±"
    tables = []
    for (model, scheme), recs in _by_network(records).items():
        if not any(isinstance(r.get("ranks"), dict) for r in recs):
            continue
        methods = list(dict.fromkeys(str(r["method"]) for r in recs))
        layers = list(dict.fromkeys(k for r in recs for k in (r.get("ranks") or {})))
        full: dict[str, Any] = {}
        for r in recs:
            full.update(r.get("full_ranks") or {})
        n_seeds = len({r.get("seed") for r in recs})
        for mac, par in _budgets(recs):
            here: dict[str, dict[Any, dict[str, Any]]] = {}
            for r in recs:
                if (float(r["budget_mac"]), float(r["budget_param"])) == (mac, par):
                    here.setdefault(str(r["method"]), {})[r.get("seed")] = r
            cols = [m for m in methods if m in here]
            grid = {layer: [str(full.get(layer, _MISSING))] + [_rank_cell(here[m], layer, pm) for m in cols]
                    for layer in layers}
            seeds = f"; mean {pm} std over {n_seeds} seeds where they differ" if n_seeds > 1 else ""
            title = f"{model} — {scheme}, budget {mac:g}/{par:g} (MAC/param): ranks kept per layer{seeds}"
            tables.append(_render_ranks(fmt, title, (model, scheme, f"{mac:g}/{par:g}"), cols, grid))
    return "\n\n".join(tables) + ("\n" if tables else "")


def _by_network(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Records grouped by (model, scheme), in first-appearance order: one group per table set."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault((str(rec["model"]), str(rec["scheme"])), []).append(rec)
    return groups


def _budgets(recs: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """The (MAC, parameter) budget pairs of ``recs``, loosest first."""
    return sorted({(float(r["budget_mac"]), float(r["budget_param"])) for r in recs}, reverse=True)


def _rank_cell(by_seed: dict[Any, dict[str, Any]], layer: str, pm: str) -> str:
    """One method's rank of ``layer`` over its seeds (see :func:`format_ranks`)."""
    ok = [r for r in by_seed.values() if r.get("status") != _FAILED]
    if not ok:
        return _FAILED
    present = [float(v) for r in ok if isinstance(r.get("ranks"), dict)
               for v in [r["ranks"].get(layer)] if is_number(v)]
    if not present:
        return _MISSING
    mean, std, _ = mean_std(present)
    text = f"{present[0]:g}" if len(set(present)) == 1 else f"{mean:.1f} {pm} {std:.1f}"
    return text + (f" (n={len(present)})" if len(present) < len(by_seed) else "")


def _render_ranks(fmt: str, title: str, where: tuple[str, str, str], methods: list[str],
                  grid: dict[str, list[str]]) -> str:
    """One layers x methods table; ``where`` is (model, scheme, budget) for CSV rows."""
    head = ["layer", "full"] + methods
    if fmt == "md":
        table = markdown_table(head, [[layer] + cells for layer, cells in grid.items()], right_from=1)
        return f"### {title}\n\n{table}"
    if fmt == "csv":
        lines = [",".join(_csv_cell(h) for h in ["model", "scheme", "budget"] + head)]
        lines += [",".join(_csv_cell(c) for c in [*where, layer] + cells) for layer, cells in grid.items()]
        return "\n".join(lines)
    lines = [
        f"% {title}",
        "\\begin{tabular}{lr" + "r" * len(methods) + "}",
        "\\toprule",
        " & ".join(["Layer", "Full"] + [_tex_escape(m) for m in methods]) + " \\\\",
        "\\midrule",
    ]
    lines += [" & ".join([_tex_escape(layer)] + cells) + " \\\\" for layer, cells in grid.items()]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines)


def _base_text(bases: list[float], scale: float, digits: int, pm: str) -> str:
    """The base accuracy: one value, or mean ± std over the seeds' base models."""
    if not bases:
        return _MISSING
    mean, std, _ = mean_std([b * scale for b in bases])
    return f"{mean:.{digits}f}" + (f" {pm} {std:.{digits}f}" if len(bases) > 1 else "")


def _failure_notes(fmt: str, failures: list[tuple[str, str, str]]) -> str:
    """Below a table: why each failed record failed (CSV stays a plain table)."""
    if not failures or fmt == "csv":
        return ""
    lead = "% " if fmt == "tex" else ""
    lines = [f"{lead}failed: {method} at {label}: {error}" for method, label, error in failures]
    return "\n\n" + "\n".join(lines) if fmt == "md" else "\n" + "\n".join(lines)


def _mark(text: str, fmt: str) -> str:
    if fmt == "md":
        return f"**{text}**"
    if fmt == "tex":
        return f"\\textbf{{{text}}}"
    return f"{text}*"


_TEX_SPECIAL = {ch: "\\" + ch for ch in "&%$#_{}"} | {"\\": "\\textbackslash{}"}


def _tex_escape(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in text)


def _csv_cell(text: str) -> str:
    if any(ch in text for ch in ',"\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _render(
    fmt: str,
    model: str,
    scheme: str,
    base: str,
    labels: list[str],
    methods: list[str],
    grid: dict[str, list[str]],
    n_seeds: dict[str, str] | None = None,
    total_seeds: int = 1,
    subcolumns: tuple[str, ...] = _SUBCOLUMNS,
) -> str:
    """One table; ``n_seeds`` (method -> seed count) adds the ``seeds`` column."""
    width = len(subcolumns)
    seeds = [] if n_seeds is None else ["seeds"]
    row = (lambda m: [m] + grid[m]) if n_seeds is None else (lambda m: [m, n_seeds[m]] + grid[m])
    if fmt == "md":
        spread = "" if n_seeds is None else f"; mean ± std over {total_seeds} seeds"
        head = ["method"] + seeds + [f"{label} {sub}" for label in labels for sub in subcolumns]
        table = markdown_table(head, [row(m) for m in methods], right_from=1)
        return f"### {model} — {scheme} (base accuracy {base}{spread})\n\n{table}"
    if fmt == "csv":
        head = ["model", "scheme", "method"] + seeds + [
            f"{label} {sub}" for label in labels for sub in subcolumns
        ]
        lines = [",".join(_csv_cell(h) for h in head)]
        lines += [",".join(_csv_cell(c) for c in [model, scheme] + row(m)) for m in methods]
        return "\n".join(lines)
    spread = "" if n_seeds is None else f"; mean $\\pm$ std over {total_seeds} seeds"
    skip = len(seeds)
    lines = [
        f"% {model} / {scheme}, base accuracy {base}{spread}",
        "\\begin{tabular}{l" + "c" * skip + "c" * width * len(labels) + "}",
        "\\toprule",
        " & ".join(["Method"] + [""] * skip
                   + [f"\\multicolumn{{{width}}}{{c}}{{{label}}}" for label in labels]) + " \\\\",
        " ".join(f"\\cmidrule(lr){{{2 + skip + width * k}-{1 + skip + width * (k + 1)}}}"
                 for k in range(len(labels))),
        " & ".join([""] + ["Seeds"] * skip + list(subcolumns) * len(labels)) + " \\\\",
        "\\midrule",
    ]
    lines += [" & ".join([_tex_escape(m)] + row(m)[1:]) + " \\\\" for m in methods]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines)
