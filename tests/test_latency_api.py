"""``allocate(..., latency=λ)`` for linen and nnx models: injected tables (no timing) give
the budget the model says; a real measurement runs (slow); bad input is named."""

from __future__ import annotations

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coblax import allocate
from coblax.lowrank.latency import LatencyCurve, NetworkLatency
from coblax.lowrank.latency_measure import LatencyError


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(24, name="fc1")(x))
        return nn.Dense(10, name="fc2")(x)


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(16, 24, rngs=rngs)
        self.fc2 = nnx.Linear(24, 10, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x.reshape(x.shape[0], -1))))


RULES = [("fc1|fc2", "dense")]


@functools.lru_cache(maxsize=1)
def _setup():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4, 4, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=64).astype(np.int32)
    model = MLP()
    return model, model.init(jax.random.key(0), jnp.asarray(x[:1])), (x, y)


def _tables() -> NetworkLatency:
    # fc1 (rank 16): fixed 0.2 + 0.05/rank vs 1.0 original; fc2 (rank 10): a second call of
    # 0.45 makes its factored form slower than the original 0.5 from rank 3 on.
    fc1 = LatencyCurve((1, 8, 16), (0.25, 0.6, 1.0), 1.0)
    fc2 = LatencyCurve((1, 5, 10), (0.47, 0.55, 0.65), 0.5)
    return NetworkLatency({"fc1": fc1, "fc2": fc2}, total=2.0, batch=8)


def _predicted(ranks, full) -> float:
    tables = _tables()
    times = []
    for name, curve in tables.curves.items():
        r = ranks[name]
        times.append(curve.original if r >= full[name] else curve.at(r))
    return tables.predict(times) / tables.total


@pytest.mark.parametrize("method", ["pos_exact", "uniform", "pos_greedy"])
@pytest.mark.parametrize("budget", [0.65, 0.8])
def test_injected_tables_give_the_latency_budget(method, budget):
    model, variables, data = _setup()
    result = allocate(model, variables, data, rules=RULES, latency=budget, method=method,
                      latency_tables=_tables())
    stats = result.allocation.stats["latency"]
    assert stats["predicted_ratio"] <= budget + 1e-9
    assert stats["predicted_ratio"] == pytest.approx(_predicted(result.ranks, result.full_ranks))
    assert stats["rest_ms"] == pytest.approx(0.5e3)  # 2.0 - 1.0 - 0.5 s, by difference
    # fc2 is faster factored only at ranks 1, 2: anything else is its original form
    assert result.ranks["fc2"] in (1, 2, 10)


def test_pos_exact_latency_budget_matches_brute_force():
    from coblax.baselines.pos import EPS

    model, variables, data = _setup()
    result = allocate(model, variables, data, rules=RULES, latency=0.7, method="pos_exact", latency_tables=_tables())
    layers = result.cost.layers
    best = None
    for r1, r2 in itertools.product(range(1, 17), range(1, 11)):
        ranks = {"fc1": r1, "fc2": r2}
        if _predicted({n: (l.full_rank if l.is_original(ranks[n]) else ranks[n]) for n, l in
                       zip(("fc1", "fc2"), layers)}, result.full_ranks) > 0.7 + 1e-12:
            continue
        value = sum(np.log(np.sum(l.sigma[: (l.full_rank if l.is_original(ranks[l.name]) else ranks[l.name])] ** 2)
                           + EPS * np.sum(l.sigma ** 2)) for l in layers)
        if best is None or value > best[0] + 1e-12:
            best = (value, ranks)
    chosen = {n: result.ranks[n] for n in ("fc1", "fc2")}
    brute = {l.name: l.full_rank if l.is_original(best[1][l.name]) else best[1][l.name] for l in layers}
    assert chosen == brute


def test_cobla_takes_the_latency_row():
    model, variables, data = _setup()
    result = allocate(model, variables, data, rules=RULES, latency=0.7, method="cobla",
                      method_options={"max_iter": 15, "roundings": 2}, latency_tables=_tables())
    assert result.allocation.stats["latency"]["predicted_ratio"] <= 0.7 + 1e-9
    assert "fc2" in result.allocation.stats["saturated_layers"] or result.ranks["fc2"] <= 2


def test_nnx_model_takes_a_latency_budget():
    x = np.random.default_rng(0).normal(size=(32, 4, 4, 1)).astype(np.float32)
    y = np.zeros(32, np.int32)
    result = allocate(NnxMLP(nnx.Rngs(0)), (x, y), rules=RULES, latency=0.7, method="pos_exact",
                      latency_tables=_tables())
    assert result.allocation.stats["latency"]["predicted_ratio"] <= 0.7 + 1e-9
    assert result.model(jnp.asarray(x)).shape == (32, 10)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan"), "0.5", True])
def test_bad_latency_budget_is_named(bad):
    model, variables, data = _setup()
    with pytest.raises(ValueError, match="latency"):
        allocate(model, variables, data, rules=RULES, latency=bad, method="uniform", latency_tables=_tables())


def test_latency_below_the_floor_names_the_smallest_budget():
    model, variables, data = _setup()
    with pytest.raises(ValueError, match="smallest feasible latency budget is 0.36"):
        # floor: (rest 0.5 + fc1 at rank 1 0.1 + fc2 at rank 1 0.12) / 2.0 = 0.36
        allocate(model, variables, data, rules=RULES, latency=0.3, method="uniform",
                 latency_tables=NetworkLatency({"fc1": LatencyCurve((1, 16), (0.1, 1.0), 1.0),
                                                "fc2": LatencyCurve((1, 10), (0.12, 0.6), 0.5)}, 2.0, 8))


def test_tables_missing_a_layer_are_named():
    model, variables, data = _setup()
    with pytest.raises(ValueError, match="latency_tables.*fc2"):
        allocate(model, variables, data, rules=RULES, latency=0.5, method="uniform",
                 latency_tables=NetworkLatency({"fc1": LatencyCurve((1, 16), (0.1, 1.0), 1.0)}, 2.0, 8))


def test_latency_budget_under_disable_jit_is_named():
    model, variables, data = _setup()
    with jax.disable_jit():
        with pytest.raises(LatencyError, match="latency.*jit"):
            allocate(model, variables, data, rules=RULES, latency=0.5, method="uniform")


@pytest.mark.slow
def test_measured_tables_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("COBLAX_CACHE", str(tmp_path))
    model, variables, data = _setup()
    result = allocate(model, variables, data, rules=RULES, latency=0.9, method="pos_exact", latency_batch=8)
    stats = result.allocation.stats["latency"]
    assert stats["batch"] == 8 and stats["predicted_ratio"] <= 0.9 + 1e-9
    assert len(list((tmp_path / "latency").glob("*.json"))) == 2  # one table per layer
