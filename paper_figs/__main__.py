"""``python -m paper_figs RESULTS_DIR... --out FIG_DIR [--only NAME...]``.

Draws every figure the results have records for (PNG and PDF); for each figure it
cannot draw it prints the study and what is missing, and goes on. Several runs of one
study (by config name) get one figure each, in ``FIG_DIR/<run name>/`` (the name made a safe
folder name: nothing is written outside FIG_DIR). Failed records are left out of the figures and
listed; a figure that cannot be drawn from its records is skipped with the reason. Exit status 0 when
at least one figure was written, 1 when none was, 2 on unreadable input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from paper_figs import FIGURES, MissingRecords, draw, failed_records, load_results


def main(argv: Sequence[str] | None = None, only: Sequence[str] = ()) -> int:
    ap = argparse.ArgumentParser(prog="python -m paper_figs", description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="results.json files, run directories or folders of runs")
    ap.add_argument("--out", default="figures", help="output folder (default: figures)")
    ap.add_argument("--only", nargs="*", choices=sorted(FIGURES), help="draw only these figures")
    args = ap.parse_args(argv)
    try:
        payloads = load_results(args.results)
    except (OSError, ValueError) as err:
        print(f"paper_figs: error: {err}", file=sys.stderr)
        return 2
    names = args.only or list(only) or list(FIGURES)
    left_out = failed_records(payloads)
    if left_out:
        print(f"left out {len(left_out)} failed record(s):\n  " + "\n  ".join(left_out))
    written = 0
    for name in names:
        try:
            paths = draw(name, payloads, args.out)
        except MissingRecords as err:
            print(f"skipped {name}: {err}")
            continue
        except (TypeError, ValueError, KeyError, IndexError) as err:  # a record this figure cannot use
            print(f"skipped {name}: cannot draw it from these records ({type(err).__name__}: {err})")
            continue
        written += len(paths)
        print(f"{name}: " + ", ".join(str(p) for p in paths))
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
