"""Benchmark: COBLA's E(m) and ∂E/∂m with masked convs run as one conv with the rebuilt
kernel W(m) (:func:`coblax.lowrank.decompose.masked_kernel`) against the two factored
convs at full rank R, in one run, on the zoo's ResNet-20 (every conv ``tai``, the head
``dense``) and LeNet-5, 500 objective inputs (random-initialized weights: the time
does not depend on them).

Both jitted value-and-grad functions are timed round-robin (median of warm calls) and
their values compared. Prints one line per model and a JSON line:

    python benchmarks/bench_masked_kernel.py [--models resnet20 lenet5] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from coblax.lowrank import decompose
from coblax.lowrank.api import decompose_selected
from coblax.lowrank.latency_measure import time_calls
from coblax.lowrank.objective import NetworkLoss
from coblax.nn.models import build_model

SHAPES = {"resnet20": (32, 32, 1), "lenet5": (28, 28, 1)}
RULES = [("fc.*|dense.*|head.*", "dense"), (".*", "tai")]


def bench(name: str, n: int, repeats: int) -> dict:
    model = build_model(name, num_classes=10)
    x = np.random.default_rng(0).standard_normal((n, *SHAPES[name])).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 10, n)
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]), **({"train": False} if name == "resnet20"
                                                                         else {}))
    kwargs = {"train": False} if "batch_stats" in variables else {}
    _, full, _ = decompose_selected(model, variables, x, RULES, kwargs)
    m = np.full(sum(int(f.sigma.shape[0]) for f in full.values()), 0.7)
    losses, values = {}, {}
    cheaper = decompose.kernel_is_cheaper
    for path in ("rebuilt", "factored"):
        if path == "factored":  # the loss's jitted functions trace at the first call: patch around it
            decompose.kernel_is_cheaper = lambda f, shape: False
        try:
            loss = NetworkLoss(model, variables, full, (x, y), batch_size=250, apply_kwargs=kwargs)
            start = time.perf_counter()
            values[path] = loss.value_and_grad(m)
            losses[path] = (loss, time.perf_counter() - start)
        finally:
            decompose.kernel_is_cheaper = cheaper
    fns = [lambda loss=loss: loss.device_value_and_grad(jnp.asarray(m, jnp.float32)) for loss, _ in losses.values()]
    t_rebuilt, t_factored = time_calls(fns, repeats=repeats, warmup=1, min_sample_s=1e-3)
    (e1, g1), (e2, g2) = values["rebuilt"], values["factored"]
    row = {"model": name, "objective_size": n, "rebuilt_s": t_rebuilt, "factored_s": t_factored,
           "speedup": t_factored / t_rebuilt, "first_call_s": {k: v[1] for k, v in losses.items()},
           "value_rel_diff": abs(e1 - e2) / abs(e2), "grad_max_abs_diff": float(np.max(np.abs(g1 - g2)))}
    print(f"{name}: E(m)+grad on {n} inputs: rebuilt kernel {t_rebuilt * 1e3:.0f} ms, factored pair "
          f"{t_factored * 1e3:.0f} ms: {row['speedup']:.2f}x; |ΔE|/E {row['value_rel_diff']:.1e}, "
          f"max |Δgrad| {row['grad_max_abs_diff']:.1e}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "lenet5"], choices=sorted(SHAPES))
    ap.add_argument("--n", type=int, default=500, help="objective inputs")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    rows = [bench(name, args.n, args.repeats) for name in args.models]
    print(json.dumps({"machine": f"{platform.machine()}, jax {jax.__version__}", "rows": rows}))


if __name__ == "__main__":
    main()
