"""``coblax.allocate`` on a user's own model: every collection, shared layers, rules,
every allocator, fine-tuning with BatchNorm/dropout/own state, safe export."""

from __future__ import annotations

import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import coblax
from coblax import BudgetError, allocate, allocator_names, finetune, load_factored, save_factored
from coblax.lowrank.costs import count_params
from coblax.lowrank.decompose import (
    factored_apply,
    factorize,
    get_kernel,
    masked_scales,
    trace_layers,
    truncate,
)
from coblax.nn.bn import recalibrate_bn
from coblax.nn.data import load_dataset
from coblax.nn.train import evaluate, fit

EVAL = {"train": False}


class Net(nn.Module):
    """BatchNorm, a depthwise conv, a Dense layer called twice, dropout, an own collection."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), padding="SAME", use_bias=False, name="conv1")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(x))
        x = nn.Conv(8, (3, 3), padding="SAME", feature_group_count=8, name="dw")(x)
        x = nn.Conv(12, (3, 3), strides=2, padding="SAME", name="conv2")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn2")(x))
        h = nn.relu(nn.Dense(24, name="fc1")(x.reshape(x.shape[0], -1)))
        shared = nn.Dense(24, name="shared")
        h = nn.relu(shared(nn.relu(shared(h))))  # one weight matrix, two calls
        h = nn.Dropout(0.2, deterministic=not train)(h)
        steps = self.variable("counter", "steps", lambda: jnp.zeros((), jnp.int32))
        if train:
            steps.value += 1
        return nn.Dense(10, name="head")(h)


RULES = [("dw", "skip"), ("conv.*", "tai"), ("fc1|shared", "dense")]


@functools.lru_cache(maxsize=1)
def trained_lenet():
    data = load_dataset("digits", seed=0)
    model = Net()
    v0 = model.init(jax.random.PRNGKey(0), jnp.asarray(data.x_train[:1]))
    variables = fit(functools.partial(model.apply, train=True), v0, data.x_train, data.y_train, epochs=3,
                    batch_size=64, learning_rate=3e-3, seed=0, progress=False,
                    mutable=("batch_stats", "counter"), rng_streams=("dropout",))
    return model, v0, variables, data


def test_fit_updates_state_collections_and_is_reproducible():
    model, v0, variables, data = trained_lenet()
    steps = 3 * (len(data.x_train) // 64)
    assert int(variables["counter"]["steps"]) == steps
    assert not np.allclose(variables["batch_stats"]["bn1"]["mean"], v0["batch_stats"]["bn1"]["mean"])
    again = fit(functools.partial(model.apply, train=True), v0, data.x_train[:256], data.y_train[:256],
                epochs=1, batch_size=64, seed=0, progress=False, mutable=("batch_stats", "counter"),
                rng_streams=("dropout",))
    twice = fit(functools.partial(model.apply, train=True), v0, data.x_train[:256], data.y_train[:256],
                epochs=1, batch_size=64, seed=0, progress=False, mutable=("batch_stats", "counter"),
                rng_streams=("dropout",))
    assert jax.tree_util.tree_all(jax.tree.map(np.array_equal, again, twice))
    acc = evaluate(functools.partial(model.apply, **EVAL), variables, data.x_test, data.y_test)
    assert acc > 0.8


def test_fit_without_dropout_key_fails_loudly():
    model, v0, _, data = trained_lenet()
    with pytest.raises(Exception, match="dropout"):
        fit(functools.partial(model.apply, train=True), v0, data.x_train[:64], data.y_train[:64], epochs=1,
            batch_size=64, progress=False, mutable=("batch_stats", "counter"))


def test_shared_layer_decomposed_once_cost_per_call_and_exact_at_m1():
    model, _, variables, data = trained_lenet()
    x = jnp.asarray(data.x_test[:16])
    traced = {l.name: l for l in trace_layers(model, variables, x, EVAL)}
    assert traced["shared"].macs == 2 * 24 * 24 and len(traced["shared"].call_shapes) == 2
    fs = {n: factorize(get_kernel(variables, n), traced[n], "zhang") for n in ("conv1", "conv2", "fc1", "shared")}
    out = factored_apply(model, variables, fs, x, masked_scales(fs, {n: jnp.ones_like(f.sigma) for n, f in fs.items()}),
                         **EVAL)
    ref = model.apply(variables, x, **EVAL)
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 1e-5
    result = allocate(model, variables, (data.x_train[:200], data.y_train[:200]), rules=RULES, mac=0.5,
                      param=0.5, method="uniform", apply_kwargs=EVAL)
    shared = {l.name: l for l in result.cost.layers}["shared"]
    assert shared.mac_per_rank == 2 * (24 + 24) and shared.param_per_rank == 24 + 24
    assert shared.original_macs == 2 * 24 * 24 and shared.original_params == 24 * 24


def test_allocate_result_costs_and_collections():
    model, _, variables, data = trained_lenet()
    result = allocate(model, variables, (data.x_train[:200], data.y_train[:200]), rules=RULES, mac=0.5,
                      param=0.4, method="uniform", apply_kwargs=EVAL)
    assert set(result.ranks) == {"conv1", "conv2", "fc1", "shared"}
    assert result.schemes == {"conv1": "tai", "conv2": "tai", "fc1": "dense", "shared": "dense"}
    assert result.mac_ratio <= 0.5 + 1e-9 and result.param_ratio <= 0.4 + 1e-9
    assert set(result.variables) == {"params", "factors", "batch_stats", "counter"}
    # Only params (and factors) count: the factored network's real parameter count is result.params.
    trainable = count_params(result.variables) + count_params(result.variables["factors"])
    assert trainable == result.params
    assert result.cost.total_params == count_params(variables) < sum(
        np.size(a) for a in jax.tree_util.tree_leaves(variables))
    logits = result.apply(result.variables, jnp.asarray(data.x_test[:5]))
    assert logits.shape == (5, 10) and np.all(np.isfinite(np.asarray(logits)))
    assert result.network_mac_ratio == result.macs / result.cost.total_macs


def _top_r_accuracy(model, variables, data, result, whitened_on=None, recalibrate_on=None) -> float:
    """Accuracy of a hand-built truncation: each factored layer's full SVD cut to its top
    ``result.ranks`` triplets at multiplier 1, run through ``factored_apply``. With
    ``whitened_on`` (inputs), the SVD in the metric of the layers' inputs (BALF's)."""
    x = jnp.asarray(data.x_test[:1])
    traced = {l.name: l for l in trace_layers(model, variables, x, EVAL)}
    factors = {}
    whitened = None
    if whitened_on is not None:
        from coblax.lowrank.spectra import whitened_factors

        whitened = whitened_factors(model, variables, [traced[n] for n in result.factors],
                                    {n: f.scheme for n, f in result.factors.items()}, whitened_on)
    for name in result.factors:
        full = whitened[name] if whitened else factorize(get_kernel(variables, name), traced[name],
                                                         result.factors[name].scheme)
        keep = np.zeros(len(np.asarray(full.sigma)))
        keep[: result.ranks[name]] = 1.0
        factors[name] = truncate(full, keep)
    def apply(v, xb):
        return factored_apply(model, v, factors, xb, **EVAL)

    if recalibrate_on is not None:  # one batch of all of them: that batch's exact statistics
        variables = recalibrate_bn(apply, variables, recalibrate_on, batches=1, batch_size=len(recalibrate_on))
    return evaluate(apply, variables, data.x_test, data.y_test)


# |acc - acc of the top-r truncation at the same ranks|: every baseline keeps the top r
# triplets at multiplier 1, so only float round-off may move a test image (band: 2 of
# 360 images); COBLA keeps the triplets by σ·m̂ scaled by m̂ (mask_values="relaxed"),
# so its network is a different one at the same ranks (band: 15 points).
BAND = {"cobla": 0.15}


@pytest.mark.parametrize("method", allocator_names())
def test_every_allocator_through_allocate(method):
    model, _, variables, data = trained_lenet()
    options = {"cobla": {"max_iter": 5, "roundings": 2, "saturation_rounds": 1},
               "lc": {"steps": 2, "l_steps": 5, "lr": 0.01}}.get(method, {})
    result = allocate(model, variables, (data.x_train[:200], data.y_train[:200]), rules=RULES, mac=0.6,
                      param=0.6, method=method, method_options=options, apply_kwargs=EVAL,
                      validation_data=(data.x_train[200:300], data.y_train[200:300]))
    assert result.mac_ratio <= 0.6 + 1e-9 and result.param_ratio <= 0.6 + 1e-9
    assert result.method == method
    acc = evaluate(result.apply, result.variables, data.x_test, data.y_test)
    whitened_on = data.x_train[:200] if method == "balf" else None  # BALF truncates the whitened SVD
    # allocate's default recalibrate_bn = "auto" re-estimates the BatchNorm statistics on
    # the 200 training images (fewer than one batch of 250: their exact statistics)
    start = getattr(result.allocation.weights, "variables", variables)  # LC hands on the network it trained
    reference = _top_r_accuracy(model, start, data, result, whitened_on, recalibrate_on=data.x_train[:200])
    assert abs(acc - reference) <= BAND.get(method, 2 / len(data.y_test)), (acc, reference)


def test_bad_rules_and_budgets_are_named():
    model, _, variables, data = trained_lenet()
    obj = (data.x_train[:50], data.y_train[:50])
    call = functools.partial(allocate, model, variables, obj, mac=0.5, param=0.5, method="uniform",
                             apply_kwargs=EVAL)
    with pytest.raises(ValueError, match="'block.*' matches no layer"):
        call(rules=[("block.*", "tai")])
    with pytest.raises(ValueError, match="unknown scheme 'svd'"):
        call(rules=[("conv1", "svd")])
    with pytest.raises(ValueError, match="layer 'dw' cannot be decomposed .grouped"):
        call(rules=[("conv.*|dw", "tai")])
    with pytest.raises(ValueError, match="layer 'conv1' is a convolution"):
        call(rules=[("conv1", "dense")])
    with pytest.raises(BudgetError, match=r"smallest feasible budget is mac >= 0\.\d+, param >= 0\.\d+"):
        call(rules=[("conv1", "tai")], basis="network", mac=0.05, param=0.05)
    with pytest.raises(ValueError, match="budget mac=0 must be in"):
        call(rules=RULES, mac=0)


def test_finetune_and_export_reproduce_accuracy(tmp_path):
    model, _, variables, data = trained_lenet()
    result = allocate(model, variables, (data.x_train[:300], data.y_train[:300]), rules=RULES, mac=0.4,
                      param=0.4, method=coblax.allocators.cobla(max_iter=10, roundings=3), apply_kwargs=EVAL)
    tuned = finetune(result, data.x_train, data.y_train, train_kwargs={"train": True}, epochs=2,
                     learning_rate=1e-3)
    steps = 2 * (len(data.x_train) // 64)
    assert int(tuned.variables["counter"]["steps"]) == int(variables["counter"]["steps"]) + steps
    assert not np.allclose(tuned.variables["batch_stats"]["bn2"]["var"], result.variables["batch_stats"]["bn2"]["var"])
    acc = evaluate(tuned.apply, tuned.variables, data.x_test, data.y_test)
    path = tmp_path / "net.npz"
    size = save_factored(path, tuned, meta={"accuracy": acc, "ranks": tuned.ranks})
    assert size.total_bytes == path.stat().st_size and size.path == path and size.format == "coblax-factored-1"
    with np.load(path, allow_pickle=False) as f:
        keys = set(f.files)
    assert "params/conv1/first/kernel" in keys and "params/conv1/second/kernel" in keys
    assert "params/conv1/kernel" not in keys and "batch_stats/bn1/mean" in keys
    loaded = load_factored(path, Net())
    assert loaded.meta["accuracy"] == acc
    assert evaluate(loaded.apply, loaded.variables, data.x_test, data.y_test) == acc
    x = jnp.asarray(data.x_test[:32])
    np.testing.assert_allclose(loaded.apply(loaded.variables, x), tuned.apply(tuned.variables, x), rtol=1e-5, atol=1e-5)


def test_public_surface():
    for name in ("allocate", "finetune", "Compressed", "save_factored", "load_factored"):
        assert name in coblax.__all__


#: ``coblax run`` on a tiny zoo ResNet (BatchNorm, residual adds) on digits: one budget, one epoch
RESNET_RUN = """
methods = {methods}
models = [{{ name = "resnet20", blocks = 1, widths = [4, 8, 8] }}]
[data]
name = "digits"
limit_train = 300
[train]
epochs = 1
[budgets]
mac = [{budget}]
param = [{budget}]
{extra}
[finetune]
epochs = 1
{finetune}
"""


def test_runner_trains_batchnorm_zoo_model_in_training_mode(tmp_path):
    """``coblax run`` on a BatchNorm zoo model: running statistics are learned, not left at init."""
    import os

    from coblax.app.cli import main

    cfg = tmp_path / "cfg.toml"
    cfg.write_text(RESNET_RUN.format(methods='["uniform"]', budget=0.6, extra="", finetune=""))
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    (path,) = (Path(os.environ["COBLAX_CACHE"]) / "models").glob("resnet20-*.npz")
    with np.load(path, allow_pickle=False) as f:
        assert "batch_stats/bn1/mean" in f.files
        assert np.any(f["batch_stats/bn1/mean"] != 0)
