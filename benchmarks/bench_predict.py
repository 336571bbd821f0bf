"""Benchmark: evaluation with the weights as an argument vs. baked into the compiled program.

``coblax.nn.train.predict`` used to jit ``lambda xb: apply_fn(params, xb)``: the weights
became constants of the program, so every call (before and after fine-tuning, each
candidate scored, each base-model evaluation) compiled anew. It now passes them as an
argument to one jitted function keyed by ``apply_fn``, so a second call with the same
network and new weights reuses the compiled program. Prints the seconds of the first and
later calls of each, and their ratio, measured in one run (calls alternate between the two
so that a shared machine's load hits both alike).

Usage: python benchmarks/bench_predict.py [--model lenet5] [--n 2000] [--calls 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from coblax.nn import train as T
from coblax.nn.models import build_model

SHAPES = {"lenet5": (28, 28, 1), "lenet_300_100": (28, 28, 1), "squeezenet": (8, 8, 1), "vgg_small": (8, 8, 1)}


def _baked(apply_fn, params, x, batch_size=1000):
    fn = jax.jit(lambda xb: apply_fn(params, xb))  # the old predict: weights are constants
    return T.batched_apply(fn, x, batch_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lenet5", choices=sorted(SHAPES))
    ap.add_argument("--n", type=int, default=2000, help="images per evaluation")
    ap.add_argument("--calls", type=int, default=4, help="evaluations, each with new weights")
    args = ap.parse_args()
    model = build_model(args.model, num_classes=10)
    x = np.random.default_rng(0).random((args.n, *SHAPES[args.model]), np.float32)
    params = model.init(jax.random.key(0), jnp.asarray(x[:1]))
    times: dict[str, list[float]] = {"baked": [], "argument": []}
    for call in range(args.calls):
        weights = jax.tree.map(lambda a, c=call: a * (1.0 + 0.01 * c), params)  # new values, same shapes
        for name, fn in (("baked", _baked), ("argument", T.predict)):
            start = time.perf_counter()
            fn(model.apply, weights, x)
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        print(f"{name:>8}: first call {ts[0]:.3f} s, later calls median {statistics.median(ts[1:]):.3f} s")
    later = statistics.median(times["baked"][1:]) / statistics.median(times["argument"][1:])
    print(f"later calls: weights baked in / as an argument = {later:.2f}x ({args.model}, {args.n} images)")


if __name__ == "__main__":
    main()
