"""The sliced factored form ``alds:k`` (ALDS): exact at full rank, per-slice Eckart-Young,
hand-counted costs, every allocator through ``allocate``, and the export round trip."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coblax import allocate, load_factored, save_factored
from coblax.lowrank.costs import SlicedLayerCost, layer_cost
from coblax.lowrank.decompose import (
    factored_apply,
    factorize,
    get_kernel,
    masked_scales,
    slice_count,
    slice_info,
    slice_spectra,
    sliced_scheme,
    trace_layers,
    truncate,
)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, padding="SAME", name="c1")(x))
        x = nn.relu(nn.Conv(6, (3, 2), padding=((2, 0), (1, 3)), name="c2")(x))
        x = nn.relu(nn.Conv(12, (3, 3), padding="VALID", use_bias=False, name="c3")(x))
        return nn.Dense(10, name="fc")(x.reshape(x.shape[0], -1))


@functools.lru_cache(maxsize=1)
def _setup():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 12, 10, 4)).astype(np.float32)
    y = rng.integers(0, 10, size=48).astype(np.int32)
    model = Net()
    variables = model.init(jax.random.key(1), jnp.asarray(x[:1]))
    traced = {l.name: l for l in trace_layers(model, variables, jnp.asarray(x[:2]))}
    return model, variables, (x, y), traced


def _kernel_of(f):
    """The (X, Y, C, N) kernel the sliced factors compute (truncated, σ folded in)."""
    k = slice_count(f.scheme)
    first, second = np.asarray(f.first, np.float64), np.asarray(f.second, np.float64)[0, 0]
    X, Y, c, kr = first.shape
    r = kr // k
    return np.concatenate([np.einsum("xyca,an->xycn", first[..., s * r:(s + 1) * r], second[s * r:(s + 1) * r])
                           for s in range(k)], axis=2)


@pytest.mark.parametrize("name,k", [("c1", 1), ("c1", 2), ("c1", 4), ("c2", 8), ("c3", 3), ("c3", 6)])
def test_full_rank_reproduces_the_layer(name, k):
    model, variables, (x, _), traced = _setup()
    f = factorize(get_kernel(variables, name), traced[name], sliced_scheme(k))
    ref = model.apply(variables, jnp.asarray(x[:4]))
    relaxed = factored_apply(model, variables, {name: f}, jnp.asarray(x[:4]),
                             masked_scales({name: f}, {name: jnp.ones_like(f.sigma)}))
    kept = factored_apply(model, variables, {name: truncate(f, np.ones(f.sigma.shape[0]))}, jnp.asarray(x[:4]))
    for out in (relaxed, kept):
        assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 1e-5
    w = np.asarray(get_kernel(variables, name), np.float64)
    np.testing.assert_allclose(_kernel_of(truncate(f, np.ones(f.sigma.shape[0]))), w, atol=1e-5 * np.abs(w).max())


def test_rank_r_is_each_slices_eckart_young():
    _, variables, _, traced = _setup()
    w = np.asarray(get_kernel(variables, "c3"), np.float64)  # (3, 3, 6, 12)
    f = factorize(w, traced["c3"], "alds:3")
    assert f.first.shape == (3, 3, 2, 3 * 12) and f.second.shape == (1, 1, 36, 12)
    r = 4
    want, spectra = [], []
    for s in range(3):
        mat = w[:, :, 2 * s:2 * s + 2, :].reshape(18, 12)
        u, sv, vt = np.linalg.svd(mat, full_matrices=False)
        spectra.append(sv)
        want.append(((u[:, :r] * sv[:r]) @ vt[:r]).reshape(3, 3, 2, 12))
    np.testing.assert_allclose(slice_spectra(f), np.array(spectra), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(f.sigma), np.sqrt(np.sum(np.array(spectra) ** 2, axis=0)), rtol=1e-5)
    mask = np.zeros(12)
    mask[:r] = 1.0
    np.testing.assert_allclose(_kernel_of(truncate(f, mask)), np.concatenate(want, axis=2), atol=1e-5)
    # the whole kernel's operator norm, as ALDS normalizes
    spectra_info, norm = slice_info({"c3": f})["c3"]
    assert norm == pytest.approx(np.linalg.norm(w.reshape(-1, 12), 2), rel=1e-5)


def test_costs_match_hand_counts():
    _, variables, _, traced = _setup()
    layer = traced["c1"]  # 3x3, C=4 -> N=8, SAME stride 2 on 12x10: output 6x5
    assert layer.out_shape[:2] == (6, 5)
    cost = layer_cost(layer, np.ones(8), "alds:2")
    assert isinstance(cost, SlicedLayerCost) and cost.slices == 2
    # per rank: grouped conv 2 groups x (3*3*2 weights -> 1 channel) = 36, 1x1 2 -> 8 = 16
    assert cost.param_per_rank == 36 + 16
    assert cost.mac_per_rank == 30 * (36 + 16)
    assert cost.full_rank == 8 and cost.shape == (18, 8)  # a slice is 18 x 8
    assert cost.original_params == 3 * 3 * 4 * 8 and cost.original_macs == 30 * 3 * 3 * 4 * 8
    # the truncated factors hold exactly that many weights
    f = truncate(factorize(get_kernel(variables, "c1"), layer, "alds:2"), np.r_[np.ones(3), np.zeros(5)])
    assert f.first.size + f.second.size == 3 * 52 == cost.params(3)
    # k = 4 on c3 (C=6 is not a multiple of 4): refused naming the scheme
    with pytest.raises(ValueError, match="4 slices do not divide the 6 input channels"):
        factorize(get_kernel(variables, "c3"), traced["c3"], "alds:4")


RULES = [("c1", "alds:2"), ("c2", "alds:4"), ("c3", "alds:3"), ("fc", "dense")]


@pytest.mark.parametrize("method,options", [("pos_exact", {}), ("cobla", {"max_iter": 3}), ("alds", {}),
                                            ("uniform", {}), ("pos_greedy", {})])
def test_every_allocator_runs_on_the_sliced_form(method, options):
    model, variables, data, _ = _setup()
    res = allocate(model, variables, data, rules=RULES, mac=0.5, param=0.5, method=method,
                   method_options=options)
    assert res.mac_ratio <= 0.5 + 1e-9 and res.param_ratio <= 0.5 + 1e-9
    assert {n: res.schemes[n] for n in ("c1", "c2", "c3")} == {"c1": "alds:2", "c2": "alds:4", "c3": "alds:3"}
    out = res.apply(res.variables, jnp.asarray(data[0][:3]))
    assert out.shape == (3, 10) and bool(jnp.all(jnp.isfinite(out)))
    # the counted parameters are the factors' own
    counted = sum(int(np.prod(np.shape(v))) for f in res.variables["factors"].values() for v in f.values())
    kept = {n for n in res.variables["factors"]}
    assert counted == sum(l.params(res.ranks[l.name]) for l in res.cost.layers if l.name in kept)


def test_export_round_trip_is_exact(tmp_path):
    model, variables, data, _ = _setup()
    res = allocate(model, variables, data, rules=RULES, mac=0.6, param=0.6, method="pos_exact")
    assert any(slice_count(res.schemes[n]) > 1 for n in res.variables["factors"])
    path = tmp_path / "sliced.npz"
    save_factored(path, res)
    back = load_factored(path, model, example=data[0][:1])
    for name, f in res.variables["factors"].items():
        node = back.variables["params"]
        for part in name.split("/"):
            node = node[part]
        np.testing.assert_array_equal(np.asarray(node["first"]["kernel"]), np.asarray(f["first"]))
        np.testing.assert_array_equal(np.asarray(node["second"]["kernel"]), np.asarray(f["second"]))
    x = jnp.asarray(data[0][:5])
    np.testing.assert_allclose(back.apply(back.variables, x), res.apply(res.variables, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme,message", [("alds:4", "4 slices do not divide the 6 input channels"),
                                            ("alds:x", "slice count"), ("alds:0", "slice count")])
def test_bad_sliced_rule_names_it(scheme, message):
    model, variables, data, _ = _setup()
    with pytest.raises(ValueError, match=message):
        allocate(model, variables, data, rules=[("c3", scheme)], mac=0.5, param=0.5, method="pos_exact")


def test_what_is_not_built_for_the_sliced_form_says_so():
    model, variables, data, _ = _setup()
    with pytest.raises(ValueError, match="whitened spectrum is not built for the sliced scheme 'alds:2'"):
        allocate(model, variables, data, rules=RULES, mac=0.5, param=0.5, method="balf")
    with pytest.raises(ValueError, match="latency budget is not built for the sliced scheme"):
        allocate(model, variables, data, rules=RULES, mac=0.5, param=0.5, method="pos_exact", latency=0.5)
