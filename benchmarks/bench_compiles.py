"""Compilations of a cut-down ``compare_squeezenet_digits`` run, and rank padding against recompiling.

Runs ``experiments/compare_squeezenet_digits.toml`` cut to one seed and one budget
(1 model x 2 schemes x 1 budget x 7 methods = 14 records) in this process and
prints the number of XLA compilations, the seconds spent compiling (tracing,
lowering, backend) and the wall time of the records. The base model is trained
(or loaded from the cache) before counting starts.

``--pad`` replaces the runner's layout rule (:func:`coblax.lowrank.padding.finetune_layout`:
every decomposable layer factored at full rank, the ones a record keeps original as
exact factors with a frozen identity, when the extra work of fine-tuning is small)
by ``none`` (every rank its own shape: recompiling), ``pow2`` (the next power of
two) or ``full`` (the kept layers at full rank, original layers left original: the
rule before the shared layout), to measure padding against recompiling.

    python benchmarks/bench_compiles.py                 # this checkout
    PYTHONPATH=/path/to/old/checkout python benchmarks/bench_compiles.py   # before
    python benchmarks/bench_compiles.py --pad none      # cached steps, no padding
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import threading
import time
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
          "/jax/core/compile/backend_compile_duration")
_totals = {"count": 0, "seconds": 0.0}
_by_name: dict[str, list] = {}
_lock = threading.Lock()


def _listen(event, duration, **kwargs):  # the same accounting as coblax.nn.compiles (absent before it)
    if event in EVENTS:
        with _lock:
            _totals["seconds"] += duration
            _totals["count"] += event == EVENTS[-1]
            if event == EVENTS[-1]:
                entry = _by_name.setdefault(str(kwargs.get("fun_name")), [0, 0.0])
                entry[0] += 1
                entry[1] += duration


def padding_policy(how: str):
    """A replacement for the runner's ``finetune_layout`` (``product``: keep the runner's own)."""
    if how == "product":
        return None
    from coblax.lowrank.padding import FinetuneLayout, full_rank_of, pad_factors, pad_to_full_rank

    if how == "none":
        return lambda kept, *a: FinetuneLayout(dict(kept))
    if how == "full":  # every kept layer at full rank; layers kept original stay original
        return lambda kept, full, params, seen: FinetuneLayout(pad_to_full_rank(kept, seen))
    if how == "pow2":
        def pow2(kept, *a):
            out = {}
            for n, f in kept.items():
                r = int(np.shape(f.first)[-1])
                out[n] = pad_factors(f, min(1 << max(0, (r - 1).bit_length()), full_rank_of(f)))
            return FinetuneLayout(out)
        return pow2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pad", choices=("product", "none", "pow2", "full"), default="product",
                    help="layout before fine-tuning: the runner's own rule (product: one shared layout), "
                         "none, kept layers to the next power of two, kept layers to full rank")
    ap.add_argument("--budget", type=float, default=0.6)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "coblax-bench-compiles-cache"))
    args = ap.parse_args()

    from coblax.app import experiment as E
    from coblax.app import record as R  # finetune_factored builds the layout
    from coblax.app.config import load_run_config

    cfg = load_run_config(REPO / "experiments" / "compare_squeezenet_digits.toml")
    cfg = dataclasses.replace(
        cfg, seeds=(0,), seed=0, cache_dir=args.cache,
        budgets=dataclasses.replace(cfg.budgets, mac=(args.budget,), param=(args.budget,)),
    )
    policy = padding_policy(args.pad)
    if policy is not None:
        if not hasattr(R, "finetune_layout"):
            raise SystemExit("bench_compiles: this checkout has no shared layout; use --pad product")
        R.finetune_layout = policy
    with tempfile.TemporaryDirectory() as out:
        plan = E.plan_from_config(cfg, out)
        E.train_base_model(cfg, cfg.models[0], plan.data, plan.cache_dir, False)  # outside the count
        jax.monitoring.register_event_duration_secs_listener(_listen)
        start = time.perf_counter()
        payload = E.run_experiment(cfg, out, plan=plan, progress=False, log=lambda _: None)
        wall = time.perf_counter() - start
    records = payload["records"]
    print(json.dumps({
        "pad": args.pad, "records": len(records), "compiles": _totals["count"],
        "compile_seconds": round(_totals["seconds"], 1), "wall_seconds": round(wall, 1),
        "finetune_seconds": round(sum(r.get("finetune_seconds") or 0 for r in records), 1),
        "acc_after": [r["acc_after_finetune"] for r in records],
        "backend_compiles_by_function": {k: [v[0], round(v[1], 1)] for k, v in
                                         sorted(_by_name.items(), key=lambda kv: -kv[1][1])[:12]},
    }))


if __name__ == "__main__":
    main()
