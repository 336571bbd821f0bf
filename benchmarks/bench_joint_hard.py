"""Benchmark: COBLA's ``joint_hard`` steps on the kept columns against the full-rank masked factors.

With every mask fixed at the rounded ones, :func:`coblax.lowrank.joint.joint_train`
trains only the kept triplets' columns (``truncate_fixed=True``, the default); the
reference computation trains the full-rank factors with the dropped triplets masked
to 0 (``truncate_fixed=False``). Both give the same weights (``tests/test_joint.py``);
this prints what the first costs against the second, measured in one run.

The network is the zoo's MobileNet-v1 (width 0.5, the issue-18 benchmark's) or
ResNet-20 with initial weights, on synthetic 28×28×1 inputs labelled by the network
itself, allocated through ``coblax.allocate`` with COBLA (a short solve: its time is
not what is measured). Per budget it prints the seconds of the ``joint_hard`` steps
of each variant and their ratio, and checks both end at the same validation loss.

Usage:
  python benchmarks/bench_joint_hard.py [--model mobilenet_v1] [--budgets 0.5,0.2] [--steps 30]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

import coblax
from coblax import allocate
from coblax.lowrank import joint as joint_mod
from coblax.nn.models import build_model

RULES = {
    "mobilenet_v1": [("conv1|block[0-9]+_pw|fc", "tai")],
    "resnet20": [(".*conv.*|fc", "tai")],
}
OPTIONS = {"mobilenet_v1": {"width": 0.5}, "resnet20": {}}


def setup(name: str, examples: int):
    model = build_model(name, num_classes=10, input_shape=(28, 28, 1), **OPTIONS[name])
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(examples, 28, 28, 1)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]), train=False)
    y = np.asarray(jnp.argmax(model.apply(variables, jnp.asarray(x), train=False), -1)).astype(np.int32)
    return model, variables, (x, y)


def run(name: str, budget: float, steps: int, truncate_fixed: bool, examples: int) -> dict:
    model, variables, data = setup(name, examples)
    real = joint_mod.joint_train
    joint_mod.joint_train = functools.partial(real, truncate_fixed=truncate_fixed)
    try:
        method = coblax.allocators.cobla(max_iter=3, roundings=1, local_search=0, polish=0,
                                         joint=steps + 5, joint_hard=steps, progress=False)
        result = allocate(model, variables, data, rules=RULES[name], mac=budget, param=budget, method=method,
                          apply_kwargs={"train": False}, recalibrate_bn=0, batch_size=128)
    finally:
        joint_mod.joint_train = real
    stats = result.allocation.stats
    return {"seconds": stats["joint_hard_seconds"], "step": stats["joint_hard_step_seconds"],
            "first": stats["joint_hard_first_step_seconds"], "val_loss": stats["joint_hard_val_loss_after"],
            "ranks": dict(result.allocation.ranks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v1", choices=sorted(RULES))
    ap.add_argument("--budgets", default="0.5,0.2")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--examples", type=int, default=1024)
    args = ap.parse_args()
    print(f"{args.model}, {args.steps} joint_hard steps (batch 128, 28x28x1), jax {jax.__version__}, "
          f"{jax.devices()[0].platform}")
    print("| budget | variant | all steps (s) | first step, compiling (s) | one step after it (s) | val loss after |")
    print("|---:|---|---:|---:|---:|---:|")
    for budget in (float(b) for b in args.budgets.split(",")):
        full = run(args.model, budget, args.steps, False, args.examples)
        kept = run(args.model, budget, args.steps, True, args.examples)
        assert full["ranks"] == kept["ranks"], "the two variants rounded to different ranks"
        for label, r in (("full masked", full), ("kept columns", kept)):
            print(f"| {budget} | {label} | {r['seconds']:.1f} | {r['first']:.2f} | {r['step']:.3f} | {r['val_loss']:.5f} |")
        print(f"| {budget} | ratio full / kept | {full['seconds'] / kept['seconds']:.2f}x | "
              f"{full['first'] / kept['first']:.2f}x | {full['step'] / kept['step']:.2f}x | |")


if __name__ == "__main__":
    main()
