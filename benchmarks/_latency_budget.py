"""Latency-budget mode of ``benchmarks/bench_latency.py`` (``--mode latency``; issue 21).

For each model (LeNet-5 on 28x28x1, ResNet-20 and VGG-16-BN on 32x32x1: Fashion-MNIST
padded by 2 pixels) and each batch size (1, 64):

1. train the base network briefly on Fashion-MNIST (``--train`` examples, ``--epochs``;
   cached in ``--out``) and measure its test accuracy;
2. measure the latency model at that batch (:func:`coblax.lowrank.latency_measure.measure_network`:
   per-layer tables, and the network with every layer's original form in one
   round-robin group; the rest of the network is a constant by difference);
3. for each latency budget λ (0.7 / 0.5 / 0.3) allocate with ``--method`` (default
   ``pos_greedy``, data-free and fast, so that the two budgets are compared with the
   same allocator; ``pos_exact``'s MILP takes minutes on VGG-16-BN) under the latency budget alone (mac = param = 1),
   with allocate's end-to-end check (:mod:`coblax.lowrank.latency_check`, ``--checks``
   re-allocations under a budget corrected by the measured miss);
4. the MAC-budgeted comparison at the same *measured* latency: the MAC fraction whose
   allocation (same method, mac = f, param = 1) the tables predict at the
   latency-budgeted one's latency (bisection on f, ``--bisect`` steps on the tables'
   prediction), then refined by bisection on the measured ratio (``--checks`` + 2
   measurements) to the largest f that measures at or below the latency-budgeted network;
5. measure end to end, in one round-robin group at that batch (the original network,
   the three latency-budgeted and the three MAC-budgeted networks; median of
   ``--repeats`` warm samples, each sample at least 2 ms of back-to-back calls, after
   two warm-up calls: the procedure of the tables), the latency ratio of every
   allocated network to the original;
6. evaluate test accuracy (no fine-tuning: the comparison is of the allocations).

Done-when of issue 21: at λ = 0.5 and batch 64 the measured ratio is within 1.1 λ
for every network, and at the matched latency the latency-budgeted allocation is at
least as accurate as the MAC-budgeted one. A row that misses either is marked.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from coblax.lowrank.allocation import Allocation, BudgetError
from coblax.lowrank.api import compressed_linen, decompose_selected, factored_builder, table_schemes
from coblax.lowrank.costs import make_problem
from coblax.lowrank.decompose import trace_layers
from coblax.lowrank.latency import NetworkLatency, fit_quality
from coblax.lowrank.latency_check import check_latency, network_measure
from coblax.lowrank.latency_measure import TimingOptions, measure_network, time_calls
from coblax.lowrank.registry import get_allocator
from coblax.nn.data import load_dataset
from coblax.nn.models import build_model, training_options
from coblax.nn.train import evaluate, fit, load_checkpoint, save_params

RULES = [(".*", "tai")]
PADDED = {"resnet20", "vgg16_bn"}  # 32x32 networks (VGG's five pools need 32): pad 28 -> 32


@dataclasses.dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    budgets: tuple[float, ...]
    batches: tuple[int, ...]
    train: dict  # model -> training examples
    epochs: dict  # model -> training epochs
    test: dict  # model -> test examples
    repeats: int
    grid: int
    bisect: int
    checks: int
    method: str
    out: Path
    data_dir: str | None


def settings_for(args) -> Settings:
    quick = args.quick
    # sized for <= ~15 min on a quiet 2-core CPU: VGG-16-BN dominates (training and evaluation)
    train = {"lenet5": 6000, "resnet20": 4000, "vgg16_bn": 1500}
    epochs = {"lenet5": 2, "resnet20": 2, "vgg16_bn": 1}
    test = {"lenet5": 2000, "resnet20": 1000, "vgg16_bn": 500}
    if quick:
        train, epochs, test = ({k: n for k in train} for n in (300, 1, 200))
    return Settings(
        models=tuple(args.models), budgets=tuple(args.budgets), batches=tuple(args.batches),
        train={k: args.train or v for k, v in train.items()}, epochs={k: args.epochs or v for k, v in epochs.items()},
        test={k: args.test or v for k, v in test.items()}, repeats=args.repeats or (3 if quick else 15),
        grid=4 if quick else 8, bisect=6 if quick else 12, checks=args.checks, method=args.method, out=Path(args.out),
        data_dir=args.data_dir,
    )


def _data(name: str, s: Settings):
    ds = load_dataset("fashion_mnist", s.data_dir, seed=0, limit_train=s.train[name], limit_test=s.test[name])
    xs = [ds.x_train, ds.x_test]
    if name in PADDED:
        xs = [np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0))) for x in xs]
    return xs[0], ds.y_train, xs[1], ds.y_test


def _base(name: str, s: Settings, x, y):
    """The trained base network (cached in ``out``: rerunning reuses it)."""
    model = build_model(name, num_classes=10)
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    path = s.out / f"base-{name}-n{len(x)}-e{s.epochs[name]}.npz"
    try:
        return model, load_checkpoint(path, variables)
    except Exception:  # noqa: BLE001 - absent or stale: train
        pass
    kwargs, fit_kwargs = training_options(model, variables)
    apply = functools.partial(model.apply, **kwargs)
    start = time.perf_counter()
    variables = fit(apply, variables, x, y, epochs=s.epochs[name], batch_size=64, learning_rate=1e-3, seed=0,
                    desc=f"train {name}", progress=False, **fit_kwargs)
    print(f"{name}: trained on {len(x)} examples x {s.epochs[name]} epochs in {time.perf_counter() - start:.0f} s",
          flush=True)
    save_params(path, variables)
    return model, variables


def _predicted(timing: NetworkLatency, net_layers, ranks) -> float:
    """Network time ratio the tables predict for ``ranks`` as the network runs them: a layer
    at full rank is original, any other rank runs factored (even where that is slower)."""
    times = []
    for layer in net_layers:
        curve, r = timing.curves[layer.name], int(ranks[layer.name])
        times.append(curve.original if r >= layer.full_rank else curve.at(r))
    return timing.predict(times) / timing.total


def _reported(net, allocation: Allocation) -> dict:
    """Ranks as the factored network runs them (original form reported at full rank)."""
    return {l.name: l.full_rank if l.is_original(int(allocation.ranks[l.name])) else int(allocation.ranks[l.name])
            for l in net.layers}


def bench_model(name: str, s: Settings) -> list[dict]:
    x, y, x_test, y_test = _data(name, s)
    model, variables = _base(name, s, x, y)
    kwargs = {"train": False} if "batch_stats" in variables else {}
    apply = functools.partial(model.apply, **kwargs)
    base_acc = evaluate(apply, variables, x_test, y_test, batch_size=250)
    schemes, full, net = decompose_selected(model, variables, x, RULES, kwargs)
    traced = {t.name: t for t in trace_layers(model, variables, jnp.asarray(x[:1]), kwargs)}
    # pos_exact: only its ranks (the relaxation bound and the greedy comparison are diagnostics)
    allocator = get_allocator(s.method, **({"bound": False, "compare_greedy": False} if s.method == "pos_exact"
                                           else {}))
    rows = []
    for batch in s.batches:
        start = time.perf_counter()
        timing = measure_network(lambda v, xb: model.apply(v, xb, **kwargs), variables, x.shape[1:], traced,
                                 net.layers, table_schemes(full), batch=batch,
                                 options=TimingOptions(repeats=s.repeats, grid=s.grid), cache=None,
                                 factored=factored_builder(model, variables, net, full, kwargs))
        table_s = time.perf_counter() - start
        fits = {n: fit_quality(c, None) for n, c in timing.curves.items()}
        print(f"{name} b{batch}: tables in {table_s:.0f} s; network {timing.total * 1e3:.2f} ms, rest "
              f"{timing.rest * 1e3:.2f} ms; in-network savings scale c = {timing.scale:.3f} (predicted/measured "
              f"ms: {', '.join(f'{p * 1e3:.2f}/{m * 1e3:.2f}' for p, m in timing.probes)}); line fit max "
              f"|err|/T_O: {max(fits.values()):.3f} (median {np.median(list(fits.values())):.3f})", flush=True)
        chosen = []
        for lam in s.budgets:
            try:
                problem = make_problem(net, 1.0, 1.0, "decomposed", latency=lam, timing=timing)
            except BudgetError as err:  # below the floor at this batch: say so in the table
                rows.append({"model": name, "batch": batch, "latency_budget": lam, "infeasible": str(err)})
                print(f"{name} b{batch} λ={lam:g}: {err}", flush=True)
                continue
            timed_net = dataclasses.replace(net, layers=problem.layers)
            measure = network_measure((apply, variables), factored_builder(model, variables, net, full, kwargs),
                                      x.shape[1:], batch, options=TimingOptions(repeats=s.repeats))
            # the end-to-end check allocate runs (coblax.lowrank.latency_check): measured, re-allocated
            # under a corrected budget while slower than lam
            lat_alloc = check_latency(allocator(problem), problem, allocator, timing, lam, measure, checks=s.checks)
            lat_ranks = _reported(timed_net, lat_alloc)
            target = _predicted(timing, net.layers, lat_ranks)
            mac_f, mac_alloc = _matching_mac(net, allocator, timing, target, s.bisect)
            mac_f, mac_alloc, mac_steps = _measured_mac(net, allocator, measure, mac_f, mac_alloc,
                                                        lat_alloc.stats["latency"]["measured_ratio"], s.checks + 2)
            print(f"{name} b{batch} λ={lam:g}: end-to-end checks "
                  f"{[(round(a['fraction'], 3), round(a['measured'], 3)) for a in lat_alloc.stats['latency']['end_to_end']]}"
                  f"; MAC budget by measured latency {[(round(f, 3), round(r, 3)) for f, r in mac_steps]}", flush=True)
            chosen.append((lam, timed_net, lat_alloc, target, mac_f, mac_alloc))
        networks = [(None, None)]
        for lam, timed_net, lat_alloc, _, _, mac_alloc in chosen:
            networks.append((lam, compressed_linen(model, variables, timed_net, full, lat_alloc, schemes, kwargs,
                                              "decomposed", s.method)))
            networks.append((lam, compressed_linen(model, variables, net, full, mac_alloc, schemes, kwargs,
                                              "decomposed", s.method)))
        xb = jnp.asarray(np.resize(x, (batch, *x.shape[1:])))
        fns = [jax.jit(apply)] + [jax.jit(r.apply) for _, r in networks[1:]]
        trees = [variables] + [r.variables for _, r in networks[1:]]
        ms = [t * 1e3 for t in time_calls([(lambda f=f, v=v, xb=xb: f(v, xb)) for f, v in zip(fns, trees)],
                                          repeats=s.repeats)]
        for i, (lam, _, _, target, mac_f, mac_alloc) in enumerate(chosen):
            lat_net, mac_net = networks[1 + 2 * i][1], networks[2 + 2 * i][1]
            row = {
                "model": name, "batch": batch, "latency_budget": lam, "original_ms": ms[0],
                "predicted_ratio": target, "measured_ratio": ms[1 + 2 * i] / ms[0],
                "mac_budget": mac_f, "mac_predicted_ratio": _predicted(timing, net.layers, _reported(net, mac_alloc)),
                "mac_measured_ratio": ms[2 + 2 * i] / ms[0],
                "latency_mac_ratio": lat_net.mac_ratio, "base_accuracy": base_acc,
                "latency_accuracy": evaluate(functools.partial(lat_net.apply_fn, **kwargs), lat_net.variables,
                                             x_test, y_test, batch_size=250),
                "mac_accuracy": evaluate(functools.partial(mac_net.apply_fn, **kwargs), mac_net.variables,
                                         x_test, y_test, batch_size=250),
                "latency_ranks": dict(lat_net.ranks), "mac_ranks": dict(mac_net.ranks),
                "fit_max_error": max(fits.values()), "rest_ms": timing.rest * 1e3, "table_seconds": table_s,
                "calibration_scale": timing.scale, "calibration_probes_ms": [(p * 1e3, m * 1e3) for p, m in
                                                                             timing.probes],
            }
            rows.append(row)
            print(table([row], header=False), flush=True)
    return sorted(rows, key=lambda r: (r["batch"], -r["latency_budget"]))  # infeasible rows were added first


def _matching_mac(net, allocator, timing: NetworkLatency, target: float, steps: int):
    """(f, allocation): the largest MAC budget f (of ``steps`` bisection steps) whose
    allocation the tables predict at or below ``target`` (the predicted latency is
    non-decreasing in f up to allocator ties); the floor's if none is."""
    a = min(1.0, net.ratios({l.name: 1 for l in net.layers}, "decomposed")[0] * 1.0001)
    b = 1.0
    best = (a, allocator(make_problem(net, a, 1.0, "decomposed")))
    for _ in range(steps):
        mid = 0.5 * (a + b)
        alloc = allocator(make_problem(net, mid, 1.0, "decomposed"))
        if _predicted(timing, net.layers, _reported(net, alloc)) <= target:
            a, best = mid, (mid, alloc)
        else:
            b = mid
    return best


def _measured_mac(net, allocator, measure, f0: float, alloc0, target: float, steps: int):
    """(f, allocation, [(f, measured)]): the MAC budget whose allocation *measures* closest
    below ``target`` (the latency-budgeted network's measured ratio), by bisection on f
    from the predicted match ``f0`` (``steps`` measurements at most); the fastest measured
    when none is below."""
    floor = min(1.0, net.ratios({l.name: 1 for l in net.layers}, "decomposed")[0] * 1.0001)
    tried = []

    def at(f, alloc=None):
        alloc = alloc or allocator(make_problem(net, f, 1.0, "decomposed"))
        tried.append((f, measure(_reported(net, alloc)), alloc))
        return tried[-1][1]

    lo, hi = floor, 1.0
    if at(f0, alloc0) > target:
        hi = f0
    else:
        lo = f0
    for _ in range(steps - 1):
        mid = 0.5 * (lo + hi)
        if at(mid) > target:
            hi = mid
        else:
            lo = mid
    below = [t for t in tried if t[1] <= target]
    f, _, alloc = max(below, key=lambda t: t[1]) if below else min(tried, key=lambda t: t[1])
    return f, alloc, [(t[0], t[1]) for t in tried]


def table(rows: list[dict], header: bool = True) -> str:
    head = ["| model | batch | λ | predicted | measured | ≤ 1.1 λ | MAC budget matched | MAC alloc. predicted "
            "| MAC alloc. measured | acc. latency-budgeted | acc. MAC-budgeted | base acc. | note |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    lines = head if header else []
    for r in rows:
        if "infeasible" in r:
            smallest = r["infeasible"].split("smallest feasible latency budget is ")[-1].split(" ")[0]
            lines.append(f"| {r['model']} | {r['batch']} | {r['latency_budget']:g} | – | – | – | – | – | – | – | – "
                         f"| – | infeasible: smallest latency budget {smallest} |")
            continue
        within = r["measured_ratio"] <= 1.1 * r["latency_budget"]
        notes = []
        if r["latency_accuracy"] < r["mac_accuracy"]:
            notes.append("latency-budgeted less accurate")
        if r["measured_ratio"] > r["mac_measured_ratio"] * 1.05:
            notes.append("measured slower than the MAC-budgeted")
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['latency_budget']:g} | {r['predicted_ratio']:.3f} | "
            f"{r['measured_ratio']:.3f} | {'yes' if within else 'NO'} | {r['mac_budget']:.3f} | "
            f"{r['mac_predicted_ratio']:.3f} | {r['mac_measured_ratio']:.3f} | {r['latency_accuracy']:.4f} | "
            f"{r['mac_accuracy']:.4f} | {r['base_accuracy']:.4f} | {'; '.join(notes)} |")
    return "\n".join(lines)


def done_when(rows: list[dict]) -> list[str]:
    """The issue's two checks at λ = 0.5, batch 64, one line per model."""
    out = []
    for r in rows:
        if r["latency_budget"] == 0.5 and r["batch"] == 64 and "infeasible" in r:
            out.append(f"{r['model']}: FAIL, latency 0.5 infeasible at batch 64 ({r['infeasible']})")
        elif r["latency_budget"] == 0.5 and r["batch"] == 64:
            out.append(f"{r['model']}: measured {r['measured_ratio']:.3f} <= 0.55: "
                       f"{'PASS' if r['measured_ratio'] <= 0.55 else 'FAIL'}; accuracy {r['latency_accuracy']:.4f} "
                       f">= MAC-budgeted {r['mac_accuracy']:.4f} at measured {r['mac_measured_ratio']:.3f}: "
                       f"{'PASS' if r['latency_accuracy'] >= r['mac_accuracy'] else 'FAIL'}")
    return out
