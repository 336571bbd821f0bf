"""Run a tight-budget config over seeds and spectra, then print one table (issue 8).

    COBLAX_DATA=../shared/datasets python experiments/tight_budgets.py experiments/tight_budgets.toml \
        --seeds 0 1 --spectra weight whitened --out runs/tight_budgets
    python experiments/tight_budgets.py --table runs/tight_budgets

Each (seed, spectrum) is one ``coblax run`` of the config with ``seed`` and
``decompose.spectrum`` overridden, written to ``OUT/seed{S}-{spectrum}/results.json``.
The table gives, per model / scheme / spectrum / budget and method, the test accuracy
before and after fine-tuning, each seed and their mean. No algorithm logic lives here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import defaultdict
from pathlib import Path

from coblax.app.config import load_run_config
from coblax.app.experiment import run_experiment


def run(config: str, seeds: list[int], spectra: list[str], out: Path) -> None:
    cfg = load_run_config(config)
    text = Path(config).read_text()
    for seed in seeds:
        for spectrum in spectra:
            c = dataclasses.replace(cfg, seed=seed, decompose=dataclasses.replace(cfg.decompose, spectrum=spectrum))
            dest = out / f"seed{seed}-{spectrum}"
            if (dest / "results.json").is_file():
                continue
            t0 = time.perf_counter()
            run_experiment(c, dest, config_text=text, progress=False)
            print(f"seed {seed} {spectrum}: {time.perf_counter() - t0:.0f} s", flush=True)


def table(out: Path) -> str:
    acc = defaultdict(dict)  # (model, scheme, spectrum, budget, method) -> seed -> (before, after)
    cobla = []
    budgets = defaultdict(set)
    methods: list[str] = []
    room: list[str] = []
    for path in sorted(out.glob("*/results.json")):
        payload = json.loads(path.read_text())
        for r in payload["records"]:
            key = (r["model"], r["scheme"], r.get("spectrum", "weight"))
            budgets[key].add(r["budget_mac"])
            if r["method"] not in methods:
                methods.append(r["method"])
            acc[key + (r["budget_mac"], r["method"])][payload["seed"]] = (
                100 * r["acc_before_finetune"], 100 * r["acc_after_finetune"])
            if r["method"] in ("cobla", "pos_greedy", "pos_exact") and r.get("room_for_one_more_rank"):
                room.append(f"{key} {r['budget_mac']:g} seed {payload['seed']} {r['method']}: "
                            f"room in {r['room_for_one_more_rank']}")
            d = r.get("diagnostics", {})
            if r["method"] == "cobla" and "relaxed_val_accuracy" in d:
                cobla.append((key, r["budget_mac"], payload["seed"], d, r["ranks"], 100 * r["acc_before_finetune"]))
    methods.sort(key=lambda m: m != "cobla")  # COBLA first, the others in the order they were run
    lines = []
    for key in sorted(budgets):
        bs = sorted(budgets[key], reverse=True)
        lines.append(f"\n#### {key[0]} — {key[1]} — spectrum `{key[2]}` (test accuracy %, before → after 1 epoch FT; seeds 0 / 1, mean)\n")
        lines.append("| method | " + " | ".join(f"{b:g} before | {b:g} after" for b in bs) + " |")
        lines.append("|---|" + "---:|---:|" * len(bs))
        for m in methods:
            cells = []
            for b in bs:
                seeds = acc.get(key + (b, m), {})
                if not seeds:
                    cells += ["–", "–"]
                    continue
                for i in (0, 1):
                    vals = [v[i] for _, v in sorted(seeds.items())]
                    mean = sum(vals) / len(vals)
                    cells.append(" / ".join(f"{v:.1f}" for v in vals) + (f" ({mean:.1f})" if len(vals) > 1 else ""))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if cobla:
        lines.append("\n#### COBLA: relaxed vs rounded (validation split of the training data; test accuracy of the rounded network)\n")
        lines.append("| model | scheme | spectrum | budget | seed | relaxed E | rounded E | relaxed val loss / acc % "
                     "| rounded val loss / acc % | chosen candidate | ranks | test acc % |")
        lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|")
        for key, b, seed, d, ranks, test in sorted(cobla, key=lambda t: (t[0], -t[1], t[2])):
            lines.append(
                f"| {key[0]} | {key[1]} | {key[2]} | {b:g} | {seed} | {d['relaxed_objective']:.3f} | "
                f"{d['rounded_objective']:.3f} | {d['relaxed_val_loss']:.3f} / {100 * d['relaxed_val_accuracy']:.1f} | "
                f"{d['rounded_val_loss']:.3f} / {100 * d['rounded_val_accuracy']:.1f} | {d['rounding']['chosen']} | "
                f"{' '.join(str(v) for v in ranks.values())} | {test:.1f} |")
    lines += ["", "#### Issue 8's criteria", ""] + criteria(acc, budgets, methods, room)
    return "\n".join(lines)


def criteria(acc, budgets, methods, room) -> list[str]:
    """Where COBLA is below a baseline before fine-tuning (any seed), where a baseline's
    mean after fine-tuning exceeds COBLA's by more than 0.5 pt, and room left for a rank."""
    out = []
    for key in sorted(budgets):
        for b in sorted(budgets[key], reverse=True):
            mine = acc.get(key + (b, "cobla"), {})
            for m in methods:
                theirs = acc.get(key + (b, m), {})
                if m == "cobla" or not mine or not theirs:
                    continue
                for seed in sorted(set(mine) & set(theirs)):
                    if theirs[seed][0] > mine[seed][0] + 1e-9:
                        out.append(f"- before FT, {key[1]}/{key[2]} {b:g} seed {seed}: {m} {theirs[seed][0]:.1f} "
                                   f"> cobla {mine[seed][0]:.1f}")
                common = sorted(set(mine) & set(theirs))
                if not common:
                    continue
                gap = (sum(theirs[s][1] for s in common) - sum(mine[s][1] for s in common)) / len(common)
                if gap > 0.5:
                    out.append(f"- after FT, {key[1]}/{key[2]} {b:g}: {m} mean is {gap:.2f} pt above cobla's")
    out += [f"- {r}" for r in room]
    return out or ["- all met: COBLA at or above every baseline before fine-tuning in every cell and seed; "
                   "no baseline mean more than 0.5 pt above it after; no COBLA/POS record with room for a rank"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--spectra", nargs="+", default=["weight", "whitened"])
    ap.add_argument("--out", default="runs/tight_budgets")
    ap.add_argument("--table", metavar="OUT")
    args = ap.parse_args()
    if args.table:
        print(table(Path(args.table)))
        return
    run(args.config, args.seeds, args.spectra, Path(args.out))
    print(table(Path(args.out)))


if __name__ == "__main__":
    main()
