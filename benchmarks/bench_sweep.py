"""Wall time of one sweep run serially, with ``--workers N`` and on a local Ray instance.

The done-when case of issue 19 (the default): ``experiments/compare_lenet5_fashion_cpu.toml``
cut to one seed and one scheme (``tai``) with four budgets (0.8 / 0.7 / 0.6 / 0.5):
1 model x 1 scheme x 4 budgets x 7 methods = 28 records on 10,000 Fashion-MNIST
training images, with a shorter COBLA solve (``max_iter = 20``, ``local_search = 10``)
so that the three runs take about 10-12 min together on a quiet 2-core machine.
The data come from ``--data-dir``, ``COBLAX_DATA`` or ``../shared/datasets``.
``--small`` uses ``compare_lenet5_digits.toml`` cut the same way on the bundled
digits (no files) with ``max_iter = 15``, ``local_search = 5``: a quick check of
the machinery (its records are too short for a speed-up), not a measurement.

Each configuration runs as its own ``coblax run`` process (startup included, as a
user sees it) into a fresh output folder; the base model is trained into a shared
cache first, so the three runs do the same work: the records. The records of the
three runs are checked to be equal (timings aside). Prints the walls, the sums of
the records' own seconds (solve + fine-tuning: what is left of a run's wall is
start-up and waiting), both ratios against the done-when limits (workers <= 0.6 x
serial, Ray within 10 % of the workers) and one JSON line:

    python benchmarks/bench_sweep.py                                     # the measurement (~12 min)
    python benchmarks/bench_sweep.py --small                             # a quick check (~3 min)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

EDITS = {
    "seeds = [0, 1, 2]": "seeds = [0]",
    'schemes = ["tai", "zhang"]': 'schemes = ["tai"]',
    "mac = [0.7, 0.6, 0.5]": "mac = [0.8, 0.7, 0.6, 0.5]",
    "param = [0.7, 0.6, 0.5]": "param = [0.8, 0.7, 0.6, 0.5]",
}
SMALL_EDITS = {"max_iter = 60 ": "max_iter = 15 ", "local_search = 20": "local_search = 5"}
FULL_EDITS = {"max_iter = 60 ": "max_iter = 20 ", "local_search = 30": "local_search = 10"}
#: The done-when limits: --workers 2 at most this x the serial wall; Ray at most this x --workers 2.
WORKERS_LIMIT, RAY_LIMIT = 0.6, 1.10


def sweep_config(small: bool, folder: Path) -> Path:
    """The cut-down config written into ``folder``."""
    name = "compare_lenet5_digits" if small else "compare_lenet5_fashion_cpu"
    text = (REPO / "experiments" / f"{name}.toml").read_text()
    for old, new in (EDITS | (SMALL_EDITS if small else FULL_EDITS)).items():
        if old not in text:
            raise SystemExit(f"bench_sweep: {name}.toml no longer contains {old!r}; update EDITS")
        text = text.replace(old, new, 1)
    path = folder / f"{name}_sweep.toml"
    path.write_text(text)
    return path


def warm_cache(config: Path, cache: Path) -> None:
    """Train (or load) the base model into ``cache`` outside the timed runs."""
    from coblax.app.experiment import plan_run, train_base_model

    plan = plan_run(config, cache.parent / "warm", force=True)
    for mc in plan.cfg.models:
        train_base_model(plan.cfg, mc, plan.data, cache, progress=False)


#: CPU seconds (user + system) of each timed run's process and the workers it waited for, by out folder.
CPU_SECONDS: dict[str, float] = {}


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_run(config: Path, out: Path, cache: Path, extra: list[str]) -> float:
    env = dict(os.environ, COBLAX_CACHE=str(cache), TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "coblax.app.cli", "run", str(config), "--out", str(out), "--quiet", *extra]
    start, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    CPU_SECONDS[str(out)] = _children_cpu() - cpu
    if proc.returncode != 0:
        raise SystemExit(f"bench_sweep: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return wall


def record_seconds(out: Path) -> float:
    """The records' own seconds (solve + fine-tuning) of a finished run."""
    records = json.loads((out / "results.json").read_text())["records"]
    return sum((r.get("solve_seconds") or 0.0) + (r.get("finetune_seconds") or 0.0) for r in records)


def data_dir(given: str | None) -> Path | None:
    """``--data-dir``, else ``COBLAX_DATA``, else ``../shared/datasets`` beside the checkout."""
    for candidate in (given, os.environ.get("COBLAX_DATA"), REPO.parent / "shared" / "datasets"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate).resolve()
    return None


def stable_records(out: Path) -> list[dict]:
    from coblax.app.experiment import VOLATILE_KEYS

    def stable(node):  # timings at any depth (COBLA's diagnostics["solves"][i]["seconds"])
        if isinstance(node, dict):
            return {k: stable(v) for k, v in node.items() if k not in VOLATILE_KEYS and k != "seconds"}
        if isinstance(node, list):
            return [stable(v) for v in node]
        return node

    return [stable(r) for r in json.loads((out / "results.json").read_text())["records"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="bundled digits, shorter solves: a quick check")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data-dir", help="Fashion-MNIST folder (default: COBLAX_DATA or ../shared/datasets)")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray run")
    args = ap.parse_args()
    if not args.small:
        folder = data_dir(args.data_dir)
        if folder is None:
            raise SystemExit("bench_sweep: no Fashion-MNIST folder: pass --data-dir, set COBLAX_DATA, "
                             "or use --small")
        os.environ["COBLAX_DATA"] = str(folder)
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        folder = Path(tmp)
        config = sweep_config(args.small, folder)
        cache = folder / "cache"
        warm_cache(config, cache)
        runs = {"serial": [], f"workers {args.workers}": ["--workers", str(args.workers)]}
        if not args.no_ray:
            runs[f"ray local ({args.workers})"] = ["--ray", "--workers", str(args.workers)]
        walls, records, own, cpu = {}, {}, {}, {}
        for label, extra in runs.items():
            out = folder / label.replace(" ", "_").replace("(", "").replace(")", "")
            walls[label] = timed_run(config, out, cache, extra)
            records[label] = stable_records(out)
            own[label] = record_seconds(out)
            cpu[label] = CPU_SECONDS[str(out)]
            print(f"{label}: {walls[label]:.1f} s", file=sys.stderr, flush=True)
    n = len(records["serial"])
    equal = all(r == records["serial"] for r in records.values())
    serial = walls["serial"]
    print(f"\n{config.stem}: {n} records, records equal across runs: {equal}")
    print("| run | wall s | / serial | records' own s | CPU s (run + local workers) |")
    print("|---|---:|---:|---:|---:|")
    for label, wall in walls.items():
        print(f"| {label} | {wall:.1f} | {wall / serial:.2f} | {own[label]:.1f} | {cpu[label]:.1f} |")
    keys = list(walls)
    ratio = walls[keys[1]] / serial
    verdicts = [f"{keys[1]} / serial = {ratio:.3f} (<= {WORKERS_LIMIT}): {'PASS' if ratio <= WORKERS_LIMIT else 'FAIL'}"]
    summary = {"config": config.stem, "records": n, "equal": equal, "cpus": os.cpu_count(),
               "wall_s": {k: round(v, 1) for k, v in walls.items()},
               "record_seconds": {k: round(v, 1) for k, v in own.items()},
               "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()},
               "workers_over_serial": round(ratio, 3)}
    if len(keys) > 2:
        ray = walls[keys[2]] / walls[keys[1]]
        summary["ray_over_workers"] = round(ray, 3)
        verdicts.append(f"{keys[2]} / {keys[1]} = {ray:.3f} (<= {RAY_LIMIT}): {'PASS' if ray <= RAY_LIMIT else 'FAIL'}")
    for line in verdicts:
        print(line)
    print(json.dumps(summary))
    if not equal:
        for label, recs in records.items():
            for a, b in zip(records["serial"], recs):
                if a != b:
                    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                    if diff == ["diagnostics"]:
                        da, db = a["diagnostics"], b["diagnostics"]
                        diff = [f"diagnostics.{k}" for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)]
                    print(f"{label}: {a['method']} {a['budget_mac']:g} differs from serial in {diff}",
                          file=sys.stderr)
        raise SystemExit("bench_sweep: the runs' records differ")


if __name__ == "__main__":
    main()
