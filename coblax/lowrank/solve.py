"""One entry point for COBLA's relaxed problem: :func:`solve`.

The relaxed problem (Li & Shi 2018, Eq. 2) has the shape

    minimize_x f(x)  s.t.  A x <= b  (a few rows),  lo <= x <= hi,
                           [x_j >= x_{j+1} inside each group, optional]

with f smooth (E(m) through jitted JAX callbacks) and n from 10^2 to 10^5.
:func:`solve` scales the rows to |b| = 1, applies the optional variable reduction
and runs either

* ``method="structured"`` — the L-BFGS SQP of :mod:`coblax.lowrank.sqp_structured`
  (exact dual projections, :mod:`coblax.lowrank.projection`; compact L-BFGS,
  :mod:`coblax.lowrank.lbfgs`): O(n·k) memory, scale-free stopping tests;
* ``method="slsqp"`` — scipy's SLSQP (:mod:`coblax.lowrank.sqp`), the reference;
  it solves a dense QP per iteration, O(n^3) time and O(n^2) memory.

Variable reduction (the COBLA authors' code, chongli-uw/cobla): with ``groups``
(per-layer sizes) and ``window``, each layer's triplets well before its warm-start
rank r₀ = Σ_j x0_j are fixed on (``upper``) and those well after it off
(``lower``); only a window of ``window`` triplets either side of r₀ enters the
solve, and :attr:`SolveResult.n_free` reports how many did.

References: Li & Shi, "Constrained Optimization Based Low-Rank Approximation of
Deep Neural Networks", ECCV 2018; Byrd, Lu, Nocedal & Zhu, SIAM J. Sci. Comput.
16, 1995; Nocedal & Wright, Numerical Optimization, 2nd ed., ch. 18.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from coblax.lowrank.projection import FeasibleSet
from coblax.lowrank.sqp import solve_slsqp
from coblax.lowrank.sqp_structured import NonFiniteError, structured_sqp

__all__ = ["SolveResult", "NonFiniteError", "solve", "reduce_window", "METHODS", "check_tolerances"]

METHODS = ("slsqp", "structured")

FunAndGrad = Callable[[np.ndarray], tuple[float, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class SolveResult:
    """Outcome of :func:`solve`.

    Attributes:
      x: the final iterate (all n variables, fixed ones included).
      value: f(x).
      success: ``status == "converged"`` (for SLSQP, scipy's flag).
      status: ``"converged"`` (``criterion`` says which test fired), ``"max_iter"``,
        ``"stalled"`` (no merit decrease possible any more, away from a KKT point)
        or ``"slsqp_<code>"`` for SLSQP's other exits.
      criterion: the stopping test that fired when converged: ``"kkt"``,
        ``"f_change"``, ``"x_change"`` or ``"stall"`` (structured, see
        :mod:`coblax.lowrank.sqp_structured`), ``"slsqp"``; None otherwise.
      message: human-readable reason, with the last KKT residual.
      iterations: SQP iterations taken.
      n_fun: objective evaluations.
      seconds: wall time of the solve.
      kkt_residual: ‖P_Ω(x − ∇f(x)) − x‖_∞ at x.
      trace: one dict per iterate: ``iteration``, ``objective``, ``slack``
        (b − A x per row, unscaled; negative = violated) and, for the structured
        solver, ``kkt_residual`` and ``step`` (the line search's α).
      n_free: variables that entered the solve (after variable reduction).
      multipliers: λ ≥ 0 of the rows of A in their own units (∇f + Aᵀλ + box
        multipliers = 0 at a KKT point), from the projection that measures the KKT
        residual at x; both solvers.
      method: which solver ran.
      pairs: the structured solver's L-BFGS memory (S, Y) over all n variables
        (zeros at fixed ones), to warm-start a related solve; None for SLSQP.
    """

    x: np.ndarray
    value: float
    success: bool
    status: str
    message: str
    iterations: int
    n_fun: int
    seconds: float
    kkt_residual: float
    trace: list[dict]
    n_free: int
    multipliers: np.ndarray | None
    method: str
    criterion: str | None = None
    pairs: tuple[list[np.ndarray], list[np.ndarray]] | None = dataclasses.field(default=None, repr=False)


# --------------------------------------------------------------------------- #
# variable reduction
# --------------------------------------------------------------------------- #
def reduce_window(
    x0: np.ndarray, groups: Sequence[int], window: int | float
) -> tuple[np.ndarray, np.ndarray]:
    """Which variables stay free around the warm start (the COBLA authors' reduction).

    In each group (layer) of size R with warm-start rank r₀ = round(Σ x0), the
    variables j with r₀ − w ≤ j < r₀ + w are free, w = ``window`` (an int) or
    ceil(window·R) (a float in (0, 1]); those before are fixed on, those after off.

    Returns:
      (free, on): boolean masks over the n variables; fixed variables are those
      not free, fixed to the upper bound where ``on`` else to the lower bound.
    """
    x0 = np.asarray(x0, dtype=np.float64)
    sizes = [int(s) for s in groups]
    if sum(sizes) != x0.size or any(s < 0 for s in sizes):
        raise ValueError(f"groups must be non-negative sizes summing to n = {x0.size}, got sum {sum(sizes)}")
    if isinstance(window, bool) or window <= 0:
        raise ValueError(f"window must be a positive int or a fraction in (0, 1], got {window!r}")
    free = np.zeros(x0.size, bool)
    on = np.zeros(x0.size, bool)
    start = 0
    for size in sizes:
        w = int(window) if isinstance(window, (int, np.integer)) else int(math.ceil(float(window) * size))
        r0 = int(round(float(np.sum(x0[start:start + size]))))
        lo_j, hi_j = max(0, r0 - w), min(size, r0 + w)
        free[start + lo_j:start + hi_j] = True
        on[start:start + lo_j] = True
        start += size
    return free, on


# --------------------------------------------------------------------------- #
# the entry point
# --------------------------------------------------------------------------- #
def solve(
    fun_and_grad: FunAndGrad,
    x0: np.ndarray,
    A: np.ndarray,
    b: np.ndarray,
    *,
    lower: float | np.ndarray = 0.0,
    upper: float | np.ndarray = 1.0,
    method: str = "structured",
    max_iter: int = 100,
    tol: float = 1e-4,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    memory: int = 10,
    groups: Sequence[int] | None = None,
    monotone: bool = False,
    window: int | float | None = None,
    subspace: bool = True,
    progress: Callable[[int, float], None] | None = None,
    pairs: tuple[list[np.ndarray], list[np.ndarray]] | None = None,
) -> SolveResult:
    """Minimize f under ``A x <= b``, box bounds and optional monotone groups.

    Solves the relaxed COBLA problem (Li & Shi 2018, Eq. 2),
    min_m E(m) s.t. N_C(m) ≤ N_C,max, N_M(m) ≤ N_M,max, 0 ≤ m ≤ 1, or any problem of
    that shape. Rows of A and b are scaled to |b| = 1 so that budgets of different
    units weigh alike.

    Args:
      fun_and_grad: x (float64, shape (n,)) -> (f(x), ∇f(x)).
      x0: starting point, shape (n,); clipped to the box (and made monotone).
      A, b: the linear rows, shapes (m, n) and (m,), m small.
      lower, upper: box bounds, scalars or shape (n,).
      method: ``"structured"`` (L-BFGS SQP, scales to 10⁵ variables) or ``"slsqp"``.
      max_iter: SQP iterations.
      tol: converged when the KKT residual ‖P_Ω(x − ∇f) − x‖_∞ is at most ``tol``
        times the first iterate's (structured; SLSQP: its ``ftol`` is ``rtol``).
      rtol: converged when f fell by at most ``rtol``·|f| over the last few
        iterations (structured; SLSQP's ``ftol``, its relative change of f).
      atol: converged when the KKT residual is at most ``atol``·max(1, |f|), or
        when no variable moved more than ``atol`` in the last iteration.
      memory: L-BFGS pairs kept (structured).
      groups: sizes of consecutive groups (COBLA: the layers' full ranks), needed by
        ``monotone`` and ``window``.
      monotone: x_j ≥ x_{j+1} within each group (structured: isotonic projection;
        slsqp: as extra linear rows).
      window: variable reduction around x0 (see :func:`reduce_window`); None: all free.
      subspace: structured: refine each QP step with the full L-BFGS matrix.
      progress: called with (iteration, objective) at each iterate.
      pairs: L-BFGS memory (S, Y) over all n variables from an earlier solve
        (:attr:`SolveResult.pairs`); restricted to the free variables, pairs
        without positive curvature there are dropped (structured only).

    Returns:
      A :class:`SolveResult`; ``success`` is False at the iteration limit, with the
      last KKT residual in ``kkt_residual`` and ``message``.

    Raises:
      ValueError: bad shapes, bounds or method (at the entry point).
      NonFiniteError: the objective returned NaN/inf (names the iteration, keeps the trace).
    """
    if method not in METHODS:
        raise ValueError(f"unknown solver method {method!r}; valid: {', '.join(METHODS)}")
    x0 = np.asarray(x0, dtype=np.float64).reshape(-1)
    n = x0.size
    A = np.atleast_2d(np.asarray(A, dtype=np.float64))
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if A.shape != (b.size, n):
        raise ValueError(f"A must have shape (len(b), n) = ({b.size}, {n}), got {A.shape}")
    if not (np.all(np.isfinite(x0)) and np.all(np.isfinite(A)) and np.all(np.isfinite(b))):
        raise ValueError("x0, A and b must be finite")
    lo = np.broadcast_to(np.asarray(lower, dtype=np.float64), (n,)).copy()
    hi = np.broadcast_to(np.asarray(upper, dtype=np.float64), (n,)).copy()
    if np.any(lo > hi):
        raise ValueError("lower must not exceed upper")
    check_tolerances(max_iter=max_iter, tol=tol, rtol=rtol, atol=atol)
    if isinstance(memory, bool) or not isinstance(memory, (int, np.integer)) or memory < 1:
        raise ValueError(f"memory must be an integer >= 1, got {memory!r}")
    if (monotone or window is not None) and groups is None:
        groups = [n]
    sizes = None if groups is None else [int(s) for s in groups]
    if sizes is not None and (sum(sizes) != n or any(s < 0 for s in sizes)):
        raise ValueError(f"groups must be non-negative sizes summing to n = {n}")

    # variable reduction: fixed variables leave the problem, b absorbs their cost
    if window is not None:
        free, on = reduce_window(x0, sizes, window)
    else:
        free, on = np.ones(n, bool), np.zeros(n, bool)
    x_full = np.where(free, np.clip(x0, lo, hi), np.where(on, hi, lo))
    idx = np.flatnonzero(free)
    b_red = b - A[:, ~free] @ x_full[~free]
    A_red = A[:, idx]
    red_sizes = None
    if sizes is not None:
        bounds = np.cumsum([0] + sizes)
        red_sizes = [int(np.count_nonzero(free[s:e])) for s, e in zip(bounds[:-1], bounds[1:])]

    scale = np.where(np.abs(b) > 0, np.abs(b), 1.0)  # the full budgets, as SLSQP scales them
    A_s, b_s = A_red / scale[:, None], b_red / scale

    trace: list[dict] = []
    last: dict = {}

    def full_x(xr: np.ndarray) -> np.ndarray:
        out = x_full.copy()
        out[idx] = xr
        return out

    def fg(xr: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = fun_and_grad(full_x(xr))
        grad = np.asarray(grad, dtype=np.float64).reshape(-1)[idx]
        last["x"], last["fg"] = xr.copy(), (float(value), grad)
        return float(value), grad

    def record(xr: np.ndarray, value: float, kkt: float | None = None, step: float | None = None) -> None:
        entry = {"iteration": len(trace), "objective": float(value), "slack": ((b_s - A_s @ xr) * scale).tolist()}
        if kkt is not None:
            entry["kkt_residual"] = kkt
        if step is not None:
            entry["step"] = step
        trace.append(entry)
        if progress is not None:
            progress(entry["iteration"], float(value))

    groups_red = None
    if monotone:
        bounds = np.cumsum([0] + red_sizes)
        groups_red = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
    omega = FeasibleSet(A_s, b_s, lo[idx], hi[idx], groups_red)

    start = time.perf_counter()
    if idx.size == 0:  # the reduction fixed everything: nothing to solve
        value = float(fun_and_grad(x_full)[0])
        record(np.zeros(0), value, 0.0)
        return SolveResult(x=x_full, value=value, success=True, status="converged",
                           message=f"no free variable; 0 of {n} variables free", iterations=0, n_fun=1,
                           seconds=time.perf_counter() - start, kkt_residual=0.0, trace=trace, n_free=0,
                           multipliers=np.zeros(b.size), method=method, criterion="kkt")
    if method == "structured":
        red_pairs = None
        if pairs is not None:
            red_pairs = ([np.asarray(v, np.float64)[idx] for v in pairs[0]],
                         [np.asarray(v, np.float64)[idx] for v in pairs[1]])
        out = structured_sqp(fg, x_full[idx], omega, max_iter=max_iter, tol=tol, rtol=rtol, atol=atol,
                             memory=memory, subspace=subspace, record=record, trace=trace, pairs=red_pairs)
        xr, value, kkt, status = out["x"], out["value"], out["kkt"], out["status"]
        iterations, n_fun, lam_s, criterion = out["iterations"], out["n_fun"], out["lam"], out["criterion"]
        success = status == "converged"
        reason = {"converged": f"converged ({_CRITERIA.get(criterion, criterion)})",
                  "max_iter": f"iteration limit ({max_iter}) reached, not converged"}.get(status, out["message"])
        full_pairs = []
        for vecs in out["pairs"]:
            full = []
            for v in vecs:
                w = np.zeros(n)
                w[idx] = v
                full.append(w)
            full_pairs.append(full)
        out_pairs = (full_pairs[0], full_pairs[1])
    else:
        xr, value, success, status, reason, iterations, n_fun = _run_slsqp(
            fg, x_full[idx], A_s, b_s, omega, groups_red, max_iter, rtol, trace, scale, progress)
        if last.get("x") is not None and np.array_equal(last["x"], xr):
            g_last = last["fg"][1]
        else:
            g_last = fg(xr)[1]
        kkt, lam_s = omega.kkt_residual(xr, g_last)
        criterion, out_pairs = ("slsqp" if success else None), None
    seconds = time.perf_counter() - start
    message = f"{reason}; KKT residual {kkt:.3g} after {iterations} iterations, {idx.size} of {n} variables free"
    # The rows were solved scaled by 1/|b|: λ_s (A/|b|) = (λ_s/|b|) A.
    return SolveResult(
        x=full_x(xr), value=float(value), success=bool(success), status=status, message=message,
        iterations=int(iterations), n_fun=int(n_fun), seconds=seconds, kkt_residual=float(kkt),
        trace=trace, n_free=int(idx.size), multipliers=np.asarray(lam_s) / scale, method=method,
        criterion=criterion, pairs=out_pairs,
    )


_CRITERIA = {
    "kkt": "KKT residual within tolerance",
    "f_change": "relative change of the objective within rtol",
    "x_change": "no variable moved more than atol",
    "stall": "no further decrease possible, near a KKT point",
}


def check_tolerances(*, max_iter: int, tol: float, rtol: float, atol: float) -> None:
    """Raise ValueError naming the first out-of-range solver limit.

    ``max_iter`` an integer ≥ 0; ``tol`` and ``rtol`` in (0, 0.1] (a looser relative
    tolerance stops before any progress); ``atol`` ≥ 0 and finite.
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 0:
        raise ValueError(f"max_iter must be an integer >= 0, got {max_iter!r}")
    for name, value in (("tol", tol), ("rtol", rtol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 0.1:
            raise ValueError(f"{name} must be a number in (0, 0.1], got {value!r}")
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not (0 <= atol < math.inf):
        raise ValueError(f"atol must be a finite number >= 0, got {atol!r}")


def _run_slsqp(fg, x0, A_s, b_s, omega, groups_red, max_iter, ftol, trace, scale, user_progress):
    """SLSQP on the (reduced, scaled) problem; monotone groups become linear rows."""
    m = A_s.shape[0]
    A_all, b_all = A_s, b_s
    if groups_red:
        rows = []
        for s, e in groups_red:
            for j in range(s, e - 1):  # x_{j+1} - x_j <= 0
                row = np.zeros(x0.size)
                row[j], row[j + 1] = -1.0, 1.0
                rows.append(row)
        if rows:
            A_all = np.vstack([A_s, np.array(rows)])
            b_all = np.concatenate([b_s, np.zeros(len(rows))])
        x0 = omega.project_box(x0)

    def checked(x):
        value, grad = fg(x)
        if not (math.isfinite(value) and np.all(np.isfinite(grad))):
            it = max(len(trace) - 1, 0) + 1
            raise NonFiniteError(
                f"slsqp: the objective returned a non-finite value or gradient ({value!r}) at iteration {it}; "
                f"the solve was stopped (trace kept, {len(trace)} iterates)", it, trace)
        return value, grad

    inner: list[dict] = []

    def progress(iteration, value):
        t = inner[-1]
        trace.append({"iteration": t["iteration"], "objective": t["objective"],
                      "slack": (np.asarray(t["slack"][:m]) * scale).tolist()})
        if user_progress is not None:
            user_progress(iteration, value)

    res = solve_slsqp(checked, x0, A_all, b_all, lower=omega.lo, upper=omega.hi, max_iter=max_iter,
                      ftol=ftol, progress=progress, trace=inner)
    status = {0: "converged", 9: "max_iter"}.get(res.status, f"slsqp_{res.status}")
    reason = res.message if res.status != 9 else f"iteration limit ({max_iter}) reached, not converged"
    return res.x, res.value, res.success, status, reason, res.iterations, res.n_fun
