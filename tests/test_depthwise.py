"""The depthwise fast path against ``lax.conv_general_dilated`` (the reference), values and gradients."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from coblax.nn import depthwise
from coblax.nn.depthwise import depthwise_conv
from coblax.nn.models import build_model

DN = ("NHWC", "HWIO", "NHWC")
_LAX_CONV = lax.conv_general_dilated  # the reference, held before any test patches it


def _ref(x, k, strides, padding, groups):
    dn = lax.conv_dimension_numbers(x.shape, k.shape, DN)
    return _LAX_CONV(x, k, strides, padding, dimension_numbers=dn, feature_group_count=groups,
                     precision=lax.Precision.HIGHEST)


@pytest.mark.parametrize("kernel,strides,padding", [
    ((3, 3), (1, 1), "SAME"), ((3, 3), (2, 2), "SAME"), ((3, 3), (2, 2), ((1, 1), (1, 1))),
    ((3, 1), (1, 1), "SAME"), ((1, 3), (1, 1), "SAME"), ((5, 5), (2, 1), "VALID"),
    ((3, 3), (1, 2), ((0, 2), (1, 0))), ((2, 2), (2, 2), "SAME"),
])
def test_depthwise_matches_lax_values_and_gradients(kernel, strides, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 9, 8, 5)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=kernel + (1, 5)).astype(np.float32))
    dn = lax.conv_dimension_numbers(x.shape, k.shape, DN)
    assert depthwise.is_depthwise(x.shape, k.shape, 5, dn)
    got = depthwise_conv(x, k, strides, padding, dimension_numbers=dn, feature_group_count=5)
    ref = _ref(x, k, strides, padding, 5)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    w = jnp.asarray(rng.normal(size=ref.shape).astype(np.float32))  # a generic cotangent
    g_got = jax.grad(lambda a, b: jnp.sum(w * depthwise_conv(a, b, strides, padding, dimension_numbers=dn,
                                                             feature_group_count=5)), argnums=(0, 1))(x, k)
    g_ref = jax.grad(lambda a, b: jnp.sum(w * _ref(a, b, strides, padding, 5)), argnums=(0, 1))(x, k)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_other_convolutions_are_lax_itself(monkeypatch):
    # a grouped conv with two channels per group, and a plain conv: no fast path
    calls = []
    real = lax.conv_general_dilated
    monkeypatch.setattr(depthwise.lax, "conv_general_dilated", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)).astype(np.float32))
    for k, groups in ((rng.normal(size=(3, 3, 2, 4)), 2), (rng.normal(size=(3, 3, 4, 6)), 1)):
        k = jnp.asarray(k.astype(np.float32))
        dn = lax.conv_dimension_numbers(x.shape, k.shape, DN)
        assert not depthwise.is_depthwise(x.shape, k.shape, groups, dn)
        got = depthwise_conv(x, k, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=groups)
        np.testing.assert_allclose(got, _ref(x, k, (1, 1), "SAME", groups), rtol=1e-5, atol=1e-5)
    # a dilated depthwise conv goes to lax too
    k = jnp.asarray(rng.normal(size=(3, 3, 1, 4)).astype(np.float32))
    dn = lax.conv_dimension_numbers(x.shape, k.shape, DN)
    depthwise_conv(x, k, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=dn, feature_group_count=4)
    assert len(calls) == 3


def test_mobilenet_with_the_fast_path_is_the_lax_network():
    # the zoo's MobileNet-v1: same parameters (shapes, initial values) and same outputs as
    # the same network built on lax's grouped convolution
    model = build_model("mobilenet_v1", num_classes=10, input_shape=(28, 28, 1), width=0.25)
    x = jnp.asarray(np.random.default_rng(2).uniform(size=(4, 28, 28, 1)).astype(np.float32))
    variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)

    hooked = []

    def plain(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, nn.Conv) and context.method_name == "__call__" and mod.conv_general_dilated is not None:
            hooked.append(mod.conv_general_dilated is depthwise_conv)
            return nn.Conv(mod.features, mod.kernel_size, mod.strides, mod.padding,
                           feature_group_count=mod.feature_group_count, use_bias=mod.use_bias,
                           precision=lax.Precision.HIGHEST, parent=None).apply(
                {"params": mod.variables["params"]}, *args)
        return next_fun(*args, **kwargs)

    got = model.apply(variables, x, train=False)
    with nn.intercept_methods(plain):
        ref = model.apply(variables, x, train=False)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert not np.allclose(ref, 0.0)
    assert hooked == [True] * 13  # every depthwise block, and nothing else, takes the hook
    kernels = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(variables["params"])
               if "_dw']" in jax.tree_util.keystr(p)}
    assert len(kernels) == 13 and all(s[:3] == (3, 3, 1) for s in kernels.values())  # nn.Conv's own kernels
