"""Cost model against MACs and parameters counted by hand (LeNet-5, LeNet-300-100)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coblax.lowrank.allocation import BudgetError
from coblax.lowrank.costs import make_problem, network_cost
from coblax.lowrank.decompose import trace_layers
from coblax.nn.models import build_model


def _net(name, scheme, only=None):
    model = build_model(name, num_classes=10)
    x = jnp.zeros((1, 28, 28, 1))
    params = model.init(jax.random.PRNGKey(0), x)
    traced = trace_layers(model, params, x)
    ranks = {"lenet5": {"tai": {"conv1": 5, "conv2": 100}, "zhang": {"conv1": 20, "conv2": 50}}}
    full = {"fc1": 500 if name == "lenet5" else 300, "fc2": 10 if name == "lenet5" else 100, "fc3": 10}
    full.update(ranks.get(name, {}).get(scheme, {}))
    sig = {l.name: np.ones(full[l.name]) for l in traced if only is None or l.name in only}
    return network_cost(traced, params, sig, scheme)


def test_lenet5_original_counts():
    net = _net("lenet5", "tai")
    # conv1 24*24*25*20, conv2 8*8*(5*5*20)*50, fc1 800*500, fc2 500*10
    assert net.total_macs == 288_000 + 1_600_000 + 400_000 + 5_000
    # kernels + biases: 500+20, 25000+50, 400000+500, 5000+10
    assert net.total_params == 431_080
    assert net.fixed_params == 20 + 50 + 500 + 10
    assert net.fixed_macs == 0


def test_lenet5_tai_per_rank_and_total():
    net = _net("lenet5", "tai")
    by = {l.name: l for l in net.layers}
    # conv1 (C*X, Y*N) = (5, 100): params X*C + Y*N = 105;
    # MACs = Ho*W_in*X*C + Ho*Wo*Y*N = 24*28*5 + 24*24*5*20
    assert by["conv1"].param_per_rank == 105
    assert by["conv1"].mac_per_rank == 24 * 28 * 5 + 24 * 24 * 5 * 20
    # conv2 (100, 250): params 100 + 250; MACs 8*12*5*20 + 8*8*5*50
    assert by["conv2"].param_per_rank == 350
    assert by["conv2"].mac_per_rank == 8 * 12 * 5 * 20 + 8 * 8 * 5 * 50
    ranks = {"conv1": 3, "conv2": 20, "fc1": 50, "fc2": 10}
    macs, params = net.cost(ranks)
    assert macs == 3 * 60_960 + 20 * 25_600 + 50 * 1_300 + 5_000  # fc2 at rank 10 is original
    assert params == 3 * 105 + 20 * 350 + 50 * 1_300 + 5_000 + 580
    assert net.ratios(ranks, "network") == pytest.approx((macs / 2_293_000, params / 431_080))
    assert net.ratios(ranks, "decomposed") == pytest.approx(((macs) / 2_293_000, (params - 580) / 430_500))


def test_lenet5_zhang_per_rank():
    net = _net("lenet5", "zhang")
    by = {l.name: l for l in net.layers}
    assert (by["conv1"].param_per_rank, by["conv1"].mac_per_rank) == (25 + 20, 24 * 24 * 45)
    assert (by["conv2"].param_per_rank, by["conv2"].mac_per_rank) == (500 + 50, 8 * 8 * 550)
    assert by["conv1"].saturation_rank == 12  # 288000 / 25920 = 11.1, 500 / 45 = 11.1
    assert net.cost({"conv1": 4, "conv2": 10, "fc1": 100, "fc2": 5})[0] == (
        4 * 25_920 + 10 * 35_200 + 100 * 1_300 + 5 * 510
    )


def test_lenet_300_100_counts_and_saturation():
    net = _net("lenet_300_100", "tai")
    assert net.total_macs == 784 * 300 + 300 * 100 + 100 * 10 == 266_200
    assert net.total_params == 266_610
    by = {l.name: l for l in net.layers}
    macs, params = net.cost({"fc1": 50, "fc2": 20, "fc3": 10})
    assert (macs, params) == (50 * 1084 + 20 * 400 + 1000, 50 * 1084 + 20 * 400 + 1000 + 410)
    # A layer whose factored form would cost >= the original keeps the original form:
    # fc1 factored costs 1084 per rank, original 235200 -> saturates at ceil(216.97) = 217.
    assert by["fc1"].saturation_rank == 217
    assert by["fc1"].macs(216) == 216 * 1084 < 235_200
    assert by["fc1"].macs(217) == by["fc1"].macs(300) == 235_200
    assert by["fc1"].is_original(217) and not by["fc1"].is_original(216)
    assert by["fc3"].macs(9) == 990 and by["fc3"].macs(10) == 1000
    # cost never exceeds the original and is monotone in rank
    for layer in net.layers:
        costs = [layer.macs(r) for r in range(1, layer.full_rank + 1)]
        assert max(costs) <= layer.original_macs and np.all(np.diff(costs) >= 0)


def test_budget_below_fixed_cost_names_the_minimum():
    net = _net("lenet5", "tai", only={"fc1", "fc2"})
    assert net.fixed_macs == 1_888_000
    with pytest.raises(BudgetError, match=r"smallest feasible budget is mac >= 0\.82"):
        make_problem(net, 0.5, 0.9, "network")
    problem = make_problem(net, 0.9, 0.9, "network")
    assert problem.mac_max == pytest.approx(0.9 * 2_293_000 - 1_888_000)
