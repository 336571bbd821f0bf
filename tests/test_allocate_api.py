"""The allocator API: allocator objects, options apart from allocate's keywords, the
objective built only on demand, ``Compressed`` as a PyTree, factored layers that keep
the original layer's dtype and precision."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import coblax
from coblax import Compressed, allocate, register_allocator
from coblax.lowrank import api
from coblax.lowrank.decompose import factored_apply, factorize, get_kernel, trace_layers, truncate
from coblax.lowrank.uniform import Uniform
from coblax.util.frozen import FrozenMap


class MLP(nn.Module):
    dtype: object = None
    precision: object = None

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(24, name="fc1")(x))
        return nn.Dense(10, name="fc2", dtype=self.dtype, precision=self.precision)(x)


RULES = [("fc1|fc2", "dense")]


@functools.lru_cache(maxsize=1)
def _setup():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4, 4, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=64).astype(np.int32)
    model = MLP()
    return model, model.init(jax.random.key(0), jnp.asarray(x[:1])), (x, y)


def _call(**kw):
    model, variables, data = _setup()
    return allocate(model, variables, data, rules=RULES, mac=0.5, param=0.5, **kw)


def test_allocator_object_equals_name_with_options():
    by_object = _call(method=coblax.allocators.cptv(iters=20))
    by_name = _call(method="cptv", method_options={"iters": 20})
    assert by_object.ranks == by_name.ranks and by_object.method == "cptv"
    assert by_object.allocation.stats["beta"] == by_name.allocation.stats["beta"]
    assert isinstance(coblax.allocators.pos_exact(), coblax.Allocator)
    assert coblax.allocators.cobla(max_iter=7).max_iter == 7


def test_options_never_share_allocates_keywords():
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) max_iter.*method_options="):
        _call(method="cobla", max_iter=5)
    with pytest.raises(TypeError, match="configure the object instead"):
        _call(method=coblax.allocators.cptv(), method_options={"iters": 3})
    with pytest.raises(TypeError, match="allocator name or an allocator object"):
        _call(method=42)
    with pytest.raises(coblax.lowrank.registry.UnknownMethodError, match="unknown method 'nope'"):
        _call(method="nope")
    with pytest.raises(TypeError):  # an option the allocator does not have
        coblax.allocators.uniform(max_iter=3)


def test_registered_allocator_reached_as_attribute(monkeypatch):
    monkeypatch.setattr(coblax.lowrank.registry, "_USER", {})
    register_allocator("my_uniform", lambda **o: Uniform(name="my_uniform", **o))
    result = _call(method=coblax.allocators.my_uniform())
    assert result.method == "my_uniform"
    with pytest.raises(AttributeError):
        coblax.allocators.not_registered  # noqa: B018


def test_objective_built_only_for_allocators_that_read_it(monkeypatch):
    built = []

    class Spy:
        def __init__(self, *args, **kwargs):
            built.append(kwargs)
            raise RuntimeError("objective built")

    monkeypatch.setattr(api, "NetworkLoss", Spy)
    for name in ("uniform", "pos_exact", "pos_greedy", "cptv", "vbmf", "gavish_donoho"):
        _call(method=name)
    assert built == []
    with pytest.raises(RuntimeError, match="objective built"):
        _call(method="cobla", method_options={"max_iter": 2})
    assert len(built) == 1


def test_compressed_is_a_pytree_of_its_variables():
    result = _call(method="uniform")
    assert isinstance(result, Compressed)
    leaves = jax.tree.leaves(result)
    assert len(leaves) == len(jax.tree.leaves(result.variables))
    doubled = jax.tree.map(lambda a: 2 * a, result)
    assert doubled.ranks is result.ranks and doubled.allocation is result.allocation
    np.testing.assert_array_equal(doubled.variables["factors"]["fc1"]["first"],
                                  2 * result.variables["factors"]["fc1"]["first"])
    assert isinstance(result.ranks, FrozenMap) and isinstance(result.ranks, dict)
    with pytest.raises(TypeError, match="read-only"):
        result.ranks["fc1"] = 1
    traces = []

    @jax.jit
    def logits(r, x):
        traces.append(1)
        return r.apply(r.variables, x)

    x = jnp.asarray(_setup()[2][0][:5])
    np.testing.assert_allclose(logits(result, x), result.apply(result.variables, x), rtol=1e-6)
    logits(jax.tree.map(lambda a: a + 0, result), x)  # same metadata, new leaves: no retrace
    assert len(traces) == 1


def _factored_fc2(dtype, precision):
    """(original logits, factored logits, jaxpr of the factored apply) of MLP's fc2 at full rank."""
    model = MLP(dtype=dtype, precision=precision)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 4, 4, 1)), jnp.float32)
    variables = model.init(jax.random.key(0), x[:1])
    layer = {l.name: l for l in trace_layers(model, variables, x[:1])}["fc2"]
    full = factorize(get_kernel(variables, "fc2"), layer, "tai")
    factors = {"fc2": truncate(full, np.ones(len(np.asarray(full.sigma))))}  # σ folded in
    run = functools.partial(factored_apply, model, variables, factors)
    return model.apply(variables, x), run(x), str(jax.make_jaxpr(run)(x))


def test_factored_layer_keeps_the_original_dtype():
    ref, out, _ = _factored_fc2(jnp.bfloat16, None)
    assert ref.dtype == jnp.bfloat16
    assert out.dtype == jnp.bfloat16  # float32 before the factored layers honoured dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=0.1)


def test_factored_layer_keeps_the_original_precision():
    _, _, default = _factored_fc2(None, None)
    _, _, highest = _factored_fc2(None, jax.lax.Precision.HIGHEST)
    # fc1 (unfactored, default precision) plus the two factored products of fc2
    assert default.count("dot_general") == 3 and "HIGHEST" not in default
    assert highest.count("precision=(Precision.HIGHEST, Precision.HIGHEST)") == 2
