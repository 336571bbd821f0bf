"""Measure COBLA's gap-closing options against the baselines, before fine-tuning.

    COBLAX_DATA=../shared/datasets python experiments/cobla_variants.py experiments/tight_budgets.toml \
        --spectra weight whitened --out runs/cobla_variants.json

For every spectrum and budget of the config it decomposes the (cached) base model
once, runs each baseline and each COBLA variant below through the runner's
``run_method`` with fine-tuning switched off, and writes one JSON row per record
(test accuracy before fine-tuning, relaxed/rounded objective and validation
metrics, wall time). No algorithm logic lives here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from coblax.app.config import load_run_config
from coblax.app.experiment import (
    decomposable_layers,
    decompose_layers,
    default_cache_dir,
    run_method,
    split_objective_data,
    train_base_model,
)
from coblax.lowrank.costs import network_cost
from coblax.lowrank.decompose import trace_layers
from coblax.lowrank.objective import NetworkLoss
from coblax.nn.data import load_dataset

VARIANTS: dict[str, dict] = {
    "authors": {"select": "loss", "warm_start": "pos_greedy", "local_search": 0},
    "accuracy": {"warm_start": "pos_greedy", "local_search": 0},
    "ls": {"warm_start": "pos_greedy", "local_search": 60},
    "exact": {"warm_start": "pos_exact", "local_search": 0},
    "exact+ls": {"warm_start": "pos_exact", "local_search": 60},
    "exact+ls+plain": {"warm_start": "pos_exact", "local_search": 60, "mask_values": "plain"},
    "exact+ls+monotone": {"warm_start": "pos_exact", "local_search": 60, "monotone": True},
    "exact+ls+continuation": {"warm_start": "pos_exact", "local_search": 60, "continuation": [0.1, 0.3, 1.0, 3.0]},
    # issue 17: the warm start, everything else at the config's settings
    "start:constant": {"warm_start": "constant"},
    "start:pos_greedy": {"warm_start": "pos_greedy"},
    "start:pos_exact": {"warm_start": "pos_exact"},
    # issue 17, the rounding gap of the constant start: the rounding before "best" and polish
    "constant:relaxed": {"warm_start": "constant", "mask_values": "relaxed", "polish": 0},
    "constant+best": {"warm_start": "constant", "mask_values": "best", "polish": 0},
    "constant+polish": {"warm_start": "constant", "mask_values": "relaxed", "polish": 50},
    "constant+best+polish": {"warm_start": "constant", "mask_values": "best", "polish": 50},
    "constant+polish10": {"warm_start": "constant", "polish": 10},
    "constant+polish15": {"warm_start": "constant", "polish": 15},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--spectra", nargs="+", default=["weight"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--baselines", nargs="+", default=["pos_greedy", "pos_exact", "cptv", "vbmf", "gavish_donoho", "uniform"])
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = load_run_config(args.config)
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, epochs=0))
    data = load_dataset(cfg.data.name, cfg.data.dir, seed=cfg.seed,
                        limit_train=cfg.data.limit_train, limit_test=cfg.data.limit_test)
    obj, val = split_objective_data(data, cfg)
    rows = []
    out = Path(args.out)
    for mc in cfg.models:
        base = train_base_model(cfg, mc, data, Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(),
                                progress=False)
        traced = trace_layers(base.model, base.params, jnp.asarray(data.x_train[:1]))
        chosen = decomposable_layers(traced, cfg)
        for spectrum in args.spectra:
            scfg = dataclasses.replace(cfg, decompose=dataclasses.replace(cfg.decompose, spectrum=spectrum))
            for scheme in cfg.decompose.schemes:
                full = decompose_layers(scfg, base, chosen, scheme, obj[0])
                net = network_cost(traced, base.params, {n: np.asarray(f.sigma) for n, f in full.items()}, scheme)
                loss = NetworkLoss(base.model, base.params, full, obj, val, batch_size=cfg.cobla.batch_size)
                for budget in cfg.budgets.pairs():
                    todo = [(b, b, {}) for b in args.baselines] + [("cobla", f"cobla:{v}", VARIANTS[v]) for v in args.variants]
                    for method, label, opts in todo:
                        vcfg = dataclasses.replace(scfg, method_options={"cobla": opts} if opts else {})
                        t0 = time.perf_counter()
                        rec = run_method(method, vcfg, base, data, traced, net, full, loss, budget, False)
                        d = rec["diagnostics"]
                        row = {
                            "model": mc.label, "spectrum": spectrum, "scheme": scheme, "budget": budget[0],
                            "method": label, "acc": rec["acc_before_finetune"], "ranks": rec["ranks"],
                            "mac_ratio": rec["mac_ratio"], "param_ratio": rec["param_ratio"],
                            "seconds": time.perf_counter() - t0, "seed": cfg.seed, "base_acc": base.accuracy,
                        }
                        for k in ("relaxed_objective", "rounded_objective", "relaxed_val_loss", "relaxed_val_accuracy",
                                  "rounded_val_loss", "rounded_val_accuracy", "saturated_layers", "relaxed_ranks",
                                  "ranks_from_warm_start", "solver_converged"):
                            if k in d:
                                row[k] = d[k]
                        if "rounding" in d:
                            row["chosen"] = d["rounding"].get("chosen")
                            if "polish" in d["rounding"]:
                                row["polish"] = d["rounding"]["polish"]
                        if "solves" in d:
                            row["solves"] = [(v["stage"], v["status"], v.get("criterion"), v["iterations"])
                                             for v in d["solves"]]
                        rows.append(row)
                        print(json.dumps({k: row[k] for k in ("spectrum", "budget", "method", "acc", "seconds")}
                                         | {k: row.get(k) for k in ("relaxed_val_accuracy", "rounded_val_accuracy", "chosen")}),
                              flush=True)
                        out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
