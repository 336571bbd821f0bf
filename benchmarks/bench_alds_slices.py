"""ALDS with one slice against ALDS's k search on the zoo's ResNet-20 / Fashion-MNIST (issue 18).

    COBLAX_DATA=../shared/datasets python benchmarks/bench_alds_slices.py \
        [--train 3000] [--test 1000] [--epochs 2] [--budgets 0.3 0.2] [--recal 20]

A briefly trained base (Adam, lr 1e-3, batch 128, BatchNorm), every conv and the head
decomposed (``tai`` for slices = 1, ``alds:k`` chosen by the search otherwise), budget
MAC = param on the decomposed layers; accuracy before fine-tuning with the BatchNorm
statistics recalibrated on ``--recal`` training batches (``allocate(..., recalibrate_bn=)``).
Prints one line per (budget, slices): eps, ratios, per-layer k and ranks, accuracy, wall time.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from coblax import allocate
from coblax.nn.data import load_dataset
from coblax.nn.models import build_model
from coblax.nn.train import evaluate, fit

RULES = [(r"conv1|stage.*conv\d", "tai"), ("fc", "dense")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.2])
    ap.add_argument("--recal", type=int, default=20)
    ap.add_argument("--slices", nargs="+", default=["1", "search"])
    args = ap.parse_args()
    ds = load_dataset("fashion_mnist", limit_train=args.train, limit_test=args.test)
    model = build_model("resnet20", num_classes=10, input_shape=ds.x_train.shape[1:])
    variables = model.init(jax.random.key(0), jnp.asarray(ds.x_train[:1]))
    t0 = time.perf_counter()
    variables = fit(lambda v, x, **kw: model.apply(v, x, train=True, **kw), variables, ds.x_train, ds.y_train,
                    epochs=args.epochs, mutable=["batch_stats"], progress=False)
    eval_fn = lambda v, x: model.apply(v, x, train=False)  # noqa: E731
    base = evaluate(eval_fn, variables, ds.x_test, ds.y_test)
    print(f"base: {100 * base:.2f} % after {args.epochs} epochs on {args.train} images "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    for budget in args.budgets:
        for slices in args.slices:
            opt = {"slices": int(slices) if slices.isdigit() else slices}
            t0 = time.perf_counter()
            res = allocate(model, variables, (ds.x_train, ds.y_train), rules=RULES, mac=budget, param=budget,
                           method="alds", method_options=opt, apply_kwargs={"train": False},
                           recalibrate_bn=args.recal, seed=0)
            wall = time.perf_counter() - t0
            acc = evaluate(res.apply, res.variables, ds.x_test, ds.y_test)
            st = res.allocation.stats
            print(json.dumps({"budget": budget, "slices": slices, "eps": round(st["eps"], 4),
                              "mac_ratio": round(res.mac_ratio, 4), "param_ratio": round(res.param_ratio, 4),
                              "acc_recal": round(100 * acc, 2), "wall_s": round(wall, 1),
                              "k": st["slices"], "ranks": dict(res.ranks)}), flush=True)


if __name__ == "__main__":
    main()
