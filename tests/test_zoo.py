"""BatchNorm zoo: hand-counted MACs and parameters; m = 1 reproduces eval-mode logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coblax.lowrank.costs import count_params
from coblax.lowrank.decompose import (
    SCHEMES,
    factored_apply,
    factorize,
    get_kernel,
    masked_scales,
    trace_layers,
)
from coblax.nn.models import MOBILENET_V1_BLOCKS, VGG16BN, MobileNetV1, ResNet20

X32 = jnp.zeros((1, 32, 32, 3), jnp.float32)


def _abstract(model):
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), X32)
    return variables, trace_layers(model, variables, X32, {"train": False})


def test_resnet20_counts_by_hand():
    variables, traced = _abstract(ResNet20())
    conv = lambda c, n: 9 * c * n  # noqa: E731 - 3x3 kernel, no bias
    params = (
        conv(3, 16)
        + 6 * conv(16, 16)
        + conv(16, 32) + 5 * conv(32, 32)
        + conv(32, 64) + 5 * conv(64, 64)
        + 64 * 10 + 10
        + 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)  # BN scale and bias
    )
    assert params == 269_722  # He et al.'s "0.27M"
    assert count_params(variables) == params
    assert set(variables) == {"params", "batch_stats"}  # running stats are not parameters
    macs = (
        32 * 32 * conv(3, 16)
        + 32 * 32 * 6 * conv(16, 16)
        + 16 * 16 * (conv(16, 32) + 5 * conv(32, 32))
        + 8 * 8 * (conv(32, 64) + 5 * conv(64, 64))
        + 640
    )
    assert sum(l.macs for l in traced) == macs == 40_551_040
    assert len(traced) == 20 and all(l.decomposable for l in traced)


def test_vgg16_bn_counts_by_hand():
    variables, traced = _abstract(VGG16BN())
    widths = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
              (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    sides = [32, 32, 16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2]
    conv_params = sum(9 * c * n for c, n in widths)
    bn = 2 * sum(n for _, n in widths)
    dense = 512 * 512 + 512 + 512 * 10 + 10
    assert count_params(variables) == conv_params + bn + dense == 14_986_698  # the usual "15.0M"
    macs = sum(s * s * 9 * c * n for (c, n), s in zip(widths, sides)) + 512 * 512 + 512 * 10
    assert sum(l.macs for l in traced) == macs == 313_463_808


def test_mobilenet_v1_counts_by_hand():
    variables, traced = _abstract(MobileNetV1())
    side, c = 32, 32
    params, macs = 9 * 3 * 32 + 2 * 32, 32 * 32 * 9 * 3 * 32
    for out, stride in MOBILENET_V1_BLOCKS:
        side //= stride
        params += 9 * c + 2 * c + c * out + 2 * out  # depthwise, BN, pointwise, BN
        macs += side * side * (9 * c + c * out)
        c = out
    params += 1024 * 10 + 10
    macs += 1024 * 10
    assert count_params(variables) == params == 3_217_226
    assert sum(l.macs for l in traced) == macs == 46_354_432
    by_name = {l.name: l for l in traced}
    assert not by_name["block1_dw"].decomposable and "depthwise" in by_name["block1_dw"].reason
    assert by_name["block1_pw"].decomposable


def _perturbed(model, x):
    """Initialized variables with running statistics moved away from (0, 1)."""
    variables = model.init(jax.random.PRNGKey(1), x)
    keys = iter(jax.random.split(jax.random.PRNGKey(2), 1000))

    def move(path, leaf):
        if path[0].key != "batch_stats":
            return leaf
        noise = jax.random.uniform(next(keys), leaf.shape, minval=0.5, maxval=1.5)
        return leaf * 0 + noise if path[-1].key == "var" else leaf + noise - 1.0

    return jax.tree_util.tree_map_with_path(move, variables)


ZOO = [
    pytest.param(ResNet20(), id="resnet20"),
    pytest.param(MobileNetV1(width=0.25), id="mobilenet-0.25"),
    pytest.param(VGG16BN(width=0.25), id="vgg16bn-0.25"),
    pytest.param(MobileNetV1(), id="mobilenet", marks=pytest.mark.slow),
    pytest.param(VGG16BN(), id="vgg16bn", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("model", ZOO)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_all_ones_reproduces_eval_logits(model, scheme):
    """Every decomposable layer at full rank, BatchNorm statistics moved off (0, 1).

    The full-width MobileNet and VGG-16-BN run with ``-m slow`` (minutes on 2 cores);
    the width-0.25 ones exercise the same layers and code paths.
    """
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    variables = _perturbed(model, x)
    traced = trace_layers(model, variables, x, {"train": False})
    fs = {l.name: factorize(get_kernel(variables, l.name), l, scheme) for l in traced if l.decomposable}
    scales = masked_scales(fs, {n: jnp.ones_like(f.sigma) for n, f in fs.items()})
    out = jax.jit(lambda v, x: factored_apply(model, v, fs, x, scales, train=False))(variables, x)
    ref = model.apply(variables, x, train=False)
    assert float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref))) < 1e-5
    assert np.all(np.isfinite(np.asarray(out)))
