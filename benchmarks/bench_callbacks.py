"""Benchmark: COBLA's jitted value-and-grad callback vs. the same computation un-jitted.

Prints the ratio measured in one run (no timing assertions anywhere in the tests).
Usage: python benchmarks/bench_callbacks.py [--model small_cnn] [--n 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from coblax.nn.data import load_dataset
from coblax.lowrank.decompose import factorize, get_kernel, trace_layers
from coblax.nn.models import build_model
from coblax.lowrank.objective import NetworkLoss


def _time(fn, repeats):
    fn()  # warm-up (compilation for the jitted path)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small_cnn")
    ap.add_argument("--n", type=int, default=1000, help="objective subset size")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    data = load_dataset("digits")
    x, y = data.x_train[: args.n], data.y_train[: args.n]
    model = build_model(args.model, num_classes=10)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    layers = [l for l in trace_layers(model, params, jnp.asarray(x[:1])) if l.decomposable]
    factors = {l.name: factorize(get_kernel(params, l.name), l, "tai") for l in layers}
    oracle = NetworkLoss(model, params, factors, (x, y), batch_size=250)
    m = np.random.default_rng(0).uniform(size=oracle.size)

    jitted = _time(lambda: oracle.value_and_grad(m), args.repeats)
    with jax.disable_jit():
        plain = _time(lambda: oracle.value_and_grad(m), max(1, args.repeats // 5))
    print(f"model={args.model} variables={oracle.size} subset={len(x)}")
    print(f"jitted value_and_grad: {jitted * 1e3:8.2f} ms/call")
    print(f"un-jitted (eager)    : {plain * 1e3:8.2f} ms/call")
    print(f"speed-up             : {plain / jitted:8.1f}x")


if __name__ == "__main__":
    main()
