"""BatchNorm recalibration of flax.nnx models (``recalibrate_bn`` in allocate / finetune on nnx).

References: the batch mean and biased variance computed in numpy from the layer
inputs (a Linear's output, x W + b, and the next layer's input after a
training-mode normalization written out by hand).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import coblax
from coblax.nn.bn import draw_batches
from coblax.nn.bn_nnx import batch_norms, recalibrate_bn_nnx, resolve_batches_nnx


class TwoBN(nnx.Module):
    """Linear -> BN -> relu -> Linear -> BN (the second BN called with use_running_average at the call site)."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(6, 5, rngs=rngs)
        self.bn1 = nnx.BatchNorm(5, momentum=0.9, rngs=rngs)
        self.fc2 = nnx.Linear(5, 4, rngs=rngs)
        self.bn2 = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn1(self.fc1(x)))
        return self.drop(self.bn2(self.fc2(h), use_running_average=True))


def _params(model):
    p = {n: (np.asarray(getattr(model, n).kernel[...], np.float64), np.asarray(getattr(model, n).bias[...], np.float64))
         for n in ("fc1", "fc2")}
    bn1 = (np.asarray(model.bn1.scale[...], np.float64), np.asarray(model.bn1.bias[...], np.float64))
    return p, bn1


def _reference(model, x):
    """(bn1 mean, var, bn2 mean, var) of one batch, by hand (training-mode normalization in between)."""
    p, (scale, bias) = _params(model)
    h1 = x @ p["fc1"][0] + p["fc1"][1]
    m1, v1 = h1.mean(0), h1.var(0)
    a = np.maximum((h1 - m1) / np.sqrt(v1 + model.bn1.epsilon) * scale + bias, 0.0)
    h2 = a @ p["fc2"][0] + p["fc2"][1]
    return m1, v1, h2.mean(0), h2.var(0)


def _model_and_data():
    model = TwoBN(nnx.Rngs(0))
    model.bn1.mean[...] = jnp.full((5,), 3.0)  # stale statistics, far from the data's
    model.bn2.var[...] = jnp.full((4,), 7.0)
    x = np.random.default_rng(0).normal(size=(64, 6)) * 2.0 + 1.0
    return model, x


def test_one_batch_gives_exactly_its_statistics():
    model, x = _model_and_data()
    new = recalibrate_bn_nnx(model, x, batches=1, batch_size=64)
    m1, v1, m2, v2 = _reference(model, x)
    np.testing.assert_allclose(new.bn1.mean[...], m1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.bn1.var[...], v1, rtol=1e-5, atol=1e-6)
    # bn2 is called with use_running_average=True by the model, and is recalibrated all the same
    np.testing.assert_allclose(new.bn2.mean[...], m2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.bn2.var[...], v2, rtol=1e-5, atol=1e-6)
    # the model given is unchanged, and the copy keeps its momentum and runs in eval mode
    assert float(model.bn1.mean[0]) == 3.0 and float(model.bn2.var[0]) == 7.0
    assert new.bn1.momentum == 0.9 and new.drop.deterministic
    assert nnx.BatchNorm.__call__.__name__ == "__call__" and nnx.BatchNorm.__call__.__qualname__.startswith("BatchNorm")


def test_several_batches_average_the_batch_statistics():
    model, x = _model_and_data()
    new = recalibrate_bn_nnx(model, x, batches=4, batch_size=16, seed=3)
    refs = [_reference(model, x[idx]) for idx in draw_batches(len(x), 4, 16, 3)]
    for k, (bn, attr) in enumerate(((new.bn1, "mean"), (new.bn1, "var"), (new.bn2, "mean"), (new.bn2, "var"))):
        np.testing.assert_allclose(getattr(bn, attr)[...], np.mean([r[k] for r in refs], axis=0), rtol=1e-5, atol=1e-6)
    # eval-mode outputs now use the recalibrated statistics: differs from the stale network's
    assert not np.allclose(new(jnp.asarray(x[:8])), model(jnp.asarray(x[:8])))


def test_zero_batches_and_models_without_batch_norm_are_returned_as_given():
    model, x = _model_and_data()
    assert recalibrate_bn_nnx(model, x, batches=0) is model
    plain = nnx.Linear(6, 2, rngs=nnx.Rngs(0))
    assert recalibrate_bn_nnx(plain, x, batches=5) is plain
    assert resolve_batches_nnx("auto", model) == 20 and resolve_batches_nnx("auto", plain) == 0
    assert len(batch_norms(model)) == 2
    for bad in (-1, 1.5, "many", True):
        with pytest.raises(ValueError, match="recalibrate_bn"):
            resolve_batches_nnx(bad, model)


def test_allocate_and_finetune_recalibrate_nnx_models():
    model, x = _model_and_data()
    y = (x[:, 0] > 1.0).astype(np.int32)
    rules = [("fc1|fc2", "dense")]
    kept = coblax.allocate(model, (x, y), rules=rules, mac=0.6, param=0.6, method="pos_greedy",
                           recalibrate_bn=0)
    fresh = coblax.allocate(model, (x, y), rules=rules, mac=0.6, param=0.6, method="pos_greedy",
                            recalibrate_bn=1, batch_size=64)
    assert dict(kept.ranks) == dict(fresh.ranks)
    assert float(kept.model.bn1.mean[0]) == 3.0  # recalibrate_bn = 0: the original's stale statistics
    # one batch of all 64 examples: the factored network's exact statistics; its first layer
    # is the truncated fc1 (x A B + b), its output taken here
    fc1 = fresh.model.fc1
    h1 = np.asarray(fc1(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(fresh.model.bn1.mean[...], h1.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fresh.model.bn1.var[...], h1.var(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="recalibrate_bn"):
        coblax.allocate(model, (x, y), rules=rules, mac=0.6, param=0.6, method="pos_greedy", recalibrate_bn=-2)

    tuned = coblax.finetune(kept, x, y, epochs=1, batch_size=64, recalibrate_bn=1)
    h1 = np.asarray(tuned.model.fc1(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(tuned.model.bn1.mean[...], h1.mean(0), rtol=1e-5, atol=1e-5)
    untouched = coblax.finetune(kept, x, y, epochs=1, batch_size=64, recalibrate_bn=0)
    # without recalibration the statistics are the training run's momentum averages
    assert not np.allclose(untouched.model.bn1.mean[...], h1.mean(0), atol=1e-3)

