"""E(m)'s masked conv as one conv with the rebuilt kernel W(m) (decompose.masked_kernel):
the same map as the two factored convs and, at m = 1, as the original conv."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from coblax.lowrank import decompose
from coblax.lowrank.decompose import Factors, apply_factors, kernel_is_cheaper, masked_kernel

DN = ("NHWC", "HWIO", "NHWC")


def _factors(kernel, scheme, strides, pads):
    """Full SVD of ``kernel`` in ``scheme``'s matricization, by NumPy (the reference)."""
    X, Y, C, N = kernel.shape
    if scheme == "zhang":
        u, s, vt = np.linalg.svd(kernel.reshape(X * Y * C, N), full_matrices=False)
        first = u.reshape(X, Y, C, -1)
        second = vt[None, None]
    else:  # tai: (C·X) x (Y·N)
        u, s, vt = np.linalg.svd(kernel.transpose(2, 0, 1, 3).reshape(C * X, Y * N), full_matrices=False)
        first = u.reshape(C, X, -1).transpose(1, 0, 2)[:, None]
        second = vt.T.reshape(Y, N, -1).transpose(0, 2, 1)[None]
    return Factors("conv", scheme, jnp.asarray(first, jnp.float32), jnp.asarray(second, jnp.float32),
                   jnp.asarray(s, jnp.float32), strides, pads)


@pytest.mark.parametrize("scheme", ["tai", "zhang"])
@pytest.mark.parametrize("strides, pads", [((1, 1), ((1, 1), (1, 1))), ((2, 2), ((0, 1), (0, 1))),
                                           ((1, 2), ((0, 0), (0, 0)))])
def test_rebuilt_kernel_equals_the_factored_convs_and_the_original(scheme, strides, pads):
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((3, 3, 5, 7)).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 5)), jnp.float32)
    f = _factors(kernel, scheme, strides, pads)
    original = lax.conv_general_dilated(x, jnp.asarray(kernel), strides, pads, dimension_numbers=DN)
    # m = 1: W(1) is the original kernel (the SVD is exact), both paths are the original conv
    np.testing.assert_allclose(masked_kernel(f, f.sigma), kernel, atol=1e-5)
    np.testing.assert_allclose(apply_factors(f, x, f.sigma), original, atol=1e-4)
    # any m: the rebuilt kernel's conv equals the factored pair
    scale = f.sigma * jnp.asarray(rng.uniform(0, 1, f.sigma.shape), jnp.float32)
    rebuilt = lax.conv_general_dilated(x, masked_kernel(f, scale), strides, pads, dimension_numbers=DN)
    np.testing.assert_allclose(rebuilt, apply_factors(f, x, scale), atol=1e-4)


def test_kernel_is_cheaper_against_hand_counted_macs():
    # 3x3 conv 64 -> 64 on 8x8 maps, batch 250, tai: R = 192
    f = Factors("conv", "tai", jnp.zeros((3, 1, 64, 192)), jnp.zeros((1, 3, 192, 64)), jnp.zeros(192), (1, 1),
                ((1, 1), (1, 1)))
    pixels = 250 * 8 * 8
    factored = pixels * (3 * 64 * 192 + 192 * 64 * 3)  # 1.18e9
    rebuilt = 3 * 64 * 192 * 3 * 64 + pixels * 9 * 64 * 64  # 7.1e6 + 5.9e8
    assert rebuilt < factored and kernel_is_cheaper(f, (250, 8, 8, 64))
    # one input pixel, zhang 3x3 64 -> 64 (R = 64): rebuilding costs 9·64·64·64 + 9·64·64 = 2.4e6
    # MACs, the factored pair 9·64·64 + 64·64 = 4.1e4
    g = Factors("conv", "zhang", jnp.zeros((3, 3, 64, 64)), jnp.zeros((1, 1, 64, 64)), jnp.zeros(64), (1, 1),
                ((1, 1), (1, 1)))
    assert not kernel_is_cheaper(g, (1, 1, 1, 64))
    dense = Factors("dense", "dense", jnp.zeros((800, 500)), jnp.zeros((500, 500)), jnp.zeros(500))
    assert not kernel_is_cheaper(dense, (250, 800))


def test_masked_objective_and_gradient_do_not_depend_on_the_path(monkeypatch):
    """E(m) and ∂E/∂m of a small CNN with both convs rebuilt equal the factored path's."""
    import flax.linen as nn

    from coblax.lowrank.decompose import factored_apply

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(8, (3, 3), name="c1")(x))
            x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2), name="c2")(x))
            return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((16, 8, 8, 2)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 16))
    model = Net()
    variables = model.init(jax.random.PRNGKey(0), x)
    p = variables["params"]
    factors = {"c1": _factors(np.asarray(p["c1"]["kernel"]), "tai", (1, 1), ((1, 1), (1, 1))),
               "c2": _factors(np.asarray(p["c2"]["kernel"]), "zhang", (2, 2), ((0, 1), (0, 1)))}
    m = {n: jnp.asarray(rng.uniform(0.2, 1, f.sigma.shape), jnp.float32) for n, f in factors.items()}

    def loss(m):
        scales = {n: m[n] * factors[n].sigma for n in m}
        out = factored_apply(model, variables, factors, x, scales)
        return -jnp.mean(jax.nn.log_softmax(out)[jnp.arange(16), y])

    assert kernel_is_cheaper(factors["c1"], (16, 8, 8, 2)) and kernel_is_cheaper(factors["c2"], (16, 8, 8, 8))
    rebuilt_value, rebuilt_grad = jax.value_and_grad(loss)(m)
    monkeypatch.setattr(decompose, "kernel_is_cheaper", lambda f, shape: False)
    value, grad = jax.value_and_grad(loss)(m)
    assert float(rebuilt_value) == pytest.approx(float(value), rel=1e-5)
    for n in m:
        np.testing.assert_allclose(rebuilt_grad[n], grad[n], rtol=1e-4, atol=1e-6)
