"""BatchNorm recalibration: exact batch statistics, nothing else changed."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coblax.nn.bn import (
    AUTO_BATCHES,
    batch_statistics,
    check_batches,
    recalibrate_bn,
    resolve_batches,
)


class Net(nn.Module):
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=self.momentum)
        h = nn.Conv(6, (3, 3), name="conv1")(x)
        h = nn.relu(bn(name="bn1")(h))
        h = nn.Conv(5, (3, 3), strides=2, name="conv2")(h)
        h = bn(name="bn2", use_fast_variance=False)(h)
        h = jnp.mean(nn.relu(h), axis=(1, 2))
        return nn.Dense(3, name="fc")(h)


def _setup():
    rng = np.random.default_rng(0)
    x = rng.normal(1.5, 2.0, size=(32, 8, 8, 2)).astype(np.float32)
    model = Net()
    variables = model.init(jax.random.PRNGKey(0), x[:1])  # running stats 0 / 1: stale for this data
    return model, variables, x


def test_one_batch_gives_exactly_that_batch_statistics():
    model, variables, x = _setup()
    out = recalibrate_bn(functools.partial(model.apply, train=False), variables, x, batches=1, batch_size=len(x))
    # reference: flax's own training-mode update with momentum 0 stores the batch's statistics
    ref_model = Net(momentum=0.0)
    _, updated = ref_model.apply(variables, x, train=True, mutable=["batch_stats"])
    for layer in ("bn1", "bn2"):
        for stat in ("mean", "var"):
            np.testing.assert_allclose(out["batch_stats"][layer][stat], updated["batch_stats"][layer][stat],
                                       rtol=1e-5, atol=1e-6)
    # by hand for the first layer: mean / biased variance of conv1's output over (N, H, W)
    conv1 = nn.Conv(6, (3, 3))
    h = np.asarray(conv1.apply({"params": variables["params"]["conv1"]}, x), np.float64)
    np.testing.assert_allclose(out["batch_stats"]["bn1"]["mean"], h.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["batch_stats"]["bn1"]["var"], h.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    # no weight changed
    jax.tree.map(np.testing.assert_array_equal, out["params"], variables["params"])


def test_several_batches_average_their_statistics():
    model, variables, x = _setup()
    apply = functools.partial(model.apply, train=False)
    stats = batch_statistics(apply, variables, x, batches=4, batch_size=8, seed=3)
    order = np.random.default_rng(3).permutation(len(x))
    per = [batch_statistics(apply, variables, x[order[i * 8:(i + 1) * 8]], batches=1, batch_size=8)
           for i in range(4)]
    for key in stats:
        np.testing.assert_allclose(stats[key][0], np.mean([p[key][0] for p in per], axis=0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(stats[key][1], np.mean([p[key][1] for p in per], axis=0), rtol=1e-5, atol=1e-7)


def test_recalibration_changes_eval_outputs_and_zero_batches_changes_nothing():
    model, variables, x = _setup()
    apply = functools.partial(model.apply, train=False)
    assert recalibrate_bn(apply, variables, x, batches=0) is variables
    out = recalibrate_bn(apply, variables, x, batches=2, batch_size=16)
    assert not np.allclose(apply(out, x), apply(variables, x))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_bad_batch_counts_name_the_key(bad):
    with pytest.raises(ValueError, match="recalibrate_bn"):
        check_batches(bad)


def test_auto_is_twenty_batches_only_where_there_are_batchnorm_statistics():
    with_bn = {"params": {"w": np.ones(2)}, "batch_stats": {"bn": {"mean": np.zeros(2), "var": np.ones(2)}}}
    assert AUTO_BATCHES == 20
    assert resolve_batches("auto", with_bn) == 20
    assert resolve_batches("auto", {"params": {"w": np.ones(2)}}) == 0
    assert resolve_batches("auto", {"params": {"w": np.ones(2)}, "batch_stats": {}}) == 0
    assert resolve_batches(3, {"params": {}}) == 3
    with pytest.raises(ValueError, match="finetune.recalibrate_bn .* or 'auto'"):
        resolve_batches("Auto", with_bn, "finetune.recalibrate_bn")
