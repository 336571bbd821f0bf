"""Benchmark: depthwise convolutions as shifted multiply-adds against XLA's grouped convolution.

:func:`coblax.nn.depthwise.depthwise_conv` is the ``conv_general_dilated`` hook of the
zoo's depthwise layers (MobileNet-v1, ``DepthwiseSeparable``, ``FlattenedConv``). This
times, in one run, a jitted training step (forward, backward, BatchNorm in training
mode) of the zoo's MobileNet-v1 with the hook's fast path and with it turned off
(every call to ``lax.conv_general_dilated``), and the 13 depthwise convolutions alone
(forward and backward at their shapes in that network), and prints the ratios and the
largest difference of the two networks' logits.

Usage:
  python benchmarks/bench_depthwise.py [--width 0.5] [--batch 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from coblax.nn import depthwise
from coblax.nn.models import build_model


@contextlib.contextmanager
def fast_path(on: bool):
    """The hook with its fast path (``on``) or deferring every call to lax."""
    real = depthwise.is_depthwise
    if not on:
        depthwise.is_depthwise = lambda *a, **k: False
    try:
        yield
    finally:
        depthwise.is_depthwise = real


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model = build_model("mobilenet_v1", num_classes=10, input_shape=(28, 28, 1), width=args.width)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(size=(args.batch, 28, 28, 1)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, args.batch).astype(np.int32))
    variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)

    def loss(params, stats):
        out, upd = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y)), upd

    shapes = []

    def record(next_fun, a, kw, context):
        mod = context.module
        if isinstance(mod, nn.Conv) and context.method_name == "__call__" and mod.feature_group_count > 1:
            st = mod.strides if mod.strides is not None else 1
            shapes.append((a[0].shape, (st, st) if isinstance(st, int) else tuple(st)))
        return next_fun(*a, **kw)

    with nn.intercept_methods(record):
        model.apply(variables, x, train=False)

    def convs(xs, ks):
        total = 0.0
        for (shape, strides), xx, k in zip(shapes, xs, ks):
            dn = lax.conv_dimension_numbers(shape, k.shape, ("NHWC", "HWIO", "NHWC"))
            total = total + jnp.sum(depthwise.depthwise_conv(xx, k, strides, ((1, 1), (1, 1)), dimension_numbers=dn,
                                                             feature_group_count=shape[-1]) ** 2)
        return total

    xs = [jnp.ones(s) for s, _ in shapes]
    ks = [jnp.full((3, 3, 1, s[-1]), 0.1) for s, _ in shapes]
    rows, logits = {}, {}
    for on in (False, True):
        with fast_path(on):
            step = jax.jit(jax.value_and_grad(loss, has_aux=True))
            alone = jax.jit(jax.grad(convs, argnums=(0, 1)))
            rows[on] = (timed(step, variables["params"], variables["batch_stats"], repeats=args.repeats),
                        timed(alone, xs, ks, repeats=args.repeats))
            logits[on] = np.asarray(jax.jit(lambda v: model.apply(v, x, train=False))(variables))
    print(f"MobileNet-v1 width {args.width}, batch {args.batch}, 28x28x1, jax {jax.__version__}, "
          f"{jax.default_backend()}, {args.repeats} repeats")
    print("| | lax grouped conv (s) | shifted multiply-adds (s) | ratio |")
    print("|---|---:|---:|---:|")
    for i, label in enumerate(("training step", f"{len(shapes)} depthwise convs, fwd+bwd")):
        print(f"| {label} | {rows[False][i]:.3f} | {rows[True][i]:.3f} | {rows[False][i] / rows[True][i]:.2f}x |")
    print(f"largest logit difference: {np.max(np.abs(logits[True] - logits[False])):.2e}")


if __name__ == "__main__":
    main()
