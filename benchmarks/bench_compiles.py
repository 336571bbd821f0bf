"""Compilations of a cut-down ``compare_squeezenet_digits`` run, and rank padding against recompiling.

Runs ``experiments/compare_squeezenet_digits.toml`` cut to one seed and one budget
(1 model x 2 schemes x 1 budget x 7 methods = 14 records) in this process and
prints the number of XLA compilations, the seconds spent compiling (tracing,
lowering, backend) and the wall time of the records. The base model is trained
(or loaded from the cache) before counting starts.

``--pad`` pads every fine-tuned factor to a bucketed rank with zero columns / rows
before fine-tuning, so records whose ranks fall in the same buckets share one
compiled step: ``pow2`` (the next power of two), ``full`` (the layer's full rank:
one shape per scheme). Zero-padded triplets get zero gradients (each factor's
padded part multiplies the other's), so they stay zero under SGD / Adam and the
network computes the same function; what changes is the work per step.

    python benchmarks/bench_compiles.py                 # this checkout
    PYTHONPATH=/path/to/old/checkout python benchmarks/bench_compiles.py   # before
    python benchmarks/bench_compiles.py --pad full
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


def _full_rank(f) -> int:
    first, second = np.shape(f.first), np.shape(f.second)
    if f.kind == "dense":
        return min(first[0], second[-1])
    return min(int(np.prod(first[:-1])), int(np.prod(second)) // second[-2])


def _bucket(r: int, full: int, how: str) -> int:
    if how == "full":
        return full
    return min(1 << max(0, (r - 1).bit_length()), full)


def pad_factors(kept: dict, how: str) -> dict:
    """Each layer's factors zero-padded to its bucketed rank (first: last axis; second: axis -2)."""
    import jax.numpy as jnp

    out = {}
    for name, f in kept.items():
        r = np.shape(f.first)[-1]
        R = _bucket(r, _full_rank(f), how)
        if R <= r:
            out[name] = f
            continue
        first = np.asarray(f.first)
        second = np.asarray(f.second)
        first = np.concatenate([first, np.zeros(first.shape[:-1] + (R - r,), first.dtype)], -1)
        pad = list(second.shape)
        pad[-2] = R - r
        second = np.concatenate([second, np.zeros(pad, second.dtype)], -2)
        sigma = np.concatenate([np.asarray(f.sigma), np.zeros(R - r, np.asarray(f.sigma).dtype)])
        out[name] = dataclasses.replace(f, first=jnp.asarray(first), second=jnp.asarray(second),
                                        sigma=jnp.asarray(sigma))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pad", choices=("none", "pow2", "full"), default="none")
    ap.add_argument("--budget", type=float, default=0.6)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "coblax-bench-compiles-cache"))
    args = ap.parse_args()

    from coblax.app import experiment as E
    from coblax.app.config import load_run_config

    cfg = load_run_config(REPO / "experiments" / "compare_squeezenet_digits.toml")
    cfg = dataclasses.replace(
        cfg, seeds=(0,), seed=0, cache_dir=args.cache,
        budgets=dataclasses.replace(cfg.budgets, mac=(args.budget,), param=(args.budget,)),
    )
    if args.pad != "none":
        original = E.finetune_factored

        def padded(cfg, base, data, kept, *a, **kw):
            return original(cfg, base, data, pad_factors(kept, args.pad), *a, **kw)

        E.finetune_factored = padded
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
