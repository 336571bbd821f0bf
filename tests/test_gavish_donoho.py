"""Gavish & Donoho (2014) optimal hard threshold: constants, MP median, planted rank, allocator."""

import math

import numpy as np
import pytest
from scipy.integrate import quad

from coblax.baselines.gavish_donoho import (
    GavishDonoho,
    lambda_star,
    mp_median,
    omega,
    omega_approx,
    threshold,
)
from coblax.lowrank.allocation import AllocationProblem, BudgetError, LayerCost, is_feasible


def test_square_constants():
    assert lambda_star(1.0) == pytest.approx(4 / math.sqrt(3), rel=1e-14)
    assert omega(1.0) == pytest.approx(2.858, abs=1e-3)


def test_omega_close_to_the_cubic_fit():
    for beta in np.linspace(0.02, 1.0, 50):
        assert abs(omega(beta) - omega_approx(beta)) < 0.02, beta


def test_mp_median_splits_the_mass():
    for beta in (0.1, 0.5, 1.0):
        a, b = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
        def dens(t, a=a, b=b, beta=beta):
            return math.sqrt(max((b - t) * (t - a), 0.0)) / (2 * math.pi * beta * t)
        assert quad(dens, a, b, limit=200)[0] == pytest.approx(1.0, abs=1e-6)
        assert quad(dens, a, mp_median(beta), limit=200)[0] == pytest.approx(0.5, abs=1e-8)
    # Empirical check: median eigenvalue of W W^T / n for a 300 x 600 Gaussian W.
    w = np.random.default_rng(0).normal(size=(300, 600))
    eig = np.linalg.eigvalsh(w @ w.T / 600)
    assert np.median(eig) == pytest.approx(mp_median(0.5), rel=0.02)


def test_threshold_conventions():
    s = np.array([5.0, 3.0, 2.0, 1.0])
    # Known noise: lambda*(beta) sqrt(n) sigma with n the larger side, either orientation.
    assert threshold(s, (4, 16), sigma=0.5) == pytest.approx(lambda_star(0.25) * 4 * 0.5)
    assert threshold(s, (16, 4), sigma=0.5) == threshold(s, (4, 16), sigma=0.5)
    # Unknown noise: omega(beta) * median singular value (median of 3, 2 = 2.5).
    assert threshold(s, (16, 4)) == pytest.approx(omega(0.25) * 2.5)
    with pytest.raises(ValueError, match="beta"):
        lambda_star(1.5)
    with pytest.raises(ValueError, match="shape"):
        threshold(s, (0, 4))


def planted(rng, m, n, rank, noise, lo, hi):
    U = np.linalg.qr(rng.normal(size=(m, rank)))[0]
    V = np.linalg.qr(rng.normal(size=(n, rank)))[0]
    return U @ np.diag(np.linspace(lo, hi, rank)) @ V.T + noise * rng.normal(size=(m, n))


@pytest.mark.parametrize("shape", [(100, 200), (200, 100), (80, 80)])
def test_planted_rank_recovery(shape):
    rng = np.random.default_rng(1)
    Y = planted(rng, *shape, rank=5, noise=1.0, lo=40.0, hi=80.0)
    s = np.linalg.svd(Y, compute_uv=False)
    assert int(np.sum(s > threshold(s, shape, sigma=1.0))) == 5
    assert int(np.sum(s > threshold(s, shape))) == 5
    noise_only = np.linalg.svd(rng.normal(size=shape), compute_uv=False)
    assert int(np.sum(noise_only > threshold(noise_only, shape))) == 0


def _problem(frac):
    rng = np.random.default_rng(2)
    mats = {
        "a": planted(rng, 40, 60, 4, 0.5, 20.0, 30.0),
        "b": planted(rng, 50, 30, 2, 0.5, 15.0, 25.0),
    }
    layers = []
    for name, Y in mats.items():
        k, l = Y.shape
        layers.append(LayerCost(name, "dense", (k, l), np.linalg.svd(Y, compute_uv=False),
                                k + l, k + l, k * l, k * l))
    o = sum(x.original_macs for x in layers)
    return AllocationProblem(tuple(layers), frac * o, frac * o)


def test_allocator_budget_mode():
    problem = _problem(0.2)
    alloc = GavishDonoho()(problem)
    s = alloc.stats
    assert s["natural_ranks"] == {"a": 4, "b": 2}
    assert s["natural_mac_ratio"] == pytest.approx((4 * 100 + 2 * 80) / 3900)
    assert s["threshold_multiplier"] < 1.0 and is_feasible(problem, alloc.ranks)
    for layer in problem.layers:  # the ranks are the threshold rule at the reported multiplier
        tau = s["thresholds"][layer.name]
        assert tau == pytest.approx(omega(min(layer.shape) / max(layer.shape))
                                    * np.median(layer.sigma))
        assert alloc.ranks[layer.name] == np.sum(layer.sigma > s["threshold_multiplier"] * tau)
    assert GavishDonoho()(_problem(1.0)).ranks == {"a": 40, "b": 30}
    with pytest.raises(BudgetError, match="gavish_donoho"):
        GavishDonoho()(_problem(0.03))
