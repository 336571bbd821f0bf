"""E(m): gradient against central finite differences; one compilation for all calls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coblax.lowrank.decompose import factorize, get_kernel, trace_layers
from coblax.lowrank.objective import NetworkLoss
from coblax.nn.models import build_model


def _oracle(dtype, scheme="tai", name="small_cnn"):
    model = build_model(name, num_classes=10, channels=(4, 6, 8), dense=12) if name == "small_cnn" else build_model(name, num_classes=10, hidden=(16, 12))
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(37, 8, 8, 1)).astype(dtype)
    y = rng.integers(0, 10, size=37).astype(np.int32)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1], jnp.float32))
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    layers = [l for l in trace_layers(model, params, jnp.asarray(x[:1])) if l.decomposable]
    fs = {l.name: factorize(get_kernel(params, l.name), l, scheme) for l in layers}
    return NetworkLoss(model, params, fs, (x, y), (x[:10], y[:10]), batch_size=16), model, params, x, y


@pytest.mark.parametrize("scheme", ["tai", "zhang"])
def test_gradient_matches_central_differences(scheme):
    with jax.enable_x64(True):
        oracle, *_ = _oracle(np.float64, scheme)
        rng = np.random.default_rng(1)
        m = rng.uniform(0.2, 0.9, size=oracle.size)
        value, grad = oracle.value_and_grad(m)
        h = 1e-6
        for i in rng.choice(oracle.size, size=12, replace=False):
            e = np.zeros_like(m)
            e[i] = h
            fd = (oracle.value(m + e) - oracle.value(m - e)) / (2 * h)
            assert grad[i] == pytest.approx(fd, rel=1e-5, abs=1e-8)
        assert value == pytest.approx(oracle.value(m))


def test_value_at_ones_is_the_original_network_loss_and_batches_are_exact():
    oracle, model, params, x, y = _oracle(np.float32)
    logits = model.apply(params, jnp.asarray(x))
    ref = float(jnp.mean(-jax.nn.log_softmax(logits)[np.arange(len(y)), y]))
    # 37 examples in batches of 16: padding must carry zero weight
    assert oracle.value(np.ones(oracle.size)) == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("n, batch_size, shape", [(600, 250, (3, 200)), (37, 16, (3, 13)), (10, 250, (1, 10)),
                                                  (1000, 250, (4, 250))])
def test_batches_are_even_and_padding_is_below_one_row_per_batch(n, batch_size, shape):
    from coblax.lowrank.objective import batch_stack

    x, y = np.zeros((n, 3), np.float32), np.zeros(n, np.int32)
    xs, ys, ws = batch_stack(x, y, batch_size)
    assert xs.shape[:2] == ys.shape == ws.shape == shape
    assert float(ws.sum()) == n and shape[0] * shape[1] - n < shape[0]


def test_callbacks_compile_once():
    oracle, *_ = _oracle(np.float32)
    rng = np.random.default_rng(0)
    for _ in range(4):
        oracle.value_and_grad(rng.uniform(size=oracle.size))
    assert oracle.compiled_count() == 1


def test_validation_metrics_match_the_original_network():
    oracle, model, params, x, y = _oracle(np.float32)
    logits = np.asarray(model.apply(params, jnp.asarray(x[:10])))
    ref_loss = float(np.mean(-np.asarray(jax.nn.log_softmax(logits))[np.arange(10), y[:10]]))
    loss, acc = oracle.validation_metrics(np.ones(oracle.size))
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert acc == pytest.approx(float(np.mean(np.argmax(logits, -1) == y[:10])))
    assert loss == pytest.approx(oracle.validation_loss(np.ones(oracle.size)), rel=1e-6)
