"""Benchmark: seconds per SQP iteration, structured solver vs. SLSQP, n = 500 ... 100,000.

The problem has COBLA's shape — two budget rows (MAC-like and parameter-like costs,
both binding), the box [0, 1], a smooth objective with a low-rank coupling
(½ Σ a_i (x_i − t_i)² + ‖V x‖², V of 5 rows) whose callback costs O(n), so the
time is the solver's own. Each solver runs a fixed number of iterations from the
same start: the structured solver to convergence (KKT residual ≤ 1e-8·|f|, at
most 300 iterations), SLSQP a fixed number (fewer at large n: it is O(n³) per
iteration); SLSQP is skipped above ``--slsqp-max-n``. Prints a table and the ratios measured in this
one run.

Usage: python benchmarks/bench_solver.py [--sizes 500,1000,2000,4000,16000,100000]
       [--iters 20] [--slsqp-max-n 4000]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from coblax import solve


def problem(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    a, t = rng.uniform(0.5, 3.0, n), rng.uniform(0.3, 1.4, n)
    V = rng.normal(size=(5, n)) / np.sqrt(n)
    A = np.stack([rng.uniform(1, 5, n) * 1e4, rng.uniform(1, 5, n) * 1e2])
    b = np.array([0.5, 0.45]) * A.sum(axis=1)

    def f(x):
        r = V @ x
        return float(0.5 * np.sum(a * (x - t) ** 2) + r @ r), a * (x - t) + 2.0 * (V.T @ r)

    return f, A, b


def run(method: str, n: int, iters: int, tol: float) -> dict:
    f, A, b = problem(n)
    x0 = np.full(n, 0.2)
    start = time.perf_counter()
    res = solve(f, x0, A, b, method=method, max_iter=iters, tol=tol)
    wall = time.perf_counter() - start
    return {"it": max(res.iterations, 1), "wall": wall, "per_it": wall / max(res.iterations, 1),
            "value": res.value, "kkt": res.kkt_residual, "nfun": res.n_fun, "status": res.status}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="500,1000,2000,4000,16000,100000")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--slsqp-max-n", type=int, default=4000)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print("| n | structured s/it | SLSQP s/it | SLSQP / structured | structured: status, iterations, "
          "wall s, f | SLSQP iterations, f |")
    print("|---:|---:|---:|---:|---|---|")
    for n in sizes:
        s = run("structured", n, 300, 1e-8)
        head = f"| {n:,} | {s['per_it']:.4f} |"
        tail = f"| {s['status']}, {s['it']}, {s['wall']:.1f}, {s['value']:.8g} |"
        if n <= args.slsqp_max_n:
            q_iters = args.iters if n <= 1000 else max(1, args.iters * 1000 // (4 * n))
            q = run("slsqp", n, q_iters, 1e-12)
            print(f"{head} {q['per_it']:.3f} | {q['per_it'] / s['per_it']:.0f}x {tail} {q['it']}, {q['value']:.8g} |",
                  flush=True)
        else:
            print(f"{head} skipped | — {tail} — |", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory of this process: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
