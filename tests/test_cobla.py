"""COBLA allocator: feasibility, descent from the warm start, cost saturation."""

from __future__ import annotations

import numpy as np
import pytest

from coblax.lowrank.allocation import AllocationProblem, LayerCost, has_room, is_feasible
from coblax.lowrank.cobla import COBLA, warm_start_point
from coblax.lowrank.registry import get_allocator
from coblax.lowrank.solve import SolveResult


class QuadraticLoss:
    """E(m) = sum_ij w_ij sigma_ij^2 (1 - m_ij)^2: a stand-in network loss."""

    def __init__(self, layers, weights):
        self.s2 = np.concatenate([l.sigma**2 for l in layers])
        self.w = np.concatenate(weights)
        self.calls = 0

    def value(self, m):
        return float(np.sum(self.w * self.s2 * (1 - m) ** 2))

    def value_and_grad(self, m):
        self.calls += 1
        return self.value(m), -2 * self.w * self.s2 * (1 - m)

    def validation_loss(self, m):
        return self.value(m)


def _dense(name, k, l, decay):
    s = np.exp(-decay * np.arange(min(k, l)))
    return LayerCost(name, "dense", (k, l), s, k + l, k + l, k * l, k * l)


def test_feasible_and_descends_from_warm_start():
    layers = (_dense("a", 60, 40, 0.05), _dense("b", 80, 30, 0.3), _dense("c", 30, 30, 0.01))
    loss = QuadraticLoss(layers, [np.ones(l.full_rank) for l in layers])
    o = sum(l.original_macs for l in layers)
    problem = AllocationProblem(layers, 0.4 * o, 0.4 * o, loss=loss, seed=0)
    alloc = COBLA(max_iter=200)(problem)
    assert is_feasible(problem, alloc.ranks)
    trace = alloc.stats["objective_trace"]
    assert trace[-1] < trace[0]
    # The relaxed optimum spends the budget where sigma^2 decays slowly (layer c).
    assert alloc.stats["relaxed_ranks"]["c"] > alloc.stats["relaxed_ranks"]["b"]
    # warm start is the uniform allocation: feasible
    m0 = warm_start_point(problem, "uniform")
    assert set(np.unique(m0)) <= {0.0, 1.0}


def test_saturated_layer_keeps_original_form():
    # Layer "tiny" is very important and cheap: its relaxed rank reaches the rank at
    # which the factored form costs as much as the original, so it is fixed original.
    layers = (_dense("big", 200, 150, 0.02), _dense("tiny", 12, 10, 0.0))
    w = [np.ones(150), np.full(10, 1e4)]
    loss = QuadraticLoss(layers, w)
    o = sum(l.original_macs for l in layers)
    problem = AllocationProblem(layers, 0.3 * o, 0.3 * o, loss=loss, seed=0)
    alloc = COBLA(max_iter=200)(problem)
    assert "tiny" in alloc.stats["saturated_layers"]
    assert alloc.ranks["tiny"] == 10  # full rank = original layer
    assert is_feasible(problem, alloc.ranks)


def test_needs_a_loss_oracle():
    layers = (_dense("a", 10, 10, 0.1),)
    with pytest.raises(ValueError, match="loss"):
        get_allocator("cobla")(AllocationProblem(layers, 50.0, 50.0))


# -- issue 8: saturation, refill, warm starts, layout, gap-closing options ------------


def _mixed(name, R, mac_per, par_per, o_mac, o_par, decay=0.05):
    s = np.exp(-decay * np.arange(R))
    return LayerCost(name, "conv", (R, R), s, mac_per, par_per, o_mac, o_par)


def test_saturation_only_when_the_rest_stays_feasible():
    # "a" saturates in MACs at rank 5 (5 x 100 = its original 500 MACs) but its
    # original form holds 1000 parameters, more than the whole parameter budget: the
    # old rule fixed it anyway, the remaining budget went negative and rounding had
    # to repair far below the budget. Now it stays factored, every solve is feasible
    # and the final allocation uses the budget (no layer can take one more rank).
    a = _mixed("a", 20, 100.0, 1.0, 500.0, 1000.0, decay=0.0)
    b = _dense("b", 40, 30, 0.05)
    loss = QuadraticLoss((a, b), [np.full(20, 50.0), np.ones(30)])
    problem = AllocationProblem((a, b), 0.5 * (500.0 + b.original_macs), 300.0, loss=loss, seed=0)
    alloc = COBLA(max_iter=200, warm_start="uniform")(problem)
    assert alloc.stats["relaxed_ranks"]["a"] >= a.saturation_rank - 1e-6  # the trap is set
    assert alloc.stats["saturated_layers"] == []
    assert all(s["feasible"] for s in alloc.stats["solves"])
    assert is_feasible(problem, alloc.ranks)
    assert not has_room(problem, alloc.ranks)
    assert not a.is_original(alloc.ranks["a"])


def test_saturation_rounds_zero_saturates_nothing():
    layers = (_dense("big", 200, 150, 0.02), _dense("tiny", 12, 10, 0.0))
    loss = QuadraticLoss(layers, [np.ones(150), np.full(10, 1e4)])
    o = sum(l.original_macs for l in layers)
    problem = AllocationProblem(layers, 0.3 * o, 0.3 * o, loss=loss, seed=0)
    alloc = COBLA(max_iter=200, saturation_rounds=0)(problem)
    assert alloc.stats["saturated_layers"] == []
    assert [s["stage"] for s in alloc.stats["solves"]] == ["relaxed"]
    assert is_feasible(problem, alloc.ranks) and not has_room(problem, alloc.ranks)
    # with saturation allowed, the saturation is followed by its own re-solve
    alloc = COBLA(max_iter=200, warm_start="constant")(problem)
    assert alloc.stats["saturated_layers"] == ["tiny"]
    assert [s["stage"] for s in alloc.stats["solves"]] == ["relaxed", "saturate tiny"]
    # a warm start that keeps "tiny" in original form starts it saturated: one solve
    alloc = COBLA(max_iter=200, warm_start="pos_exact")(problem)
    assert alloc.stats["warm_start_ranks"]["tiny"] == 10
    assert alloc.stats["saturated_layers"] == ["tiny"]
    assert [s["stage"] for s in alloc.stats["solves"]] == ["relaxed"]


def test_a_solve_that_breaks_a_constraint_is_rolled_back(monkeypatch):
    layers = (_dense("a", 60, 40, 0.05), _dense("b", 80, 30, 0.3))
    loss = QuadraticLoss(layers, [np.ones(l.full_rank) for l in layers])
    o = sum(l.original_macs for l in layers)
    problem = AllocationProblem(layers, 0.4 * o, 0.4 * o, loss=loss, seed=0)

    def broken(self, fun_and_grad, x0, A, b, tick, groups=None, pairs=None):
        x = np.ones_like(x0)  # every triplet kept: far over budget
        return SolveResult(x=x, value=fun_and_grad(x)[0], success=False, status="stalled",
                           message="the line search found no decrease of the merit function", iterations=3,
                           n_fun=3, seconds=0.0, kkt_residual=1.0, trace=[], n_free=x.size,
                           multipliers=np.zeros(2), method="structured")

    monkeypatch.setattr(COBLA, "_solve", broken)
    alloc = COBLA(warm_start="uniform")(problem)
    assert alloc.stats["solves"][0]["rolled_back"]
    assert alloc.stats["solves"][0]["status"] == "stalled"
    m0 = warm_start_point(problem, "uniform")
    np.testing.assert_allclose(np.concatenate([alloc.relaxed[n] for n in problem.names]), m0)
    assert is_feasible(problem, alloc.ranks)


def test_layer_order_mismatch_raises():
    layers = (_dense("a", 20, 10, 0.1), _dense("b", 30, 10, 0.1))
    loss = QuadraticLoss(layers, [np.ones(10), np.ones(10)])
    loss.names = ["b", "a"]
    problem = AllocationProblem(layers, 300.0, 300.0, loss=loss)
    with pytest.raises(ValueError, match="layer order"):
        COBLA()(problem)
    loss.names, loss.sizes = ["a", "b"], [10, 9]
    with pytest.raises(ValueError, match="block sizes"):
        COBLA()(problem)


def test_warm_start_cobla_is_refused():
    with pytest.raises(ValueError, match="itself"):
        COBLA(warm_start="cobla")


@pytest.mark.parametrize("how", ["pos_greedy", "pos_exact"])
def test_warm_starts_from_pos(how):
    layers = (_dense("a", 60, 40, 0.05), _dense("b", 80, 30, 0.3), _dense("c", 30, 30, 0.01))
    loss = QuadraticLoss(layers, [np.ones(l.full_rank) for l in layers])
    o = sum(l.original_macs for l in layers)
    problem = AllocationProblem(layers, 0.3 * o, 0.3 * o, loss=loss, seed=0)
    alloc = COBLA(max_iter=200, warm_start=how)(problem)
    assert alloc.stats["warm_start_ranks"] == get_allocator(how)(problem).ranks
    assert is_feasible(problem, alloc.ranks) and not has_room(problem, alloc.ranks)
    labels = [c["label"] for c in alloc.stats["rounding"]["candidates"]]
    assert "warm_start" in labels


class Scored(QuadraticLoss):
    """QuadraticLoss plus validation metrics from a function of the kept ranks."""

    def __init__(self, layers, weights, metrics):
        super().__init__(layers, weights)
        self.layers, self._metrics = layers, metrics

    def validation_metrics(self, m):
        sizes = np.cumsum([0] + [l.full_rank for l in self.layers])
        ranks = {l.name: int(np.count_nonzero(m[sizes[i]:sizes[i + 1]])) for i, l in enumerate(self.layers)}
        return self._metrics(ranks)


def _flat_problem(metrics=None, budget=7.0, weights=(1.0, 1.0)):
    # Two layers of 10 equal singular values, one unit of cost per rank: the relaxed
    # optimum of the quadratic loss spreads the budget evenly (m = 0.35 each): fractional.
    layers = tuple(LayerCost(n, "dense", (10, 10), np.ones(10), 1.0, 1.0, 100.0, 100.0) for n in "ab")
    w = [np.full(10, weights[0]), np.full(10, weights[1])]
    loss = QuadraticLoss(layers, w) if metrics is None else Scored(layers, w, metrics)
    return AllocationProblem(layers, budget, budget, loss=loss, seed=0)


def test_relaxed_optimum_is_fractional():
    problem = _flat_problem()
    alloc = COBLA(max_iter=200, warm_start="uniform", saturation_rounds=0)(problem)
    np.testing.assert_allclose(np.concatenate(list(alloc.relaxed.values())), 0.35, atol=1e-3)


def test_monotone_constraint():
    # Later triplets weigh more in the loss: unconstrained, m increases with j; the
    # authors' constraint m_j >= m_j+1 pools them into one value per layer.
    layers = (LayerCost("a", "dense", (10, 10), np.ones(10), 1.0, 1.0, 100.0, 100.0),)
    w = [np.linspace(1.0, 3.0, 10)]
    problem = AllocationProblem(layers, 4.0, 4.0, loss=QuadraticLoss(layers, w), seed=0)
    free = COBLA(max_iter=200, warm_start="uniform", saturation_rounds=0)(problem).relaxed["a"]
    mono = COBLA(max_iter=200, warm_start="uniform", saturation_rounds=0, monotone=True)(problem).relaxed["a"]
    assert np.any(np.diff(free) > 1e-3)
    assert np.all(np.diff(mono) <= 1e-6)
    np.testing.assert_allclose(mono, 0.4, atol=1e-3)  # the pooled optimum


def test_integrality_continuation():
    # Distinct singular values: the relaxed optimum m_j = 1 - λ / (2 w σ_j²) is
    # fractional and has no symmetry that would hold the continuation at m = const.
    layers = tuple(LayerCost(n, "dense", (10, 10), np.linspace(1.2, 0.8, 10), 1.0, 1.0, 100.0, 100.0) for n in "ab")
    loss = QuadraticLoss(layers, [np.ones(10), np.full(10, 1.5)])
    problem = AllocationProblem(layers, 7.0, 7.0, loss=loss, seed=0)
    base = COBLA(max_iter=200, warm_start="uniform", saturation_rounds=0)(problem)
    cont = COBLA(max_iter=200, warm_start="uniform", saturation_rounds=0, continuation=(0.3, 1.0, 3.0, 10.0))(problem)

    def frac(alloc):
        m = np.concatenate(list(alloc.relaxed.values()))
        return float(np.mean(4 * m * (1 - m)))

    assert frac(base) > 0.5
    assert frac(cont) < 0.1  # pushed to 0/1
    assert [s["stage"] for s in cont.stats["solves"]][-1] == "continuation 10"
    assert is_feasible(problem, cont.ranks) and not has_room(problem, cont.ranks)
    assert cont.stats["relaxed_objective"] == pytest.approx(base.stats["relaxed_objective"], rel=1e-3)


def test_selection_by_accuracy_or_loss():
    # Accuracy is best with all rank in "a", the loss prefers an even split.
    def metrics(r):
        return (abs(r["a"] - r["b"]) * 0.1, r["a"] / 7.0)

    problem = _flat_problem(metrics)
    by_acc = COBLA(max_iter=50, warm_start="uniform", roundings=5, local_search=60)(problem)
    by_loss = COBLA(max_iter=50, warm_start="uniform", roundings=5, select="loss")(problem)
    assert by_acc.ranks == {"a": 6, "b": 1}  # min_rank 1 in b
    assert abs(by_loss.ranks["a"] - by_loss.ranks["b"]) <= 1
    assert by_acc.stats["rounding"]["local_search"]["improved"]


def test_warm_start_allocation_is_a_candidate():
    target = {"a": 1, "b": 6}
    problem = _flat_problem(lambda r: (0.0, 1.0 - abs(r["a"] - 1) / 10))
    ws = get_allocator("pos_greedy")(problem).ranks
    alloc = COBLA(max_iter=50, warm_start="pos_greedy", roundings=3)(problem)
    if ws == target:
        assert alloc.stats["rounding"]["chosen"] == "warm_start"
    # local search reaches it from any start
    alloc = COBLA(max_iter=50, warm_start="uniform", roundings=3, local_search=100)(problem)
    assert alloc.ranks == target


# ------------------------------------------------------------------ saturation (issue 17)
def _saturation_problem(small: tuple[tuple[int, int], ...]):
    """Layers ``small`` (the relaxed solve keeps them whole, past their saturation rank)
    beside one large decaying layer that takes the rest of the budget."""
    from coblax.lowrank.allocation import AllocationProblem, LayerCost

    def dense(name, k, l, sigma):
        return LayerCost(name, "dense", (k, l), sigma, k + l, k + l, k * l, k * l)

    layers = [dense(f"s{i}", k, l, np.ones(min(k, l))) for i, (k, l) in enumerate(small)]
    layers.append(dense("big", 60, 40, np.exp(-0.05 * np.arange(40))))
    # the small layers' triplets each lower E by 100 (linear: pinned at m = 1, past saturation)
    linear = np.concatenate([np.full(l.full_rank, 100.0 if l.name != "big" else 0.0) for l in layers])

    class Loss:
        s2 = np.concatenate([l.sigma ** 2 for l in layers])

        def value_and_grad(self, m):
            r = 1 - m
            return float(np.sum(self.s2 * r ** 2 + linear * r)), -2 * self.s2 * r - linear

        def value(self, m):
            return self.value_and_grad(m)[0]

        validation_loss = value

    budget = sum(l.full_rank * l.mac_per_rank for l in layers[:-1]) + 0.3 * layers[-1].original_macs
    return AllocationProblem(tuple(layers), budget, budget, loss=Loss(), seed=0)


def _saturation_stages(alloc):
    return [s for s in alloc.stats["solves"] if s["stage"].startswith("saturate")]


def test_saturation_fixes_every_eligible_layer_in_one_round_with_one_resolve():
    problem = _saturation_problem(((10, 10), (12, 12)))
    alloc = COBLA(warm_start="constant", saturation_rounds=5, local_search=0, roundings=3)(problem)
    stages = _saturation_stages(alloc)
    assert len(stages) == 1 and stages[0]["status"] != "skipped"  # one re-solve for both layers
    assert set(stages[0]["stage"].removeprefix("saturate ").split(", ")) == {"s0", "s1"}
    assert sorted(alloc.stats["saturated_layers"]) == ["s0", "s1"]
    assert alloc.ranks["s0"] >= 10 and alloc.ranks["s1"] >= 12  # original form


def test_saturation_skips_the_resolve_when_the_freed_budget_is_below_one_rank():
    # 3x48 and 4x40 dense layers: whole, their factored forms cost 153 and 176 against
    # 144 and 160 originally, so saturating both frees 25 MACs; one rank of "big" costs 100.
    problem = _saturation_problem(((3, 48), (4, 40)))
    alloc = COBLA(warm_start="constant", saturation_rounds=5, local_search=0, roundings=3)(problem)
    stages = _saturation_stages(alloc)
    assert [s["status"] for s in stages] == ["skipped"]
    assert sorted(alloc.stats["saturated_layers"]) == ["s0", "s1"]
    assert len(alloc.stats["solves"]) == 2  # the relaxed solve and the skipped round


def test_polish_refits_the_kept_masks_to_the_quadratic_optimum():
    """Ranks fixed, E(m) = Σ w σ² (1 - m)² is minimized at m = 1 on the support.

    The rounded masks start at m̂ (≤ 1) and the polish must bring every kept triplet to
    1 (the closed-form optimum within the box), leave dropped triplets at 0 and the
    ranks (so both costs) unchanged, and report the score it improved.
    """
    from coblax.lowrank.polish import polish_masks

    layers = (_dense("a", 20, 20, 0.2), _dense("b", 20, 20, 0.1))
    loss = QuadraticLoss(layers, [np.ones(20), np.ones(20)])
    problem = AllocationProblem(layers, 1e9, 1e9, loss=loss)
    masks = {"a": np.r_[np.full(4, 0.5), np.zeros(16)], "b": np.r_[0.3, 0.9, np.zeros(18)]}
    score = lambda m: (loss.value(m),)  # noqa: E731
    out, info = polish_masks(problem, masks, score, max_iter=50)
    assert info["kept"] and info["score_after"][0] < info["score_before"][0]
    np.testing.assert_allclose(out["a"][:4], 1.0, atol=1e-6)
    np.testing.assert_allclose(out["b"][:2], 1.0, atol=1e-6)
    assert np.all(out["a"][4:] == 0) and np.all(out["b"][2:] == 0)
    # A score that prefers the unpolished masks keeps them.
    same, info2 = polish_masks(problem, masks, lambda m: (-loss.value(m),), max_iter=50)
    assert not info2["kept"] and same is masks


def test_best_mask_values_are_compared_after_their_polish():
    """The rounding ranks candidates before the polish; the polish can reverse the order.

    E(m) = Σ σ² (1 - m)²: the polish lifts every kept triplet to 1, so a polished candidate's
    E is the σ² it dropped (hand count below). The relaxed masks keep triplet 5 of layer a
    over 2-4 (its m̂ is larger) and so drop larger σ than plain truncation at the same ranks.
    Ranked on a score that favours it before the polish, the relaxed candidate is chosen by
    the rounding; after both polishes the plain one is better and must be returned.
    """
    from coblax.lowrank.rounding import masks_for_ranks

    layers = (_dense("a", 20, 20, 0.2), _dense("b", 20, 20, 0.1))
    loss = QuadraticLoss(layers, [np.ones(20), np.ones(20)])
    problem = AllocationProblem(layers, 1e9, 1e9, loss=loss)
    m_hat = {"a": np.r_[0.9, 0.9, 0.01, 0.01, 0.01, 0.9, np.full(14, 0.001)], "b": np.r_[0.8, 0.7, np.full(18, 0.001)]}
    ranks = {"a": 3, "b": 2}
    info = {"candidates": [{"label": "draw0:relaxed", "ranks": ranks, "values": "relaxed", "score": [0.0]},
                           {"label": "draw0:plain", "ranks": ranks, "values": "plain", "score": [9.0]}],
            "chosen": "draw0:relaxed", "values": "relaxed"}
    masks = masks_for_ranks(problem, ranks, m_hat, "relaxed")[1]
    assert np.flatnonzero(masks["a"]).tolist() == [0, 1, 5]

    def score(m):
        return (loss.value(m),)

    s2a, s2b = layers[0].sigma ** 2, layers[1].sigma ** 2
    e_relaxed = s2a.sum() - s2a[[0, 1, 5]].sum() + s2b[2:].sum()
    e_plain = s2a[3:].sum() + s2b[2:].sum()
    assert e_plain < e_relaxed
    out_ranks, out_masks = COBLA(polish=50)._polish(problem, ranks, masks, m_hat, info, score)
    assert info["chosen"] == "draw0:plain+polish" and info["values"] == "plain"
    assert out_ranks == ranks
    np.testing.assert_allclose(score(flat_of(problem, out_masks))[0], e_plain, rtol=1e-6)
    # (the polish stops at COBLA's rtol = 3e-3 of the rounded E)
    np.testing.assert_allclose(info["polish"]["score_after"][0], e_relaxed, rtol=1e-3)
    # mask_values = "relaxed": only the chosen candidate is polished
    info2 = {"candidates": info["candidates"], "chosen": "draw0:relaxed", "values": "relaxed"}
    _, kept = COBLA(polish=50, mask_values="relaxed")._polish(problem, ranks, masks, m_hat, info2, score)
    assert "polish_other" not in info2 and np.flatnonzero(kept["a"]).tolist() == [0, 1, 5]


def flat_of(problem, masks):
    from coblax.lowrank.rounding import flat_mask

    return flat_mask(problem, masks)


def test_extra_warm_starts_keep_the_start_with_the_lowest_relaxed_objective():
    """Three iterations from each start end at different points: the two-start run is the
    single-start run whose relaxed E is lower (ranks, objective and trace), and it pays
    both solves."""
    layers = (_dense("a", 60, 40, 0.05), _dense("b", 80, 30, 0.3), _dense("c", 30, 30, 0.01))
    loss = QuadraticLoss(layers, [np.ones(l.full_rank) for l in layers])
    o = sum(l.original_macs for l in layers)
    problem = AllocationProblem(layers, 0.4 * o, 0.4 * o, loss=loss, seed=0)
    opts = dict(max_iter=3, saturation_rounds=0, local_search=0, polish=0)
    single = {how: COBLA(warm_start=how, **opts)(problem) for how in ("uniform", "constant")}
    ends = {how: loss.value(np.concatenate([a.relaxed[l.name] for l in layers])) for how, a in single.items()}
    assert abs(ends["uniform"] - ends["constant"]) > 1e-3 * max(ends.values())  # the two solves differ
    winner = min(ends, key=ends.get)
    for first, extra in (("uniform", "constant"), ("constant", "uniform")):
        both = COBLA(warm_start=first, extra_warm_starts=(extra,), **opts)(problem)
        assert both.stats["warm_start"] == winner
        assert both.ranks == single[winner].ranks
        assert both.stats["objective_trace"] == single[winner].stats["objective_trace"]
        objectives = {s["start"]: s["objective"] for s in both.stats["warm_starts"]}
        assert objectives == pytest.approx(ends, rel=1e-9)
        assert both.stats["solve_seconds"] == pytest.approx(sum(s["seconds"] for s in both.stats["warm_starts"]))


def test_extra_warm_starts_refuse_cobla_and_repeats():
    with pytest.raises(ValueError, match="itself"):
        COBLA(extra_warm_starts=("cobla",))
    with pytest.raises(ValueError, match="repeats"):
        COBLA(warm_start="uniform", extra_warm_starts=("uniform",))
