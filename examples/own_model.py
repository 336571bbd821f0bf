"""Compress your own Flax model: BatchNorm, dropout, layer rules, two allocators, export.

The model is in this file (its layer rules, the command line and the printing are
in ``example_common.py`` beside it); coblax sees the model only through
``coblax.allocate``. Steps: train the model briefly on Fashion-MNIST (the bundled
8x8 digits when no Fashion-MNIST files are found), allocate per-layer ranks under
40 % of the decomposed layers' MACs and parameters with COBLA and with the
``uniform`` baseline, fine-tune each factored network one epoch (BatchNorm
statistics updated, dropout on), export it as a safe ``.npz``, load it back with
nothing but this file's model definition and check the accuracy is the same.

Usage (a few minutes on 2 CPU cores):
    python examples/own_model.py [--data-dir DIR] [--out DIR] [--train N] [--budget 0.4]
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
from example_common import (  # the walk-throughs' shared plumbing and layer rules
    METHODS,
    RULES,
    example_data,
    objective_and_validation,
    parse_args,
    print_table,
    result_cells,
)

from coblax import allocate, finetune, load_factored, save_factored
from coblax.app.export_cbx import load_factored_cbx, save_factored_cbx
from coblax.nn.train import evaluate, fit


class MyNet(nn.Module):
    """The user's model: conv-BN-ReLU-pool x 2, dense-ReLU-dropout, classifier."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, ch in enumerate((16, 32)):
            x = nn.Conv(ch, (3, 3), padding="SAME", use_bias=False, name=f"conv{i + 1}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i + 1}")(x)
            x = nn.relu(x)
            if x.shape[1] >= 4:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(128, name="fc1")(x.reshape(x.shape[0], -1)))
        x = nn.Dropout(0.3, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="head")(x)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "runs/own_model")
    start = time.perf_counter()
    data = example_data(args)

    model = MyNet(num_classes=data.num_classes)
    variables = model.init(jax.random.PRNGKey(args.seed), jnp.asarray(data.x_train[:1]))
    variables = fit(functools.partial(model.apply, train=True), variables, data.x_train, data.y_train,
                    epochs=3, batch_size=64, learning_rate=2e-3, seed=args.seed, progress=False,
                    mutable=("batch_stats",), rng_streams=("dropout",))
    eval_apply = functools.partial(model.apply, train=False)
    base_acc = evaluate(eval_apply, variables, data.x_test, data.y_test)
    print(f"base model: test accuracy {100 * base_acc:.2f} %")

    objective, validation = objective_and_validation(data)
    out = Path(args.out)
    rows = []
    for method, options in METHODS:
        result = allocate(model, variables, objective, rules=RULES, mac=args.budget, param=args.budget,
                          method=method, validation_data=validation, apply_kwargs={"train": False},
                          seed=args.seed, method_options=options)
        before = evaluate(result.apply, result.variables, data.x_test, data.y_test)
        result = finetune(result, data.x_train, data.y_train, train_kwargs={"train": True}, epochs=1,
                          learning_rate=3e-4, seed=args.seed)
        after = evaluate(result.apply, result.variables, data.x_test, data.y_test)
        path = out / f"{method}.npz"
        size = save_factored(path, result, meta={"accuracy": after, "ranks": result.ranks}).total_bytes
        loaded = load_factored(path, MyNet(num_classes=data.num_classes))
        reloaded = evaluate(loaded.apply, loaded.variables, data.x_test, data.y_test)
        assert reloaded == after, (reloaded, after)
        # bit-packed: 50 % magnitude pruning per kernel + 4-bit k-means sharing, no retraining
        cbx = save_factored_cbx(out / f"{method}.cbx", result, prune=0.5, bits=4)
        packed = load_factored_cbx(out / f"{method}.cbx", MyNet(num_classes=data.num_classes))
        cbx_acc = evaluate(packed.apply, packed.variables, data.x_test, data.y_test)
        rows.append(result_cells(method, result, before, after, size) + [f"{cbx.total_bytes:,}",
                                                                          f"{100 * cbx_acc:.2f}"])
    print_table(args.budget, base_acc, rows, extra=[".cbx bytes (prune 0.5, 4 bit)", ".cbx acc"])
    print(f"\nexports in {out}/ reload to the same accuracy; {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
