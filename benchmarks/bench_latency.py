"""Benchmark: jitted CPU inference latency and on-disk size, original vs. factored.

For LeNet-5 (28x28x1), VGG-16-BN and ResNet-20 (32x32x3) at MAC = parameter
budgets 0.7 / 0.5 / 0.3 (of the decomposed layers; every conv and dense layer is
decomposed, ``tai`` scheme), ranks from the ``uniform`` allocator through
``coblax.allocate``. Weights are random-initialized: latency and size depend on
the ranks, not on the weights' values, and ranks from another allocator change
the numbers only through their shapes. Latency is the median of ``--repeats``
warm calls (after two warm-up calls that compile) of one ``jax.jit``-ed eval-mode
apply, at batch 1 and batch 64; the original and the factored networks of one
model are timed round-robin, so load changes of a shared machine hit all alike. Size is the bytes of the exported ``.npz``
(:func:`coblax.save_factored`, all collections) beside N_M(m) x 4 bytes (float32
parameters, ``params`` collection only).

Usage: python benchmarks/bench_latency.py [--models lenet5 vgg16_bn resnet20]
       [--budgets 0.7 0.5 0.3] [--repeats 20] [--repeats64 5] [--out DIR]

``--mode latency`` is the latency-budget mode (issue 21; see ``benchmarks/_latency_budget.py``):
latency budgets 0.7 / 0.5 / 0.3 at batch 1 and 64, measured latency ratio of the
allocated network, and test accuracy on Fashion-MNIST beside the MAC-budgeted
allocation matched to the same latency. ``--quick`` sizes it down to check that it runs.

       python benchmarks/bench_latency.py --mode latency [--quick] [--models ...] [--batches 1 64]
       [--method pos_greedy] [--train N] [--epochs E] [--test N] [--repeats R] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from coblax import allocate, save_factored
from coblax.lowrank.costs import count_params
from coblax.nn.models import build_model
from coblax.util import flatten_tree, to_numpy_tree, write_json_atomic

SHAPES = {"lenet5": (28, 28, 1)}
SLOWER = 0.8  # flag a measured speed-up below 0.8 / MAC ratio (or above 1.25 / MAC ratio)


def median_ms(fns, variables, x, repeats: int) -> list[float]:
    """Median wall time (ms) of warm calls of each jitted ``fns[i](variables[i], x)``.

    The networks are timed round-robin (one call of each per repeat) so that a
    change of the machine's load during the run hits all of them alike.
    """
    for fn, v in zip(fns, variables):
        for _ in range(2):
            jax.block_until_ready(fn(v, x))
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, (fn, v) in enumerate(zip(fns, variables)):
            start = time.perf_counter()
            jax.block_until_ready(fn(v, x))
            times[i].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def npz_bytes(variables) -> int:
    buf = io.BytesIO()
    np.savez(buf, **flatten_tree(to_numpy_tree(variables)))
    return len(buf.getvalue())


def bench_model(name: str, budgets, repeats: int, repeats64: int, out: Path) -> list[dict]:
    model = build_model(name, num_classes=10)
    shape = SHAPES.get(name, (32, 32, 3))
    rng = np.random.default_rng(0)
    x1 = jnp.asarray(rng.normal(size=(1,) + shape), jnp.float32)
    x64 = jnp.asarray(rng.normal(size=(64,) + shape), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), x1)
    kwargs = {"train": False} if "batch_stats" in variables else {}
    data = (np.asarray(x64[:16]), rng.integers(0, 10, size=16))
    results = [allocate(model, variables, data, rules=[(".*", "tai")], mac=b, param=b, method="uniform",
                        apply_kwargs=kwargs) for b in budgets]
    fns = [jax.jit(lambda v, x: model.apply(v, x, **kwargs))] + [jax.jit(r.apply) for r in results]
    trees = [variables] + [r.variables for r in results]
    ms1 = median_ms(fns, trees, x1, repeats)
    print(f"{name}: batch 1 " + ", ".join(f"{t:.2f}" for t in ms1) + " ms", flush=True)
    ms64 = median_ms(fns, trees, x64, repeats64)
    print(f"{name}: batch 64 " + ", ".join(f"{t:.1f}" for t in ms64) + " ms", flush=True)
    n_params = count_params(variables)
    rows = [{
        "model": name, "budget": 1.0, "mac_ratio": 1.0, "param_ratio": 1.0,
        "ms_b1": ms1[0], "ms_b64": ms64[0], "speedup_b1": 1.0, "speedup_b64": 1.0,
        "file_bytes": npz_bytes(variables), "params": n_params, "param_bytes": 4 * n_params,
    }]
    for i, (b, result) in enumerate(zip(budgets, results), start=1):
        size = save_factored(out / f"{name}-{b:g}.npz", result, meta={"budget": b, "ranks": result.ranks}).total_bytes
        rows.append({
            "model": name, "budget": b, "mac_ratio": result.network_mac_ratio,
            "param_ratio": result.network_param_ratio, "ms_b1": ms1[i], "ms_b64": ms64[i],
            "speedup_b1": ms1[0] / ms1[i], "speedup_b64": ms64[0] / ms64[i],
            "file_bytes": size, "params": result.params, "param_bytes": 4 * result.params,
            "ranks": result.ranks,
        })
    return rows


def table(rows: list[dict]) -> str:
    head = ("| model | budget | MAC ratio | predicted speed-up (1/MAC) | batch 1 ms | speed-up b1 | batch 64 ms "
            "| speed-up b64 | export bytes | N_M(m)×4 bytes | note |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        predicted = 1.0 / r["mac_ratio"]
        slow = [f"b{b}" for b in (1, 64) if r["budget"] < 1 and r[f"speedup_b{b}"] < SLOWER * predicted]
        fast = [f"b{b}" for b in (1, 64) if r["budget"] < 1 and r[f"speedup_b{b}"] > predicted / SLOWER]
        notes = [f"slower than MACs predict ({', '.join(slow)})"] * bool(slow)
        notes += [f"faster than MACs predict ({', '.join(fast)})"] * bool(fast)
        note = "; ".join(notes)
        budget = "original" if r["budget"] == 1.0 else f"{r['budget']:g}"
        lines.append(
            f"| {r['model']} | {budget} | {r['mac_ratio']:.3f} | {predicted:.2f} | {r['ms_b1']:.2f} | "
            f"{r['speedup_b1']:.2f} | {r['ms_b64']:.1f} | {r['speedup_b64']:.2f} | {r['file_bytes']:,} | "
            f"{int(r['param_bytes']):,} | {note} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["lenet5", "resnet20", "vgg16_bn"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    ap.add_argument("--mode", choices=("mac", "latency"), default="mac",
                    help="mac: uniform MAC=param budgets (the original table); latency: latency budgets")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls at batch 1 (mac mode: 20) / "
                    "samples per network and table entry (latency mode: 15, --quick 3)")
    ap.add_argument("--repeats64", type=int, default=3, help="timed calls at batch 64")
    ap.add_argument("--out", default=os.environ.get("BENCH_OUT", "runs/bench_latency"))
    ap.add_argument("--quick", action="store_true", help="latency mode: tiny training, few repeats (a smoke run)")
    ap.add_argument("--checks", type=int, default=2, help="latency mode: end-to-end checks (re-allocations) "
                    "of each latency-budgeted network, as allocate's latency_checks")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64], help="latency mode: batch sizes")
    ap.add_argument("--method", default="pos_greedy", help="latency mode: the allocator of both budgets "
                    "(pos_greedy: data-free and fast; pos_exact's MILP is slow on VGG-16-BN's ~8k candidates)")
    ap.add_argument("--train", type=int, default=None, help="latency mode: training examples per model")
    ap.add_argument("--epochs", type=int, default=None, help="latency mode: base training epochs")
    ap.add_argument("--test", type=int, default=None, help="latency mode: test examples")
    ap.add_argument("--data-dir", default=os.environ.get("COBLAX_DATA", "/work/shared/datasets"),
                    help="latency mode: the Fashion-MNIST folder's parent")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mode == "latency":
        return latency_main(args, out)
    args.repeats = args.repeats or 20
    rows = []
    for name in args.models:
        rows += bench_model(name, args.budgets, args.repeats, args.repeats64, out)
        print(table(rows[-1 - len(args.budgets):]), flush=True)
    text = table(rows)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, jax {jax.__version__}\n")
    print(text)
    write_json_atomic(out / "latency.json", {"rows": rows, "cpus": os.cpu_count(), "jax": jax.__version__,
                                             "loadavg": os.getloadavg()})


def latency_main(args, out: Path) -> None:
    """``--mode latency``: the latency-budget table (``benchmarks/_latency_budget.py``)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import _latency_budget as lb

    start = time.perf_counter()
    settings = lb.settings_for(args)
    rows = []
    for name in settings.models:
        rows += lb.bench_model(name, settings)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, jax {jax.__version__}, {time.perf_counter() - start:.0f} s\n")
    print(lb.table(rows))
    print("\n" + "\n".join(lb.done_when(rows)))
    write_json_atomic(out / "latency_budget.json", {"rows": rows, "cpus": os.cpu_count(), "jax": jax.__version__,
                                                    "loadavg": os.getloadavg(), "quick": bool(args.quick),
                                                    "seconds": time.perf_counter() - start})


if __name__ == "__main__":
    main()
