"""COBLA's E(m) with BatchNorm's running, batch or recalibrated statistics (``cobla.bn_stats``).

References: a NumPy forward pass of a dense-BN-dense network (batch moments by hand,
zero-weight padding excluded), flax's own training-mode BatchNorm, finite differences.
"""

from __future__ import annotations

from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coblax.lowrank.decompose import factorize, get_kernel, trace_layers
from coblax.lowrank.objective import NetworkLoss
from coblax.nn.models import build_model

EPS = 1e-5


class DenseBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Dense(6, name="fc1")(x)
        h = nn.BatchNorm(use_running_average=not train, epsilon=EPS, name="bn")(h)
        return nn.Dense(3, name="fc2")(nn.relu(h))


class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Conv(4, (3, 3), name="conv1")(x)
        h = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(h))
        h = nn.Conv(5, (3, 3), strides=2, name="conv2")(h)
        h = nn.relu(nn.BatchNorm(use_running_average=not train, use_fast_variance=False, name="bn2")(h))
        return nn.Dense(3, name="fc")(jnp.mean(h, axis=(1, 2)))


def _problem(model, x, dtype=np.float64):
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    rng = np.random.default_rng(7)
    # non-trivial scale/bias and stale running statistics, so that every mode differs
    variables = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.asarray(rng.normal(1.0, 0.3, a.shape) if "scale" in str(p) or "var" in str(p)
                                 else rng.normal(0.0, 0.3, a.shape) if "bias" in str(p) or "mean" in str(p)
                                 else a), variables)
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), variables)
    layers = [l for l in trace_layers(model, variables, jnp.asarray(x[:1])) if l.decomposable]
    return variables, {l.name: factorize(get_kernel(variables, l.name), l, "tai") for l in layers}


def _data(n, shape=(5,), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.5, 1.5, size=(n,) + shape)
    return x, rng.integers(0, 3, size=n).astype(np.int32)


def _masked(f, m):
    return np.asarray(f.first) @ np.diag(m * np.asarray(f.sigma)) @ np.asarray(f.second)


def _reference(variables, fs, m, batches, mode):
    """NumPy E(m) of DenseBN over ``batches`` (lists of row arrays), ``mode`` "batch" or "recalibrated"."""
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    r1 = fs["fc1"].sigma.shape[0]
    w1, w2 = _masked(fs["fc1"], m[:r1]), _masked(fs["fc2"], m[r1:])
    pre = [xb @ w1 + p["fc1"]["bias"] for xb, _ in batches]
    stats = [(h.mean(0), h.var(0)) for h in pre]
    if mode == "recalibrated":
        n = np.array([len(h) for h in pre], float)
        mu = sum(k * s[0] for k, s in zip(n, stats)) / n.sum()
        var = sum(k * s[1] for k, s in zip(n, stats)) / n.sum()
        stats = [(mu, var)] * len(pre)
    total, count = 0.0, 0
    for h, (mu, var), (_, yb) in zip(pre, stats, batches):
        z = (h - mu) / np.sqrt(var + EPS) * p["bn"]["scale"] + p["bn"]["bias"]
        out = np.maximum(z, 0) @ w2 + p["fc2"]["bias"]
        logp = out - out.max(1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
        total += -logp[np.arange(len(yb)), yb].sum()
        count += len(yb)
    return total / count


@pytest.mark.parametrize("mode", ["batch", "recalibrated"])
def test_batch_and_recalibrated_match_numpy_reference_with_padding(mode):
    with jax.enable_x64(True):
        x, y = _data(37)
        variables, fs = _problem(DenseBN(), x)
        loss = NetworkLoss(DenseBN(), variables, fs, (x, y), batch_size=16, bn_stats=mode)
        m = np.random.default_rng(1).uniform(0.2, 1.0, size=loss.size)
        # batch_stack: 37 examples in 3 even batches of 13 (the last with 2 zero-weight padding rows)
        batches = [(x[i:i + 13], y[i:i + 13]) for i in (0, 13, 26)]
        assert loss.value(m) == pytest.approx(_reference(variables, fs, m, batches, mode), rel=1e-5)


def test_one_batch_batch_mode_matches_numpy_and_running_differs():
    with jax.enable_x64(True):
        x, y = _data(12)
        variables, fs = _problem(DenseBN(), x)
        m = np.random.default_rng(2).uniform(0.2, 1.0, size=8)
        ref = _reference(variables, fs, m, [(x, y)], "batch")
        batch = NetworkLoss(DenseBN(), variables, fs, (x, y), batch_size=64, bn_stats="batch")
        running = NetworkLoss(DenseBN(), variables, fs, (x, y), batch_size=64)
        assert batch.value(m) == pytest.approx(ref, rel=1e-5)
        assert abs(running.value(m) - ref) > 1e-2  # stale statistics: a different network


def test_recalibrated_on_one_batch_equals_batch():
    x, y = _data(24, (6, 6, 2))
    variables, fs = _problem(ConvBN(), x, np.float32)
    batch = NetworkLoss(ConvBN(), variables, fs, (x, y), batch_size=32, bn_stats="batch")
    recal = batch.with_bn_stats("recalibrated")
    assert recal.bn_stats == "recalibrated" and recal.with_bn_stats("batch") is batch  # variants shared
    m = np.random.default_rng(3).uniform(0.1, 1.0, size=batch.size)
    (vb, gb), (vr, gr) = batch.value_and_grad(m), recal.value_and_grad(m)
    assert vr == pytest.approx(vb, rel=1e-5)
    np.testing.assert_allclose(gr, gb, rtol=1e-4, atol=1e-6)


def test_batch_mode_equals_flax_training_mode_at_full_masks():
    """At m = 1 the factored network is the original: E is the training-mode forward's cross-entropy."""
    with jax.enable_x64(True):
        x, y = _data(20, (6, 6, 2))
        variables, fs = _problem(ConvBN(), x)
        loss = NetworkLoss(ConvBN(), variables, fs, (x, y), batch_size=32, bn_stats="batch")
        logits, _ = ConvBN().apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
        ref = float(jnp.mean(-jax.nn.log_softmax(logits)[np.arange(len(y)), y]))
        assert loss.value(np.ones(loss.size)) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("mode", ["batch", "recalibrated"])
def test_gradient_matches_central_differences(mode):
    with jax.enable_x64(True):
        x, y = _data(30, (6, 6, 2))
        variables, fs = _problem(ConvBN(), x)
        loss = NetworkLoss(ConvBN(), variables, fs, (x, y), (x[:9], y[:9]), batch_size=12, bn_stats=mode)
        rng = np.random.default_rng(4)
        m = rng.uniform(0.2, 0.9, size=loss.size)
        value, grad = loss.value_and_grad(m)
        h = 1e-6
        for i in rng.choice(loss.size, size=10, replace=False):
            e = np.zeros_like(m)
            e[i] = h
            fd = (loss.value(m + e) - loss.value(m - e)) / (2 * h)
            assert grad[i] == pytest.approx(fd, rel=1e-5, abs=1e-8)
        assert value == pytest.approx(loss.value(m))
        assert loss.compiled_count() == 1


def test_recalibrated_validation_uses_statistics_of_the_objective_subset():
    with jax.enable_x64(True):
        x, y = _data(30)
        xv, yv = _data(10, seed=5)
        variables, fs = _problem(DenseBN(), x)
        loss = NetworkLoss(DenseBN(), variables, fs, (x, y), (xv, yv), batch_size=30, bn_stats="recalibrated")
        m = np.random.default_rng(6).uniform(0.2, 1.0, size=loss.size)
        # reference: the objective subset's statistics at m, applied to the validation rows
        p = jax.tree_util.tree_map(np.asarray, variables["params"])
        w1, w2 = _masked(fs["fc1"], m[:5]), _masked(fs["fc2"], m[5:])
        h = x @ w1 + p["fc1"]["bias"]
        hv = xv @ w1 + p["fc1"]["bias"]
        z = (hv - h.mean(0)) / np.sqrt(h.var(0) + EPS) * p["bn"]["scale"] + p["bn"]["bias"]
        out = np.maximum(z, 0) @ w2 + p["fc2"]["bias"]
        logp = out - np.log(np.exp(out).sum(1, keepdims=True))
        val_loss, val_acc = loss.validation_metrics(m)
        assert val_loss == pytest.approx(-logp[np.arange(10), yv].mean(), rel=1e-6)
        assert val_acc == pytest.approx(np.mean(out.argmax(1) == yv))


def test_models_without_batchnorm_give_identical_e_in_every_mode():
    model = build_model("small_cnn", num_classes=10, channels=(4, 6, 8), dense=12)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(37, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=37).astype(np.int32)
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    layers = [l for l in trace_layers(model, variables, jnp.asarray(x[:1])) if l.decomposable]
    fs = {l.name: factorize(get_kernel(variables, l.name), l, "tai") for l in layers}
    running = NetworkLoss(model, variables, fs, (x, y), (x[:10], y[:10]), batch_size=16)
    m = rng.uniform(0.1, 1.0, size=running.size)
    v0, g0 = running.value_and_grad(m)
    for mode in ("batch", "recalibrated"):
        other = running.with_bn_stats(mode)
        v, g = other.value_and_grad(m)
        assert v == pytest.approx(v0, rel=1e-6)
        np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-7)
        assert other.validation_metrics(m) == pytest.approx(running.validation_metrics(m), rel=1e-6)


def test_bad_bn_stats_names_its_key():
    from coblax.lowrank.cobla import COBLA

    with pytest.raises(ValueError, match="cobla bn_stats"):
        COBLA(bn_stats="stale")
    x, y = _data(8)
    variables, fs = _problem(DenseBN(), x, np.float32)
    with pytest.raises(ValueError, match="bn_stats"):
        NetworkLoss(DenseBN(), variables, fs, (x, y), bn_stats="train")


class DropBN(nn.Module):
    rate: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(nn.Dense(6, name="fc1")(x)))
        h = nn.Dropout(self.rate, deterministic=not train)(h)
        return nn.Dense(3, name="fc2")(h)


def test_batch_mode_keeps_dropout_off():
    """The model's train flag would also switch dropout on: batch statistics come without it."""
    x, y = _data(16)
    x = x.astype(np.float32)
    variables, fs = _problem(DropBN(), x, np.float32)
    loss = NetworkLoss(DropBN(), variables, fs, (x, y), batch_size=16, bn_stats="batch")
    logits, _ = DropBN(rate=0.0).apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    ref = float(jnp.mean(-jax.nn.log_softmax(logits)[np.arange(len(y)), y]))
    ones = np.ones(loss.size)
    assert loss.value(ones) == pytest.approx(ref, rel=1e-5)
    assert loss.value(ones) == loss.value(ones)  # deterministic: no dropout key drawn


def test_allocate_runs_cobla_with_batch_statistics():
    """Through coblax.allocate: the allocator switches the oracle, and its stats are the batch-mode E."""
    import coblax
    from coblax.lowrank.rounding import flat_mask

    x, y = _data(48, (6, 6, 2))
    x = x.astype(np.float32)
    variables, fs = _problem(ConvBN(), x, np.float32)
    fs = {n: fs[n] for n in ("conv1", "conv2")}
    method = coblax.allocators.cobla(max_iter=5, roundings=2, local_search=0, polish=0, bn_stats="batch")
    result = coblax.allocate(ConvBN(), variables, (x, y), rules=[("conv.*", "tai")], mac=0.6, param=0.6,
                             method=method, apply_kwargs={"train": False}, batch_size=16)
    alloc = result.allocation
    loss = NetworkLoss(ConvBN(), variables, fs, (x, y), batch_size=16, bn_stats="batch")
    problem = SimpleNamespace(layers=[SimpleNamespace(name=n, full_rank=fs[n].sigma.shape[0]) for n in fs])
    m = flat_mask(problem, alloc.masks)
    assert alloc.stats["rounded_objective"] == pytest.approx(loss.value(m), rel=1e-5)
    assert alloc.stats["rounded_objective"] != pytest.approx(loss.with_bn_stats("running").value(m), rel=1e-3)


def test_auto_takes_batch_statistics_only_where_the_network_has_batch_norm():
    """bn_stats = "auto": the BatchNorm net's E is the batch-mode E (as with
    bn_stats = "batch"), a net without BatchNorm keeps the running mode (no second compile)."""
    import coblax
    from coblax.lowrank.rounding import flat_mask

    x, y = _data(48, (6, 6, 2))
    x = x.astype(np.float32)
    variables, fs = _problem(ConvBN(), x, np.float32)
    fs = {n: fs[n] for n in ("conv1", "conv2")}
    assert coblax.allocators.cobla().bn_stats == "auto"  # the default (see README)
    method = coblax.allocators.cobla(max_iter=5, roundings=2, local_search=0, polish=0, bn_stats="auto")
    result = coblax.allocate(ConvBN(), variables, (x, y), rules=[("conv.*", "tai")], mac=0.6, param=0.6,
                             method=method, apply_kwargs={"train": False}, batch_size=16)
    alloc = result.allocation
    assert alloc.stats["bn_stats"] == "batch"
    loss = NetworkLoss(ConvBN(), variables, fs, (x, y), batch_size=16, bn_stats="batch")
    problem = SimpleNamespace(layers=[SimpleNamespace(name=n, full_rank=fs[n].sigma.shape[0]) for n in fs])
    assert alloc.stats["rounded_objective"] == pytest.approx(loss.value(flat_mask(problem, alloc.masks)), rel=1e-5)

    import flax.linen as nn

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
            return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))

    plain = Plain()
    pv = plain.init(jax.random.PRNGKey(0), x[:1])
    result = coblax.allocate(plain, pv, (x, y % 3), rules=[("conv.*", "tai")], mac=0.6, param=0.6, method=method,
                             batch_size=16)
    assert result.allocation.stats["bn_stats"] == "running"
