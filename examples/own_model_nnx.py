"""Compress your own flax.nnx model: BatchNorm, dropout, layer rules, two allocators, export.

The nnx version of ``examples/own_model.py``: the same network, data, rules, budget
and steps, written the way the Flax documentation now writes models (``flax.nnx``:
the module carries its state; ``model.train()`` / ``model.eval()`` switch BatchNorm
and dropout). Steps: train the model briefly on Fashion-MNIST (the bundled 8x8 digits
when no Fashion-MNIST files are found) with ``nnx.Optimizer``, allocate per-layer
ranks under 40 % of the decomposed layers' MACs and parameters with COBLA and with
the ``uniform`` baseline (``allocate(model, (x, y), ...)``: no variables), fine-tune
each factored network one epoch (BatchNorm statistics updated, dropout on), export it
as a safe ``.npz``, load it back into a fresh instance of this file's model and check
the accuracy is the same.

Usage (a few minutes on 2 CPU cores):
    python examples/own_model_nnx.py [--data-dir DIR] [--out DIR] [--train N] [--budget 0.4] [--rank-multiple 8]
"""

from __future__ import annotations

import time
from pathlib import Path

from example_common import (  # the walk-throughs' shared plumbing and layer rules
    METHODS,
    RULES,
    example_data,
    objective_and_validation,
    parse_args,
    print_table,
    result_cells,
)
from flax import nnx

from coblax import allocate, finetune, load_factored, save_factored
from coblax.nn.train import evaluate
from coblax.nn.train_nnx import evaluate_nnx, fit_nnx


class MyNet(nnx.Module):
    """The user's model: conv-BN-ReLU-pool x 2, dense-ReLU-dropout, classifier."""

    def __init__(self, input_shape, num_classes: int = 10, *, rngs: nnx.Rngs):
        h, w, c = input_shape
        self.conv1 = nnx.Conv(c, 16, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
        for _ in range(2):
            h, w = (h // 2, w // 2) if h >= 4 else (h, w)
        self.fc1 = nnx.Linear(h * w * 32, 128, rngs=rngs)
        self.dropout = nnx.Dropout(0.3, rngs=rngs)
        self.head = nnx.Linear(128, num_classes, rngs=rngs)

    def __call__(self, x):
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2)):
            x = nnx.relu(bn(conv(x)))
            if x.shape[1] >= 4:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        x = nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))
        return self.head(self.dropout(x))


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "runs/own_model_nnx", rank_multiple=True)
    start = time.perf_counter()
    data = example_data(args)

    def fresh() -> MyNet:  # the model code alone: what a user has when loading an export
        return MyNet(data.x_train.shape[1:], data.num_classes, rngs=nnx.Rngs(args.seed))

    model = fit_nnx(fresh(), data.x_train, data.y_train, epochs=3, batch_size=64, learning_rate=2e-3,
                    seed=args.seed, progress=False)
    base_acc = evaluate_nnx(model, data.x_test, data.y_test)
    print(f"base model: test accuracy {100 * base_acc:.2f} %")

    objective, validation = objective_and_validation(data)
    out = Path(args.out)
    rows = []
    for method, options in METHODS:
        result = allocate(model, objective, rules=RULES, mac=args.budget, param=args.budget, method=method,
                          validation_data=validation, seed=args.seed, rank_multiple=args.rank_multiple,
                          method_options=options)
        before = evaluate(result.apply, result.variables, data.x_test, data.y_test)
        result = finetune(result, data.x_train, data.y_train, epochs=1, learning_rate=3e-4, seed=args.seed)
        after = evaluate(result.apply, result.variables, data.x_test, data.y_test)
        path = out / f"{method}.npz"
        size = save_factored(path, result, meta={"accuracy": after, "ranks": result.ranks}).total_bytes
        loaded = load_factored(path, fresh())
        reloaded = evaluate(loaded.apply, loaded.variables, data.x_test, data.y_test)
        assert reloaded == after, (reloaded, after)
        rows.append(result_cells(method, result, before, after, size))
    print_table(args.budget, base_acc, rows)
    print(f"\nexports in {out}/ reload to the same accuracy; {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
