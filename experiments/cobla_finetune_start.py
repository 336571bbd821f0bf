"""Does fine-tuning COBLA's network from its m̂-scaled triplets cost accuracy? Measured per record.

    COBLAX_DATA=../shared/datasets python experiments/cobla_finetune_start.py \
        experiments/compare_lenet5_fashion_cpu.toml runs/compare_lenet5_fashion_cpu \
        [--cache DIR] [--out runs/cobla_finetune_start.json]

COBLA keeps its kept triplets scaled by the relaxed masks m̂ (``mask_values = "relaxed"``), which
helps before fine-tuning; the baselines keep plain truncations. For every COBLA record of a
finished run this rebuilds the factored network from the record's applied masks
(``diagnostics.rounded_masks``), checks that it reproduces the record's accuracy before
fine-tuning, and fine-tunes, with the run's settings, data and seed, the same kept triplets
with every mask at 1 (the first record is also re-fine-tuned scaled, as a reproduction check).
Prints the per-record and per-cell differences; nothing else is changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from collections import defaultdict
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from coblax.app.config import load_run_config
from coblax.app.experiment import (
    decomposable_layers,
    decompose_layers,
    default_cache_dir,
    finetune_factored,
    train_base_model,
)
from coblax.app.report import load_records
from coblax.lowrank.decompose import trace_layers, truncate
from coblax.nn.data import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="the run's config")
    ap.add_argument("results", nargs="+", help="the run's results (folders or results[.partial].json)")
    ap.add_argument("--cache", default=None, help="base-model cache (default: the run's cache_dir or coblax's)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    cfg = load_run_config(args.config)
    cache = Path(args.cache or cfg.cache_dir or default_cache_dir())
    recs = [r for r in load_records(args.results)
            if r["method"] == "cobla" and r.get("acc_after_finetune") is not None]
    rows, checked = [], False
    for seed in sorted({r["seed"] for r in recs}):
        c = dataclasses.replace(cfg, seed=seed)
        data = load_dataset(cfg.data.name, cfg.data.dir, seed=seed, limit_train=cfg.data.limit_train,
                            limit_test=cfg.data.limit_test)
        model_cfg = {m.label: m for m in cfg.models}
        for label in sorted({r["model"] for r in recs if r["seed"] == seed}):
            base = train_base_model(c, model_cfg[label], data, cache, False)
            traced = trace_layers(base.model, base.params, jnp.asarray(data.x_train[:1]))
            chosen = decomposable_layers(traced, c)
            for scheme in sorted({r["scheme"] for r in recs if r["seed"] == seed and r["model"] == label}):
                full = decompose_layers(c, base, chosen, scheme, None)  # the `weight` spectrum
                for r in (r for r in recs if (r["seed"], r["model"], r["scheme"]) == (seed, label, scheme)):
                    if abs(base.accuracy - r["base_acc"]) > 1e-9:
                        raise SystemExit(f"seed {seed}: the cached base model ({base.accuracy}) is not the "
                                         f"run's ({r['base_acc']}); give --cache the run's cache")
                    applied = {n: np.asarray(m, float) for n, m in r["diagnostics"]["rounded_masks"].items()
                               if n not in r["original_layers"]}
                    row = {"seed": seed, "model": label, "scheme": scheme, "budget": r["budget_mac"],
                           "ranks": r["ranks"], "before_scaled": r["acc_before_finetune"],
                           "after_scaled": r["acc_after_finetune"]}
                    plain = {n: truncate(full[n], (m > 0).astype(float)) for n, m in applied.items()}
                    row["before_plain"], row["after_plain"], _ = finetune_factored(c, base, data, plain)
                    if not checked:  # the rebuilt scaled network must reproduce the record
                        scaled = {n: truncate(full[n], m) for n, m in applied.items()}
                        row["before_scaled_rebuilt"], row["after_scaled_rebuilt"], _ = finetune_factored(
                            c, base, data, scaled)
                        checked = True
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    cells = defaultdict(list)
    for row in rows:
        cells[(row["model"], row["scheme"], row["budget"])].append(row)
    print("\n| model | scheme | budget | seeds | after FT, scaled start | after FT, plain start | plain − scaled (pt) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (label, scheme, budget), group in sorted(cells.items()):
        a = [100 * g["after_scaled"] for g in group]
        b = [100 * g["after_plain"] for g in group]
        print(f"| {label} | {scheme} | {budget:g} | {len(group)} | {statistics.fmean(a):.2f} | "
              f"{statistics.fmean(b):.2f} | {statistics.fmean(b) - statistics.fmean(a):+.2f} |")
    diff = [100 * (g["after_plain"] - g["after_scaled"]) for g in rows]
    if diff:
        print(f"\nplain − scaled after fine-tuning: mean {statistics.fmean(diff):+.3f} pt over {len(diff)} records "
              f"({sum(d > 0 for d in diff)} higher, {sum(d == 0 for d in diff)} equal, {sum(d < 0 for d in diff)} lower)")


if __name__ == "__main__":
    main()
