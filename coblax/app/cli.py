"""The ``coblax`` command line: run, check, table, compress, evaluate, methods.

Kept short on purpose: every command calls a library function. Errors caused by
input — the project's own error types (:class:`~coblax.util.errors.CoblaxError`:
config, budget, data, results, ``.cbx`` files...) — exit with status 2 and one
message naming the file or key. Any other exception is a bug: its traceback is
printed and the status is 1. ``--debug`` prints the traceback in both cases.
A run stopped by SIGINT/SIGTERM exits with 130/143 after saving what is finished.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from pathlib import Path

__all__ = ["main", "build_parser"]


def _say(message: str) -> None:
    print(f"coblax: {message}", file=sys.stderr, flush=True)


def _default_out(config: str) -> Path:
    return Path("runs") / Path(config).stem


def _describe(plan) -> str:
    cfg = plan.cfg
    shape = (f"{len(cfg.models)} model(s) x {len(cfg.decompose.schemes)} scheme(s) x "
             f"{len(cfg.budgets.pairs())} budget(s) x {len(cfg.methods)} method(s)"
             + (f" x {len(cfg.seed_list)} seeds" if len(cfg.seed_list) > 1 else ""))
    if plan.complete:
        state = f"complete ({plan.finished} records in {plan.out_dir / 'results.json'})"
    elif plan.previous is not None:
        state = f"resumes after {plan.finished} finished record(s)"
    elif plan.force:
        state = "starts over (--force)"
    else:
        state = "new"
    return f"{plan.total} records ({shape}); output {plan.out_dir}: {state}"


def _failed_exit(records: list[dict]) -> int:
    failed = [r for r in records if r.get("status") == "failed"]
    if not failed:
        return 0
    _say(f"error: {len(failed)} of {len(records)} records failed (marked in the table):")
    for r in failed:
        seed = f", seed {r['seed']}" if len({x.get("seed") for x in records}) > 1 else ""
        print(f"  {r['model']}, {r['scheme']}, {r['budget_mac']:g}/{r['budget_param']:g}, "
              f"{r['method']}{seed}: {r.get('error', '')}", file=sys.stderr)
    return 2


def _cmd_run(args) -> int:
    from coblax.app.experiment import plan_run, run_experiment
    from coblax.app.report import format_table
    from coblax.app.sweep import parallel_spec, sweep_for

    spec = parallel_spec(args.workers, args.ray)  # bad --workers / --ray: exit 2 before any work
    out = Path(args.out) if args.out else _default_out(args.config)
    plan = plan_run(args.config, out, force=args.force)
    payload = run_experiment(plan.cfg, out, plan=plan, progress=not args.quiet, sweep=sweep_for(spec))
    print(format_table(payload["records"], "md"))
    if not plan.complete:
        print(f"\nwrote {out / 'results.json'}")
    return _failed_exit(payload["records"])


def _cmd_check(args) -> int:
    from coblax.app.experiment import plan_run

    out = Path(args.out) if args.out else _default_out(args.config)
    plan = plan_run(args.config, out, force=args.force)
    print(f"{args.config}: ok; {_describe(plan)}")
    return 0


def _cmd_table(args) -> int:
    from coblax.app.report import ResultsError, format_ranks, format_table, load_records

    records = load_records(args.results)
    if args.ranks:
        text = format_ranks(records, args.format)
        if not text:
            raise ResultsError(f"{', '.join(args.results)}: no record holds per-layer ranks")
        print(text)
        return 0
    print(format_table(records, args.format))
    return 0


def _check_out_folder(out: Path) -> None:
    from coblax.app.config import ConfigError
    from coblax.app.experiment import writable_problem

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    reason = writable_problem(out)
    if reason:
        raise ConfigError(f"--out {out}: {reason}")


def _cmd_compress(args) -> int:
    from coblax.app.compress import run_compress
    from coblax.app.config import read_config_text
    from coblax.compress.pipeline import format_compression_table

    read_config_text(args.config)  # a missing, unreadable or non-UTF-8 file fails here
    out = Path(args.out) if args.out else _default_out(args.config)
    _check_out_folder(out)
    report = run_compress(args.config, out)
    print(format_compression_table(report))
    print(f"\nwrote {out}")
    return 0


#: Activation memory of one evaluation batch (all module outputs, float32): the batch
#: size of ``coblax evaluate`` is chosen to stay below it, and a model whose single
#: example needs more is refused.
MAX_ACTIVATION_BYTES = 1 << 28
#: Below :data:`MAX_ACTIVATION_BYTES`, a batch's activations stay within the larger of
#: this and an eighth of the file's decoded parameter bytes, so that the memory of
#: evaluating a file stays proportional to it (README, "Resource caps").
MIN_ACTIVATION_BYTES = 1 << 24


def _check_cbx_for_evaluation(path: Path) -> int:
    """The file is a valid .cbx whose metadata rebuilds a model with the file's shapes.

    Returns the evaluation batch size that keeps the model's activations (every
    module's output, per example, from ``jax.eval_shape``) under
    :data:`MAX_ACTIVATION_BYTES`.
    """
    import jax
    import jax.numpy as jnp

    from coblax.app.config import check_model_options
    from coblax.compress.cbx import CbxError, read_cbx_layout
    from coblax.nn.models import build_model

    if not path.exists():
        raise CbxError(f"{path}: no such file")
    if path.is_dir():
        raise CbxError(f"{path} is a folder; expected a .cbx file (e.g. {path / 'model.cbx'})")
    meta, shapes = read_cbx_layout(path)
    missing = [k for k in ("model", "num_classes", "input_shape", "dataset") if k not in meta]
    if missing:
        raise CbxError(
            f"{path}: metadata lacks {', '.join(map(repr, missing))}; this .cbx file was not written "
            "by coblax compress"
        )
    name, options = meta["model"]["name"], dict(meta["model"].get("options", {}))
    problems = check_model_options(name, options, "model")
    if problems:
        raise CbxError(f"{path}: metadata describes a model coblax cannot build: {'; '.join(problems)}")
    model = build_model(name, num_classes=meta["num_classes"], **options)
    x = jax.ShapeDtypeStruct((1, *meta["input_shape"]), jnp.float32)  # nothing allocated
    try:
        expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    except Exception as err:  # noqa: BLE001 - options that break the model are the file's fault
        raise CbxError(f"{path}: metadata describes a model coblax cannot build: {err}") from None
    want = {"/".join(str(getattr(part, "key", part)) for part in key): tuple(leaf.shape)
            for key, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]}
    if want != shapes:
        diff = sorted(set(want) ^ set(shapes)) or [k for k in want if want[k] != shapes[k]]
        k = diff[0]
        raise CbxError(
            f"{path}: its parameters do not fit the model its metadata names ({name}): "
            f"{k} is {shapes.get(k, 'missing')} in the file, {want.get(k, 'not in the model')} in the model"
        )
    _, inter = jax.eval_shape(
        lambda p, xb: model.apply(p, xb, capture_intermediates=True, mutable=["intermediates"]), expected, x)
    per_example = 4 * sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(inter))
    if per_example > MAX_ACTIVATION_BYTES:
        raise CbxError(f"{path}: the model its metadata names needs {per_example:,} bytes of activations per "
                       f"example, more than the {MAX_ACTIVATION_BYTES:,}-byte cap of coblax evaluate")
    budget = min(MAX_ACTIVATION_BYTES, max(MIN_ACTIVATION_BYTES, sum(map(math.prod, shapes.values())) // 2))
    return int(max(1, min(1000, budget // max(per_example, 1))))


def _cmd_evaluate(args) -> int:
    import json

    from coblax.app.compress import evaluate_file
    from coblax.util.limits import return_large_frees

    return_large_frees()  # memory proportional to the file (README, "Resource caps")
    batch_size = _check_cbx_for_evaluation(Path(args.file))
    result = evaluate_file(args.file, data_dir=args.data_dir, batch_size=batch_size)
    print(json.dumps(result, indent=1))
    return 0


def _cmd_methods(args) -> int:
    from coblax.lowrank.registry import allocator_names

    print("\n".join(allocator_names()))
    return 0


def _cmd_study(args) -> int:
    from coblax.app.studies import format_study, run_study_file

    payload = run_study_file(args.config, args.out, force=args.force, progress=not args.quiet)
    print(format_study(payload))
    print(f"\nwrote {payload['results_file']} ({payload['wall_seconds']:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of every error")
    parser = argparse.ArgumentParser(prog="coblax", description="Budget-constrained network compression.",
                                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", parents=[common],
                       help="run an experiment config (train/load, allocate, fine-tune, table); "
                            "resumes an unfinished run in the same --out")
    p.add_argument("config")
    p.add_argument("--out", help="output directory (default runs/CONFIG_NAME)")
    p.add_argument("--force", action="store_true",
                   help="start over: discard the results of an earlier run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--workers", type=int, metavar="N",
                   help="run records in N local worker processes (default 1: one at a time); "
                        "with --ray, the records in flight (default: the cluster's CPUs)")
    p.add_argument("--ray", nargs="?", const=True, metavar="ADDRESS",
                   help="run records as Ray tasks: a local Ray instance, or the cluster at ADDRESS "
                        "(host:port, ray://host:port, auto); needs pip install 'coblax[ray]'")
    p.set_defaults(fn=_cmd_run)
    p = sub.add_parser("check", parents=[common],
                       help="validate a config and everything a run needs, without running")
    p.add_argument("config")
    p.add_argument("--out", help="output directory to check (default runs/CONFIG_NAME)")
    p.add_argument("--force", action="store_true", help="as for run: ignore earlier results in --out")
    p.set_defaults(fn=_cmd_check)
    p = sub.add_parser("table", parents=[common], help="comparison table of results directories")
    p.add_argument("results", nargs="+", help="directories holding results.json (or the files)")
    p.add_argument("--format", choices=("md", "csv", "tex"), default="md")
    p.add_argument("--ranks", action="store_true",
                   help="per-layer target ranks instead: layers x methods, one table per model, scheme "
                        "and budget")
    p.set_defaults(fn=_cmd_table)
    p = sub.add_parser("compress", parents=[common],
                       help="run a compression pipeline config (prune/quantize/encode)")
    p.add_argument("config")
    p.add_argument("--out")
    p.set_defaults(fn=_cmd_compress)
    p = sub.add_parser("evaluate", parents=[common], help="decode a .cbx file and evaluate it")
    p.add_argument("file")
    p.add_argument("--data-dir")
    p.set_defaults(fn=_cmd_evaluate)
    p = sub.add_parser("methods", parents=[common], help="list the allocation methods")
    p.set_defaults(fn=_cmd_methods)
    p = sub.add_parser("study", parents=[common], help="run a study config (kd, small_arch, svd_fc, prune_quant)")
    p.add_argument("config")
    p.add_argument("--out", help="output directory (default runs/CONFIG_NAME)")
    p.add_argument("--force", action="store_true",
                   help="start over: overwrite an existing results.json and ignore an unfinished run's partial results")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_study)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status.

    Called as the ``coblax`` command (``argv`` None), an interrupted run ends the
    process at once after its message (:func:`coblax._cli_signals.hard_exit`): the
    interpreter's teardown with JAX's threads mid-start could crash (SIGSEGV).
    """
    code = _main(argv)
    if argv is None:
        from coblax._cli_signals import finish, hard_exit, is_command_line

        if is_command_line():
            if code in (130, 143):
                hard_exit(code)
            finish(code)  # a signal during the teardown that follows: 130/143, not a kill or a crash
    return code


def _main(argv: list[str] | None) -> int:
    from coblax.util.errors import CoblaxError, RunInterrupted

    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        debug = getattr(args, "debug", False)
        return args.fn(args)
    except RunInterrupted as err:
        where = f" in {err.partial}" if err.partial is not None else ""
        _say(f"interrupted by {err}; {err.saved} finished record(s) are saved{where}; "
             "run the same command again to resume")
        return 128 + err.signum
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except BrokenPipeError:
        # the reader went away (``coblax table ... | head``): not an error of ours; point
        # stdout at /dev/null so that the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except CoblaxError as err:
        if debug:
            traceback.print_exc()
        _say(f"error: {err}")
        return 2
    except Exception:  # noqa: BLE001 - a bug: keep its traceback, exit 1
        traceback.print_exc()
        _say("internal error: the traceback above is a bug in coblax, not a problem with your input")
        return 1


if __name__ == "__main__":
    sys.exit(main())
