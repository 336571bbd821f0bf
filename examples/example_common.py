"""What the two walk-throughs (``own_model.py``, ``own_model_nnx.py``) share.

Everything here is example plumbing (command line, data, printing) and the layer
rules of the examples' network; each example file keeps its own model, training
and compression steps.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from coblax.nn.data import DataError, Dataset, load_dataset

#: Which layers of the examples' ``MyNet`` (linen and nnx name them alike) are factored, and how.
RULES = [
    (r"conv1", "skip"),  # 9 input taps: nothing to gain
    (r"conv\d+", "tai"),
    (r"fc\d+|head", "dense"),
]
#: (method, allocator options) each example compresses with.
METHODS = (("cobla", {"max_iter": 40, "roundings": 5}), ("uniform", {}))


def parse_args(description: str, default_out: str, rank_multiple: bool = False) -> argparse.Namespace:
    """The examples' command line: data folder, output folder, training size, budget, seed."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--data-dir", default=os.environ.get("COBLAX_DATA"))
    ap.add_argument("--out", default=default_out)
    ap.add_argument("--train", type=int, default=6000, help="training examples used")
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--seed", type=int, default=0)
    if rank_multiple:
        ap.add_argument("--rank-multiple", type=int, default=1, help="every factored rank a multiple of this")
    return ap.parse_args()


def example_data(args: argparse.Namespace) -> Dataset:
    """Fashion-MNIST (``--train`` examples, 2,000 test), or the bundled 8x8 digits when it is not found."""
    try:
        data = load_dataset("fashion_mnist", args.data_dir, seed=args.seed, limit_train=args.train, limit_test=2000)
    except DataError as err:
        print(f"Fashion-MNIST not found ({err}); using the bundled 8x8 digits")
        data = load_dataset("digits", seed=args.seed)
    print(f"data: {data.name}, {len(data.x_train)} train / {len(data.x_test)} test")
    return data


def objective_and_validation(data: Dataset) -> tuple[tuple, tuple]:
    """COBLA's objective batch (up to 1,000 training examples) and the 500 after it for validation."""
    n_obj = min(1000, len(data.x_train) // 2)
    objective = (data.x_train[:n_obj], data.y_train[:n_obj])
    validation = (data.x_train[n_obj:n_obj + 500], data.y_train[n_obj:n_obj + 500])
    return objective, validation


def result_cells(method: str, result, before: float, after: float, size: int) -> list[str]:
    """The table cells every example prints for one compressed network."""
    ranks = ", ".join(f"{k}={v}" for k, v in result.ranks.items())
    return [method, ranks, f"{result.mac_ratio:.3f}", f"{result.param_ratio:.3f}", f"{100 * before:.2f}",
            f"{100 * after:.2f}", f"{size:,}", f"{int(4 * result.params):,}"]


def print_table(budget: float, base_acc: float, rows: Sequence[Sequence[str]], extra: Sequence[str] = ()) -> None:
    """A Markdown table of :func:`result_cells` rows, with ``extra`` columns after them."""
    header = ["method", "ranks", "MAC ratio", "param ratio", "acc before FT", "acc after FT", "export bytes",
              "N_M×4", *extra]
    print(f"\nbudget {budget:g} of the decomposed layers' MACs and parameters; base {100 * base_acc:.2f} %")
    print("| " + " | ".join(header) + " |")
    print("|---|---|" + "---:|" * (len(header) - 2))
    for row in rows:
        print("| " + " | ".join(row) + " |")
