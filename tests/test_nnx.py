"""flax.nnx models through ``allocate`` / ``finetune`` / export: the linen twins as references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coblax import BudgetError, allocate, finetune, load_factored, save_factored
from coblax.lowrank.costs import network_cost
from coblax.lowrank.decompose import factorize, get_kernel, trace_layers, truncate
from coblax.lowrank.nnx_adapter import (
    Factored,
    build_factored,
    factored_calls,
    find_layers,
    hooked_copy,
    trace_nnx,
)
from coblax.lowrank.nnx_api import NnxNetworkLoss
from coblax.lowrank.objective import NetworkLoss
from coblax.nn import models as zoo
from coblax.nn import models_nnx as zoo_nnx
from coblax.nn.data import load_dataset
from coblax.nn.train import evaluate
from coblax.nn.train_nnx import eval_apply, evaluate_nnx, fit_nnx
from coblax.util.errors import NumericalError


class Steps(nnx.Variable):
    """A model's own variable type: counts training calls."""


class Net(nnx.Module):
    """BatchNorm, a depthwise conv, a Linear called twice, dropout, an own variable type."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.dw = nnx.Conv(8, 8, (3, 3), padding="SAME", feature_group_count=8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 12, (3, 3), strides=2, padding="SAME", rngs=rngs)
        self.bn2 = nnx.BatchNorm(12, rngs=rngs)
        self.fc1 = nnx.Linear(4 * 4 * 12, 24, rngs=rngs)
        self.shared = nnx.Linear(24, 24, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.head = nnx.Linear(24, 10, rngs=rngs)
        self.steps = Steps(jnp.zeros((), jnp.int32))
        self.deterministic = False  # Module.eval() / .train() set it

    def __call__(self, x):
        if not self.deterministic:
            self.steps[...] += 1
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(self.dw(x))))
        h = nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))
        h = nnx.relu(self.shared(nnx.relu(self.shared(h))))  # one weight matrix, two calls
        return self.head(self.drop(h))


RULES = [("dw", "skip"), ("conv.*", "tai"), ("fc1|shared", "dense")]


@functools.lru_cache(maxsize=1)
def _trained():
    data = load_dataset("digits", seed=0)
    model = fit_nnx(Net(nnx.Rngs(0)), data.x_train, data.y_train, epochs=3, batch_size=64, learning_rate=3e-3,
                    progress=False)
    return model, data


def _leaves(tree):
    return [np.asarray(jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a)
            for a in jax.tree_util.tree_leaves(tree)]


def _same(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


# ---------------------------------------------------------------- the zoo twins


def _linen_variables(twin: nnx.Module) -> dict:
    """The linen twin's variables, by path: ``params`` from the Params, ``batch_stats`` from the BatchStats.

    (Built from the nnx twin: ``linen.init`` of ResNet-20 alone takes ~20 s on the
    shared machine; :func:`load_linen_variables` is checked to invert this exactly.)
    """
    out: dict = {}
    for kind, collection in ((nnx.Param, "params"), (nnx.BatchStat, "batch_stats")):
        for path, var in nnx.to_flat_state(nnx.state(twin, kind)):
            node = out.setdefault(collection, {})
            for part in path[:-1]:
                node = node.setdefault(str(part), {})
            node[str(path[-1])] = var[...]
    return out


def _twins(name: str, x: np.ndarray):
    linen = {"lenet5": zoo.LeNet5(), "resnet20": zoo.ResNet20(blocks=1)}[name]
    cls = {"lenet5": zoo_nnx.LeNet5, "resnet20": functools.partial(zoo_nnx.ResNet20, blocks=1)}[name]
    source = cls(x.shape[1:], rngs=nnx.Rngs(3))
    for path, var in nnx.to_flat_state(nnx.state(source, nnx.BatchStat)):  # non-trivial running statistics
        var[...] = var[...] + 0.1 * jnp.arange(var[...].size, dtype=jnp.float32) / var[...].size + 0.05 * len(path)
    variables = _linen_variables(source)
    assert jax.tree.structure(variables) == jax.tree.structure(
        jax.eval_shape(linen.init, jax.random.PRNGKey(0), jnp.asarray(x[:1])))
    twin = zoo_nnx.load_linen_variables(cls(x.shape[1:], rngs=nnx.Rngs(0)), variables)
    assert _same(nnx.state(twin), nnx.state(source))
    return linen, variables, twin


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_twins_same_costs_and_same_logits_at_m1(name):
    data = load_dataset("digits", seed=0)
    x = data.x_test[:64]
    linen, variables, twin = _twins(name, x)
    apply, state = eval_apply(twin)
    ref = linen.apply(variables, jnp.asarray(x))
    np.testing.assert_allclose(apply(state, jnp.asarray(x)), ref, rtol=0, atol=1e-5)
    # same layers, shapes, strides, pads and MACs; same cost vectors and totals
    t_linen, t_nnx = trace_layers(linen, variables, jnp.asarray(x[:1])), trace_nnx(twin, x[:1])
    assert t_nnx == t_linen
    scheme = "tai"
    full = {l.name: factorize(get_kernel(variables, l.name), l, scheme) for l in t_linen if l.decomposable}
    full_nnx = {l.name: factorize(find_layers(twin)[l.name].kernel[...], l, scheme) for l in t_nnx if l.decomposable}
    sig = {n: np.asarray(f.sigma) for n, f in full.items()}
    c_linen = network_cost(t_linen, variables, sig, scheme)
    c_nnx = network_cost(t_nnx, {"params": nnx.state(twin, nnx.Param)}, sig, scheme)
    assert (c_nnx.total_macs, c_nnx.total_params, c_nnx.fixed_macs, c_nnx.fixed_params) == (
        c_linen.total_macs, c_linen.total_params, c_linen.fixed_macs, c_linen.fixed_params)
    assert [(l.name, l.mac_per_rank, l.param_per_rank, l.original_macs, l.original_params) for l in c_nnx.layers] == [
        (l.name, l.mac_per_rank, l.param_per_rank, l.original_macs, l.original_params) for l in c_linen.layers]
    # m = 1: the masked network (E(m)'s) and the built two-layer network equal the original
    scales = {n: f.sigma for n, f in full_nnx.items()}
    g, s = nnx.split(hooked_copy(twin))
    with factored_calls(full_nnx, scales):
        masked = nnx.merge(g, s)(jnp.asarray(x))
    np.testing.assert_allclose(masked, ref, rtol=0, atol=1e-5)
    kept = {n: truncate(f, np.ones(f.sigma.shape[0])) for n, f in full_nnx.items()}
    built_apply, built_state = eval_apply(build_factored(twin, kept))
    np.testing.assert_allclose(built_apply(built_state, jnp.asarray(x)), ref, rtol=0, atol=1e-5)
    if name != "lenet5":
        return  # the objectives' compilation is slow; one network shows they agree
    # E(m) at m = 1 and at a random m: nnx and linen objectives agree
    y = data.y_test[:64]
    e_linen = NetworkLoss(linen, variables, full, (x, y), batch_size=32)
    e_nnx = NnxNetworkLoss(twin, full_nnx, (x, y), batch_size=32)
    for m in (np.ones(e_linen.size), np.random.default_rng(0).uniform(size=e_linen.size)):
        (v1, g1), (v2, g2) = e_linen.value_and_grad(m), e_nnx.value_and_grad(m)
        assert abs(v1 - v2) < 1e-5
        np.testing.assert_allclose(g2, g1, rtol=1e-3, atol=1e-5)


def test_twin_allocations_equal_linen():
    data = load_dataset("digits", seed=0)
    x, y = data.x_train[:120], data.y_train[:120]
    linen, variables, twin = _twins("lenet5", x)
    rules = [("conv1", "skip"), ("conv2", "tai"), ("fc.*", "dense")]
    for method, options in (("uniform", {}), ("cobla", {"max_iter": 3, "roundings": 2})):
        a = allocate(linen, variables, (x, y), rules=rules, mac=0.4, param=0.4, method=method,
                     method_options=options)
        b = allocate(twin, (x, y), rules=rules, mac=0.4, param=0.4, method=method, method_options=options)
        assert b.ranks == a.ranks and (b.macs, b.params, b.mac_ratio, b.param_ratio) == (
            a.macs, a.params, a.mac_ratio, a.param_ratio)
        xt = jnp.asarray(data.x_test[:50])
        np.testing.assert_allclose(b.apply(b.variables, xt), a.apply(a.variables, xt), rtol=0, atol=1e-5)
        assert isinstance(b.model.conv2, Factored) and b.model.conv2.first.kernel[...].shape[-1] == b.ranks["conv2"]


# ---------------------------------------------------------------- a user's nnx model


def test_allocate_finetune_evaluate_with_batchnorm_and_own_state():
    model, data = _trained()
    before = nnx.state(model)
    base_acc = evaluate_nnx(model, data.x_test, data.y_test)
    assert base_acc > 0.8
    result = allocate(model, (data.x_train[:300], data.y_train[:300]), rules=RULES, mac=0.5, param=0.5,
                      method="cobla", validation_data=(data.x_train[300:400], data.y_train[300:400]),
                      method_options={"max_iter": 5, "roundings": 2})
    assert _same(nnx.state(model), before)  # the user's model is not touched
    assert set(result.ranks) == {"conv1", "conv2", "fc1", "shared"}
    assert result.mac_ratio <= 0.5 + 1e-9 and result.param_ratio <= 0.5 + 1e-9
    # the shared layer: one factored pair serving both calls, MACs per call
    shared = {l.name: l for l in result.cost.layers}["shared"]
    assert shared.mac_per_rank == 2 * (24 + 24) and shared.original_macs == 2 * 24 * 24
    # every variable type comes along; only Params count as parameters
    assert isinstance(result.model.bn2, nnx.BatchNorm) and isinstance(result.model.drop, nnx.Dropout)
    assert int(result.model.steps[...]) == int(model.steps[...])
    n_params = sum(a.size for a in jax.tree_util.tree_leaves(nnx.state(result.model, nnx.Param)))
    assert n_params == result.params
    acc = evaluate(result.apply, result.variables, data.x_test, data.y_test)
    assert acc > 0.3
    x, y = data.x_train[:640], data.y_train[:640]
    tuned = finetune(result, x, y, epochs=2, learning_rate=1e-3)
    steps = 2 * (len(x) // 64)
    assert int(tuned.model.steps[...]) == int(result.model.steps[...]) + steps  # trained in train mode
    assert not np.allclose(tuned.model.bn2.var[...], result.model.bn2.var[...])
    assert tuned.model.drop.deterministic and tuned.model.bn2.use_running_average  # back in eval mode
    tuned_acc = evaluate(tuned.apply, tuned.variables, data.x_test, data.y_test)
    assert tuned_acc > acc and tuned_acc > 0.7
    again = finetune(result, x, y, epochs=2, learning_rate=1e-3)
    assert _same(again.variables, tuned.variables)  # reproducible
    assert _same(result.variables, nnx.state(result.model))  # finetune made a copy


def test_export_round_trips_exactly(tmp_path):
    model, data = _trained()
    result = allocate(model, (data.x_train[:200], data.y_train[:200]), rules=RULES, mac=0.5, param=0.5,
                      method="uniform")
    tuned = finetune(result, data.x_train[:640], data.y_train[:640], epochs=1, learning_rate=1e-3)
    path = tmp_path / "net.npz"
    acc = evaluate(tuned.apply, tuned.variables, data.x_test, data.y_test)
    size = save_factored(path, tuned, meta={"accuracy": acc})
    assert size.total_bytes == path.stat().st_size and size.format == "coblax-factored-nnx-1"
    with np.load(path, allow_pickle=False) as f:
        keys = set(f.files)
    assert {"conv2/first/kernel", "conv2/second/kernel", "conv2/second/bias", "bn1/mean"} <= keys
    assert "conv2/kernel" not in keys and "steps" in keys
    loaded = load_factored(path, Net(nnx.Rngs(7)))
    assert loaded.meta["accuracy"] == acc
    assert _same(loaded.variables, tuned.variables)  # every variable, PRNG keys included, bit for bit
    x = jnp.asarray(data.x_test[:64])
    np.testing.assert_array_equal(loaded.apply(loaded.variables, x), tuned.apply(tuned.variables, x))
    assert evaluate(loaded.apply, loaded.variables, data.x_test, data.y_test) == acc
    with pytest.raises(ValueError, match="expected 'coblax-factored-1'"):
        load_factored(path, zoo.LeNet5())
    with pytest.raises(ValueError, match=r"head/bias is float32\(10,\), the model needs float32\(5,\)"):
        load_factored(path, FiveNet(nnx.Rngs(0)))


class FiveNet(Net):
    """Net with five classes: another model than the file's."""

    def __init__(self, rngs):
        super().__init__(rngs)
        self.head = nnx.Linear(24, 5, rngs=rngs)


def test_shared_layer_in_lists_is_one_layer():
    class Blocks(nnx.Module):
        def __init__(self, rngs):
            lin = nnx.Linear(6, 6, rngs=rngs)
            self.blocks = nnx.List([lin, nnx.Linear(6, 6, rngs=rngs), lin])
            self.out = nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x):
            for b in self.blocks:
                x = nnx.tanh(b(x))
            return self.out(x)

    model = Blocks(nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 3, 40)
    traced = {l.name: l for l in trace_nnx(model, x[:1])}
    assert list(traced) == ["blocks/0", "blocks/1", "out"]
    assert traced["blocks/0"].macs == 2 * 36 and len(traced["blocks/0"].call_shapes) == 2
    result = allocate(model, (x, y), rules=[(r"blocks/\d", "dense")], mac=0.7, param=0.7, method="uniform")
    blocks = result.model.blocks
    assert isinstance(blocks[0], Factored) and blocks[0] is blocks[2]
    assert {n: result.ranks[n] for n in ("blocks/0", "blocks/1")} == {"blocks/0": 2, "blocks/1": 2}


# ---------------------------------------------------------------- bad input


def test_errors_are_those_of_linen():
    data = load_dataset("digits", seed=0)
    x = data.x_train[:50]
    linen, variables, twin = _twins("lenet5", x)
    obj = (x, data.y_train[:50])

    def message(*args, **kwargs):
        with pytest.raises((ValueError, BudgetError)) as err:
            allocate(*args, **kwargs)
        return str(err.value)

    cases = [{"rules": [("block.*", "tai")]}, {"rules": [("conv1", "svd")]}, {"rules": [("conv1", "dense")]},
             {"rules": [("conv1", "tai")], "basis": "network", "mac": 0.05, "param": 0.05},
             {"rules": [("fc1", "dense")], "mac": 0}, {"rules": [("fc1", "dense")], "rank_multiple": 0}]
    for case in cases:
        kwargs = {"mac": 0.5, "param": 0.5, "method": "uniform"} | case
        assert message(twin, obj, **kwargs) == message(linen, variables, obj, **kwargs)
    model, _ = _trained()
    with pytest.raises(ValueError, match="layer 'dw' cannot be decomposed .grouped"):
        allocate(model, obj, rules=[("conv.*|dw", "tai")], mac=0.5, param=0.5)


def test_model_kind_arguments_are_named():
    data = load_dataset("digits", seed=0)
    x = data.x_train[:50]
    linen, _, twin = _twins("lenet5", x)
    obj = (x, data.y_train[:50])
    rules = [("fc1", "dense")]
    with pytest.raises(ValueError, match="variables: LeNet5 is a flax.nnx module"):
        allocate(twin, {"params": {}}, obj, rules=rules, mac=0.5, param=0.5)
    with pytest.raises(ValueError, match="variables: LeNet5 is a flax.linen module, which needs its variables"):
        allocate(linen, obj, rules=rules, mac=0.5, param=0.5)
    with pytest.raises(ValueError, match="variables: LeNet5 is a flax.linen module"):
        allocate(linen, data=obj, rules=rules, mac=0.5, param=0.5)
    with pytest.raises(ValueError, match="data: missing|data: an nnx model"):
        allocate(twin, rules=rules, mac=0.5, param=0.5)
    # keyword form works for nnx
    result = allocate(twin, data=obj, rules=rules, mac=0.5, param=0.5, method="uniform")
    assert set(result.ranks) == {"fc1"}


def test_fit_nnx_diverging_loss_is_named():
    model, data = _trained()
    with pytest.raises(NumericalError, match="train"):
        fit_nnx(model, data.x_train[:256], data.y_train[:256], epochs=2, batch_size=64, learning_rate=1e8,
                optimizer="sgd", progress=False)

