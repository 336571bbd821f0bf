"""Benchmark: the float64 NumPy callback the solvers see vs. the bare jitted value_and_grad.

Both run the same compiled ``value_and_grad(E)`` on the same device-resident
objective subset; the callback adds the float64 -> float32 host-to-device copy of
m and the device-to-host copy of (E, ∂E/∂m). Calls are interleaved and the median
taken, so a shared machine's load hits both alike. Also prints the time per call
against the objective-subset size. Ratios are measured in one run; no test times
anything.

Usage: python benchmarks/bench_callbacks.py [--model small_cnn] [--n 1000]
       [--repeats 30] [--sizes 250,500,1000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from coblax.lowrank.decompose import factorize, get_kernel, trace_layers
from coblax.lowrank.objective import NetworkLoss
from coblax.nn.data import load_dataset
from coblax.nn.models import build_model


def _oracle(model_name: str, n: int, scheme: str = "tai") -> tuple[NetworkLoss, int]:
    data = load_dataset("digits")
    x, y = data.x_train[:n], data.y_train[:n]
    model = build_model(model_name, num_classes=10)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    layers = [l for l in trace_layers(model, params, jnp.asarray(x[:1])) if l.decomposable]
    factors = {l.name: factorize(get_kernel(params, l.name), l, scheme) for l in layers}
    return NetworkLoss(model, params, factors, (x, y), batch_size=250), len(x)


def measure(oracle: NetworkLoss, repeats: int) -> tuple[float, float]:
    """Median seconds per call: (NumPy float64 callback, bare jitted on device data)."""
    rng = np.random.default_rng(0)
    ms = [rng.uniform(size=oracle.size) for _ in range(repeats)]
    ms_dev = [jnp.asarray(m, oracle.dtype) for m in ms]
    jax.block_until_ready(ms_dev)

    def bare(m_dev):
        jax.block_until_ready(oracle.device_value_and_grad(m_dev))

    bare(ms_dev[0])  # compile once; both paths share the executable
    oracle.value_and_grad(ms[0])
    t_cb, t_bare = [], []
    for i in range(repeats):
        for fn, arg, out in ((oracle.value_and_grad, ms[i], t_cb), (bare, ms_dev[i], t_bare)):
            start = time.perf_counter()
            fn(arg)
            out.append(time.perf_counter() - start)
    return statistics.median(t_cb), statistics.median(t_bare)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small_cnn")
    ap.add_argument("--n", type=int, default=1000, help="objective subset size")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--sizes", default="250,500,1000", help="subset sizes for the time-vs-size table")
    args = ap.parse_args()
    oracle, n = _oracle(args.model, args.n)
    cb, bare = measure(oracle, args.repeats)
    print(f"model={args.model} variables={oracle.size} subset={n} devices={jax.device_count()} "
          f"({jax.devices()[0].platform})")
    print(f"bare jitted value_and_grad (device m)  : {bare * 1e3:8.3f} ms/call (median of {args.repeats})")
    print(f"float64 NumPy callback (solver's view) : {cb * 1e3:8.3f} ms/call")
    print(f"callback / bare ratio                  : {cb / bare:8.3f}  (target <= 1.10)")
    print(f"compiled variants after all calls      : {oracle.compiled_count()}  (1 = no recompilation)")
    print("\nobjective-subset size vs. time per callback")
    print("| examples | ms/call | µs/example |")
    print("|---:|---:|---:|")
    for size in (int(s) for s in args.sizes.split(",")):
        o, k = _oracle(args.model, size)
        t, _ = measure(o, max(5, args.repeats // 3))
        print(f"| {k} | {t * 1e3:.2f} | {t / k * 1e6:.1f} |")


if __name__ == "__main__":
    main()
