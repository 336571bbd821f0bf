"""The ``coblax`` command line: run, table, compress, evaluate, methods.

Kept short on purpose: every command calls a library function. Bad input
(config, budget, data, method) exits with status 2 and one message, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def _user_errors() -> tuple[type[BaseException], ...]:
    from coblax.lowrank.allocation import BudgetError
    from coblax.app.config import ConfigError
    from coblax.nn.data import DataError
    from coblax.lowrank.registry import UnknownMethodError

    errors: list[type[BaseException]] = [ConfigError, BudgetError, DataError, UnknownMethodError, ValueError]
    return tuple(errors)


def _cmd_run(args) -> int:
    from coblax.app.config import load_run_config
    from coblax.app.experiment import run_experiment
    from coblax.app.report import format_table

    cfg = load_run_config(args.config)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    if (out / "results.json").exists() and not args.force:
        raise ValueError(f"{out / 'results.json'} exists; pass --force to overwrite or choose another --out")
    payload = run_experiment(cfg, out, config_text=Path(args.config).read_text(), progress=not args.quiet)
    print(format_table(payload["records"], "md"))
    print(f"\nwrote {out / 'results.json'}")
    return 0


def _cmd_table(args) -> int:
    from coblax.app.report import format_table, load_records

    records = load_records(args.results)
    print(format_table(records, args.format))
    return 0


def _cmd_compress(args) -> int:
    from coblax.compress.pipeline import format_compression_table, run_compress

    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    report = run_compress(args.config, out)
    print(format_compression_table(report))
    print(f"\nwrote {out}")
    return 0


def _cmd_evaluate(args) -> int:
    import json

    from coblax.compress.pipeline import evaluate_file

    result = evaluate_file(args.file, data_dir=args.data_dir)
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
    parser = argparse.ArgumentParser(prog="coblax", description="Budget-constrained network compression.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run an experiment config (train/load, allocate, fine-tune, table)")
    p.add_argument("config")
    p.add_argument("--out", help="output directory (default runs/CONFIG_NAME)")
    p.add_argument("--force", action="store_true", help="overwrite an existing results.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_run)
    p = sub.add_parser("table", help="comparison table of results directories")
    p.add_argument("results", nargs="+", help="directories holding results.json (or the files)")
    p.add_argument("--format", choices=("md", "csv", "tex"), default="md")
    p.set_defaults(fn=_cmd_table)
    p = sub.add_parser("compress", help="run a compression pipeline config (prune/quantize/encode)")
    p.add_argument("config")
    p.add_argument("--out")
    p.set_defaults(fn=_cmd_compress)
    p = sub.add_parser("evaluate", help="decode a .cbx file and evaluate it")
    p.add_argument("file")
    p.add_argument("--data-dir")
    p.set_defaults(fn=_cmd_evaluate)
    p = sub.add_parser("methods", help="list the allocation methods")
    p.set_defaults(fn=_cmd_methods)
    p = sub.add_parser("study", help="run a study config (kd, small_arch, svd_fc, prune_quant)")
    p.add_argument("config")
    p.add_argument("--out", help="output directory (default runs/CONFIG_NAME)")
    p.add_argument("--force", action="store_true", help="overwrite an existing results.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_study)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except _user_errors() as err:
        print(f"coblax: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("coblax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
