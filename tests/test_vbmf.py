"""Analytic EVBMF (Nakajima et al. 2013): planted rank, noise variance, orientation, allocator."""

import math

import numpy as np
import pytest

from coblax.baselines.vbmf import VBMF, evb_tau, evbmf, evbmf_from_singular_values
from coblax.lowrank.allocation import AllocationProblem, BudgetError, LayerCost, is_feasible


def planted(rng, L=100, M=200, rank=5, noise=0.7, scale=(60.0, 100.0)):
    U = np.linalg.qr(rng.normal(size=(L, rank)))[0]
    V = np.linalg.qr(rng.normal(size=(M, rank)))[0]
    signal = U @ np.diag(np.linspace(*scale, rank)) @ V.T
    return signal + noise * rng.normal(size=(L, M))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_rank_and_noise_variance(seed):
    rng = np.random.default_rng(seed)
    Y = planted(rng)
    res = evbmf(Y)
    assert res.rank == 5
    assert res.sigma2 == pytest.approx(0.49, rel=0.10)
    assert res.shape == (100, 200)
    # Posterior means shrink the kept singular values and zero the rest.
    s = np.linalg.svd(Y, compute_uv=False)
    assert np.all(res.posterior[:5] < s[:5]) and np.all(res.posterior[:5] > 0.9 * s[:5])
    assert np.all(res.posterior[5:] == 0.0)


def test_transposed_input_gives_the_same_result():
    Y = planted(np.random.default_rng(4))
    a, b = evbmf(Y), evbmf(Y.T)
    assert a.rank == b.rank == 5
    assert a.sigma2 == pytest.approx(b.sigma2, rel=1e-6)
    assert a.threshold == pytest.approx(b.threshold, rel=1e-6)
    np.testing.assert_allclose(a.posterior, b.posterior, rtol=1e-6)


@pytest.mark.parametrize("shape", [(100, 200), (60, 60), (200, 30)])
def test_pure_noise_has_rank_zero(shape):
    res = evbmf(1.3 * np.random.default_rng(5).normal(size=shape))
    assert res.rank == 0
    assert res.sigma2 == pytest.approx(1.69, rel=0.10)


def test_from_singular_values_equals_evbmf():
    Y = planted(np.random.default_rng(6), L=40, M=70, rank=3, scale=(30.0, 40.0))
    s = np.linalg.svd(Y, compute_uv=False)
    a, b = evbmf(Y), evbmf_from_singular_values(s[::-1], (70, 40))  # any order/orientation
    assert (a.rank, a.sigma2, a.threshold) == (b.rank, b.sigma2, b.threshold)


def test_known_noise_threshold_closed_form():
    # gamma_EVB = sqrt(M sigma^2 (1 + tau)(1 + alpha / tau)); square case tau = 2.5129.
    res = evbmf_from_singular_values(np.array([100.0, 50.0, 1.0]), (3, 3), sigma2=4.0)
    tau = evb_tau(1.0)
    assert tau == pytest.approx(2.5129, abs=1e-4)
    assert math.log(tau + 1) * 2 - tau == pytest.approx(0.0, abs=1e-12)
    assert res.threshold == pytest.approx(math.sqrt(3 * 4.0 * (1 + tau) ** 2 / tau))
    assert res.rank == 2
    # Posterior mean for gamma = 100 (L = M = 3, sigma^2 = 4), formula of the docstring.
    a = 1 - 6 * 4.0 / 100.0**2
    assert res.posterior[0] == pytest.approx(50.0 * (a + math.sqrt(a * a - 36 * 16.0 / 100.0**4)))


def test_evb_tau_rectangular_root():
    for alpha in (0.05, 0.3, 0.8):
        tau = evb_tau(alpha)
        assert math.log(tau + 1) + alpha * math.log(tau / alpha + 1) - tau == pytest.approx(
            0.0, abs=1e-10)
        assert tau == pytest.approx(2.5129 * math.sqrt(alpha), rel=0.15)  # the paper's fit


def test_zero_matrix_and_bad_input():
    assert evbmf(np.zeros((4, 6))).rank == 0
    with pytest.raises(ValueError, match="2-D"):
        evbmf(np.zeros(5))
    with pytest.raises(ValueError, match="at most"):
        evbmf_from_singular_values(np.ones(5), (4, 6))
    with pytest.raises(ValueError, match="sigma2"):
        evbmf_from_singular_values(np.ones(4), (4, 6), sigma2=-1.0)


def _layer(name, Y):
    k, l = Y.shape
    s = np.linalg.svd(Y, compute_uv=False)
    return LayerCost(name, "dense", (k, l), s, k + l, k + l, k * l, k * l)


def _problem(frac):
    rng = np.random.default_rng(7)
    layers = (
        _layer("a", planted(rng, 40, 60, 3, 0.5, (20.0, 30.0))),
        _layer("b", planted(rng, 50, 30, 6, 0.5, (15.0, 25.0))),
    )
    o = sum(x.original_macs for x in layers)
    return AllocationProblem(layers, frac * o, frac * o)


def test_allocator_natural_ranks_and_budget_mode():
    problem = _problem(0.3)
    alloc = VBMF()(problem)
    s = alloc.stats
    assert s["natural_ranks"] == {"a": 3, "b": 6}
    # Natural cost: 3 * 100 + 6 * 80 = 780 of 40 * 60 + 50 * 30 = 3,900.
    assert s["natural_mac_ratio"] == pytest.approx(780 / 3900)
    # The budget (0.3) leaves room, so the multiplier drops below 1 and ranks grow.
    assert s["threshold_multiplier"] < 1.0
    assert is_feasible(problem, alloc.ranks)
    assert alloc.ranks["a"] >= 3 and alloc.ranks["b"] >= 6
    # Largest ranks: lowering the multiplier to the next singular-value ratio overruns.
    t = s["threshold_multiplier"]
    ratios = np.concatenate([l.sigma / s["thresholds"][l.name] for l in problem.layers])
    below = ratios[ratios <= t]
    if below.size:
        t_lower = below.max() * (1 - 1e-12)
        ranks = {l.name: int(np.sum(l.sigma > t_lower * s["thresholds"][l.name]))
                 for l in problem.layers}
        assert not is_feasible(problem, ranks)


def test_allocator_tight_and_generous_budgets():
    tight = VBMF()(_problem(0.06))  # below the natural 0.2: fewer ranks, multiplier > 1
    assert tight.stats["threshold_multiplier"] > 1.0
    assert tight.ranks["a"] <= 3 and tight.ranks["b"] <= 6
    full = VBMF()(_problem(1.0))
    assert full.stats["threshold_multiplier"] == 0.0
    assert full.ranks == {"a": 40, "b": 30}
    with pytest.raises(BudgetError, match="vbmf"):
        VBMF()(_problem(0.02))  # rank 1 everywhere costs 180 / 3900 = 0.046
