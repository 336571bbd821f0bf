"""SLSQP driver on a separable quadratic whose KKT point is computed independently."""

from __future__ import annotations

import numpy as np
import pytest

from coblax.lowrank.sqp import solve_slsqp


def _kkt_solution(a, t, c, p, C, P):
    """Minimize sum a_i/2 (m_i - t_i)^2 s.t. c.m <= C, p.m <= P, 0 <= m <= 1.

    Stationarity gives m_i(l, u) = clip(t_i - (l c_i + u p_i) / a_i, 0, 1); the
    multipliers l, u >= 0 are found by nested bisection on complementary slackness.
    """
    def m_of(lam, mu):
        return np.clip(t - (lam * c + mu * p) / a, 0, 1)

    def lam_for(mu):
        if c @ m_of(0.0, mu) <= C:
            return 0.0
        lo, hi = 0.0, 1e6
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if c @ m_of(mid, mu) > C else (lo, mid)
        return hi

    if p @ m_of(lam_for(0.0), 0.0) <= P:
        mu = 0.0
    else:
        lo, hi = 0.0, 1e6
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if p @ m_of(lam_for(mid), mid) > P else (lo, mid)
        mu = hi
    return m_of(lam_for(mu), mu)


@pytest.mark.parametrize("case", ["mac_binds", "both_bind", "none_bind"])
def test_reaches_known_optimum(case):
    rng = np.random.default_rng({"mac_binds": 0, "both_bind": 1, "none_bind": 2}[case])
    n = 30
    a = rng.uniform(0.5, 3.0, n)
    t = rng.uniform(0.3, 1.4, n)  # some targets above the upper bound
    c = rng.uniform(1, 5, n)
    p = rng.uniform(1, 5, n) if case == "both_bind" else c * rng.uniform(0.9, 1.1, n)
    full_c, full_p = c.sum(), p.sum()
    C, P = {"mac_binds": (0.5 * full_c, 0.9 * full_p), "both_bind": (0.5 * full_c, 0.45 * full_p),
            "none_bind": (2 * full_c, 2 * full_p)}[case]
    expected = _kkt_solution(a, t, c, p, C, P)

    def f(m):
        return float(0.5 * np.sum(a * (m - t) ** 2)), a * (m - t)

    res = solve_slsqp(f, np.zeros(n), np.stack([c, p]), np.array([C, P]), max_iter=200, ftol=1e-12)
    assert res.success, res.message
    np.testing.assert_allclose(res.x, expected, atol=1e-4)
    assert c @ res.x <= C * (1 + 1e-6) and p @ res.x <= P * (1 + 1e-6)
    # trace: one entry for x0 and one per iteration, objective of the last = result
    assert len(res.trace) == res.iterations + 1
    assert res.trace[-1]["objective"] == pytest.approx(res.value)
    ref_slack = np.array([C - c @ expected, P - p @ expected])
    np.testing.assert_allclose(res.trace[-1]["slack"], ref_slack, atol=1e-3 * max(C, P))
    active = {"mac_binds": [True, False], "both_bind": [False, True], "none_bind": [False, False]}[case]
    assert list(ref_slack < 1e-6 * max(C, P)) == active  # the cases cover what they claim
