"""COBLA: Constrained Optimization Based Low-rank Approximation (Li & Shi, ECCV 2018).

Relaxed problem (seed, Eq. 2):
    minimize_m  E(m)   s.t.  N_C(m) <= N_C,max,  N_M(m) <= N_M,max,  0 <= m <= 1,
with E the network's mean cross-entropy on a fixed objective subset and N_C, N_M
affine in m (see :mod:`coblax.lowrank.costs`). A latency budget adds the third row
Σ_i s_i Σ_j m_ij <= T_max − Σ_i a_i, the line a_i + s_i r fitted to each layer's
measured table (:mod:`coblax.lowrank.latency`); rounding uses the table itself. It is solved by SQP (scipy SLSQP) over
jitted JAX callbacks, then rounded (:mod:`coblax.lowrank.rounding`).

Where the paper is silent we follow the authors' public code (chongli-uw/cobla):
* cost saturation — after a solve, a layer whose relaxed rank Σ_j m_ij reaches
  the rank at which its factored form costs as much as the original is fixed in
  its original form (m_i = 1, original cost), its variables leave the problem,
  and the rest is re-solved, warm-started, with the budgets reduced accordingly.
  Here every eligible layer is saturated in one round (largest relaxed rank
  relative to its saturation rank first, each only while the remaining layers at
  ``min_rank`` still fit what is left of both budgets). The re-solve is skipped
  when the point stays feasible and the budget the round freed is below the
  cheapest rank of any remaining layer in some row (no layer could take a whole
  rank more), and it starts from the previous solve's L-BFGS memory, not from
  scratch. Every solve's status and the feasibility of its point are checked,
  and a solve whose point breaks a constraint is rolled back.
  ``saturation_rounds = 0`` saturates nothing;
* warm start from a feasible point: an allocator's allocation as a 0/1 mask (the
  authors use POS greedy; ``cobla`` itself is refused), or ``constant`` m = α·1;
* rounding as described in :mod:`coblax.lowrank.rounding`.

Closing the rounding gap (options, measured in ``experiments/README.md``):
* ``monotone`` — the authors' constraint m_ij >= m_i,j+1 within a layer;
* ``continuation`` — warm-started re-solves of E(m) + μ_k·E₀·Σ 4m(1−m) / Σ m̂ for
  the penalty weights μ_k, pushing m towards 0/1 (E₀ and m̂ the relaxed optimum's
  value and point: at μ = 1, spreading the relaxed ranks over twice as many
  triplets at m = ½ costs about 2·E₀);
* ``local_search`` — an integer local search over rank moves between layers;
* ``select`` — rounding candidates scored by validation accuracy (then loss) or loss,
  or (``"finetune"``) the best K by accuracy each fine-tuned for S steps and the best
  after them kept (:mod:`coblax.lowrank.finetune_select`);
* ``bn_stats`` — E(m) and the scores with BatchNorm's running, batch or recalibrated
  statistics (:mod:`coblax.lowrank.objective`);
* ``mask_values = "best"`` — every rounded rank vector scored with its triplets scaled
  by m̂ and as plain truncation;
* ``polish`` — the kept masks refitted, ranks fixed (:mod:`coblax.lowrank.polish`);
* the warm start's own allocation is always among the rounding candidates.

Fine-tuning-aware (issue 18): ``joint = S`` trains the masks together with the
factors and the rest of the network for S steps after the relaxed solve, each step
projected back onto the budgets (:mod:`coblax.lowrank.joint`); the rounding, polish
and the returned allocation's factored network then use the trained weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from coblax.lowrank.allocation import Allocation, AllocationProblem, is_feasible
from coblax.lowrank.finetune_select import candidate_tuner, check_finetune_select, finetune_pick
from coblax.lowrank.objective import check_bn_stats
from coblax.lowrank.polish import polish_masks
from coblax.lowrank.rounding import VALUE_CHOICES, flat_mask, masks_for_ranks, round_masks
from coblax.lowrank.solve import SolveResult, check_tolerances, solve
from coblax.lowrank.warm_start import check_oracle_layout, warm_start_point, warm_start_ranks

__all__ = ["COBLA", "warm_start_point", "warm_start_ranks", "SELECT", "check_oracle_layout"]

SELECT = ("accuracy", "loss", "finetune")
_FEAS_TOL = 1e-6


@dataclasses.dataclass
class _Relaxed:
    m: np.ndarray
    saturated: list[str]
    trace: list[dict]
    solves: list[dict]
    iterations: int = 0
    seconds: float = 0.0
    pairs: tuple[list[np.ndarray], list[np.ndarray]] | None = None  # L-BFGS memory over all of m


def _score_key(values) -> tuple[float, ...]:
    """A recorded score (``None`` for a non-finite entry) as a comparable tuple."""
    return tuple(float("inf") if v is None else float(v) for v in values)


@dataclasses.dataclass(frozen=True)
class COBLA:
    """The COBLA allocator; needs ``problem.loss`` (a :class:`~coblax.lowrank.allocation.LossOracle`).

    Attributes:
      max_iter, tol, rtol, atol: the solver's limits per solve (:func:`coblax.solve`):
        converged when the KKT residual is ``tol`` times the first iterate's, when E
        moved by at most ``rtol``·E over the last iterations, or (``atol``) when the
        KKT residual is below ``atol``·max(1, E) or no mask moved more than ``atol``.
        SLSQP uses ``rtol`` as its ``ftol``.
      solver: ``"structured"`` (L-BFGS SQP, :func:`coblax.solve`) or ``"slsqp"``.
      window: variable reduction: only ``window`` triplets either side of each
        layer's warm-start rank are free (int, or a fraction of the layer's rank);
        None keeps every variable free.
      roundings: K, the number of stochastic roundings drawn.
      warm_start: an allocator's name (``pos_greedy``, ``pos_exact``, ``uniform``...)
        or ``"constant"``; ``"cobla"`` is refused.
      extra_warm_starts: further starts, as ``warm_start``. The relaxed solve is local:
        on MobileNet it ends within a few ranks per layer of its start
        (experiments/README.md, issue 18). With more than one start the relaxed solve
        (saturation and continuation included) runs from each, and the one with the
        lowest E(m) goes on to the joint steps and the rounding; the others cost only
        their solve time. ``lc`` starts from LC's first C step (direct compression on the
        network's weights; no L step runs).
      saturation_rounds: rounds of saturation, each fixing every eligible layer in
        original form and re-solving at most once, warm-started (0: none).
      monotone: add m_ij >= m_i,j+1 within each layer.
      continuation: penalty weights μ_k of the integrality continuation (empty: off).
      local_search: evaluation budget of the integer local search (0: off).
      select: score rounding candidates by validation ``"accuracy"`` (then loss) or ``"loss"``,
        or ``"finetune"`` (see ``finetune_candidates``).
      mask_values: the draws keep the top triplets by σ·m̂ scaled by m̂ (``"relaxed"``,
        the authors'), or by 1 (``"ones"``), or the top by σ at 1 (``"plain"``), or
        ``"best"``: each draw scored both as ``"relaxed"`` and as ``"plain"``.
      polish: iterations of the post-rounding mask fit (0: off), see the module doc.
      joint: S, steps of joint training of the masks and the factors after the relaxed
        solve, each followed by the projection onto the budgets (0: off;
        :mod:`coblax.lowrank.joint`); the rounding, polish and the factored network
        then use the trained factors.
      joint_lr, joint_mask_lr: Adam's learning rates of the weights and of the masks there.
      joint_schedule: the weights' rate over the ``joint`` steps (both phases, as one run):
        ``"constant"`` (``joint_lr`` throughout) or ``"cosine"`` (``joint_lr`` decayed to 0
        at the last step, as the base model is trained). Measured on MobileNet /
        Fashion-MNIST at 0.5 (3 seeds): the decayed rate fits the training images (99.8-100 %)
        and loses 3.2 pt after fine-tuning, so ``"constant"`` stays the default.
      joint_hard: H, the last H of the ``joint`` steps train the weights at fixed ranks:
        after S − H joint steps the masks are rounded (the usual rounding, scored on the
        trained network), then the network trains H steps under the rounded masks,
        which are the answer (no second rounding). Why: joint training leaves
        fractional masks that the weights rely on, and rounding drops them (ResNet-20 /
        Fashion-MNIST, whitened, ``joint = 300``: relaxed validation accuracy 87–93 %,
        rounded 80–89 %); LC ends at its ranks instead. 0: off.
      joint_average: A, the network after the ``joint_hard`` steps is the mean of the
        weights over its last A steps (tail averaging; :func:`coblax.lowrank.joint.joint_train`'s
        ``average_last``) instead of the last step's. 0 (default): the last step's.
      progress: show progress bars over the SQP iterations and the joint steps.
      bn_stats: how E(m) and the candidate scores normalize BatchNorm: the original's
        ``"running"`` statistics, each batch's own (``"batch"``), or statistics
        re-estimated at m on the objective subset (``"recalibrated"``);
        :mod:`coblax.lowrank.objective`. ``"auto"``: ``"batch"`` for a network with
        BatchNorm statistics, else ``"running"`` (no BatchNorm: the three agree), is the
        default: masks chosen under batch statistics are right for a network whose
        statistics are then re-estimated, which ``allocate``, ``finetune`` and the runner
        do by default (``recalibrate_bn = "auto"``); with ``recalibrate_bn = 0`` use
        ``"running"``.
      finetune_candidates, finetune_steps, finetune_learning_rate: with
        ``select = "finetune"``, the K best distinct rounded candidates (by the
        accuracy score) are each fine-tuned for S steps (Adam at this learning rate)
        and the best validation accuracy after them is kept
        (:mod:`coblax.lowrank.finetune_select`).
    """

    max_iter: int = 100
    tol: float = 1e-4
    # E is a sample mean over ``objective_size`` examples whose own sampling error is
    # tens of percent; the quick-start CNN reaches today's 100-iteration objective
    # (0.00824) at 30 iterations and moves by < 0.3 % per 5 iterations after 88.
    rtol: float = 3e-3
    atol: float = 1e-8
    roundings: int = 10
    warm_start: str = "pos_exact"
    extra_warm_starts: tuple[str, ...] = ()
    saturation_rounds: int = 5
    monotone: bool = False
    continuation: tuple[float, ...] = ()
    local_search: int = 60
    select: str = "accuracy"
    # "best" and polish = 30: measured on tight_budgets.toml (experiments/README.md) they
    # lift the constant start from below POS-exact in 3 of 6 cells to above it in all 6.
    mask_values: str = "best"
    polish: int = 30
    solver: str = "structured"
    window: int | float | None = None
    # joint training (issue 18): off by default; joint_lr is fine-tuning's default rate; a mask
    # rate of 1e-2 let the masks random-walk and raised E (measured: coblax/lowrank/joint.py).
    joint: int = 0
    joint_lr: float = 1e-4
    joint_mask_lr: float = 1e-3
    joint_hard: int = 0
    joint_schedule: str = "constant"
    joint_average: int = 0
    progress: bool = False
    # issue 18 (BatchNorm statistics in E(m), fine-tuning-aware selection)
    bn_stats: str = "auto"
    finetune_candidates: int = 3
    finetune_steps: int = 50
    finetune_learning_rate: float = 1e-4
    name: str = "cobla"
    needs_loss = True  # not a field: allocate() builds the objective E(m) only for allocators that ask

    def __post_init__(self) -> None:
        check_tolerances(max_iter=self.max_iter, tol=self.tol, rtol=self.rtol, atol=self.atol)
        starts = self._starts
        if "cobla" in starts:
            warm_start_ranks(None, "cobla")  # raises the explanatory ValueError
        if len(set(starts)) != len(starts):
            raise ValueError(f"cobla extra_warm_starts = {list(self.extra_warm_starts)!r} repeats a start "
                             f"(warm_start = {self.warm_start!r} included)")
        if self.select not in SELECT:
            raise ValueError(f"cobla select = {self.select!r}; valid: {', '.join(SELECT)}")
        if self.mask_values not in VALUE_CHOICES:
            raise ValueError(f"cobla mask_values = {self.mask_values!r}; valid: {', '.join(VALUE_CHOICES)}")
        if self.saturation_rounds < 0 or self.local_search < 0 or self.polish < 0:
            raise ValueError("cobla saturation_rounds, local_search and polish must be >= 0")
        if any(mu < 0 for mu in self.continuation):
            raise ValueError("cobla continuation weights must be >= 0")
        if self.bn_stats != "auto":
            check_bn_stats(self.bn_stats, "cobla bn_stats")
        check_finetune_select(self.finetune_candidates, self.finetune_steps, self.finetune_learning_rate)
        if isinstance(self.joint, bool) or not isinstance(self.joint, (int, np.integer)) or self.joint < 0:
            raise ValueError(f"cobla joint = {self.joint!r}: must be an integer >= 0 (training steps; 0 = off)")
        if (isinstance(self.joint_hard, bool) or not isinstance(self.joint_hard, (int, np.integer))
                or self.joint_hard < 0 or (self.joint_hard and self.joint_hard >= self.joint)):
            raise ValueError(f"cobla joint_hard = {self.joint_hard!r}: must be an integer, 0 <= joint_hard "
                             f"< joint = {self.joint} (0 without joint)")
        if self.joint_hard and self.select == "finetune":  # it would re-pick ranks the steps were not spent on
            raise ValueError("cobla joint_hard > 0 fixes the ranks before its steps; select = 'finetune' "
                             "would pick others afterwards: use select = 'accuracy' or 'loss'")
        if (isinstance(self.joint_average, bool) or not isinstance(self.joint_average, (int, np.integer))
                or not 0 <= self.joint_average <= self.joint_hard):
            raise ValueError(f"cobla joint_average = {self.joint_average!r}: must be an integer, "
                             f"0 <= joint_average <= joint_hard = {self.joint_hard}")
        if self.joint_schedule not in ("constant", "cosine"):
            raise ValueError(f"cobla joint_schedule = {self.joint_schedule!r}; valid: constant, cosine")
        for key in ("joint_lr", "joint_mask_lr"):
            if not float(getattr(self, key)) > 0.0:
                raise ValueError(f"cobla {key} = {getattr(self, key)!r}: must be > 0")

    @property
    def _starts(self) -> tuple[str, ...]:
        """Every start of the relaxed solve, ``warm_start`` first."""
        return (self.warm_start, *self.extra_warm_starts)

    # -- the relaxed solve -------------------------------------------------------------

    def _solve(self, fun_and_grad, x0, A, b, tick, groups, pairs=None) -> SolveResult:
        """The one call into the SQP solver (``solver``: SLSQP or the structured one)."""
        return solve(fun_and_grad, x0, A, b, method=self.solver, max_iter=self.max_iter, tol=self.tol,
                     rtol=self.rtol, atol=self.atol, groups=groups,
                     monotone=self.monotone and self.solver == "structured",
                     window=self.window, progress=tick, pairs=pairs)

    def _system(self, problem: AllocationProblem, active: list[int], saturated: set[str]):
        layers = problem.layers
        offsets = problem.offsets()
        idx = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in active]) if active else np.zeros(0, int)
        rows = [np.zeros(idx.size) for _ in range(_budget_rows(problem))]
        pos = 0
        mono = []
        for i in active:
            R = layers[i].full_rank
            rows[0][pos:pos + R] = layers[i].mac_per_rank
            rows[1][pos:pos + R] = layers[i].param_per_rank
            if problem.has_latency:  # the fitted line's slope; its intercept goes to b below
                rows[2][pos:pos + R] = layers[i].latency_line[1]
            if self.monotone and self.solver == "slsqp":  # the structured solver projects instead
                for j in range(R - 1):  # m_{j+1} - m_j <= 0
                    row = np.zeros(idx.size)
                    row[pos + j], row[pos + j + 1] = -1.0, 1.0
                    mono.append(row)
            pos += R
        fixed_mac = sum(l.original_macs for l in layers if l.name in saturated)
        fixed_par = sum(l.original_params for l in layers if l.name in saturated)
        A = np.stack(rows + mono)
        budgets = [problem.mac_max - fixed_mac, problem.param_max - fixed_par]
        if problem.has_latency:
            budgets.append(problem.latency_max - sum(l.latency.original for l in layers if l.name in saturated)
                           - sum(layers[i].latency_line[0] for i in active))
        b = np.concatenate([budgets, np.zeros(len(mono))])
        return idx, A, b

    @staticmethod
    def _feasible_point(x: np.ndarray, A: np.ndarray, b: np.ndarray) -> bool:
        if np.any(x < -_FEAS_TOL) or np.any(x > 1 + _FEAS_TOL):
            return False
        scale = np.maximum(np.abs(b), 1.0)
        return bool(np.all((A @ x - b) / scale <= _FEAS_TOL))

    @staticmethod
    def _shrink_into(x: np.ndarray, A: np.ndarray, b: np.ndarray, rows: int = 2) -> np.ndarray:
        """Scale x down (towards 0, keeping its order) until the ``rows`` budget rows hold."""
        alpha = 1.0
        for row, bound in zip(A[:rows], b[:rows]):
            used = float(row @ x)
            if used > bound > 0:
                alpha = min(alpha, bound / used)
            elif bound <= 0 < used:
                alpha = 0.0
        return x * alpha

    def _run_solve(self, problem, m, active, saturated, penalty, state: _Relaxed, tick, label):
        """Solve over ``active`` layers from ``m``; returns the new flat m or None (rolled back)."""
        idx, A, b = self._system(problem, active, saturated)
        if idx.size == 0:
            return m
        x0 = m[idx]
        if not self._feasible_point(x0, A, b):
            x0 = self._shrink_into(x0, A, b, _budget_rows(problem))

        def fun_and_grad(x, idx=idx):
            full = m.copy()
            full[idx] = x
            value, grad = problem.loss.value_and_grad(full)
            grad = grad[idx]
            if penalty:
                value = value + penalty * float(np.sum(4.0 * x * (1.0 - x)))
                grad = grad + penalty * 4.0 * (1.0 - 2.0 * x)
            return value, grad

        warm = None
        if state.pairs is not None and not penalty:  # the penalty changes the curvature: start afresh
            warm = ([v[idx] for v in state.pairs[0]], [v[idx] for v in state.pairs[1]])
        res = self._solve(fun_and_grad, x0, A, b, tick, [problem.layers[i].full_rank for i in active], warm)
        ok = self._feasible_point(res.x, A, b)
        if res.pairs is not None and not penalty:
            state.pairs = tuple([_scatter(v, idx, m.size) for v in vecs] for vecs in res.pairs)
        base = len(state.trace)
        for t in res.trace:
            state.trace.append(dict(t, iteration=base + t["iteration"], saturated=sorted(saturated), stage=label))
        state.iterations += res.iterations
        state.seconds += res.seconds
        state.solves.append({"stage": label, "status": res.status, "criterion": res.criterion,
                             "success": res.success, "message": res.message, "iterations": res.iterations,
                             "n_fun": res.n_fun, "kkt_residual": res.kkt_residual, "value": res.value,
                             "seconds": res.seconds, "variables": int(idx.size), "feasible": ok,
                             "rolled_back": not ok})
        if not ok:
            return None
        out = m.copy()
        out[idx] = res.x
        return out

    @staticmethod
    def _saturation_set(problem: AllocationProblem, m: np.ndarray, saturated: set[str]) -> list[int]:
        """Every layer to fix in original form this round (indices), feasibility kept.

        Eligible: relaxed rank Σ m ≥ its saturation rank. Taken in order of that
        rank relative to the saturation rank, each only while the layers left at
        ``min_rank`` fit what is left of both budgets.
        """
        layers, offsets = problem.layers, problem.offsets()
        cands = []
        for i, layer in enumerate(layers):
            if layer.name in saturated or layer.saturation_rank > layer.full_rank:
                continue
            r = float(np.sum(m[offsets[i]:offsets[i + 1]]))
            if r >= layer.saturation_rank - 1e-6:
                cands.append((r / layer.saturation_rank, i))
        chosen: list[int] = []
        names = set(saturated)
        for _, i in sorted(cands, reverse=True):
            trial = names | {layers[i].name}
            rest = [l for l in layers if l.name not in trial]
            fixed = [l for l in layers if l.name in trial]
            left = (problem.mac_max - sum(l.original_macs for l in fixed),
                    problem.param_max - sum(l.original_params for l in fixed))
            floor = (sum(min(problem.min_rank, l.full_rank) * l.mac_per_rank for l in rest),
                     sum(min(problem.min_rank, l.full_rank) * l.param_per_rank for l in rest))
            if problem.has_latency:
                left += (problem.latency_max - sum(l.latency.original for l in fixed),)
                floor += (sum(l.latency_at(problem.min_rank) for l in rest),)
            if all(need <= have * (1 + 1e-9) for need, have in zip(floor, left)):
                chosen.append(i)
                names = trial
        return chosen

    def _resolve_pointless(self, problem, m: np.ndarray, active: list[int], saturated: set[str]) -> bool:
        """Whether m stays feasible and some row's slack is below its cheapest remaining rank."""
        if not active:
            return True
        idx, A, b = self._system(problem, active, saturated)
        x = m[idx]
        if not self._feasible_point(x, A, b):
            return False
        n = _budget_rows(problem)
        slack = b[:n] - A[:n] @ x
        cheapest = (min(problem.layers[i].mac_per_rank for i in active),
                    min(problem.layers[i].param_per_rank for i in active))
        if problem.has_latency:
            cheapest += (min(problem.layers[i].latency_line[1] for i in active),)
        return any(s < c for s, c in zip(slack, cheapest))

    def _start_saturated(self, problem: AllocationProblem, warm_ranks: dict[str, int] | None) -> tuple[str, ...]:
        """Layers a solve from ``warm_ranks`` starts in original form (see :meth:`_relaxed`)."""
        layers = problem.layers
        start_saturated: tuple[str, ...] = ()
        if warm_ranks is not None and self.saturation_rounds > 0:
            start_saturated = tuple(l.name for l in layers if l.is_original(warm_ranks[l.name]))
        if problem.has_latency:  # a layer whose factored form is never faster stays original
            start_saturated += tuple(l.name for l in layers
                                     if l.is_original(problem.min_rank) and l.name not in start_saturated)
        return start_saturated

    def _relaxed(self, problem: AllocationProblem, m0: np.ndarray, tick,
                 start_saturated: tuple[str, ...] = ()) -> tuple[_Relaxed, np.ndarray]:
        """Relaxed solve with saturation, then the continuation; (state, m before continuation).

        ``start_saturated``: layers the warm start keeps in original form; they start
        saturated (m = 1, original cost) instead of one triplet short of it, which in
        a layer of three triplets (a first convolution) wrecks the network: the
        quick-start CNN's E went from 0.001 to 4.4 (18 % validation accuracy).
        """
        layers = problem.layers
        offsets = problem.offsets()
        state = _Relaxed(m=m0.copy(), saturated=list(start_saturated), trace=[], solves=[])
        saturated: set[str] = set(start_saturated)
        for i, layer in enumerate(layers):
            if layer.name in saturated:
                state.m[offsets[i]:offsets[i + 1]] = 1.0
        all_idx = [i for i, layer in enumerate(layers) if layer.name not in saturated]
        new = self._run_solve(problem, state.m, all_idx, saturated, 0.0, state, tick, "relaxed")
        if new is not None:
            state.m = new
        for _ in range(self.saturation_rounds):
            chosen = self._saturation_set(problem, state.m, saturated)
            if not chosen:
                break
            trial = saturated | {layers[i].name for i in chosen}
            m_try = state.m.copy()
            for i in chosen:
                m_try[offsets[i]:offsets[i + 1]] = 1.0
            active = [i for i, l in enumerate(layers) if l.name not in trial]
            label = "saturate " + ", ".join(layers[i].name for i in chosen)
            if self._resolve_pointless(problem, m_try, active, trial):
                new = m_try
                state.solves.append({"stage": label, "status": "skipped", "criterion": None, "success": True,
                                     "message": "the freed budget is below the cheapest rank of every "
                                                "remaining layer in some row: no re-solve",
                                     "iterations": 0, "n_fun": 0, "feasible": True, "rolled_back": False})
            else:
                new = self._run_solve(problem, m_try, active, trial, 0.0, state, tick, label)
            if new is None:  # the re-solve broke a constraint: keep the previous point
                break
            saturated = trial
            state.m = new
            state.saturated.extend(layers[i].name for i in chosen)
        m_relaxed = state.m.copy()
        if self.continuation:
            e0 = abs(problem.loss.value_and_grad(state.m)[0]) or 1.0
            active = [i for i, l in enumerate(layers) if l.name not in saturated]
            idx = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in active]) if active else []
            mass = max(float(np.sum(state.m[idx])), 1.0)  # Σ m over the free layers: the relaxed ranks
            for mu in self.continuation:
                new = self._run_solve(problem, state.m, active, saturated, mu * e0 / mass, state, tick,
                                      f"continuation {mu:g}")
                if new is None:
                    break
                state.m = new
        return state, m_relaxed

    # -- the allocator -----------------------------------------------------------------

    def _finetune_select(self, problem, ranks, masks, m_hat, info):
        """``select = "finetune"``: the top ``finetune_candidates`` of the rounding, each fine-tuned."""
        scored = [(_score_key(c["score"]), c["ranks"], masks_for_ranks(problem, c["ranks"], m_hat, c["values"])[1])
                  for c in info["candidates"]]
        return finetune_pick(problem, (ranks, masks, _score_key(info["score"])), scored, self.finetune_candidates,
                             lambda: candidate_tuner(problem, self.finetune_steps, self.finetune_learning_rate))

    def _polish(self, problem: AllocationProblem, ranks: dict[str, int], masks: dict[str, np.ndarray],
                m_hat: dict[str, np.ndarray], info: dict, score: Callable) -> tuple[dict, dict]:
        """Polish the chosen rounding; with ``mask_values = "best"`` also the best candidate
        of the other mask values, keeping whichever scores better after its polish.

        Why both: the rounding compares candidates before the polish, and the polish does
        not keep their order. ResNet-20 / Fashion-MNIST at 0.3 (seed 0): the best
        ``relaxed``-valued candidate led the ``plain`` ones on validation accuracy (63.8
        against 58.2 %), but polished it reached 67.6 % and a plain candidate 75.6 %
        (test 67.3 against 73.0 % before fine-tuning, 80.0 against 81.8 % after).
        """
        polished, info["polish"] = polish_masks(problem, masks, score, self.polish, rtol=self.rtol)
        if self.mask_values != "best" or self.select == "finetune" or "score_before" not in info["polish"]:
            return ranks, polished  # (no score_before: nothing to polish, every layer original)
        others = [c for c in info["candidates"] if c["values"] != info["values"]]
        if not others:
            return ranks, polished

        def final(record: dict) -> tuple:
            return _score_key(record["score_after"] if record["kept"] else record["score_before"])

        other = min(others, key=lambda c: _score_key(c["score"]))
        other_ranks, other_masks = masks_for_ranks(problem, other["ranks"], m_hat, other["values"])
        other_polished, other_info = polish_masks(problem, other_masks, score, self.polish, rtol=self.rtol)
        info["polish_other"] = {"label": other["label"], **other_info}
        if "score_before" in other_info and final(other_info) < final(info["polish"]):
            info["chosen"] = f"{other['label']}+polish"
            info["values"] = other["values"]
            return other_ranks, other_polished
        return ranks, polished

    def _bn_stats_for(self, loss: Any) -> str:
        """``bn_stats``, with ``"auto"`` resolved: ``"batch"`` where the oracle's network has
        BatchNorm statistics and can switch (measured on ResNet-20 / Fashion-MNIST: +9 to +12
        pt after fine-tuning over ``"running"``, and ``"recalibrated"`` within noise of it
        at two forward passes per evaluation), else the oracle's own."""
        if self.bn_stats != "auto":
            return self.bn_stats
        if getattr(loss, "has_batch_norm", False) and hasattr(loss, "with_bn_stats"):
            return "batch"
        return getattr(loss, "bn_stats", "running")

    def __call__(self, problem: AllocationProblem) -> Allocation:
        if problem.loss is None:
            raise ValueError("cobla needs the network's loss: build the problem with a loss oracle")
        bn_stats = self._bn_stats_for(problem.loss)
        if bn_stats != getattr(problem.loss, "bn_stats", "running"):
            switch = getattr(problem.loss, "with_bn_stats", None)
            if switch is None:
                raise ValueError(f"cobla bn_stats = {bn_stats!r} needs a loss oracle with with_bn_stats "
                                 f"(coblax's NetworkLoss); {type(problem.loss).__name__} has none")
            problem = dataclasses.replace(problem, loss=switch(bn_stats))
        check_oracle_layout(problem)
        if self.joint > 0:  # fail before the solve where joint training cannot run
            from coblax.lowrank.joint import check_joint

            check_joint(problem)
        layers = problem.layers
        offsets = problem.offsets()
        bar = tqdm(desc="cobla SQP", unit="it", disable=not self.progress, leave=False)

        def tick(iteration: int, value: float) -> None:
            bar.update(1)
            bar.set_postfix(E=f"{value:.4f}")

        several = len(self._starts) > 1
        objective = getattr(problem.loss, "value", None) or (lambda m: problem.loss.value_and_grad(m)[0])
        starts = []
        for how in self._starts:
            ranks0 = warm_start_ranks(problem, how)
            bar.set_description(f"cobla SQP from {how}")
            state, m_relaxed = self._relaxed(problem, warm_start_point(problem, how, ranks0), tick,
                                             self._start_saturated(problem, ranks0))
            # E at the end of each solve, only where there is a choice to make
            end = float(objective(state.m)) if several else float("nan")
            starts.append((how, ranks0, state, m_relaxed, end))
        bar.close()
        # the lowest relaxed objective wins (the first start on ties and where E is not finite)
        best = min(range(len(starts)), key=lambda k: (not np.isfinite(starts[k][4]), starts[k][4], k))
        how, warm_ranks, state, m_relaxed, _ = starts[best]
        start_stats = [{"start": h, "objective": e if np.isfinite(e) else None, "iterations": st.iterations,
                        "seconds": st.seconds, "ranks": r} for h, r, st, _, e in starts]
        weights, joint_stats = None, {}
        if self.joint > 0:  # masks and factors trained together; rounding then sees the trained network
            state.m, problem, weights, joint_stats = self._joint(problem, state, self.joint - self.joint_hard)
            m_relaxed = state.m.copy()

        def blocks(m: np.ndarray) -> dict[str, np.ndarray]:
            out = {l.name: m[offsets[i]:offsets[i + 1]].copy() for i, l in enumerate(layers)}
            for name in state.saturated:
                out[name] = np.ones_like(out[name])
            return out

        m_hat = blocks(state.m)
        metrics = _metrics_fn(problem.loss)
        if self.select in ("accuracy", "finetune"):
            score = lambda m: (-metrics(m)[1], metrics(m)[0])  # noqa: E731 - cached below
        else:
            score = lambda m: (metrics(m)[0],)  # noqa: E731
        extra = [("warm_start", warm_ranks)] if warm_ranks is not None else []
        ranks, masks, info = round_masks(
            problem, m_hat, draws=self.roundings, seed=problem.seed, score=score,
            values=self.mask_values, extra=extra, local_search_evals=self.local_search,
        )
        # the relaxed masks' diagnostics below are measured on the network they were trained with
        relaxed_metrics, rel_value = metrics, getattr(problem.loss, "value", None)
        if self.joint_hard > 0:  # the network trains on at the rounded ranks; those masks are the answer
            problem, weights, hard_stats = self._joint_hard(problem, masks)
            joint_stats = {**joint_stats, **hard_stats}
            metrics = _metrics_fn(problem.loss)  # the cache held the network before these steps
        if not is_feasible(problem, ranks):  # pragma: no cover - rounding guarantees it
            raise AssertionError("COBLA rounding produced an infeasible allocation")
        if self.select == "finetune":
            ranks, masks, info["finetune_select"] = self._finetune_select(problem, ranks, masks, m_hat, info)
        if self.polish > 0:
            ranks, masks = self._polish(problem, ranks, masks, m_hat, info, score)
        value = getattr(problem.loss, "value", None)
        m_rounded = flat_mask(problem, masks)
        relaxed_blocks = blocks(m_relaxed)
        m_rel_flat = flat_mask(problem, relaxed_blocks)
        rel_val_loss, rel_val_acc = relaxed_metrics(m_rel_flat)
        rnd_val_loss, rnd_val_acc = metrics(m_rounded)
        last = state.solves[-1] if state.solves else {}
        stats = {
            "objective_trace": [t["objective"] for t in state.trace],
            "trace": state.trace,
            "solver_iterations": state.iterations,
            "solve_seconds": sum(st["seconds"] for st in start_stats),  # every start's solve is paid
            "warm_start": how,
            "warm_starts": start_stats,
            "bn_stats": getattr(problem.loss, "bn_stats", "running"),
            "solver_status": last.get("status"),
            "solver_message": last.get("message"),
            "solves": state.solves,
            "relaxed_objective": rel_value(m_rel_flat) if rel_value else None,
            "rounded_objective": value(m_rounded) if value else None,
            "relaxed_val_loss": rel_val_loss,
            "relaxed_val_accuracy": rel_val_acc,
            "rounded_val_loss": rnd_val_loss,
            "rounded_val_accuracy": rnd_val_acc,
            "continued_objective": value(flat_mask(problem, m_hat)) if value and self.continuation else None,
            "saturated_layers": sorted(state.saturated),
            "relaxed_ranks": {k: float(np.sum(v)) for k, v in relaxed_blocks.items()},
            # Per-triplet masks (σ order) so that figures can show the rounding gap without
            # re-solving: the relaxed m̂ and the rounded network's mask values.
            "relaxed_masks": {k: np.round(v, 5).tolist() for k, v in relaxed_blocks.items()},
            "rounded_masks": {k: np.round(np.asarray(v, np.float64), 5).tolist() for k, v in masks.items()},
            "warm_start_ranks": warm_ranks,
            # True when rounding returned exactly the warm start's allocation: the
            # answer is the baseline's ranks (with m̂-scaled triplets at most).
            "ranks_from_warm_start": None if warm_ranks is None else dict(ranks) == dict(warm_ranks),
            "solver_converged": all(sv.get("success", False) for sv in state.solves),
            "rounding": info,
            "variables": int(offsets[-1]),
            **joint_stats,
        }
        return Allocation(
            ranks=ranks,
            status="repaired" if info["repaired"] else "ok",
            relaxed=m_hat,
            masks=masks,
            stats=stats,
            weights=weights,
        )

    def _joint(self, problem: AllocationProblem, state: _Relaxed, steps: int):
        """``steps`` joint steps over the unsaturated layers' masks (:func:`coblax.lowrank.joint.joint_train`)."""
        from coblax.lowrank.joint import joint_train

        saturated = set(state.saturated)
        active = [i for i, l in enumerate(problem.layers) if l.name not in saturated]
        idx, A, b = self._system(problem, active, saturated)
        rows = _budget_rows(problem)  # the budgets; monotone rows are not imposed (see joint's doc)
        return joint_train(problem, state.m, idx, A[:rows], b[:rows], steps, self.joint_lr, self.joint_mask_lr,
                           lr_schedule=self._joint_rate(0), progress="cobla joint" if self.progress else None)

    def _joint_rate(self, offset: int):
        """The weights' rate at a phase's step k, which is step ``offset + k`` of the joint run."""
        if self.joint_schedule == "constant":
            return None
        import optax  # only joint training needs it, as coblax.lowrank.joint is imported late

        cosine = optax.cosine_decay_schedule(self.joint_lr, self.joint)
        return lambda count: cosine(count + offset)

    def _joint_hard(self, problem: AllocationProblem, masks: Mapping[str, np.ndarray]):
        """``joint_hard`` steps on the weights with the rounded masks fixed (no mask is free)."""
        from coblax.lowrank.joint import joint_train

        m = flat_mask(problem, masks)
        _, problem, weights, st = joint_train(problem, m, np.zeros(0, int), np.zeros((_budget_rows(problem), 0)),
                                              np.zeros(_budget_rows(problem)), self.joint_hard, self.joint_lr,
                                              self.joint_mask_lr,
                                              lr_schedule=self._joint_rate(self.joint - self.joint_hard),
                                              progress="cobla joint_hard" if self.progress else None,
                                              average_last=self.joint_average)
        # problem's loss and trainer hold the soft phase's trained weights: this continues them
        keep = ("joint_steps", "joint_seconds", "joint_first_step_seconds", "joint_step_seconds",
                "joint_lr_first", "joint_lr_last",
                "joint_train_loss_first", "joint_train_loss_last",
                "joint_val_loss_before", "joint_val_accuracy_before", "joint_val_loss_after",
                "joint_val_accuracy_after", "joint_objective_before", "joint_objective_after",
                "joint_averaged_steps")
        hard = {"joint_hard_" + k[len("joint_"):]: st[k] for k in keep if k in st}
        hard["joint_hard_ranks"] = {n: int(np.count_nonzero(v)) for n, v in masks.items()}
        return problem, weights, hard


def _budget_rows(problem: AllocationProblem) -> int:
    """Budget rows of the relaxed system: MACs, params and (with a latency budget) latency."""
    return 3 if problem.has_latency else 2


def _scatter(v: np.ndarray, idx: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n)
    out[idx] = v
    return out


def _metrics_fn(oracle) -> Callable[[np.ndarray], tuple[float, float]]:
    """(validation loss, validation accuracy) of a flat mask, cached per mask.

    Oracles without ``validation_metrics`` (or with a NaN accuracy) report accuracy
    0, so candidates tie on accuracy and the loss decides.
    """
    cache: dict[bytes, tuple[float, float]] = {}
    has = hasattr(oracle, "validation_metrics")

    def metrics(m: np.ndarray) -> tuple[float, float]:
        key = np.asarray(m, np.float64).tobytes()
        if key not in cache:
            if has:
                loss, acc = oracle.validation_metrics(m)
            else:
                loss, acc = oracle.validation_loss(m), float("nan")
            acc = float(acc)
            cache[key] = (float(loss), 0.0 if acc != acc else acc)  # NaN: ties on accuracy
        return cache[key]

    return metrics
