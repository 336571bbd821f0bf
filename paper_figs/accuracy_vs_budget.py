"""Figures of ``coblax run`` results: accuracy vs. budget, per-layer ranks, SQP convergence.

Rebuilt from ``results.json`` files only (no training, no allocation here).
Usage: ``python -m paper_figs RESULTS_DIR... --out FIG_DIR`` draws these with every other
figure; ``python paper_figs/accuracy_vs_budget.py RESULTS_DIR... --out FIG_DIR`` only these.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from paper_figs._common import (  # noqa: E402
    HATCHES, MissingRecords, label_axes, mean_std, plt, run_records, save, slug, style)

__all__ = ["accuracy_vs_budget", "rank_bars", "sqp_convergence"]

_RUN = "coblax run (allocator comparison)"


def _runs(payloads, need: str = ""):
    recs = run_records(payloads)
    if not recs:
        raise MissingRecords(f"{_RUN}: no results.json with records holding model, method, budget_mac and the"
                             " accuracies before/after fine-tuning")
    if need and not any(r.get(need) for r in recs):
        raise MissingRecords(f"{_RUN}: no record has {need!r}")
    return recs


def _panels(recs):
    return sorted({(r["model"], r.get("scheme", "")) for r in recs})


def accuracy_vs_budget(payloads, out_dir) -> list[Path]:
    """Test accuracy before and after fine-tuning vs. budget, one line per method.

    Points are means over the seeds present (records of the same model, scheme,
    method and budget); error bars are one sample standard deviation when there
    are several seeds.
    """
    recs = _runs(payloads)
    panels = _panels(recs)
    fig, axes = plt.subplots(len(panels), 2, figsize=(9.5, 3.4 * len(panels)), squeeze=False)
    for row, (model, scheme) in enumerate(panels):
        groups = defaultdict(list)
        for r in recs:
            if (r["model"], r.get("scheme", "")) == (model, scheme):
                groups[(r["method"], float(r["budget_mac"]))].append(r)
        methods = sorted({m for m, _ in groups})
        n_seeds = max(len(g) for g in groups.values())
        for col, (key, when) in enumerate((("acc_before_finetune", "before"), ("acc_after_finetune", "after"))):
            ax = axes[row][col]
            for i, method in enumerate(methods):
                pts = sorted((b, *mean_std([100 * g[key] for g in grp])[:2])
                             for (m, b), grp in groups.items() if m == method)
                x, y, e = (np.array(v) for v in zip(*pts))
                ax.errorbar(x, y, yerr=e if n_seeds > 1 else None, capsize=3, label=method, **style(i))
            label_axes(ax, "budget N_C,max = N_M,max (fraction of original)", f"test accuracy {when} fine-tuning (%)",
                       f"{model} — {scheme}, {when} fine-tuning"
                       + (f" (mean ± std, {n_seeds} seeds)" if n_seeds > 1 else ""), legend=col == 1)
    return save(fig, out_dir, "accuracy_vs_budget")


def rank_bars(payloads, out_dir) -> list[Path]:
    """Per-layer rank chosen by each method, one panel per budget (one figure per model/scheme)."""
    recs = [r for r in _runs(payloads, "ranks") if r.get("ranks")]
    paths = []
    for model, scheme in _panels(recs):
        mine = [r for r in recs if (r["model"], r.get("scheme", "")) == (model, scheme)]
        budgets = sorted({(float(r["budget_mac"]), float(r["budget_param"])) for r in mine}, reverse=True)
        layers = list(mine[0]["ranks"])
        methods = sorted({r["method"] for r in mine})
        fig, axes = plt.subplots(len(budgets), 1, figsize=(max(6.0, 0.9 * len(layers) * len(methods) / 3 + 3),
                                                             2.8 * len(budgets)), squeeze=False)
        width = 0.8 / len(methods)
        for ax, (bm, bp) in zip(axes[:, 0], budgets):
            for i, method in enumerate(methods):
                grp = [r for r in mine if r["method"] == method and (r["budget_mac"], r["budget_param"]) == (bm, bp)]
                if not grp:
                    continue
                ranks = [mean_std([g["ranks"].get(l) for g in grp])[0] for l in layers]
                ax.bar(np.arange(len(layers)) + (i - (len(methods) - 1) / 2) * width, ranks, width,
                       label=method, color=style(i)["color"], edgecolor="black", hatch=HATCHES[i % len(HATCHES)])
            full = mine[0].get("full_ranks") or {}
            if full:
                ax.plot(np.arange(len(layers)), [full.get(l, np.nan) for l in layers], "k_", markersize=20,
                        label="full rank")
            ax.set_xticks(np.arange(len(layers)), layers, rotation=30, fontsize=7, ha="right")
            ax.set_ylabel("rank (singular triplets kept)")
            ax.set_xlabel("layer")
            ax.set_yscale("log")
            ax.set_title(f"{model} — {scheme}, budget {bm:g}/{bp:g} (MAC/param)", fontsize=9)
        axes[0][0].legend(fontsize=7, ncol=min(4, len(methods) + 1))
        paths += save(fig, out_dir, slug("rank_bars", model, scheme))
    return paths


def sqp_convergence(payloads, out_dir) -> list[Path]:
    """COBLA's SQP: objective E(m) per iteration (and constraint slacks when recorded)."""
    recs = [r for r in _runs(payloads, "objective_trace") if r.get("objective_trace")]
    has_slack = any(_slacks(r) for r in recs)
    panels = _panels(recs)
    fig, axes = plt.subplots(len(panels), 2 if has_slack else 1, figsize=(9.5 if has_slack else 5.5,
                                                                          3.3 * len(panels)), squeeze=False)
    for row, (model, scheme) in enumerate(panels):
        mine = sorted((r for r in recs if (r["model"], r.get("scheme", "")) == (model, scheme)),
                      key=lambda r: (-float(r["budget_mac"]), r.get("seed", 0)))
        ax = axes[row][0]
        for i, r in enumerate(mine):
            tr = r["objective_trace"]
            label = f"budget {float(r['budget_mac']):g}" + (f", seed {r['seed']}" if "seed" in r else "")
            ax.plot(np.arange(len(tr)), tr, label=label, markevery=max(1, len(tr) // 10), **style(i))
            if has_slack and _slacks(r):
                sl = np.asarray(_slacks(r), dtype=float)
                for j, name in enumerate(("MAC", "param")[: sl.shape[1]]):
                    st = style(i)
                    axes[row][1].plot(np.arange(len(sl)), sl[:, j], label=f"{label}, {name}", marker=st["marker"],
                                      linestyle=_LINESTYLE[j], color=st["color"], markevery=max(1, len(sl) // 10))
        label_axes(ax, "SLSQP iteration (count)", "objective E(m) (mean cross-entropy, nats)",
                   f"{model} — {scheme}: COBLA SQP objective")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if has_slack:
            a2 = axes[row][1]
            a2.axhline(0.0, color="black", linewidth=0.8)
            label_axes(a2, "SLSQP iteration (count)", "slack b − A·m (constraint units; < 0 violated)",
                       f"{model} — {scheme}: constraint slack")
            a2.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save(fig, out_dir, "sqp_convergence")


_LINESTYLE = ("-", "--")


def _slacks(record) -> list | None:
    """Per-iteration (MAC, param) slacks: ``slack_trace``, or the ``slack`` of each ``trace`` entry."""
    if record.get("slack_trace"):
        return record["slack_trace"]
    trace = record.get("trace") or (record.get("diagnostics") or {}).get("trace")
    if trace and all(isinstance(t, dict) and "slack" in t for t in trace):
        return [t["slack"] for t in trace]
    return None


def main(argv=None) -> int:
    from paper_figs.__main__ import main as figs_main

    return figs_main(argv, only=__all__)


if __name__ == "__main__":
    sys.exit(main())
