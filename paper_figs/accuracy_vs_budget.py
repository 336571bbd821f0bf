"""Figure: accuracy after fine-tuning vs. budget, one line per method, from saved results.

Rebuilt from ``results.json`` files only (no training, no allocation here).
Usage: python paper_figs/accuracy_vs_budget.py RESULTS_DIR... --out fig.png [--before]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from coblax.app.report import load_records  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out", default="accuracy_vs_budget.png")
    ap.add_argument("--before", action="store_true", help="plot accuracy before fine-tuning")
    args = ap.parse_args()
    key = "acc_before_finetune" if args.before else "acc_after_finetune"
    records = load_records(args.results)
    panels = sorted({(r["model"], r.get("scheme", "")) for r in records})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (model, scheme) in zip(axes[0], panels):
        lines = defaultdict(list)
        for r in records:
            if (r["model"], r.get("scheme", "")) == (model, scheme):
                lines[r["method"]].append((r["budget_mac"], 100 * r[key]))
        for method, points in sorted(lines.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.set_title(f"{model} — {scheme}", fontsize=9)
        ax.set_xlabel("budget (fraction of MACs = params)")
        ax.set_ylabel(f"test accuracy {'before' if args.before else 'after'} fine-tuning (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=150)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
