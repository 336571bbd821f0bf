"""ALDS with input-channel slices: the sliced relative error, the min-max threshold against
brute force on sliced layers, the per-layer k step, the k search and its bad input."""

from __future__ import annotations

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coblax import allocate
from coblax.baselines.alds import (
    ALDS,
    _best_k,
    _solve,
    alds_ranks,
    max_relative_error,
    relative_errors,
)
from coblax.lowrank.allocation import AllocationProblem, BudgetError, is_feasible
from coblax.lowrank.costs import SlicedLayerCost
from coblax.lowrank.registry import get_allocator


def _sliced(name, rng, k, rows, cols, spatial=1):
    """A synthetic sliced layer: k slices of rows x cols, cost as ``alds:k`` of a 1x1 conv."""
    R = min(rows, cols)
    spectra = np.sort(rng.gamma(1.0, size=(k, R)), axis=1)[:, ::-1]
    sigma = np.sqrt(np.sum(spectra**2, axis=0))
    norm = float(np.max(spectra[:, 0]) * rng.uniform(1.0, np.sqrt(k)))  # max_s ||W_s|| <= ||W|| <= sqrt(k)·max
    per = rows * k + k * cols
    return SlicedLayerCost(name, "conv", (rows, cols), sigma, float(spatial * per), float(per),
                           float(spatial * rows * k * cols), float(rows * k * cols), slices=k,
                           slice_sigma=spectra, norm=norm)


def test_sliced_relative_error_is_the_largest_slice_value_over_the_norm():
    spectra = np.array([[3.0, 1.0, 0.5], [2.0, 1.5, 0.1]])
    layer = SlicedLayerCost("a", "conv", (3, 9), np.sqrt((spectra**2).sum(0)), 100.0, 100.0, 1e6, 1e6,
                            slices=2, slice_sigma=spectra, norm=4.0)
    np.testing.assert_allclose(relative_errors(layer), [3 / 4, 1.5 / 4, 0.5 / 4, 0.0])


@pytest.mark.parametrize("seed", range(10))
def test_alds_is_the_min_max_on_sliced_layers(seed):
    rng = np.random.default_rng(seed)
    layers = tuple(_sliced(f"l{i}", rng, int(rng.choice([1, 2, 3])), int(rng.integers(2, 6)),
                           int(rng.integers(2, 6)), int(rng.choice([1, 4]))) for i in range(3))
    o_mac = sum(x.original_macs for x in layers)
    o_par = sum(x.original_params for x in layers)
    problem = AllocationProblem(layers, float(rng.uniform(0.3, 0.9)) * o_mac, float(rng.uniform(0.3, 0.9)) * o_par)
    errors = {x.name: relative_errors(x) for x in layers}
    feasible = [dict(zip(problem.names, c)) for c in itertools.product(*[range(1, x.full_rank + 1) for x in layers])
                if is_feasible(problem, dict(zip(problem.names, c)))]
    if not feasible:
        with pytest.raises(BudgetError):
            ALDS()(problem)
        return
    best = min(max_relative_error(problem, r, errors) for r in feasible)
    eps, ranks = alds_ranks(problem)
    assert is_feasible(problem, ranks) and eps == pytest.approx(best, abs=1e-15)
    assert ALDS()(problem).stats["slices"] == {x.name: x.slices for x in layers}


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(12, (3, 3), padding="SAME", name="c1")(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, padding="SAME", name="c2")(x))
        x = nn.relu(nn.Conv(6, (3, 3), padding="SAME", name="c3")(x))
        return nn.Dense(10, name="fc")(x.reshape(x.shape[0], -1))


RULES = [("c.*", "tai"), ("fc", "dense")]


@functools.lru_cache(maxsize=1)
def _setup():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 8, 8, 4)).astype(np.float32)
    y = rng.integers(0, 10, size=32).astype(np.int32)
    model = Net()
    return model, model.init(jax.random.key(0), jnp.asarray(x[:1])), (x, y)


def test_fixed_slices_factor_every_conv_layer():
    model, variables, data = _setup()
    res = allocate(model, variables, data, rules=RULES, mac=0.4, param=0.4, method="alds",
                   method_options={"slices": 2})
    assert {n: res.schemes[n] for n in ("c1", "c2", "c3")} == {"c1": "alds:2", "c2": "alds:2", "c3": "alds:2"}
    assert res.allocation.stats["slices"] == {"c1": 2, "c2": 2, "c3": 2, "fc": 1}
    assert res.mac_ratio <= 0.4 + 1e-9 and res.param_ratio <= 0.4 + 1e-9
    assert res.allocation.stats["max_relative_error"] <= res.allocation.stats["eps"]


def test_slices_that_do_not_divide_the_channels_name_the_key():
    model, variables, data = _setup()
    with pytest.raises(ValueError, match=r"slices = 3 does not divide the 4 input channels of layer 'c1'"):
        allocate(model, variables, data, rules=RULES, mac=0.4, param=0.4, method="alds",
                 method_options={"slices": 3})


def test_runner_problem_without_sliced_layers_is_refused():
    layer = SlicedLayerCost("a", "conv", (3, 9), np.ones(3), 1.0, 1.0, 100.0, 100.0)
    plain = AllocationProblem((layer,), 50.0, 50.0)
    with pytest.raises(ValueError, match="slices = 'search' needs the sliced factored form"):
        ALDS(slices="search")(plain)


def test_search_never_loses_to_its_fixed_starts_and_improves_per_layer():
    model, variables, data = _setup()
    seen = {}

    class Spy(ALDS):
        def slice_plan(self, cands, mac_max, param_max, min_rank, seed):
            seen.update(cands=cands, budgets=(mac_max, param_max))
            return super().slice_plan(cands, mac_max, param_max, min_rank, seed)

    res = allocate(model, variables, data, rules=RULES, mac=0.3, param=0.3, method=Spy(slices="search"))
    cands, budgets = seen["cands"], seen["budgets"]
    assert cands.options["c1"] == (1, 2, 4) and cands.options["c3"] == (1, 2, 4, 8) and cands.options["fc"] == (1,)
    plan = res.allocation.stats["slices"]
    assert all(plan[n] in cands.options[n] for n in cands.names)
    eps = res.allocation.stats["eps"]
    assert res.mac_ratio <= 0.3 + 1e-9 and res.param_ratio <= 0.3 + 1e-9
    # the fixed starts (largest divisor <= 3, 5, 7, 9) and k = 1 everywhere are never better
    for start in (1, 3, 5, 7, 9):
        fixed = {n: max(o for o in cands.options[n] if o <= start) for n in cands.names}
        solved = _solve(cands, fixed, budgets, 1)
        assert solved is None or eps <= solved[0] + 1e-15
    # the per-layer step against brute force over (k, r) at the layer's current cost
    for name in cands.convs:
        here = cands.cost(name, plan[name])
        r = res.ranks[name]
        if here.is_original(r):
            continue

        def best_error(options, layer_of=cands.cost, name=name, here=here, r=r):
            return min(relative_errors(layer_of(name, o))[q] for o in options
                       for q in range(1, layer_of(name, o).full_rank + 1)
                       if layer_of(name, o).macs(q) <= here.macs(r) and layer_of(name, o).params(q) <= here.params(r))

        chosen = _best_k(cands, name, plan[name], r, 1)
        assert best_error([chosen]) == best_error(cands.options[name])


@pytest.mark.parametrize("options,message", [({"slices": "auto"}, "slices must be a positive integer or 'search'"),
                                             ({"search_seeds": 0}, "search_seeds must be a positive integer"),
                                             ({"search_iterations": -1}, "search_iterations")])
def test_bad_options_name_their_key(options, message):
    with pytest.raises(ValueError, match=message):
        get_allocator("alds", **options)


def test_rank_multiple_keeps_the_sliced_error():
    model, variables, data = _setup()
    res = allocate(model, variables, data, rules=RULES, mac=0.5, param=0.5, method="alds",
                   method_options={"slices": 2}, rank_multiple=2)
    assert all(r % 2 == 0 or r == res.full_ranks[n] for n, r in res.ranks.items())
    # the threshold rule at the reported eps, on the real (ungrouped) sliced spectra
    full = {l.name: l for l in res.cost.layers}
    for name, r in res.ranks.items():
        if full[name].is_original(r) or name == "fc":
            continue
        assert relative_errors(full[name])[r] <= res.allocation.stats["eps"] + 1e-12
