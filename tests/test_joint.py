"""COBLA's ``joint = S``: masks and factors trained together, projected onto the budgets.

References: scipy's SLSQP for the Euclidean projection on tiny polytopes, the SVD
(the factored kernel at full rank is the kernel), an independent forward pass for
the training loss, the problem's own cost vectors for every step's feasibility.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import minimize

import coblax
from coblax import allocate
from coblax.lowrank import joint as joint_mod
from coblax.lowrank.allocation import AllocationProblem, LayerCost
from coblax.lowrank.decompose import factored_apply, factorize, get_kernel, trace_layers, truncate
from coblax.lowrank.joint import factors_kernel, joint_train, rebind_loss
from coblax.lowrank.objective import NetworkLoss
from coblax.lowrank.projection import project_budget

# -- the projection -------------------------------------------------------------------


def _scipy_projection(c, A, b):
    cons = [{"type": "ineq", "fun": lambda z, a=a, bb=bb: (bb - a @ z) / abs(bb), "jac": lambda z, a=a, bb=bb: -a / abs(bb)}
            for a, bb in zip(A, b)]
    res = minimize(lambda z: 0.5 * np.sum((z - c) ** 2), np.clip(c, 0, 1) * 0.0, jac=lambda z: z - c,
                   bounds=[(0.0, 1.0)] * c.size, constraints=cons, method="SLSQP",
                   options={"ftol": 1e-15, "maxiter": 1000})
    assert res.success, res.message
    return res.x


@pytest.mark.parametrize("seed", range(6))
def test_projection_matches_scipy_on_tiny_polytopes(seed):
    rng = np.random.default_rng(seed)
    n = 7
    # a MAC-like row and a parameter-like row three orders of magnitude apart
    A = np.stack([rng.uniform(1, 5, n) * 1e4, rng.uniform(1, 5, n) * 10.0])
    b = np.array([0.35, 0.5]) * A.sum(axis=1)
    c = rng.uniform(-0.5, 1.5, n)
    z, lam, ok = project_budget(c, A, b)
    ref = _scipy_projection(c, A, b)
    assert ok
    np.testing.assert_allclose(z, ref, atol=1e-6)
    assert np.all(z >= 0) and np.all(z <= 1) and np.all(A @ z <= b * (1 + 1e-9))
    assert np.all(lam >= 0)


def test_projection_of_a_feasible_point_is_itself():
    A = np.array([[1.0, 2.0, 3.0]])
    c = np.array([0.1, 0.2, 0.3])
    z, lam, ok = project_budget(c, A, np.array([10.0]))
    np.testing.assert_array_equal(z, c)
    assert ok and lam[0] == 0.0


def test_projection_closed_form_one_row():
    # one row a·z <= b with every z inside the box: z = c - λ a, λ = (a·c - b) / ‖a‖²
    a = np.array([1.0, 2.0, 2.0])
    c = np.array([0.6, 0.7, 0.8])
    z, lam, _ = project_budget(c, a[None], np.array([2.0]))
    lam_ref = (a @ c - 2.0) / (a @ a)
    np.testing.assert_allclose(z, c - lam_ref * a, atol=1e-12)
    np.testing.assert_allclose(lam, [lam_ref], rtol=1e-9)


# -- factored kernels -----------------------------------------------------------------


class _CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(5, (3, 2), strides=(1, 1), padding="SAME", name="conv")(x))
        return nn.Dense(4, name="fc")(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("scheme", ["tai", "zhang"])
def test_factors_kernel_reproduces_the_kernel_at_full_rank(scheme):
    model = _CNN()
    x = jnp.ones((1, 6, 6, 3))
    variables = model.init(jax.random.key(1), x)
    layers = {layer.name: layer for layer in trace_layers(model, variables, x, {})}
    for name, sch in (("conv", scheme), ("fc", "tai")):
        kernel = np.asarray(get_kernel(variables, name))
        f = factorize(kernel, layers[name], sch)
        rebuilt = factors_kernel(f, np.ones(f.sigma.shape[0]), kernel.shape)
        np.testing.assert_allclose(rebuilt, kernel, atol=1e-5)
        # the SVD's balanced factors have columns of norm √σ (orthonormal U, V): weight
        # normalization to the starting norms rescales grown factors back to them
        a, b = joint_mod._split_sigma(f)
        norms = joint_mod._start_norms({name: (a, b)}, True)[name]
        np.testing.assert_allclose(norms[0], np.sqrt(f.sigma), rtol=1e-5)
        np.testing.assert_allclose(norms[1], np.sqrt(f.sigma), rtol=1e-5)
        a_n, b_n = joint_mod._effective(2.0 * a, 3.0 * b, norms)
        np.testing.assert_allclose(a_n, a, atol=1e-5)
        np.testing.assert_allclose(b_n, b, atol=1e-5)
        # a mask drops triplets: the kernel of the truncated layer (Eckart-Young's rank-2 part)
        mask = np.zeros(f.sigma.shape[0])
        mask[:2] = 1.0
        t = truncate(f, mask)
        y_trunc = factored_apply(model, variables, {name: t}, jnp.ones((2, 6, 6, 3)))
        swapped = jax.tree.map(lambda v: v, variables)
        swapped = _with_kernel(swapped, name, factors_kernel(f, mask, kernel.shape))
        np.testing.assert_allclose(model.apply(swapped, jnp.ones((2, 6, 6, 3))), y_trunc, atol=1e-4)


def _with_kernel(variables, name, kernel):
    params = dict(variables["params"])
    params[name] = dict(params[name], kernel=jnp.asarray(kernel, jnp.float32))
    return {**variables, "params": params}


# -- joint training through allocate ---------------------------------------------------


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(24, name="fc1")(x))
        return nn.Dense(3, name="fc2")(x)


RULES = [("fc1|fc2", "dense")]


@functools.lru_cache(maxsize=1)
def _setup():
    """A tiny dense net trained a little on Gaussian blobs (so the budget costs accuracy)."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)) * 1.2
    y = rng.integers(0, 3, size=600).astype(np.int32)
    x = (centers[y] + rng.normal(size=(600, 16))).astype(np.float32)
    model = _MLP()
    variables = model.init(jax.random.key(0), jnp.asarray(x[:1]))
    tx = optax.adam(1e-2)
    params, opt = variables["params"], tx.init(variables["params"])

    @jax.jit
    def step(params, opt):
        def loss(p):
            out = model.apply({"params": p}, x)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y))

        g = jax.grad(loss)(params)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(params, u), opt

    for _ in range(60):
        params, opt = step(params, opt)
    return model, {"params": params}, (x, y)


def _allocate(**cobla):
    model, variables, data = _setup()
    method = coblax.allocators.cobla(max_iter=15, roundings=3, local_search=0, polish=0, **cobla)
    return allocate(model, variables, data, rules=RULES, mac=0.3, param=0.3, method=method)


def _train_loss(model, variables, factors, m_blocks, x, y):
    scales = {n: jnp.asarray(m_blocks[n], jnp.float32) * factors[n].sigma for n in factors}
    out = factored_apply(model, variables, factors, jnp.asarray(x), scales)
    return float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, jnp.asarray(y))))


def test_every_step_is_feasible_and_joint_lowers_the_training_loss(monkeypatch):
    seen = []
    real = joint_mod.project_budget

    def spy(c, A, b):
        out = real(c, A, b)
        seen.append(np.asarray(out[0]))
        return out

    monkeypatch.setattr(joint_mod, "project_budget", spy)
    steps = 60
    result = _allocate(joint=steps, joint_lr=3e-3, joint_mask_lr=2e-2)
    stats = result.allocation.stats
    assert len(seen) == steps and stats["joint_steps"] == steps
    # every step's m within the budgets (the problem's own costs) and the box
    net = result.cost
    saturated = set(stats["saturated_layers"])
    free = [layer for layer in net.layers if layer.name not in saturated]
    mac_max = 0.3 * sum(layer.original_macs for layer in net.layers) - sum(
        layer.original_macs for layer in net.layers if layer.name in saturated)
    par_max = 0.3 * sum(layer.original_params for layer in net.layers) - sum(
        layer.original_params for layer in net.layers if layer.name in saturated)
    for z in seen:
        z32 = z.astype(np.float32).astype(np.float64)  # as the network used it
        assert np.all(z32 >= 0.0) and np.all(z32 <= 1.0)
        blocks = np.split(z32, np.cumsum([layer.full_rank for layer in free])[:-1])
        macs = sum(layer.mac_per_rank * blk.sum() for layer, blk in zip(free, blocks))
        pars = sum(layer.param_per_rank * blk.sum() for layer, blk in zip(free, blocks))
        assert macs <= mac_max * (1 + 1e-6) and pars <= par_max * (1 + 1e-6)
    assert stats["joint_max_violation"] <= 1e-6 and len(stats["joint_violation_trace"]) == steps
    assert stats["joint_mask_change"] > 1e-3  # the masks did move

    # the training loss (an independent forward pass over all training data): the trained
    # network at the trained m below the original weights at the relaxed solution
    model, variables, (x, y) = _setup()
    plain = _allocate()
    full = {n: factorize(np.asarray(get_kernel(variables, n)), layer, "tai") for n, layer in
            ((layer.name, layer) for layer in trace_layers(model, variables, jnp.asarray(x[:1]), {})
             if layer.name in ("fc1", "fc2"))}
    before = _train_loss(model, variables, full, plain.allocation.relaxed, x, y)
    w = result.allocation.weights
    after = _train_loss(model, w.variables, w.factors, result.allocation.relaxed, x, y)
    assert after < before - 0.01, (before, after)
    assert stats["joint_objective_after"] < stats["joint_objective_before"]


def test_joint_starts_from_the_relaxed_network_on_the_whitened_basis(monkeypatch):
    # Whitened factors (first = L⁻ᵀU) do not have columns of norm √σ. With a learning rate
    # of 1e-10 the trained network must be the starting one: the factors returned equal the
    # whitened SVD's and E(m) after equals E(m) before. (Normalizing to √σ instead changed
    # the starting network: ResNet-20's first joint loss was 107.8 against E = 0.035.)
    from coblax.lowrank import api
    from coblax.lowrank.decompose import factorize_whitened

    monkeypatch.setattr(api, "allocator_spectrum", lambda allocator, default="weight": "whitened")
    result = _allocate(joint=2, joint_lr=1e-10, joint_mask_lr=1e-10)
    stats = result.allocation.stats
    np.testing.assert_allclose(stats["joint_objective_after"], stats["joint_objective_before"], rtol=1e-4)
    model, variables, (x, _) = _setup()
    layers = {layer.name: layer for layer in trace_layers(model, variables, jnp.asarray(x[:1]), {})}
    hidden = np.asarray(nn.relu(x @ variables["params"]["fc1"]["kernel"] + variables["params"]["fc1"]["bias"]))
    for name, inputs in (("fc1", x), ("fc2", hidden)):
        gram = np.asarray(inputs, np.float64).T @ np.asarray(inputs, np.float64)
        ref = factorize_whitened(np.asarray(get_kernel(variables, name)), layers[name], "tai", gram)
        norms = np.linalg.norm(np.asarray(ref.first, np.float64) * np.sqrt(ref.sigma), axis=0)
        assert np.max(np.abs(norms / np.sqrt(ref.sigma) - 1.0)) > 0.1  # not the weight SVD's norms
        got = result.allocation.weights.factors[name]
        np.testing.assert_allclose(got.first, ref.first, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(got.second, ref.second, rtol=1e-3, atol=1e-5)


def test_the_factored_network_carries_the_trained_factors():
    result = _allocate(joint=20)
    alloc = result.allocation
    w = alloc.weights
    assert isinstance(w, joint_mod.TrainedWeights)
    model, _, (x, _) = _setup()
    # the network handed on is the rounded trained network: layers kept factored with
    # their masks, layers kept original through the kernel rebuilt from the trained factors
    scales = {n: jnp.asarray(alloc.masks[n], jnp.float32) * w.factors[n].sigma for n in w.factors}
    ref = factored_apply(model, w.variables, w.factors, jnp.asarray(x[:50]), scales)
    got = result.apply(result.variables, jnp.asarray(x[:50]))
    np.testing.assert_allclose(got, ref, atol=1e-4)
    for n in result.variables["factors"]:
        t = truncate(w.factors[n], alloc.masks[n])
        np.testing.assert_allclose(result.variables["factors"][n]["first"], t.first, atol=1e-6)


def test_joint_hard_trains_on_at_the_rounded_ranks(monkeypatch):
    # joint = 40, joint_hard = 15: 25 steps with free masks, a rounding, then 15 steps with
    # every mask fixed at the rounded ones, continuing the soft phase's weights.
    calls = []
    real = joint_mod.joint_train

    def spy(problem, m, idx, A, b, steps, *args, **kwargs):
        out = real(problem, m, idx, A, b, steps, *args, **kwargs)
        calls.append({"m": np.asarray(m).copy(), "idx": np.asarray(idx), "steps": steps, "out": out})
        return out

    monkeypatch.setattr(joint_mod, "joint_train", spy)
    result = _allocate(joint=40, joint_hard=15, joint_lr=3e-3, joint_mask_lr=2e-2)
    assert [c["steps"] for c in calls] == [25, 15]
    assert calls[0]["idx"].size > 0 and calls[1]["idx"].size == 0
    alloc, stats = result.allocation, result.allocation.stats
    # the hard phase's masks are the rounded answer, support and values (polish is off)
    hard_m = calls[1]["m"]
    sizes = np.cumsum([np.size(alloc.masks[n]) for n in alloc.masks])[:-1]
    for n, block in zip(alloc.masks, np.split(hard_m, sizes)):
        np.testing.assert_allclose(alloc.masks[n], block, atol=1e-6)
        assert stats["joint_hard_ranks"][n] == alloc.ranks[n] == np.count_nonzero(block)
    # the hard phase starts from the soft phase's weights (its loss before = the soft
    # network at the rounded masks) and moves only the kept triplets: a dropped triplet
    # gets no gradient, so Adam leaves it where the soft phase did
    soft_w, hard_w = calls[0]["out"][2], alloc.weights
    assert hard_w is calls[1]["out"][2]
    moved_kept = False
    for n, block in zip(alloc.masks, np.split(hard_m, sizes)):
        dropped, kept = block == 0, block > 0
        a0, a1 = np.asarray(soft_w.factors[n].first), np.asarray(hard_w.factors[n].first)
        np.testing.assert_allclose(a1[:, dropped], a0[:, dropped], rtol=1e-5, atol=1e-7)  # split/join rounding
        moved_kept |= bool(np.max(np.abs(a1[:, kept] - a0[:, kept])) > 1e-4)
    assert moved_kept
    soft_params = soft_w.variables["params"]["fc2"]["bias"]
    assert np.max(np.abs(np.asarray(hard_w.variables["params"]["fc2"]["bias"]) - np.asarray(soft_params))) > 1e-5
    assert stats["joint_hard_steps"] == 15 and stats["joint_steps"] == 25
    assert stats["joint_hard_train_loss_last"] < stats["joint_hard_train_loss_first"]
    # the relaxed diagnostics are the soft phase's network at its fractional masks
    assert stats["relaxed_val_accuracy"] == pytest.approx(stats["joint_val_accuracy_after"], abs=1e-6)
    assert stats["relaxed_objective"] == pytest.approx(stats["joint_objective_after"], rel=1e-5)


def test_joint_hard_on_the_kept_columns_is_the_full_masked_computation(monkeypatch):
    # With every mask fixed, a dropped triplet adds 0 and gets no gradient: training only
    # the kept columns must end where training the full-rank masked factors ends (the
    # reference: truncate_fixed=False), while each step runs at the rounded ranks.
    real_train, real_step = joint_mod.joint_train, joint_mod._step_fn
    widths = []

    def step_spy(model, meta, *args, **kwargs):
        widths.append({n: int(np.shape(f.sigma)[0]) for n, f in meta.items()})
        return real_step(model, meta, *args, **kwargs)

    monkeypatch.setattr(joint_mod, "_step_fn", step_spy)
    results = []
    for truncate_fixed in (False, True):
        monkeypatch.setattr(joint_mod, "joint_train",
                            functools.partial(real_train, truncate_fixed=truncate_fixed))
        results.append(_allocate(joint=30, joint_hard=12, joint_lr=3e-3, joint_mask_lr=2e-2).allocation)
    ref, got = results
    assert ref.ranks == got.ranks
    full = widths[0]
    assert widths[1] == full and widths[2] == full  # soft phases, and the untruncated hard phase
    assert widths[3] == {n: got.ranks[n] if got.ranks[n] < full[n] else full[n] for n in full}
    assert any(widths[3][n] < full[n] for n in full)
    for n in ref.weights.factors:
        for part in ("first", "second"):
            np.testing.assert_allclose(getattr(got.weights.factors[n], part), getattr(ref.weights.factors[n], part),
                                       rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 got.weights.variables, ref.weights.variables)
    assert got.stats["joint_hard_val_loss_after"] == pytest.approx(ref.stats["joint_hard_val_loss_after"], rel=1e-4)


def test_joint_average_is_the_mean_of_the_last_steps_weights(monkeypatch):
    """joint_average = A: the hard phase's network is the mean of the weights after each of
    its last A steps. Reference: the same hard phase run separately for S - A + 1, ..., S
    steps (no averaging; the runs are deterministic), their factors and biases averaged
    with numpy."""
    calls = []
    real = joint_mod.joint_train

    def spy(problem, m, idx, A, b, steps, *args, **kwargs):
        calls.append((problem, np.asarray(m).copy(), idx, A, b, steps, args, dict(kwargs)))
        return real(problem, m, idx, A, b, steps, *args, **kwargs)

    monkeypatch.setattr(joint_mod, "joint_train", spy)
    S, A = 12, 4
    got = _allocate(joint=30, joint_hard=S, joint_lr=3e-3, joint_mask_lr=2e-2, joint_average=A).allocation
    assert got.stats["joint_hard_averaged_steps"] == A and got.stats["joint_averaged_steps"] == 0
    problem, m, idx, A_rows, b, steps, args, kwargs = calls[1]
    assert steps == S and kwargs["average_last"] == A
    kwargs["average_last"] = 0
    runs = [real(problem, m, idx, A_rows, b, n, *args, **kwargs)[2] for n in range(S - A + 1, S + 1)]
    for n in got.weights.factors:
        for part in ("first", "second"):
            mean = np.mean([np.asarray(getattr(w.factors[n], part)) for w in runs], axis=0)
            np.testing.assert_allclose(np.asarray(getattr(got.weights.factors[n], part)), mean, rtol=1e-5, atol=1e-6)
            last = np.asarray(getattr(runs[-1].factors[n], part))
            assert np.max(np.abs(mean - last)) > 1e-4  # the mean is not the last step's weights
        bias = np.mean([np.asarray(w.variables["params"][n]["bias"]) for w in runs], axis=0)
        np.testing.assert_allclose(np.asarray(got.weights.variables["params"][n]["bias"]), bias, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="joint_average"):
        coblax.allocators.cobla(joint=30, joint_hard=5, joint_average=6)


def test_joint_zero_leaves_the_allocation_unchanged(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("joint training ran with joint = 0")

    monkeypatch.setattr(joint_mod, "joint_train", forbidden)
    result = _allocate()
    explicit = _allocate(joint=0)
    alloc = result.allocation
    assert alloc.weights is None and not any(k.startswith("joint") for k in alloc.stats)
    assert dict(alloc.ranks) == dict(explicit.allocation.ranks)
    for n in alloc.masks:
        np.testing.assert_array_equal(alloc.masks[n], explicit.allocation.masks[n])
    # the factored network is the original's SVD truncated at the masks, bit for bit
    model, variables, (x, _) = _setup()
    layers = {layer.name: layer for layer in trace_layers(model, variables, jnp.asarray(x[:1]), {})}
    for n in result.variables["factors"]:
        t = truncate(factorize(np.asarray(get_kernel(variables, n)), layers[n], "tai"), alloc.masks[n])
        np.testing.assert_array_equal(result.variables["factors"][n]["first"], t.first)
        np.testing.assert_array_equal(result.variables["factors"][n]["second"], t.second)


def test_rebound_objective_reuses_the_compiled_callback():
    model, variables, (x, y) = _setup()
    layers = {layer.name: layer for layer in trace_layers(model, variables, jnp.asarray(x[:1]), {})}
    full = {n: factorize(np.asarray(get_kernel(variables, n)), layers[n], "tai") for n in ("fc1", "fc2")}
    loss = NetworkLoss(model, variables, full, (x[:100], y[:100]))
    m = np.ones(loss.size)
    v0, _ = loss.value_and_grad(m)
    scaled = {n: f.__class__(f.kind, f.scheme, f.first * 0.5, f.second, f.sigma) for n, f in full.items()}
    other = rebind_loss(loss, variables, scaled)
    v1, _ = other.value_and_grad(m)
    assert v1 != v0 and loss.value_and_grad(m)[0] == v0  # the original is unchanged
    assert loss.compiled_count() == 1


def test_bad_options_and_a_bare_problem():
    for bad in ({"joint": -1}, {"joint": 1.5}, {"joint_lr": 0.0}, {"joint_mask_lr": -1.0},
                {"joint_hard": 5, "joint": 5}, {"joint_hard": 2}, {"joint_hard": -1, "joint": 5}):
        key = next(iter(bad))
        with pytest.raises(ValueError, match=key):
            coblax.allocators.cobla(**bad)
    with pytest.raises(ValueError, match="joint_hard"):
        coblax.allocators.cobla(joint=5, joint_hard=2, select="finetune")
    layer = LayerCost("a", "dense", (4, 4), np.array([2.0, 1.0]), 8.0, 8.0, 16.0, 16.0)
    problem = AllocationProblem((layer,), 10.0, 10.0)
    with pytest.raises(ValueError, match="problem.training"):
        joint_train(problem, np.ones(2), np.arange(2), np.ones((2, 2)), np.ones(2), 3, 1e-3, 1e-2)


def test_joint_refuses_grouped_masks_before_solving():
    model, variables, data = _setup()
    with pytest.raises(ValueError, match="rank_multiple"):
        allocate(model, variables, data, rules=RULES, mac=0.3, param=0.3, rank_multiple=2,
                 method=coblax.allocators.cobla(max_iter=3, joint=5))


def test_config_key_is_validated(tmp_path):
    from coblax.app.config import CoblaConfig, load_run_config
    from coblax.app.record import COBLA_KEYS
    from tests.helpers import tiny_run_config

    assert CoblaConfig().joint == 0 and {"joint", "joint_lr", "joint_mask_lr"} <= set(COBLA_KEYS)
    assert load_run_config(tiny_run_config(tmp_path, cobla__joint="50")).cobla.joint == 50
    with pytest.raises(Exception, match="joint"):
        load_run_config(tiny_run_config(tmp_path, name="bad.toml", cobla__joint="-2"))
    assert load_run_config(tiny_run_config(tmp_path, name="h.toml", cobla__joint="50",
                                           cobla__joint_hard="20")).cobla.joint_hard == 20
    for name, extra in (("h1.toml", {"cobla__joint": "20"}), ("h2.toml", {"cobla__joint": "0"}),
                        ("h3.toml", {"cobla__joint": "50", "cobla__select": '"finetune"'})):
        with pytest.raises(Exception, match="cobla.joint_hard"):
            load_run_config(tiny_run_config(tmp_path, name=name, cobla__joint_hard="20", **extra))


@pytest.mark.slow  # 16 s: a base model, a COBLA solve and a fine-tuning
def test_a_run_record_with_joint(tmp_path):
    from coblax.app.config import load_run_config
    from coblax.app.experiment import run_experiment
    from tests.helpers import tiny_run_config

    cfg = load_run_config(tiny_run_config(tmp_path, methods='["cobla"]', cobla__joint="5"))
    out = run_experiment(cfg, tmp_path / "out", progress=False, log=lambda _: None)
    (rec,) = out["records"]
    diag = rec["diagnostics"]
    assert rec["status"] in ("ok", "repaired") and diag["joint_steps"] == 5
    assert diag["joint_max_violation"] <= 1e-6
    assert 0.0 <= rec["acc_before_finetune"] <= 1.0 and rec["mac_ratio"] <= 0.5 + 1e-9


def test_joint_schedule_cosine_runs_both_phases_as_one_decay():
    """joint = 40, joint_hard = 15, cosine: the soft phase runs steps 0-24 and the hard phase
    steps 25-39 of one cosine decay from joint_lr, lr_k = lr (1 + cos(pi k / 40)) / 2 (the
    hand formula); the weights still train (the hard phase's loss falls)."""
    import math

    lr, S, H = 3e-3, 40, 15
    stats = _allocate(joint=S, joint_hard=H, joint_lr=lr, joint_mask_lr=2e-2,
                      joint_schedule="cosine").allocation.stats

    def rate(k):
        return lr * 0.5 * (1.0 + math.cos(math.pi * k / S))

    assert stats["joint_lr_first"] == pytest.approx(lr, rel=1e-6)
    assert stats["joint_lr_last"] == pytest.approx(rate(S - H - 1), rel=1e-5)
    assert stats["joint_hard_lr_first"] == pytest.approx(rate(S - H), rel=1e-5)
    assert stats["joint_hard_lr_last"] == pytest.approx(rate(S - 1), rel=1e-4)
    assert stats["joint_hard_train_loss_last"] < stats["joint_hard_train_loss_first"]
    constant = _allocate(joint=S, joint_hard=H, joint_lr=lr, joint_mask_lr=2e-2).allocation.stats
    assert constant["joint_hard_lr_first"] == constant["joint_hard_lr_last"] == lr


def test_joint_phases_show_progress_bars_only_when_asked(capsys):
    _allocate(joint=6, joint_hard=2, joint_lr=3e-3, joint_mask_lr=2e-2)
    assert "cobla joint" not in capsys.readouterr().err
    _allocate(joint=6, joint_hard=2, joint_lr=3e-3, joint_mask_lr=2e-2, progress=True)
    err = capsys.readouterr().err
    assert "cobla joint:" in err and "/4 [" in err  # the soft phase: 6 - 2 steps
    assert "cobla joint_hard:" in err and "/2 [" in err
