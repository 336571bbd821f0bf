"""Benchmark: where one COBLA allocation spends its time, and how many iterations its solves take.

For each case it builds the allocation problem with the runner's own pieces (trained
base model from the config; the zoo's ResNet-20 and VGG-16-BN with initial weights on
synthetic 32×32×3 inputs labelled by the network itself, as ``bench_vgg16_cobla.py``
does), runs COBLA at its defaults (``max_iter = 100``) and prints one row:

* wall time split into objective evaluations (E and ∂E/∂m inside the solves),
  validation evaluations (scoring rounding candidates), the solver's own time, the
  rounding's own time and the rest (warm start, set-up);
* the overhead ratio: wall time over (evaluations × mean evaluation time);
* per solve: stage, status, stopping criterion, iterations, evaluations.

``--against COMMIT`` also runs the quick-start small-CNN COBLA of another commit (a
temporary ``git worktree``, in a subprocess, with ``max_iter = 100``) in the same
run and prints the wall-time ratio and both relaxed objectives.

``--rounding`` prints the time of rounding alone at VGG-16 size (11,145 triplets,
synthetic σ and costs, a cheap synthetic validation score).

Usage:
  python benchmarks/bench_cobla.py [--cases quickstart_cnn,quickstart_mlp,lenet5_tai,lenet5_zhang,resnet20,vgg16_bn]
                                   [--against 43b0edc] [--rounding] [--examples 64]
LeNet-5 needs Fashion-MNIST (``COBLAX_DATA`` or ``../shared/datasets``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    # name: (config, model label prefix, scheme, budget)
    "quickstart_cnn": ("experiments/quickstart.toml", "small_cnn", "tai", 0.5),
    "quickstart_mlp": ("experiments/quickstart.toml", "mlp", "tai", 0.5),
    "lenet5_tai": ("experiments/compare_lenet5_fashion_cpu.toml", "lenet5", "tai", 0.5),
    "lenet5_zhang": ("experiments/compare_lenet5_fashion_cpu.toml", "lenet5", "zhang", 0.5),
    "resnet20": ("zoo", "resnet20", "tai", 0.5),
    "vgg16_bn": ("zoo", "vgg16_bn", "tai", 0.5),
}


class Timed:
    """Wraps a loss oracle: counts and times every evaluation, by kind."""

    def __init__(self, loss):
        self._loss = loss
        self.seconds = {"objective": 0.0, "validation": 0.0}
        self.calls = {"objective": 0, "validation": 0}

    def _timed(self, kind, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.seconds[kind] += time.perf_counter() - start
        self.calls[kind] += 1
        return out

    def value_and_grad(self, m):
        return self._timed("objective", self._loss.value_and_grad, m)

    def value(self, m):
        return self._timed("objective", self._loss.value, m)

    def validation_loss(self, m):
        return self._timed("validation", self._loss.validation_loss, m)

    def validation_metrics(self, m):
        return self._timed("validation", self._loss.validation_metrics, m)

    def __getattr__(self, name):
        return getattr(self._loss, name)

    def snapshot(self) -> float:
        return sum(self.seconds.values())


def zoo_problem(model_name: str, examples: int, budget: float):
    """A zoo network with its initial weights on synthetic data labelled by itself."""
    import jax
    import jax.numpy as jnp

    from coblax.lowrank.costs import make_problem, network_cost
    from coblax.lowrank.decompose import factorize, get_kernel, trace_layers
    from coblax.lowrank.objective import NetworkLoss
    from coblax.nn.models import build_model

    model = build_model(model_name, num_classes=10, input_shape=(32, 32, 3))
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(2 * examples, 32, 32, 3)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    kwargs = {"train": False} if "batch_stats" in variables else {}
    y = np.asarray(jnp.argmax(model.apply(variables, jnp.asarray(x), **kwargs), -1)).astype(np.int32)
    traced = trace_layers(model, variables, jnp.asarray(x[:1]), kwargs or None)
    chosen = [l for l in traced if l.decomposable and l.kind == "conv"]
    full = {l.name: factorize(get_kernel(variables, l.name), l, "tai") for l in chosen}
    net = network_cost(traced, variables, {n: np.asarray(f.sigma) for n, f in full.items()}, "tai")
    loss = NetworkLoss(model, variables, full, (x[:examples], y[:examples]), (x[examples:], y[examples:]),
                       batch_size=examples, apply_kwargs=kwargs)
    return make_problem(net, budget, budget, "decomposed", loss=loss, seed=0), loss


def run_case(name: str, examples: int, max_iter: int) -> dict:
    from _problems import build

    import coblax.lowrank.cobla as C

    config, model, scheme, budget = CASES[name]
    if config == "zoo":
        problem, loss = zoo_problem(model, examples, budget)
    else:
        problem, _, _, loss = build(str(ROOT / config), model, scheme, (budget, budget))
    timed = Timed(loss)
    problem = dataclasses.replace(problem, loss=timed)
    timed.value_and_grad(np.ones(timed.size))  # compile outside the measurement
    timed.validation_metrics(np.ones(timed.size))
    timed.seconds = {k: 0.0 for k in timed.seconds}
    timed.calls = {k: 0 for k in timed.calls}
    clock = {"solve": 0.0, "solve_evals": 0.0, "round": 0.0, "round_evals": 0.0}

    @contextlib.contextmanager
    def span(key):
        e0, t0 = timed.snapshot(), time.perf_counter()
        yield
        clock[key] += time.perf_counter() - t0
        clock[key + "_evals"] = clock.get(key + "_evals", 0.0) + timed.snapshot() - e0

    orig_solve, orig_round = C.COBLA._solve, C.round_masks

    def solve(self, *args, **kwargs):
        with span("solve"):
            return orig_solve(self, *args, **kwargs)

    def round_masks(*args, **kwargs):
        with span("round"):
            return orig_round(*args, **kwargs)

    C.COBLA._solve, C.round_masks = solve, round_masks
    try:
        start = time.perf_counter()
        alloc = C.COBLA(max_iter=max_iter)(problem)
        wall = time.perf_counter() - start
    finally:
        C.COBLA._solve, C.round_masks = orig_solve, orig_round
    evals = sum(timed.calls.values())
    eval_s = timed.snapshot()
    return {
        "case": name, "variables": int(timed.size), "wall": wall, "evals": evals,
        "objective_s": timed.seconds["objective"], "validation_s": timed.seconds["validation"],
        "solver_s": clock["solve"] - clock["solve_evals"], "rounding_s": clock["round"] - clock["round_evals"],
        "other_s": wall - eval_s - (clock["solve"] - clock["solve_evals"]) - (clock["round"] - clock["round_evals"]),
        "overhead": wall / eval_s if eval_s else float("nan"),
        "solves": [(s["stage"], s["status"], s.get("criterion"), s["iterations"], s.get("n_fun"))
                   for s in alloc.stats["solves"]],
        "relaxed_objective": alloc.stats["relaxed_objective"],
        "ranks_from_warm_start": alloc.stats.get("ranks_from_warm_start"),
    }


def against(commit: str, max_iter: int) -> dict:
    """The quick-start small-CNN COBLA of ``commit``, in a subprocess on a temporary worktree."""
    code = f"""
import json, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from _problems import build
from coblax.lowrank.cobla import COBLA
problem, *_ = build({str(ROOT / CASES['quickstart_cnn'][0])!r}, "small_cnn", "tai", (0.5, 0.5))
problem.loss.value_and_grad(__import__("numpy").ones(sum(l.full_rank for l in problem.layers)))
t = time.perf_counter(); a = COBLA(max_iter={max_iter})(problem); wall = time.perf_counter() - t
print(json.dumps({{"wall": wall, "relaxed_objective": a.stats["relaxed_objective"],
                  "solves": [(s["stage"], s["status"], s["iterations"]) for s in a.stats["solves"]]}}))
"""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), commit], check=True)
        try:
            env = dict(os.environ, PYTHONPATH=str(tree))
            out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True,
                                 text=True, check=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rounding_at_vgg_size() -> float:
    """Seconds of COBLA's rounding on 11,145 synthetic triplets (VGG-16 under ``tai``)."""
    from coblax.lowrank.allocation import AllocationProblem, LayerCost
    from coblax.lowrank.rounding import round_masks

    widths = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    rng = np.random.default_rng(0)
    layers = []
    for i, (c, n) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        r = min(3 * c, 3 * n)
        hw = (32 >> min(i // 2, 4)) ** 2
        layers.append(LayerCost(f"conv{i}", "conv", (3 * c, 3 * n), np.sort(rng.gamma(2.0, size=r))[::-1],
                                hw * 3 * (c + n), 3 * (c + n), hw * 9 * c * n, 9 * c * n))
    o_mac = sum(l.original_macs for l in layers)
    o_par = sum(l.original_params for l in layers)
    problem = AllocationProblem(tuple(layers), 0.3 * o_mac, 0.3 * o_par, seed=0)
    m_hat = {l.name: np.clip(rng.normal(0.35, 0.3, l.full_rank), 0, 1) for l in layers}

    def score(m):  # a cheap stand-in for the validation accuracy: the kept energy
        return (-float(np.sum(m * np.concatenate([l.sigma for l in layers]) ** 2)),)

    start = time.perf_counter()
    round_masks(problem, m_hat, draws=12, seed=0, score=score, values="relaxed", extra=[], local_search_evals=60)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="quickstart_cnn,quickstart_mlp")
    ap.add_argument("--examples", type=int, default=64, help="objective examples of the zoo cases")
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--against", default=None, help="a commit to compare the quick-start CNN with")
    ap.add_argument("--rounding", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    rows = []
    if args.cases:
        print("| case | masks | wall s | evals | objective s | validation s | solver s | rounding s | other s "
              "| overhead | solves (stage, status, criterion, iterations, evals) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for name in args.cases.split(","):
            r = run_case(name, args.examples, args.max_iter)
            rows.append(r)
            print(f"| {r['case']} | {r['variables']} | {r['wall']:.1f} | {r['evals']} | {r['objective_s']:.1f} | "
                  f"{r['validation_s']:.1f} | {r['solver_s']:.1f} | {r['rounding_s']:.1f} | {r['other_s']:.1f} | "
                  f"{r['overhead']:.2f} | {r['solves']} |", flush=True)
    if args.against:
        old = against(args.against, args.max_iter)
        new = next((r for r in rows if r["case"] == "quickstart_cnn"), None) or run_case(
            "quickstart_cnn", args.examples, args.max_iter)
        print(f"\nquick-start small CNN, max_iter = {args.max_iter}: {args.against} {old['wall']:.1f} s "
              f"(relaxed E {old['relaxed_objective']:.6f}, solves {old['solves']}); this tree {new['wall']:.1f} s "
              f"(relaxed E {new['relaxed_objective']:.6f}); speed-up {old['wall'] / new['wall']:.2f}x")
    if args.rounding:
        print(f"\nrounding at VGG-16 size (11,145 triplets, 12 draws, local search 60): "
              f"{rounding_at_vgg_size():.2f} s")


if __name__ == "__main__":
    main()
