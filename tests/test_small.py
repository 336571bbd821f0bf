"""Small architectures: Fire, depthwise-separable and flattened costs by hand and by the tracer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coblax.lowrank.decompose import trace_layers
from coblax.nn.small import (
    BlockNet,
    Cost,
    DepthwiseSeparable,
    FireNet,
    FlattenedConv,
    block_net_cost,
    conv_cost,
    depthwise_separable_cost,
    fire_cost,
    fire_dims,
    fire_net_cost,
    flattened_cost,
)


def _n_params(variables) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(variables))


def _traced_macs(model, variables, x) -> int:
    return sum(layer.macs for layer in trace_layers(model, variables, x))


def test_seed_depthwise_example():
    # 8x8x3 -> 8x8x256 with 5x5 kernels: 1,228,800 vs 4,800 + 49,152 = 53,952 multiplications.
    std = conv_cost(8, 8, 5, 5, 3, 256)
    dws = depthwise_separable_cost(8, 8, 3, 256, 5)
    assert std.macs == 1_228_800
    assert dws.macs == 53_952
    assert conv_cost(8, 8, 5, 5, 3, 3, groups=3).macs == 4_800
    assert conv_cost(8, 8, 1, 1, 3, 256).macs == 49_152
    assert round(std.macs / dws.macs) == 23


def test_seed_depthwise_example_by_tracer():
    x = jnp.zeros((1, 8, 8, 3))
    dws = DepthwiseSeparable(256, 5)
    v = dws.init(jax.random.key(0), x)
    assert _traced_macs(dws, v, x) == 53_952
    assert _n_params(v) == depthwise_separable_cost(8, 8, 3, 256, 5).params == 5 * 5 * 3 + 3 + 3 * 256 + 256


def test_flattened_by_hand_and_tracer():
    # Jin et al.: N filters of C + Y + X weights instead of C*Y*X.
    h, w, c, n, ky, kx = 6, 5, 4, 7, 3, 5
    cost = flattened_cost(h, w, c, n, ky, kx)
    assert cost == Cost(h * w * n * (c + ky + kx), n * (c + ky + kx) + n)
    x = jnp.zeros((1, h, w, c))
    mod = FlattenedConv(n, (ky, kx))
    v = mod.init(jax.random.key(0), x)
    assert _traced_macs(mod, v, x) == cost.macs
    assert _n_params(v) == cost.params
    assert mod.apply(v, x).shape == (1, h, w, n)


def test_flattened_is_a_rank_one_filter():
    # The three 1-D convs compute the conv with kernel alpha (x) beta (x) gamma.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
    mod = FlattenedConv(2, (3, 3))
    v = mod.init(jax.random.key(1), x)
    p = v["params"]
    a = np.asarray(p["lateral"]["kernel"])[0, 0]  # (C, N)
    b = np.asarray(p["vertical"]["kernel"])[:, 0, 0]  # (Y, N)
    g = np.asarray(p["horizontal"]["kernel"])[0, :, 0]  # (X, N)
    full = np.einsum("cn,yn,xn->yxcn", a, b, g)
    ref = jax.lax.conv_general_dilated(x, jnp.asarray(full), (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ref = ref + p["horizontal"]["bias"]
    np.testing.assert_allclose(mod.apply(v, x), ref, rtol=1e-4, atol=1e-5)


def test_fire_by_hand():
    # fire2 of SqueezeNet (Iandola et al. Table 1, in the seed): 96 -> s16, e64 + e64 has
    # 11,920 parameters before pruning: 11,776 weights + 144 biases.
    c = fire_cost(55, 55, 96, 16, 64, 64)
    assert c.params == 96 * 16 + 16 * 64 + 9 * 16 * 64 + 16 + 64 + 64 == 11_920
    assert c.macs == 55 * 55 * (96 * 16 + 16 * 64 + 9 * 16 * 64)


def test_fire_dims():
    assert fire_dims(128, 0.125, 0.5) == (16, 64, 64)
    assert fire_dims(64, 0.75, 0.25) == (48, 48, 16)
    assert fire_dims(8, 0.01, 0.0) == (1, 7, 1)  # both branches kept
    with pytest.raises(ValueError, match="squeeze_ratio"):
        fire_dims(64, 1.0, 0.5)


NETS = [
    *(FireNet(expand=16, stem=8, squeeze_ratio=sr, pct3x3=pct) for sr, pct in ((0.125, 0.5), (0.5, 0.25), (0.75, 0.875))),
    *(BlockNet(block=b, stem=8, channels=(16, 32)) for b in ("standard", "depthwise", "flattened")),
]


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1)])
@pytest.mark.parametrize("net", NETS, ids=lambda n: n.block if isinstance(n, BlockNet) else f"fire-{n.squeeze_ratio}")
def test_net_cost_matches_tracer_and_tree(shape, net):
    x = jnp.zeros((1, *shape))
    v = net.init(jax.random.key(0), x)
    cost = (fire_net_cost if isinstance(net, FireNet) else block_net_cost)(net, shape)
    assert _traced_macs(net, v, x) == cost.macs
    assert _n_params(v) == cost.params
    assert net.apply(v, x).shape == (1, 10)


def test_cheaper_blocks_are_cheaper():
    costs = {b: block_net_cost(BlockNet(block=b), (28, 28, 1)) for b in ("standard", "depthwise", "flattened")}
    assert costs["depthwise"].macs < costs["standard"].macs
    assert costs["flattened"].params < costs["standard"].params


def test_bad_block():
    with pytest.raises(ValueError, match="unknown block"):
        BlockNet(block="nope").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
