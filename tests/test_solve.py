"""coblax.solve: both solvers against optima computed independently with cvxpy.

Convex separable problems (quadratic and exponential, one or both budgets binding,
with and without monotone groups), variable reduction, the bad-input contract
(iteration limit, NaN, wrong arguments) and a real COBLA objective at small n.
"""

from __future__ import annotations

import cvxpy as cp
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coblax import NonFiniteError, SolveResult, solve
from coblax.lowrank.decompose import factorize, get_kernel, trace_layers
from coblax.lowrank.objective import NetworkLoss
from coblax.lowrank.solve import reduce_window

METHODS = ["structured", "slsqp"]


def _problem(kind: str, case: str, n: int = 40, seed: int = 0):
    """(f, cvxpy objective builder, A, b): a convex separable problem on [0, 1]^n."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(1, 5, n)
    p = rng.uniform(1, 5, n) if case == "both_bind" else c * rng.uniform(0.9, 1.1, n)
    frac = {"mac_binds": (0.5, 0.9), "both_bind": (0.5, 0.45), "none_bind": (2.0, 2.0)}[case]
    A = np.stack([c, p]) * np.array([[1e6], [1e4]])  # MACs and parameters: different units
    b = np.array([frac[0] * A[0].sum(), frac[1] * A[1].sum()])
    if kind == "quadratic":
        a, t = rng.uniform(0.5, 3.0, n), rng.uniform(0.3, 1.4, n)

        def f(x):
            return float(0.5 * np.sum(a * (x - t) ** 2)), a * (x - t)

        def obj(x):
            return 0.5 * cp.sum(cp.multiply(a, cp.square(x - t)))
    else:  # sum_i w_i exp(-k_i x_i): like a loss that falls as triplets are kept
        w, k = rng.uniform(0.5, 2.0, n), rng.uniform(0.5, 4.0, n)

        def f(x):
            e = w * np.exp(-k * x)
            return float(np.sum(e)), -k * e

        def obj(x):
            return cp.sum(cp.multiply(w, cp.exp(cp.multiply(-k, x))))
    return f, obj, A, b


def _cvxpy_optimum(obj, A, b, n, groups=None) -> float:
    x = cp.Variable(n)
    cons = [x >= 0, x <= 1, (A / np.abs(b)[:, None]) @ x <= np.sign(b)]
    for s, e in groups or []:
        if e - s > 1:
            cons.append(x[s:e - 1] >= x[s + 1:e])
    prob = cp.Problem(cp.Minimize(obj(x)), cons)
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    assert prob.status == cp.OPTIMAL
    return float(prob.value)


def _assert_budgets_met(res: SolveResult, A, b):
    assert np.all(A @ res.x <= b * (1 + 1e-6)), (A @ res.x - b) / b
    assert np.all(res.x >= -1e-12) and np.all(res.x <= 1 + 1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["quadratic", "exponential"])
@pytest.mark.parametrize("case", ["mac_binds", "both_bind", "none_bind"])
def test_reaches_the_cvxpy_optimum(method, kind, case):
    f, obj, A, b = _problem(kind, case)
    ref = _cvxpy_optimum(obj, A, b, A.shape[1])
    res = solve(f, np.zeros(A.shape[1]), A, b, method=method, max_iter=300, tol=1e-10, rtol=1e-12)
    assert res.value == pytest.approx(ref, rel=1e-4)
    _assert_budgets_met(res, A, b)
    # one trace entry per iterate, x0 included, with unscaled slacks
    assert len(res.trace) == res.iterations + 1
    assert [t["iteration"] for t in res.trace] == list(range(len(res.trace)))
    assert res.trace[-1]["objective"] == pytest.approx(res.value, rel=1e-9)
    np.testing.assert_allclose(res.trace[-1]["slack"], b - A @ res.x, rtol=1e-6, atol=1e-6 * np.abs(b).max())
    assert res.kkt_residual < 1e-3 and res.n_free == A.shape[1]


@pytest.mark.parametrize("method", METHODS)
def test_monotone_groups_reach_the_cvxpy_optimum(method):
    f, obj, A, b = _problem("exponential", "both_bind", n=36, seed=3)
    sizes = [10, 14, 12]
    bounds = np.cumsum([0] + sizes)
    groups = list(zip(bounds[:-1], bounds[1:]))
    ref = _cvxpy_optimum(obj, A, b, 36, groups)
    free_ref = _cvxpy_optimum(obj, A, b, 36)
    assert ref > free_ref * (1 + 1e-3)  # the monotone constraints bind
    res = solve(f, np.zeros(36), A, b, method=method, groups=sizes, monotone=True, max_iter=300, tol=1e-10, rtol=1e-12)
    assert res.value == pytest.approx(ref, rel=1e-4)
    _assert_budgets_met(res, A, b)
    for s, e in groups:
        assert np.all(np.diff(res.x[s:e]) <= 1e-7)  # SLSQP's feasibility tolerance


def test_structured_solver_scales_where_slsqp_cannot():
    # n = 20,000 with a low-rank coupling term: finishes in a few seconds, O(n k) memory
    n = 20_000
    rng = np.random.default_rng(0)
    a, t = rng.uniform(0.5, 3.0, n), rng.uniform(0.3, 1.4, n)
    V = rng.normal(size=(3, n)) / np.sqrt(n)
    A = np.stack([rng.uniform(1, 5, n), rng.uniform(1, 5, n)])
    b = np.array([0.5, 0.45]) * A.sum(axis=1)

    def f(x):
        r = V @ x
        return float(0.5 * np.sum(a * (x - t) ** 2) + r @ r), a * (x - t) + 2 * V.T @ r

    res = solve(f, np.zeros(n), A, b, max_iter=200, tol=1e-7)
    assert res.success, res.message
    _assert_budgets_met(res, A, b)
    assert res.trace[-1]["objective"] < res.trace[0]["objective"]


def test_variable_reduction_fixes_leading_on_and_trailing_off():
    x0 = np.concatenate([np.r_[np.ones(6), np.zeros(14)], np.r_[np.ones(3), np.zeros(7)]])
    free, on = reduce_window(x0, [20, 10], 2)
    np.testing.assert_array_equal(np.flatnonzero(free), [4, 5, 6, 7, 21, 22, 23, 24])
    np.testing.assert_array_equal(np.flatnonzero(on), [0, 1, 2, 3, 20])
    free_f, _ = reduce_window(x0, [20, 10], 0.5)  # w = ceil(0.5 R): 10 and 5
    assert np.count_nonzero(free_f[:20]) == 16 and np.count_nonzero(free_f[20:]) == 8
    with pytest.raises(ValueError, match="window"):
        reduce_window(x0, [20, 10], 0)


@pytest.mark.parametrize("method", METHODS)
def test_solve_with_variable_reduction(method):
    f, obj, A, b = _problem("exponential", "both_bind", n=40, seed=5)
    x0 = np.zeros(40)
    x0[:8], x0[20:26] = 1.0, 1.0  # a feasible 0/1 warm start in two layers of 20
    assert np.all(A @ x0 <= b)
    res = solve(f, x0, A, b, method=method, groups=[20, 20], window=5, max_iter=300, tol=1e-10, rtol=1e-12)
    assert res.n_free == 20 and "20 of 40 variables free" in res.message
    free, on = reduce_window(x0, [20, 20], 5)
    np.testing.assert_array_equal(res.x[on], 1.0)
    np.testing.assert_array_equal(res.x[~free & ~on], 0.0)
    _assert_budgets_met(res, A, b)
    # the window spans everything: the same optimum as without reduction
    full = solve(f, x0, A, b, method=method, groups=[20, 20], window=40, max_iter=300, tol=1e-10, rtol=1e-12)
    assert full.n_free == 40
    assert full.value == pytest.approx(_cvxpy_optimum(obj, A, b, 40), rel=1e-4)
    assert res.value >= full.value * (1 - 1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_iteration_limit_is_reported_not_converged(method):
    f, _, A, b = _problem("exponential", "both_bind", n=40)
    res = solve(f, np.zeros(40), A, b, method=method, max_iter=2, tol=1e-12, rtol=1e-12)
    assert not res.success and res.status == "max_iter"
    assert res.iterations == 2 and res.kkt_residual > 0
    assert "KKT residual" in res.message and "not converged" in res.message


@pytest.mark.parametrize("method", METHODS)
def test_nan_stops_the_solve_naming_the_iteration(method):
    f, _, A, b = _problem("quadratic", "both_bind", n=20)
    calls = {"n": 0}

    def bad(x):
        calls["n"] += 1
        value, grad = f(x)
        return (float("nan"), grad) if calls["n"] >= 4 else (value, grad)

    with pytest.raises(NonFiniteError, match=r"non-finite .* at iteration \d+") as err:
        solve(bad, np.zeros(20), A, b, method=method, max_iter=50)
    assert err.value.iteration >= 1 and len(err.value.trace) >= 1
    assert all(np.isfinite(t["objective"]) for t in err.value.trace)


def test_bad_arguments_fail_at_the_entry_point():
    f, _, A, b = _problem("quadratic", "both_bind", n=10)
    with pytest.raises(ValueError, match="unknown solver method 'newton'"):
        solve(f, np.zeros(10), A, b, method="newton")
    with pytest.raises(ValueError, match="shape"):
        solve(f, np.zeros(9), A, b)
    with pytest.raises(ValueError, match="lower"):
        solve(f, np.zeros(10), A, b, lower=1.0, upper=0.0)
    with pytest.raises(ValueError, match="groups"):
        solve(f, np.zeros(10), A, b, groups=[4, 4], monotone=True)


class _TanhMLP(nn.Module):
    """A smooth network (tanh), so that E(m) is smooth and KKT points are sharp."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = jnp.tanh(nn.Dense(24, name="fc1")(x))
        x = jnp.tanh(nn.Dense(16, name="fc2")(x))
        return nn.Dense(5, name="fc3")(x)


def _mlp_loss():
    model = _TanhMLP()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 12))
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) * 2.0, params)
    y = np.asarray(jnp.argmax(model.apply(params, jnp.asarray(x)), axis=1)).astype(np.int32)  # teacher labels
    layers = [l for l in trace_layers(model, params, jnp.asarray(x[:1])) if l.decomposable]
    fs = {l.name: factorize(get_kernel(params, l.name), l, "zhang") for l in layers}
    return NetworkLoss(model, params, fs, (x, y), batch_size=64), fs


def test_both_solvers_agree_on_a_real_cobla_objective():
    with jax.enable_x64(True):
        loss, fs = _mlp_loss()
        sizes = loss.sizes
        # dense in x out at rank r costs r (in + out) MACs and parameters
        per_rank = np.concatenate([np.full(r, float(fs[n].first.shape[0] + fs[n].second.shape[-1]))
                                   for r, n in zip(sizes, loss.names)])
        A = np.stack([per_rank, per_rank * np.linspace(1.0, 2.0, per_rank.size)])
        x0 = np.full(loss.size, 0.3)
        b = A @ np.full(loss.size, 0.45)
        results = {m: solve(loss.value_and_grad, x0, A, b, method=m, max_iter=400, tol=1e-12, rtol=1e-12) for m in METHODS}
        assert loss.compiled_count() == 1  # no recompilation across both solves
    s, q = results["structured"], results["slsqp"]
    assert s.value == pytest.approx(q.value, rel=1e-4)
    assert s.value < s.trace[0]["objective"]
    for res in results.values():
        _assert_budgets_met(res, A, b)


def _cobla_problem():
    from coblax.lowrank.allocation import AllocationProblem, LayerCost

    class Loss:  # E(m) = Σ w σ² (1 − m)² + a smooth coupling: a stand-in network loss
        def __init__(self, layers):
            self.s2 = np.concatenate([l.sigma**2 for l in layers])

        def value_and_grad(self, m):
            r = 1 - m
            return float(np.sum(self.s2 * r**2) + 0.1 * np.sum(r) ** 2), -2 * self.s2 * r - 0.2 * np.sum(r)

        def value(self, m):
            return self.value_and_grad(m)[0]

        validation_loss = value

    def dense(name, k, l, decay):
        s = np.exp(-decay * np.arange(min(k, l)))
        return LayerCost(name, "dense", (k, l), s, k + l, k + l, k * l, k * l)

    layers = (dense("a", 60, 40, 0.05), dense("b", 80, 30, 0.3), dense("c", 50, 45, 0.02))
    o = sum(l.original_macs for l in layers)
    return AllocationProblem(layers, 0.35 * o, 0.3 * o, loss=Loss(layers), seed=0)


def test_cobla_relaxed_objective_agrees_between_solvers():
    from coblax.lowrank.allocation import is_feasible
    from coblax.lowrank.cobla import COBLA

    problem = _cobla_problem()
    out = {s: COBLA(solver=s, max_iter=300, tol=1e-9, rtol=1e-9, saturation_rounds=0)(problem) for s in METHODS}
    values = {s: a.stats["relaxed_objective"] for s, a in out.items()}
    assert values["structured"] == pytest.approx(values["slsqp"], rel=1e-4)
    for alloc in out.values():
        assert is_feasible(problem, alloc.ranks)
    assert out["structured"].stats["solver_status"] == "converged"


def test_cobla_at_the_iteration_limit_is_not_converged_but_rounded_feasible():
    from coblax.lowrank.allocation import is_feasible
    from coblax.lowrank.cobla import COBLA

    problem = _cobla_problem()
    alloc = COBLA(max_iter=1, saturation_rounds=0, window=10)(problem)
    assert alloc.stats["solver_status"] == "max_iter"
    assert "not converged" in alloc.stats["solver_message"] and "KKT residual" in alloc.stats["solver_message"]
    assert " of 115 variables free" in alloc.stats["solver_message"]
    assert is_feasible(problem, alloc.ranks)


def test_config_selects_the_solver():
    from coblax.app.config import CoblaConfig, ConfigError, parse_dataclass

    cfg = parse_dataclass(CoblaConfig, {"solver": "slsqp", "data_parallel": True, "window": 8}, "cobla")
    assert (cfg.solver, cfg.data_parallel, cfg.window) == ("slsqp", True, 8)
    assert CoblaConfig().solver in METHODS
    with pytest.raises(ConfigError, match="cobla.solver = 'newton' is not allowed; valid values: slsqp, structured"):
        parse_dataclass(CoblaConfig, {"solver": "newton"}, "cobla")


def test_empty_problem_returns_at_once():
    res = solve(lambda x: (0.0, x), np.zeros(0), np.zeros((2, 0)), np.ones(2))
    assert res.success and res.n_free == 0 and res.iterations == 0


# --------------------------------------------------------------------------- #
# convergence, multipliers, tolerances (issue 17)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", ["quadratic", "exponential"])
@pytest.mark.parametrize("case", ["mac_binds", "both_bind", "none_bind"])
def test_cvxpy_problems_end_converged_at_default_tolerances(kind, case):
    f, obj, A, b = _problem(kind, case)
    ref = _cvxpy_optimum(obj, A, b, A.shape[1])
    res = solve(f, np.zeros(A.shape[1]), A, b, max_iter=100)
    assert res.status == "converged" and res.success, res.message
    assert res.criterion in ("kkt", "f_change", "x_change", "stall")
    assert res.value == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("kind, case", [("quadratic", "both_bind"), ("quadratic", "mac_binds"),
                                        ("exponential", "both_bind"), ("exponential", "mac_binds")])
def test_multipliers_match_cvxpy_duals(kind, case):
    f, obj, A, b = _problem(kind, case)
    x = cp.Variable(A.shape[1])
    rows = (A / b[:, None]) @ x <= 1  # scaled rows keep the conic solver accurate
    prob = cp.Problem(cp.Minimize(obj(x)), [x >= 0, x <= 1, rows])
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    assert prob.status == cp.OPTIMAL
    dual = np.asarray(rows.dual_value, float) / b  # λ of A x <= b, in 1/MAC and 1/parameter
    res = solve(f, np.zeros(A.shape[1]), A, b, max_iter=300, tol=1e-12, rtol=1e-14, atol=0.0)
    assert res.multipliers.shape == (2,)
    big = dual > 1e-3 * dual.max()
    np.testing.assert_allclose(res.multipliers[big], dual[big], rtol=1e-4)
    assert np.all(res.multipliers[~big] <= 1e-3 * dual.max())
    # the KKT condition itself, in the problem's own units, at the returned point
    g = f(res.x)[1] + A.T @ res.multipliers
    inside = (res.x > 1e-6) & (res.x < 1 - 1e-6)
    assert np.max(np.abs(g[inside])) <= 1e-4 * np.max(np.abs(f(res.x)[1]))


class _ReluMLP(nn.Module):
    """A ReLU network: E(m) is only piecewise smooth (the case COBLA meets in practice)."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(24, name="fc1")(x))
        x = nn.relu(nn.Dense(16, name="fc2")(x))
        return nn.Dense(5, name="fc3")(x)


def test_relu_network_objective_converges_within_the_cap():
    model = _ReluMLP()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 12)).astype(np.float32)
    params = model.init(jax.random.PRNGKey(1), jnp.asarray(x[:1]))
    y = np.asarray(jnp.argmax(model.apply(params, jnp.asarray(x)), axis=1)).astype(np.int32)
    layers = [l for l in trace_layers(model, params, jnp.asarray(x[:1])) if l.decomposable]
    fs = {l.name: factorize(get_kernel(params, l.name), l, "zhang") for l in layers}
    loss = NetworkLoss(model, params, fs, (x, y), batch_size=100)
    per_rank = np.concatenate([np.full(r, float(fs[n].first.shape[0] + fs[n].second.shape[-1]))
                               for r, n in zip(loss.sizes, loss.names)])
    A = np.stack([per_rank, per_rank * np.linspace(1.0, 2.0, per_rank.size)])
    b = A @ np.full(loss.size, 0.5)
    res = solve(loss.value_and_grad, np.full(loss.size, 0.3), A, b, max_iter=100)
    assert res.status == "converged", res.message
    assert res.iterations < 100 and res.value < res.trace[0]["objective"]
    _assert_budgets_met(res, A, b)


def test_lbfgs_memory_carries_over_to_a_related_solve():
    f, _, A, b = _problem("exponential", "both_bind", n=60, seed=2)
    first = solve(f, np.zeros(60), A, b, max_iter=300)
    assert first.pairs is not None and len(first.pairs[0]) > 0
    # a perturbed budget: restarting from the learned curvature needs fewer evaluations
    b2 = b * 0.97
    cold = solve(f, first.x * 0.97, A, b2, max_iter=300)
    warm = solve(f, first.x * 0.97, A, b2, max_iter=300, pairs=first.pairs)
    assert cold.success and warm.success
    assert warm.value == pytest.approx(cold.value, rel=1e-5)
    assert warm.n_fun < cold.n_fun


@pytest.mark.parametrize("kwargs, name", [({"tol": 0.0}, "tol"), ({"tol": 0.5}, "tol"), ({"rtol": -1e-3}, "rtol"),
                                          ({"rtol": float("nan")}, "rtol"), ({"atol": -1.0}, "atol"),
                                          ({"atol": float("inf")}, "atol"), ({"max_iter": -1}, "max_iter"),
                                          ({"max_iter": 2.5}, "max_iter"), ({"tol": True}, "tol")])
def test_out_of_range_tolerances_are_named(kwargs, name):
    f, _, A, b = _problem("quadratic", "both_bind", n=10)
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        solve(f, np.zeros(10), A, b, **kwargs)
    from coblax.lowrank.cobla import COBLA

    with pytest.raises(ValueError, match=rf"^{name} must be"):
        COBLA(**kwargs)
