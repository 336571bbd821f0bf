"""POS: maximize the product of the kept energies of all layers (Zhang et al. 2016).

The objective of Zhang, Zou, He and Sun for choosing the ranks k_i is

    maximize  prod_i  sum_{j <= k_i} sigma_ij^2     s.t.  N_C(k) <= N_C,max,  N_M(k) <= N_M,max,

or, in logs, sum_i log E_i(k_i) with E_i(k) = sum_{j<=k} sigma_ij^2. A layer whose rank
reaches its saturation rank is kept in original form: it then holds *all* its energy
(E_i = sum_j sigma_ij^2) at the original cost, so throughout this module the energy of
an original-form layer is its full energy. To keep the logarithm finite the objective
is sum_i log(E_i(k_i) + eps * E_i(full)) with eps = 1e-12 (layers with no energy at
all are left out: they add the same constant to every allocation).

Three allocators:

* ``pos_greedy`` — the greedy of Zhang et al. (TPAMI 2016, Sec. 3.4): start at full
  rank and repeatedly drop the singular value with the smallest relative objective
  loss per unit of complexity saved, (Delta E_i / E_i) / Delta C, until both budgets
  hold. With two budgets Delta C is the normalized saving weighted by how far each
  budget is still exceeded,
      Delta C = w_C Delta N_C / N_C,orig + w_M Delta N_M / N_M,orig,
      w_b = max(0, N_b / N_b,max - 1),
  so a budget that already holds stops steering the choice (the same weighting as
  :func:`coblax.lowrank.allocation.greedy_repair`). Zhang et al. have a single complexity
  budget; this weighting is our choice for two.
* ``pos_greedy_unnormalized`` — the variant of the COBLA authors' code (Li & Shi,
  ECCV 2018, as described in the project brief): drop the triplet with the smallest
  relative objective loss Delta E_i / E_i, *without* dividing by the cost saved.
* ``pos_exact`` — the exact integer optimum as a multiple-choice knapsack MILP (one
  binary per layer per candidate rank, exactly one per layer), solved by HiGHS,
  together with a concave continuous relaxation (an upper bound) and the greedy's
  optimality gap. This is the "modern numerical ... with provable optimality" remark
  of the lecture's POS slide.

From an original-form layer a step down may go to any factored rank (the ranks from
saturation_rank up all cost the original); the greedy scores every such target, so it
is not trapped into cutting other layers because the only step out of original form
would save a single rank and lose the whole tail. Both greedies end with a refill that
spends what the descent left over (largest log-energy gain per unit of budget), so no
layer that is not full can take one more rank.

References:
  X. Zhang, J. Zou, K. He, J. Sun, "Accelerating very deep convolutional networks for
  classification and detection", IEEE TPAMI 38(10), 2016, Sec. 3.4.
  C. Li, C. J. R. Shi, "Constrained optimization based low-rank approximation of deep
  neural networks", ECCV 2018.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from coblax.baselines._budget import check_floor, clip_ranks, cost_ratios
from coblax.lowrank.allocation import (
    Allocation,
    AllocationProblem,
    LayerCost,
    descend,
    is_feasible,
    refill,
)

__all__ = [
    "POSGreedy",
    "POSGreedyUnnormalized",
    "POSExact",
    "pos_objective",
    "pos_greedy_ranks",
    "pos_milp",
    "pos_relaxation_bound",
    "EPS",
]

logger = logging.getLogger(__name__)

EPS = 1e-12
"""Relative floor inside the logarithm: log(E_i + EPS * E_i(full))."""



@contextlib.contextmanager
def _quiet_native_stdout():
    """Silence C-level stdout: HiGHS prints a banner even with output_flag=False,
    which would land in the middle of the tables that ``coblax run`` prints."""
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # captured / replaced stdout
        yield
        return
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)

def _cumulative(layer: LayerCost) -> np.ndarray:
    """[0, E(1), ..., E(full)] with E(k) = sum_{j<=k} sigma_j^2."""
    return np.concatenate([[0.0], np.cumsum(np.asarray(layer.sigma, dtype=np.float64) ** 2)])


def _energy(layer: LayerCost, rank: int, cum: np.ndarray | None = None) -> float:
    """Kept energy of a layer at ``rank``; an original-form layer keeps all of it."""
    cum = _cumulative(layer) if cum is None else cum
    if layer.is_original(rank):
        return float(cum[-1])
    return float(cum[min(max(0, rank), len(cum) - 1)])


def _total(layer: LayerCost) -> float:
    return float(np.sum(np.asarray(layer.sigma, dtype=np.float64) ** 2))


def pos_objective(problem: AllocationProblem, ranks: Mapping[str, int]) -> float:
    """log of the POS objective: sum_i log(E_i(k_i) + EPS * E_i(full)).

    Layers with zero total energy are skipped (a constant for every allocation).
    """
    total = 0.0
    for layer in problem.layers:
        full = _total(layer)
        if full <= 0.0:
            continue
        total += math.log(_energy(layer, int(ranks[layer.name])) + EPS * full)
    return total


def _log_energy(layer: LayerCost, rank: int, cum: np.ndarray) -> float:
    return math.log(_energy(layer, rank, cum) + EPS * float(cum[-1]))


def _energy_steps(problem: AllocationProblem):
    """(loss, gain) step scores: relative energy lost, log-energy gained."""
    cum = {layer.name: _cumulative(layer) for layer in problem.layers}

    def loss(layer: LayerCost, r: int, new_r: int) -> float:
        e_now = _energy(layer, r, cum[layer.name])
        return (e_now - _energy(layer, new_r, cum[layer.name])) / e_now if e_now > 0.0 else 0.0

    def gain(layer: LayerCost, r: int, new_r: int, current=None) -> float:
        if cum[layer.name][-1] <= 0.0:
            return 0.0
        return _log_energy(layer, new_r, cum[layer.name]) - _log_energy(layer, r, cum[layer.name])

    return loss, gain


def pos_greedy_ranks(problem: AllocationProblem, *, per_cost: bool = True) -> dict[str, int]:
    """Greedy POS ranks (see the module docstring for the rule).

    Lowering is :func:`coblax.lowrank.allocation.descend` (the same loop as the
    repair) with the step loss ΔE_i / E_i; from an original-form layer every factored
    rank is scored as a target. Then :func:`coblax.lowrank.allocation.refill` spends
    what is left, largest log-energy gain per unit of budget first, so no layer that
    is not full can take one more rank.

    Args:
      per_cost: divide the relative loss by the weighted normalized cost saved (Zhang
        et al.); False gives the unnormalized variant.
    Raises:
      BudgetError: if even min_rank everywhere is infeasible.
    """
    method = "pos_greedy" if per_cost else "pos_greedy_unnormalized"
    check_floor(problem, method)
    loss, gain = _energy_steps(problem)
    ranks = descend(problem, problem.full_ranks(), loss, per_cost=per_cost, method=method)
    return refill(problem, ranks, gain)


@dataclasses.dataclass(frozen=True)
class POSGreedy:
    """POS greedy allocator (Zhang et al. 2016, Sec. 3.4).

    Attributes:
      per_cost: True (default) ranks removals by relative loss per weighted cost
        saved; False is the COBLA authors' unnormalized variant.
    stats: ``objective`` (log POS objective), ``mac_ratio``, ``param_ratio``.
    """

    per_cost: bool = True

    @property
    def name(self) -> str:
        return "pos_greedy" if self.per_cost else "pos_greedy_unnormalized"

    def __call__(self, problem: AllocationProblem) -> Allocation:
        ranks = pos_greedy_ranks(problem, per_cost=self.per_cost)
        mac_r, par_r = cost_ratios(problem, ranks)
        return Allocation(
            ranks=ranks,
            status="ok",
            stats={
                "objective": pos_objective(problem, ranks),
                "mac_ratio": mac_r,
                "param_ratio": par_r,
            },
        )


def POSGreedyUnnormalized() -> POSGreedy:  # noqa: N802 - a factory named like the class
    """Factory for ``pos_greedy_unnormalized``: :class:`POSGreedy` with per_cost=False."""
    return POSGreedy(per_cost=False)


def _candidates(layer: LayerCost, min_rank: int) -> list[int]:
    """Ranks that differ in cost: factored ranks min_rank..sat-1, plus full (original)."""
    top = min(layer.saturation_rank, layer.full_rank)
    lo = min(min_rank, layer.full_rank)
    return list(range(lo, top)) + [layer.full_rank]


def _budget_scale(budget: float) -> float:
    return budget if budget > 0.0 else 1.0


def pos_milp(
    problem: AllocationProblem, *, solver: str = "HIGHS", tol: float = 1e-9
) -> tuple[dict[str, int], float]:
    """Exact integer POS optimum as a multiple-choice knapsack MILP.

    maximize  sum_i sum_{r in R_i} x_ir log(E_i(r) + EPS E_i(full))
    s.t.      sum_{r in R_i} x_ir = 1  (each i),   x_ir in {0, 1},
              sum_ir x_ir N_C,i(r) <= N_C,max,   sum_ir x_ir N_M,i(r) <= N_M,max,
              [sum_ir x_ir T_i(r) <= T_max   with a latency budget: T_i the measured table]

    with R_i the ranks of distinct cost (min_rank..saturation_rank-1 and full rank).
    The latency row is exact: x_ir picks one rank, so the table's value at that rank
    (interpolated, :mod:`coblax.lowrank.latency`) is its cost, no linearization.

    Returns:
      (ranks, objective) with objective = :func:`pos_objective` of the ranks.
    Raises:
      BudgetError: if even min_rank everywhere is infeasible.
    """
    import cvxpy as cp

    check_floor(problem, "pos_exact")
    cands = [_candidates(layer, problem.min_rank) for layer in problem.layers]
    sizes = [len(c) for c in cands]
    n = int(sum(sizes))
    weight = np.zeros(n)
    c_mac = np.zeros(n)
    c_par = np.zeros(n)
    c_lat = np.zeros(n)
    select = np.zeros((len(cands), n))
    pos = 0
    s_mac = _budget_scale(problem.mac_max)
    s_par = _budget_scale(problem.param_max)
    s_lat = _budget_scale(problem.latency_max) if problem.has_latency else 1.0
    for i, (layer, ranks_i) in enumerate(zip(problem.layers, cands)):
        full = _total(layer)
        for r in ranks_i:
            if full > 0.0:  # normalized energies: same argmax, better-scaled coefficients
                weight[pos] = math.log(_energy(layer, r) / full + EPS)
            c_mac[pos] = layer.macs(r) / s_mac
            c_par[pos] = layer.params(r) / s_par
            c_lat[pos] = layer.latency_at(r) / s_lat
            select[i, pos] = 1.0
            pos += 1
    x = cp.Variable(n, boolean=True)
    rhs_c = problem.mac_max / s_mac
    rhs_m = problem.param_max / s_par
    # Solver tolerances can admit a hair of budget overrun; tighten and re-solve then.
    for shrink in (0.0, 1e-7, 1e-5):
        cons = [
            select @ x == 1,
            c_mac @ x <= rhs_c * (1 - shrink),
            c_par @ x <= rhs_m * (1 - shrink),
        ]
        if problem.has_latency:
            rhs_l = problem.latency_max / s_lat
            cons.append(c_lat @ x <= rhs_l - shrink * abs(rhs_l))
        prob = cp.Problem(cp.Maximize(weight @ x), cons)
        with _quiet_native_stdout():
            prob.solve(
                solver=solver,
                mip_rel_gap=tol,
                mip_feasibility_tolerance=tol,
                primal_feasibility_tolerance=tol,
                output_flag=False,
            )
        if x.value is None:
            continue
        chosen = np.asarray(x.value) > 0.5
        ranks = {}
        for i, (layer, ranks_i) in enumerate(zip(problem.layers, cands)):
            idx = np.flatnonzero(chosen[select[i] > 0])
            ranks[layer.name] = int(ranks_i[int(idx[0])]) if len(idx) else problem.min_rank
        ranks = clip_ranks(problem, ranks)
        if is_feasible(problem, ranks):
            # Ranks whose energy gain is 0 (σ = 0) tie in the MILP: take them too, so
            # no layer is left with room for one more rank.
            ranks = refill(problem, ranks, _energy_steps(problem)[1])
            return ranks, pos_objective(problem, ranks)
    raise RuntimeError(f"pos_exact: the MILP solver {solver} returned no feasible solution")


def pos_relaxation_bound(problem: AllocationProblem, *, solver: str = "CLARABEL") -> float:
    """Upper bound on the integer POS optimum from a concave continuous relaxation.

    Per layer i, masking variables m_ij in [0, 1 - z_i] and z_i in [0, 1] (the weight
    of "keep the original layer"):

        maximize  sum_i log( sum_j m_ij sigma_ij^2 + z_i E_i(full) + EPS E_i(full) )
        s.t.      sum_i ( mac_per_rank_i sum_j m_ij + z_i N_C,i,orig ) <= N_C,max
                  sum_i ( param_per_rank_i sum_j m_ij + z_i N_M,i,orig ) <= N_M,max
                  sum_j m_ij + z_i R_i >= min_rank.

    Every integer allocation is feasible in it with the same objective (factored rank
    r: m = first r ones, z = 0; original form: m = 0, z = 1), so its optimum bounds
    the MILP from above. A latency budget is left out: dropping a constraint keeps
    the bound valid (the measured latency is not linear in m). Concave objective, linear constraints: a convex program.

    Returns:
      the bound, in the units of :func:`pos_objective`.
    """
    import cvxpy as cp

    s_mac = _budget_scale(problem.mac_max)
    s_par = _budget_scale(problem.param_max)
    terms, cons = [], []
    mac_expr, par_expr = 0, 0
    const = 0.0
    for layer in problem.layers:
        full = _total(layer)
        m = cp.Variable(layer.full_rank, nonneg=True)
        z = cp.Variable(nonneg=True)
        floor = min(problem.min_rank, layer.full_rank)
        cons += [z <= 1, m <= 1 - z, cp.sum(m) + z * layer.full_rank >= floor]
        mac_expr = mac_expr + (layer.mac_per_rank * cp.sum(m) + z * layer.original_macs) / s_mac
        par_expr = par_expr + (layer.param_per_rank * cp.sum(m) + z * layer.original_params) / s_par
        if full > 0.0:
            w = np.asarray(layer.sigma, dtype=np.float64) ** 2 / full
            terms.append(cp.log(w @ m + z + EPS))
            const += math.log(full)
    cons += [mac_expr <= problem.mac_max / s_mac, par_expr <= problem.param_max / s_par]
    objective = cp.Maximize(cp.sum(cp.hstack(terms)) if terms else cp.Constant(0.0))
    prob = cp.Problem(objective, cons)
    prob.solve(solver=solver)
    if prob.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"pos_exact: relaxation solver {solver} ended with {prob.status}")
    return float(prob.value) + const


@dataclasses.dataclass(frozen=True)
class POSExact:
    """Exact POS allocator (MILP), with the relaxation bound and the greedy's gap.

    Attributes:
      solver: cvxpy MILP solver (HiGHS by default).
      relaxation_solver: cvxpy conic solver for the bound (CLARABEL or SCS).
      bound: compute the relaxation bound (``relaxation_bound``, ``bound_gap``).
      compare_greedy: run POS-greedy on the same problem (``greedy_objective``,
        ``greedy_gap``).
    stats: ``milp_objective``, ``relaxation_bound``, ``bound_gap`` = bound - milp,
      ``greedy_objective``, ``greedy_gap`` = milp - greedy (>= 0), ``mac_ratio``,
      ``param_ratio``; the greedy's gap is also logged at INFO level.
    """

    solver: str = "HIGHS"
    relaxation_solver: str = "CLARABEL"
    bound: bool = True
    compare_greedy: bool = True

    name: ClassVar[str] = "pos_exact"

    def __post_init__(self) -> None:
        if self.relaxation_solver not in ("CLARABEL", "SCS"):
            raise ValueError(
                f"relaxation_solver must be 'CLARABEL' or 'SCS', got {self.relaxation_solver!r}"
            )

    def __call__(self, problem: AllocationProblem) -> Allocation:
        ranks, milp = pos_milp(problem, solver=self.solver)
        mac_r, par_r = cost_ratios(problem, ranks)
        stats: dict[str, float] = {"milp_objective": milp, "mac_ratio": mac_r, "param_ratio": par_r}
        if self.bound:
            # The bound is a diagnostic: a conic solver that fails on it (CLARABEL does on
            # LeNet-5's 0.1 budget) is retried with the other one, then reported, never fatal.
            errors = []
            for solver in dict.fromkeys((self.relaxation_solver, "SCS", "CLARABEL")):
                try:
                    bound = pos_relaxation_bound(problem, solver=solver)
                except Exception as err:  # cvxpy.error.SolverError and the RuntimeError above
                    errors.append(f"{solver}: {err}")
                    continue
                stats["relaxation_bound"] = bound
                stats["bound_gap"] = bound - milp
                break
            if errors:
                stats["bound_errors"] = errors
        if self.compare_greedy:
            greedy = pos_objective(problem, pos_greedy_ranks(problem, per_cost=True))
            stats["greedy_objective"] = greedy
            stats["greedy_gap"] = milp - greedy
            logger.info(
                "pos_exact: POS-greedy is %.6g below the MILP optimum in log objective "
                "(product ratio %.6g)",
                milp - greedy,
                math.exp(greedy - milp),
            )
        return Allocation(ranks=ranks, status="ok", stats=stats)
