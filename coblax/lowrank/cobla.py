"""COBLA: Constrained Optimization Based Low-rank Approximation (Li & Shi, ECCV 2018).

Relaxed problem (seed, Eq. 2):
    minimize_m  E(m)   s.t.  N_C(m) <= N_C,max,  N_M(m) <= N_M,max,  0 <= m <= 1,
with E the network's mean cross-entropy on a fixed objective subset and N_C, N_M
affine in m (see :mod:`coblax.lowrank.costs`). It is solved by SQP (scipy SLSQP) over
jitted JAX callbacks, then rounded (:mod:`coblax.lowrank.rounding`).

Where the paper is silent we follow the authors' public code (chongli-uw/cobla):
* cost saturation — after a solve, a layer whose relaxed rank Σ_j m_ij reaches
  the rank at which its factored form costs as much as the original is fixed in
  its original form (m_i = 1, original cost), its variables leave the problem,
  and the rest is re-solved with the budgets reduced accordingly;
* warm start from a feasible point: the ``uniform`` allocation (or any other
  registered allocator's) as a 0/1 mask, or ``constant`` m = α·1;
* rounding as described in :mod:`coblax.lowrank.rounding`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tqdm.auto import tqdm

from coblax.lowrank.allocation import Allocation, AllocationProblem, is_feasible
from coblax.lowrank.registry import get_allocator
from coblax.lowrank.rounding import round_masks
from coblax.lowrank.solve import solve

__all__ = ["COBLA", "warm_start_point"]


def warm_start_point(problem: AllocationProblem, how: str) -> np.ndarray:
    """A feasible starting m (flat), from an allocator's ranks or a constant."""
    blocks = []
    if how == "constant":
        c_full = sum(l.mac_per_rank * l.full_rank for l in problem.layers)
        m_full = sum(l.param_per_rank * l.full_rank for l in problem.layers)
        alpha = min(1.0, problem.mac_max / c_full, problem.param_max / m_full)
        return np.concatenate([np.full(l.full_rank, alpha) for l in problem.layers])
    ranks = get_allocator(how)(problem).ranks
    for layer in problem.layers:
        # An original-form layer starts at its largest factored rank: in the affine
        # (unsaturated) cost model that is no dearer than the original.
        r = min(ranks[layer.name], min(layer.saturation_rank, layer.full_rank + 1) - 1)
        block = np.zeros(layer.full_rank)
        block[: max(r, 0)] = 1.0
        blocks.append(block)
    return np.concatenate(blocks)


@dataclasses.dataclass(frozen=True)
class COBLA:
    """The COBLA allocator; needs ``problem.loss`` (a :class:`~coblax.lowrank.allocation.LossOracle`).

    Attributes:
      max_iter, ftol: the solver's limits per solve (``ftol``: SLSQP's ftol, or the
        structured solver's KKT tolerance).
      solver: ``"structured"`` (L-BFGS SQP, :func:`coblax.solve`) or ``"slsqp"``.
      window: variable reduction: only ``window`` triplets either side of each
        layer's warm-start rank are free (int, or a fraction of the layer's rank);
        None keeps every variable free.
      roundings: K, the number of stochastic roundings drawn.
      warm_start: ``"uniform"``, another allocator's name, or ``"constant"``.
      saturation_rounds: how many times layers may be moved to original form and
        the problem re-solved.
      progress: show a progress bar over SQP iterations.
    """

    max_iter: int = 100
    ftol: float = 1e-6
    roundings: int = 10
    warm_start: str = "uniform"
    saturation_rounds: int = 5
    solver: str = "structured"
    window: int | float | None = None
    progress: bool = False
    name: str = "cobla"

    def __call__(self, problem: AllocationProblem) -> Allocation:
        if problem.loss is None:
            raise ValueError("cobla needs the network's loss: build the problem with a loss oracle")
        layers = problem.layers
        offsets = problem.offsets()
        n = int(offsets[-1])
        m = warm_start_point(problem, self.warm_start)
        saturated: set[str] = set()
        trace: list[dict] = []
        iterations = 0
        seconds = 0.0
        status, message = 0, ""
        bar = tqdm(desc="cobla SQP", unit="it", disable=not self.progress, leave=False)

        def tick(iteration: int, value: float) -> None:
            bar.update(1)
            bar.set_postfix(E=f"{value:.4f}", saturated=len(saturated))

        for _ in range(self.saturation_rounds + 1):
            active = [i for i, l in enumerate(layers) if l.name not in saturated]
            idx = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in active]) if active else np.zeros(0, int)
            if idx.size == 0:
                break
            fixed_mac = sum(l.original_macs for l in layers if l.name in saturated)
            fixed_par = sum(l.original_params for l in layers if l.name in saturated)
            A = np.zeros((2, idx.size))
            pos = 0
            for i in active:
                R = layers[i].full_rank
                A[0, pos:pos + R] = layers[i].mac_per_rank
                A[1, pos:pos + R] = layers[i].param_per_rank
                pos += R
            b = np.array([problem.mac_max - fixed_mac, problem.param_max - fixed_par])

            def fun_and_grad(x, idx=idx):
                full = m.copy()
                full[idx] = x
                value, grad = problem.loss.value_and_grad(full)
                return value, grad[idx]

            res = solve(fun_and_grad, m[idx], A, b, method=self.solver, max_iter=self.max_iter, tol=self.ftol,
                        groups=[layers[i].full_rank for i in active], window=self.window, progress=tick)
            m[idx] = res.x
            base = len(trace)
            for t in res.trace:
                trace.append(dict(t, iteration=base + t["iteration"], saturated=sorted(saturated)))
            iterations += res.iterations
            seconds += res.seconds
            status, message = res.status, res.message
            newly = self._saturating(problem, m, offsets, saturated)
            if not newly:
                break
            for i in newly:
                m[offsets[i]:offsets[i + 1]] = 1.0
                saturated.add(layers[i].name)
        bar.close()
        m_hat = {l.name: m[offsets[i]:offsets[i + 1]].copy() for i, l in enumerate(layers)}
        for name in saturated:
            m_hat[name] = np.ones_like(m_hat[name])
        relaxed_value = problem.loss.value(m) if hasattr(problem.loss, "value") else None
        ranks, masks, info = round_masks(
            problem, m_hat, draws=self.roundings, seed=problem.seed, score=problem.loss.validation_loss
        )
        if not is_feasible(problem, ranks):  # pragma: no cover - rounding guarantees it
            raise AssertionError("COBLA rounding produced an infeasible allocation")
        stats = {
            "objective_trace": [t["objective"] for t in trace],
            "trace": trace,
            "solver_iterations": iterations,
            "solve_seconds": seconds,
            "solver_status": status,
            "solver_message": message,
            "relaxed_objective": relaxed_value,
            "saturated_layers": sorted(saturated),
            "relaxed_ranks": {k: float(np.sum(v)) for k, v in m_hat.items()},
            "rounding": info,
            "variables": n,
        }
        return Allocation(
            ranks=ranks,
            status="repaired" if info["repaired"] else "ok",
            relaxed=m_hat,
            masks=masks,
            stats=stats,
        )

    @staticmethod
    def _saturating(problem, m, offsets, saturated) -> list[int]:
        out = []
        for i, layer in enumerate(problem.layers):
            if layer.name in saturated or layer.saturation_rank > layer.full_rank:
                continue
            if float(np.sum(m[offsets[i]:offsets[i + 1]])) >= layer.saturation_rank - 1e-6:
                out.append(i)
        return out

