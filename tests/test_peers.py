"""The peer allocators ALDS, LC and BALF against brute force on tiny problems."""

import itertools

import numpy as np
import pytest

from coblax.baselines.alds import ALDS, alds_ranks, max_relative_error, relative_errors
from coblax.baselines.balf import BALF, balf_objective, combined_cost, lagrangian_ranks
from coblax.baselines.lc import LC, c_step, c_step_mixed, c_step_rank
from coblax.lowrank.allocation import AllocationProblem, BudgetError, LayerCost, is_feasible
from coblax.lowrank.registry import get_allocator


def _layer(name, sigma, k, l, spatial=1):
    sigma = np.sort(np.asarray(sigma, float))[::-1]
    return LayerCost(name, "conv" if spatial > 1 else "dense", (k, l), sigma, float(spatial * (k + l)),
                     float(k + l), float(spatial * k * l), float(k * l))


def _random_problem(rng, n_layers=3, mac=0.5, param=0.5, spatial=False, min_rank=1):
    layers = []
    for i in range(n_layers):
        k, l = int(rng.integers(2, 7)), int(rng.integers(2, 7))
        sigma = rng.gamma(1.0, size=min(k, l))
        layers.append(_layer(f"l{i}", sigma, k, l, int(rng.choice([1, 4])) if spatial else 1))
    o_mac = sum(x.original_macs for x in layers)
    o_par = sum(x.original_params for x in layers)
    return AllocationProblem(tuple(layers), mac * o_mac, param * o_par, min_rank=min_rank)


def _all_allocations(problem):
    ranges = [range(problem.min_rank, x.full_rank + 1) for x in problem.layers]
    for combo in itertools.product(*ranges):
        yield dict(zip(problem.names, combo))


# ------------------------------------------------------------------------------ ALDS


def test_alds_relative_errors_hand_values():
    layer = _layer("a", [4.0, 2.0, 1.0], 3, 10)  # saturation: ceil(30/13) = 3 = full rank
    np.testing.assert_allclose(relative_errors(layer), [1.0, 0.5, 0.25, 0.0])
    small = _layer("b", [4.0, 2.0, 1.0], 3, 3)  # saturation ceil(9/6) = 2: rank 2 is original
    np.testing.assert_allclose(relative_errors(small), [1.0, 0.5, 0.0, 0.0])


@pytest.mark.parametrize("seed", range(12))
def test_alds_is_the_min_max_over_all_feasible_allocations(seed):
    rng = np.random.default_rng(seed)
    problem = _random_problem(rng, mac=float(rng.uniform(0.3, 0.9)), param=float(rng.uniform(0.3, 0.9)),
                              spatial=bool(seed % 2))
    errors = {x.name: relative_errors(x) for x in problem.layers}
    feasible = [r for r in _all_allocations(problem) if is_feasible(problem, r)]
    if not feasible:
        with pytest.raises(BudgetError, match="alds"):
            ALDS()(problem)
        return
    best = min(max_relative_error(problem, r, errors) for r in feasible)
    eps, ranks = alds_ranks(problem)
    assert is_feasible(problem, ranks)
    assert max_relative_error(problem, ranks, errors) == pytest.approx(best, abs=1e-15)
    assert eps == pytest.approx(best, abs=1e-15)
    # each layer takes the smallest rank (>= min_rank) whose error is <= eps
    for layer in problem.layers:
        r = ranks[layer.name]
        assert errors[layer.name][r] <= eps
        assert r == problem.min_rank or errors[layer.name][r - 1] > eps


def test_alds_refuses_bad_slices():
    # slices > 1 and "search" are built (tests/test_alds_slices.py); these are not slice counts
    for bad in (0, -2, True, 2.0, "many"):
        with pytest.raises(ValueError, match="slices"):
            get_allocator("alds", slices=bad)


# ------------------------------------------------------------------------------ BALF


def _proportional_problem(rng, budget):
    """Dense layers: MACs = parameters per rank, so the two budgets are one knapsack."""
    layers = []
    for i in range(3):
        k, l = int(rng.integers(2, 6)), int(rng.integers(2, 6))
        layers.append(_layer(f"d{i}", rng.gamma(1.0, size=min(k, l)), k, l))
    o = sum(x.original_params for x in layers)
    return AllocationProblem(tuple(layers), budget * o, budget * o)


@pytest.mark.parametrize("seed", range(12))
def test_balf_lagrangian_solution_is_the_knapsack_optimum_at_its_cost(seed):
    rng = np.random.default_rng(100 + seed)
    problem = _proportional_problem(rng, float(rng.uniform(0.6, 0.95)))
    floor = {x.name: 1 for x in problem.layers}
    if not is_feasible(problem, floor):
        with pytest.raises(BudgetError, match="balf"):
            BALF()(problem)
        return
    alloc = BALF()(problem)
    assert is_feasible(problem, alloc.ranks)
    used = sum(combined_cost(problem, x, alloc.ranks[x.name]) for x in problem.layers)
    # brute force: best sum of normalized energies among allocations costing at most as much
    best = max(balf_objective(problem, r) for r in _all_allocations(problem)
               if sum(combined_cost(problem, x, r[x.name]) for x in problem.layers) <= used + 1e-12)
    assert balf_objective(problem, alloc.ranks) == pytest.approx(best, abs=1e-12)


def test_balf_bisection_reaches_the_budget_breakpoint():
    # When the budget equals the cost of a Lagrangian solution the bisection finds it exactly.
    rng = np.random.default_rng(7)
    problem = _proportional_problem(rng, 0.6)
    lam_ranks = lagrangian_ranks(problem, 0.05)
    cost = sum(x.params(lam_ranks[x.name]) for x in problem.layers)
    tight = AllocationProblem(problem.layers, cost, cost)
    alloc = BALF()(tight)
    brute = max(balf_objective(tight, r) for r in _all_allocations(tight) if is_feasible(tight, r))
    assert balf_objective(tight, alloc.ranks) == pytest.approx(brute, abs=1e-12)


def test_balf_refill_leaves_no_room():
    from coblax.lowrank.allocation import has_room

    rng = np.random.default_rng(3)
    layers = (_layer("a", rng.gamma(1.0, size=12), 12, 20, 4), _layer("b", rng.gamma(1.0, size=16), 16, 16),
              _layer("c", rng.gamma(1.0, size=10), 30, 10, 9))
    o_mac, o_par = sum(x.original_macs for x in layers), sum(x.original_params for x in layers)
    problem = AllocationProblem(layers, 0.6 * o_mac, 0.5 * o_par)
    alloc = BALF(refill=True)(problem)
    assert is_feasible(problem, alloc.ranks) and has_room(problem, alloc.ranks) == []
    assert alloc.stats["objective"] >= alloc.stats["lagrangian_objective"]


# ------------------------------------------------------------------------------ LC


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_lc_c_step_matches_brute_force_enumeration(seed, normalize):
    rng = np.random.default_rng(200 + seed)
    k, l = int(rng.integers(3, 8)), int(rng.integers(3, 8))
    a = rng.normal(size=(k, l))
    s = np.linalg.svd(a, compute_uv=False)
    layer = _layer("x", s, k, l, spatial=4)
    problem = AllocationProblem((layer,), layer.original_macs, layer.original_params)
    mu, alpha = float(rng.uniform(0.1, 2.0)), float(rng.uniform(0.0, 0.3))
    norm = float(np.sum(a**2)) if normalize else 1.0
    best = None
    for r in range(1, layer.full_rank + 1):
        if layer.is_original(r):
            approx = a  # original form: exact
        else:  # Eckart-Young: the truncated SVD is the best rank-r approximation
            u, sv, vt = np.linalg.svd(a, full_matrices=False)
            approx = (u[:, :r] * sv[:r]) @ vt[:r]
        cost = layer.macs(r) / problem.mac_max + layer.params(r) / problem.param_max
        value = alpha * cost + 0.5 * mu * float(np.sum((a - approx) ** 2)) / norm
        if best is None or value < best[0] - 1e-12:
            best = (value, layer.full_rank if layer.is_original(r) else r)  # one original form
    assert c_step_rank(problem, layer, s, alpha, mu, normalize) == best[1]


def test_lc_c_step_alpha_meets_the_budgets_and_is_smallest():
    rng = np.random.default_rng(5)
    layers = (_layer("a", rng.gamma(1.0, size=12), 12, 20, 4), _layer("b", rng.gamma(1.0, size=16), 16, 16),
              _layer("c", rng.gamma(1.0, size=10), 30, 10, 9))
    o_mac, o_par = sum(x.original_macs for x in layers), sum(x.original_params for x in layers)
    problem = AllocationProblem(layers, 0.5 * o_mac, 0.4 * o_par)
    spectra = {x.name: np.asarray(x.sigma) for x in problem.layers}
    alpha, ranks = c_step(problem, spectra, 0.5)
    assert is_feasible(problem, ranks)
    below = {x.name: c_step_rank(problem, x, spectra[x.name], alpha * (1 - 1e-6), 0.5) for x in problem.layers}
    assert alpha == 0.0 or not is_feasible(problem, below)


def _distortion(problem, spectra, ranks):
    """sum_i tail_i(r_i) / ||s_i||^2 by hand (0 in original form)."""
    total = 0.0
    for layer in problem.layers:
        s2 = np.asarray(spectra[layer.name], float) ** 2
        r = ranks[layer.name]
        total += 0.0 if layer.is_original(r) else float(np.sum(s2[r:]) / np.sum(s2))
    return total


def test_lc_cost_mix_charges_the_binding_budget():
    """Two budgets, two multipliers: with the MAC budget tight and the parameter budget
    slack, the mixed C step keeps less tail energy out than one multiplier on the plain
    sum of both costs, meets both budgets, and is the least-distortion one of its thetas;
    with one mix it is the plain-sum C step."""
    rng = np.random.default_rng(13)
    layers = (_layer("wide", rng.gamma(1.0, size=8), 8, 12, spatial=16),   # MAC-heavy: 16 positions
              _layer("deep", rng.gamma(1.0, size=10), 10, 40),             # parameter-heavy
              _layer("mid", rng.gamma(1.0, size=6), 6, 9, spatial=4))
    o_mac, o_par = sum(x.original_macs for x in layers), sum(x.original_params for x in layers)
    problem = AllocationProblem(layers, 0.4 * o_mac, 1.0 * o_par)
    spectra = {x.name: np.asarray(x.sigma) for x in layers}
    _, plain = c_step(problem, spectra, 0.5)
    alpha, theta, mixed = c_step_mixed(problem, spectra, 0.5)
    assert is_feasible(problem, plain) and is_feasible(problem, mixed)
    assert _distortion(problem, spectra, mixed) < _distortion(problem, spectra, plain) - 0.1  # 0.78 vs 1.00
    assert theta > 0.5  # the MAC multiplier weighs more
    for t in np.linspace(0.0, 1.0, 11):
        _, other = c_step(problem, spectra, 0.5, theta=float(t))
        assert _distortion(problem, spectra, mixed) <= _distortion(problem, spectra, other) + 1e-12
    assert c_step_mixed(problem, spectra, 0.5, mixes=1)[2] == plain


def test_lc_unreachable_budget_names_the_smallest_reachable():
    layer = _layer("a", [3.0, 2.0, 1.0], 3, 9)
    problem = AllocationProblem((layer,), 0.01, 0.01)
    with pytest.raises(BudgetError, match=r"method lc cannot meet the budget: its smallest allocation costs 0\.4444"):
        LC()(problem)


def _tiny_mlp():
    """(model, variables, x, y): a 10-12-3 tanh MLP at init on 200 blob points."""
    import flax.linen as nn
    import jax

    from tests.helpers import blobs

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="fc2")(nn.tanh(nn.Dense(12, name="fc1")(x)))

    x, y = blobs(n=200, d=10)
    model = Net()
    return model, model.init(jax.random.PRNGKey(0), x[:1]), x, y


def _tiny_mlp_problem():
    """The tiny MLP's allocation problem at 0.6 / 0.6 with its trainer attached (LC's L steps)."""
    from coblax.lowrank.costs import make_problem, network_cost
    from coblax.lowrank.decompose import factorize, get_kernel, trace_layers
    from coblax.lowrank.training import attach_trainer

    model, variables, x, y = _tiny_mlp()
    traced = trace_layers(model, variables, x[:1])
    full = {t.name: factorize(get_kernel(variables, t.name), t, "tai") for t in traced}
    net = network_cost(traced, variables, {n: np.asarray(f.sigma) for n, f in full.items()}, "tai")
    problem = make_problem(net, 0.6, 0.6, "decomposed")
    return attach_trainer(problem, model, variables, {n: (f.kind, f.scheme) for n, f in full.items()}, (x, y))


def test_lc_on_a_network_trains_and_meets_the_budget():
    """LC with its L steps on a tiny MLP: the budget holds, the steps are counted."""
    problem = _tiny_mlp_problem()
    alloc = LC(steps=3, l_steps=5, lr=0.01, batch_size=32)(problem)
    assert alloc.status == "ok" and is_feasible(problem, alloc.ranks)
    assert alloc.stats["training_steps"] == 15
    assert len(alloc.stats["lc_trace"]) == 4


def test_lc_progress_bar_counts_its_lc_steps_only_when_asked(capsys):
    """``progress = True`` draws a bar over the ``steps`` LC steps with the L-step loss, μ and
    the total rank; the default draws none."""
    problem = _tiny_mlp_problem()
    LC(steps=2, l_steps=3, lr=0.01, batch_size=32)(problem)
    assert "lc L/C steps" not in capsys.readouterr().err
    LC(steps=2, l_steps=3, lr=0.01, batch_size=32, progress=True)(problem)
    err = capsys.readouterr().err
    assert "lc L/C steps" in err and "/2 [" in err and "loss=" in err and "mu=9.81e-05" in err  # mu0 * 1.09


def test_lc_as_cobla_warm_start_does_not_train():
    """LC's warm start is its first C step: no L step runs, and the ranks are the C step's on
    the network's weights (numpy's singular values of each kernel), not on the problem's."""
    from coblax.lowrank.decompose import get_kernel
    from coblax.lowrank.warm_start import warm_start_ranks

    problem = _tiny_mlp_problem()
    ranks = warm_start_ranks(problem, "lc")
    assert problem.training.steps_done == 0
    variables = problem.training.variables
    spectra = {n: np.linalg.svd(np.asarray(get_kernel(variables, n), np.float64), compute_uv=False)
               for n in problem.names}
    assert ranks == c_step_mixed(problem, spectra, LC().mu0)[2]
    assert is_feasible(problem, ranks)


def test_lc_hands_on_its_trained_network():
    """LC's network is its last C step's Delta = the rank-r truncated SVD of the trained
    A = w - lambda/mu (handed on as the kernels of ``allocation.weights``): every factored
    layer of ``allocate``'s result equals numpy's rank-r truncation of that kernel, the
    other trained parameters (biases) come along, and with 0 LC steps nothing is trained."""
    from coblax import allocate
    from coblax.lowrank.decompose import get_kernel
    from coblax.lowrank.training import TrainedVariables

    model, variables, x, y = _tiny_mlp()
    result = allocate(model, variables, (x, y), rules=[("fc.*", "dense")], mac=0.6, param=0.6,
                      method=LC(steps=3, l_steps=20, lr=0.1, batch_size=32))
    weights = result.allocation.weights
    assert isinstance(weights, TrainedVariables)
    factored = [n for n, r in result.ranks.items() if r < result.full_ranks[n]]
    assert factored
    for name in factored:
        a = np.asarray(get_kernel(weights.variables, name), np.float64)
        assert not np.allclose(a, np.asarray(get_kernel(variables, name)), atol=1e-4)  # trained
        u, s, vt = np.linalg.svd(a, full_matrices=False)
        r = result.ranks[name]
        f = result.variables["factors"][name]
        np.testing.assert_allclose(np.asarray(f["first"]) @ np.asarray(f["second"]), (u[:, :r] * s[:r]) @ vt[:r],
                                   atol=1e-5)
    assert not np.allclose(result.variables["params"]["fc1"]["bias"], variables["params"]["fc1"]["bias"])
    plain = allocate(model, variables, (x, y), rules=[("fc.*", "dense")], mac=0.6, param=0.6,
                     method=LC(steps=0))
    assert plain.allocation.weights is None
    np.testing.assert_array_equal(plain.variables["params"]["fc1"]["bias"], variables["params"]["fc1"]["bias"])
