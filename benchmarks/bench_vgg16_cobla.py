"""Benchmark: a full COBLA relaxed solve on a VGG-16-width network, both schemes.

VGG-16's 13 3×3 convolutions (64, 64 | 128, 128 | 256 ×3 | 512 ×3 | 512 ×3, max-pool
after each stage) and a dense head (512 → 512 → 10) on 32×32×3 inputs; the 13
convolutions are decomposed: 11,145 masking variables under ``tai`` (C·X × Y·N)
and 4,187 under ``zhang`` (X·Y·C × N). Weights are He-initialized and the inputs
synthetic (uniform noise) with the network's own argmax as labels, so E(m) at
m = 1 is the loss of a confident network; only the solver's work is measured.
Prints per scheme: variables, free variables, iterations, objective evaluations,
E before/after, wall time of the relaxed solve and of the whole allocation
(rounding included), solver status, and the process's peak resident memory
(``resource.getrusage``).

Usage: python benchmarks/bench_vgg16_cobla.py [--examples 64] [--max-iter 30]
       [--schemes tai,zhang] [--solver structured] [--budget 0.5] [--window W]
"""

from __future__ import annotations

import argparse
import resource
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from coblax.lowrank.cobla import COBLA
from coblax.lowrank.costs import make_problem, network_cost
from coblax.lowrank.decompose import factorize, get_kernel, trace_layers
from coblax.lowrank.objective import NetworkLoss

STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG16(nn.Module):
    """VGG-16 (configuration D) for 32×32 inputs, no batch norm."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        init = nn.initializers.he_normal()
        for s, stage in enumerate(STAGES):
            for c, ch in enumerate(stage):
                x = nn.relu(nn.Conv(ch, (3, 3), padding="SAME", kernel_init=init, name=f"conv{s + 1}_{c + 1}")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(512, kernel_init=init, name="fc1")(x))
        return nn.Dense(self.num_classes, name="fc2")(x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=64, help="objective subset size")
    ap.add_argument("--max-iter", type=int, default=30)
    ap.add_argument("--schemes", default="tai,zhang")
    ap.add_argument("--solver", default="structured")
    ap.add_argument("--budget", type=float, default=0.5, help="MAC and parameter fraction")
    ap.add_argument("--window", type=int, default=None, help="variable reduction window")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    model = VGG16()
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(args.examples + 32, 32, 32, 3)).astype(np.float32)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    logits = model.apply(params, jnp.asarray(x))
    # scale the head so the teacher labels are confidently predicted at m = 1
    scale = 4.0 / float(jnp.std(logits))
    params["params"]["fc2"] = jax.tree_util.tree_map(lambda a: a * scale, params["params"]["fc2"])
    y = np.asarray(jnp.argmax(model.apply(params, jnp.asarray(x)), axis=1)).astype(np.int32)
    obj, val = (x[:args.examples], y[:args.examples]), (x[args.examples:], y[args.examples:])
    traced = trace_layers(model, params, jnp.asarray(x[:1]))
    convs = [l for l in traced if l.decomposable and l.kind != "dense"]
    print(f"VGG-16 width: {len(convs)} conv layers decomposed, objective subset {args.examples} examples "
          f"(synthetic 32x32x3), budget {args.budget:g}/{args.budget:g}, solver {args.solver}, "
          f"max_iter {args.max_iter}, devices {jax.device_count()} ({jax.devices()[0].platform})")
    print("| scheme | variables | free | iterations | evaluations | E(warm start) | E(relaxed) | status "
          "| solve s | s/iteration | allocation s | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for scheme in args.schemes.split(","):
        factors = {l.name: factorize(get_kernel(params, l.name), l, scheme) for l in convs}
        net = network_cost(traced, params, {n: np.asarray(f.sigma) for n, f in factors.items()}, scheme)
        loss = NetworkLoss(model, params, factors, obj, val, batch_size=args.batch_size)
        calls = {"n": 0}
        inner = loss.value_and_grad

        def counted(m, inner=inner, calls=calls):
            calls["n"] += 1
            return inner(m)

        loss.value_and_grad = counted  # count the solver's objective evaluations
        problem = make_problem(net, args.budget, args.budget, "decomposed", loss=loss, seed=0)
        allocator = COBLA(max_iter=args.max_iter, solver=args.solver, window=args.window, roundings=4,
                          saturation_rounds=1)
        start = time.perf_counter()
        alloc = allocator(problem)
        total = time.perf_counter() - start
        st = alloc.stats
        trace = st["trace"]
        free = st["solver_message"].split("iterations, ")[-1].split(" of")[0]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        iters = max(st["solver_iterations"], 1)
        print(f"| {scheme} | {st['variables']:,} | {free} | {st['solver_iterations']} | {calls['n']} "
              f"| {trace[0]['objective']:.4f} | {trace[-1]['objective']:.4f} | {st['solver_status']} "
              f"| {st['solve_seconds']:.0f} | {st['solve_seconds'] / iters:.1f} | {total:.0f} | {peak:.0f} |",
              flush=True)
        print(f"  {scheme}: {st['solver_message']}; saturated: {st['saturated_layers']}; "
              f"compiled variants: {loss.compiled_count()}", flush=True)


if __name__ == "__main__":
    main()
