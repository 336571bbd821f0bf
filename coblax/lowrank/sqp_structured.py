"""A structured SQP method for COBLA's relaxed problem: O(n·k) memory, no dense QP.

The problem has the shape

    minimize_x f(x)  s.t.  A x <= b  (a few rows),  lo <= x <= hi,
                           [x_j >= x_{j+1} inside each group, optional]

Per iteration k at the box-feasible iterate x:

1. **Curvature.** Compact L-BFGS B = γI − W M Wᵀ (:mod:`coblax.lowrank.lbfgs`).
   A pair leaves out the coordinates pinned at the same bound at both ends of the
   step (their y is set to 0): those variables did not move, so their gradient
   change is not curvature along s and only distorts γ = yᵀy / sᵀy.
2. **QP step, exact through its dual** with the diagonal D = diag(B):
   min_z gᵀ(z−x) + ½(z−x)ᵀD(z−x) s.t. z ∈ Ω, the D-metric projection of x − g/D
   (:class:`coblax.lowrank.projection.FeasibleSet`). D is positive definite, so the
   QP step is a descent direction of the merit function whenever ρ > ‖λ‖_∞
   (Nocedal & Wright, Thm. 18.2).
3. **Subspace refinement, then projection** (as L-BFGS-B after its Cauchy point,
   Byrd et al. 1995 §5): on the variables the QP left strictly inside the box,
   keeping its active linear rows as equalities, the full model gᵀd + ½dᵀBd is
   minimized from z (Sherman-Morrison-Woodbury on the compact form, a Schur
   complement for the active rows), and z + δ is *projected* onto Ω in the
   D-metric. Cutting δ back to the first bound it meets (the earlier rule) made the
   method a primal active-set method that adds one to three bounds per iteration;
   projecting lets every bound the step crosses become active at once. The
   refined step is used when it is a descent direction of the merit function at
   least a tenth as steep as the QP step's.
4. **Line search** on the ℓ1 merit φ(x) = f(x) + ρ Σ_j max(0, (A x − b)_j),
   ρ ≥ 1.1·‖λ‖_∞ (Nocedal & Wright 2006, §18.3): Armijo backtracking with
   safeguarded quadratic interpolation, from α = 1. Extending full steps (α = 2, 4
   while φ keeps falling) was measured and dropped: on the quick-start CNN it took
   half of all steps but cost an evaluation per try, and reaching E = 0.0075 took
   120 evaluations with it against 80 without.
5. **Stopping, scale-free** (L-BFGS-B's ``pgtol``/``factr``, optimistix's
   rtol/atol), checked at feasible iterates:

   * ``"kkt"`` — the KKT residual r = ‖P_Ω(x − ∇f(x)) − x‖_∞ (zero exactly at a
     KKT point) is at most ``tol`` times the first iterate's r₀, or at most
     ``atol``·max(1, |f|);
   * ``"f_change"`` — f moved by at most ``rtol``·|f| over the last
     :data:`F_WINDOW` iterations, all of them feasible;
   * ``"x_change"`` — no variable moved more than ``atol`` in the last iteration;
   * ``"stall"`` — no decrease of the merit function can be found any more (the
     objective's rounding noise) with r at most √tol·r₀: a success, as a
     converged float32 objective stalls before it meets any tighter test.

   ``status`` is ``"converged"`` for all four (``criterion`` says which fired),
   ``"stalled"`` for a stall farther from a KKT point, ``"max_iter"`` at the cap.

References: Byrd, Nocedal & Schnabel, Math. Prog. 63, 1994; Byrd, Lu, Nocedal &
Zhu, SIAM J. Sci. Comput. 16, 1995; Nocedal & Wright, Numerical Optimization,
2nd ed., ch. 18.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from coblax.lowrank.lbfgs import CompactLBFGS
from coblax.lowrank.projection import FeasibleSet

__all__ = ["structured_sqp", "F_WINDOW", "NonFiniteError"]

#: Iterations over which the relative change of f is measured (``rtol``).
F_WINDOW = 5
#: Largest violation (rows scaled to |b| = 1) at which an iterate counts as feasible.
_FEAS = 1e-9

FunAndGrad = Callable[[np.ndarray], tuple[float, np.ndarray]]


class NonFiniteError(ValueError):
    """The objective returned NaN or inf; ``iteration`` and ``trace`` are kept."""

    def __init__(self, message: str, iteration: int, trace: list[dict]):
        super().__init__(message)
        self.iteration = iteration
        self.trace = trace


def structured_sqp(
    fg: FunAndGrad,
    x0: np.ndarray,
    omega: FeasibleSet,
    *,
    max_iter: int,
    tol: float,
    rtol: float,
    atol: float,
    memory: int,
    subspace: bool,
    record: Callable[..., None],
    trace: list[dict],
    pairs: tuple[list[np.ndarray], list[np.ndarray]] | None = None,
) -> dict:
    """Run the method from ``x0`` (see the module docstring); returns a dict of the outcome."""
    A, b, lo, hi = omega.A, omega.b, omega.lo, omega.hi
    n = x0.size
    counts = {"fun": 0}

    def evaluate(x: np.ndarray, iteration: int) -> tuple[float, np.ndarray]:
        counts["fun"] += 1
        value, grad = fg(x)
        value = float(value)
        grad = np.asarray(grad, dtype=np.float64).reshape(-1)
        if not (math.isfinite(value) and np.all(np.isfinite(grad))):
            what = "value" if not math.isfinite(value) else "gradient"
            raise NonFiniteError(
                f"structured SQP: the objective returned a non-finite {what} ({value!r}) at iteration "
                f"{iteration}; the solve was stopped (trace kept, {len(trace)} iterates)", iteration, trace)
        return value, grad

    def viol(x: np.ndarray) -> float:
        return float(np.sum(np.maximum(A @ x - b, 0.0))) if A.shape[0] else 0.0

    x = omega.project_box(x0)
    f, g = evaluate(x, 0)
    kkt, lam_kkt = omega.kkt_residual(x, g)
    kkt0 = kkt
    record(x, f, kkt)
    lbfgs = CompactLBFGS(memory, pairs)
    width = float(np.max(hi - lo)) if n else 1.0
    lam = np.zeros(A.shape[0])
    rho = 0.0
    f_hist = [f if viol(x) <= _FEAS else None]  # f at feasible iterates (None: infeasible)
    step_max = np.inf
    status, criterion, message = "max_iter", None, ""
    iterations = 0
    for k in range(1, max_iter + 1):
        criterion = _converged(kkt, kkt0, f, f_hist, step_max, viol(x), tol, rtol, atol)
        if criterion:
            status = "converged"
            break
        if lbfgs.empty:
            D = np.full(n, max(float(np.max(np.abs(g))), 1e-12) / max(width, 1e-12))
        else:
            gamma = lbfgs.compact()[0]
            D = np.clip(lbfgs.diagonal(), 1e-8 * gamma, None)
        z, lam, _ = omega.minimize(x - g / D, D, lam)
        d = z - x
        rho = max(rho, 1.1 * float(np.max(lam, initial=0.0)) + 1e-12)
        v0 = viol(x)
        dphi_d = float(g @ d) - rho * v0
        p, dphi = d, dphi_d
        if subspace and not lbfgs.empty and omega.groups is None:
            q = _subspace_point(x, g, z, lam, omega, lbfgs)
            if q is not None:
                q = omega.minimize(q, D, lam)[0] - x
                dphi_q = float(g @ q) - rho * v0
                if dphi_q <= 0.1 * dphi_d:
                    p, dphi = q, dphi_q
        if not dphi < 0:
            status, message = "stalled", "the QP step is not a descent direction of the merit function"
            break
        step = _line_search(evaluate, x, f, g, p, dphi, rho, v0, viol, lo, hi, k)
        if step is None:
            status, message = "stalled", "the line search found no decrease of the merit function"
            break
        xt, ft, gt, alpha = step
        s, y = xt - x, gt - g
        pinned = (s == 0.0) & ((x <= lo) | (x >= hi))
        y[pinned] = 0.0
        lbfgs.update(s, y)
        step_max = float(np.max(np.abs(s))) if n else 0.0
        x, f, g = xt, ft, gt
        f_hist.append(f if viol(x) <= _FEAS else None)
        iterations = k
        kkt, lam_kkt = omega.kkt_residual(x, g, lam_kkt)
        record(x, f, kkt, alpha)
    else:
        criterion = _converged(kkt, kkt0, f, f_hist, step_max, viol(x), tol, rtol, atol)
        if criterion:
            status = "converged"
    if status == "stalled" and viol(x) <= _FEAS and kkt <= math.sqrt(tol) * kkt0:
        status, criterion = "converged", "stall"
    return {"x": x, "value": f, "status": status, "criterion": criterion, "message": message,
            "iterations": iterations, "n_fun": counts["fun"], "kkt": kkt, "kkt0": kkt0,
            "lam": lam_kkt, "pairs": lbfgs.pairs}


def _converged(kkt, kkt0, f, f_hist, step_max, violation, tol, rtol, atol) -> str | None:
    """Which stopping criterion holds at the current iterate (None: keep going)."""
    if kkt <= max(tol * kkt0, atol * max(1.0, abs(f))):
        return "kkt"
    if violation > _FEAS:
        return None
    window = f_hist[-1 - F_WINDOW:]
    if len(window) > F_WINDOW and all(v is not None for v in window) and max(window) - min(window) <= rtol * abs(f):
        return "f_change"
    if step_max <= atol:
        return "x_change"
    return None


def _line_search(evaluate, x, f, g, p, dphi, rho, v0, viol, lo, hi, k):
    """Armijo backtracking on the ℓ1 merit from α = 1; (x⁺, f⁺, g⁺, α) or None if no decrease."""
    phi = f + rho * v0
    alpha = 1.0
    for _ in range(40):
        xt = np.clip(x + alpha * p, lo, hi)
        ft, gt = evaluate(xt, k)
        phit = ft + rho * viol(xt)
        if phit <= phi + 1e-4 * alpha * dphi:
            return xt, ft, gt, alpha
        # minimizer of the quadratic through φ(0), φ'(0), φ(α), safeguarded
        denom = 2.0 * (phit - phi - dphi * alpha)
        a_new = -dphi * alpha * alpha / denom if denom > 0 else 0.5 * alpha
        alpha = float(np.clip(a_new, 0.1 * alpha, 0.5 * alpha))
    return None


def _subspace_point(x, g, z, lam, omega: FeasibleSet, lbfgs: CompactLBFGS) -> np.ndarray | None:
    """From the QP point z, the minimizer z + δ of the full L-BFGS model on z's free variables.

    Minimizes r_Fᵀδ + ½ δᵀ B_FF δ s.t. C δ = 0 (C: the active linear rows on F),
    r = g + B (z − x), with B_FF⁻¹ by Sherman-Morrison-Woodbury on the compact form.
    The point may leave Ω: the caller projects it. None when there is nothing to refine.
    """
    A, lo, hi = omega.A, omega.lo, omega.hi
    gamma, W, _, Minv = lbfgs.compact()
    F = (z > lo) & (z < hi)
    if not np.any(F):
        return None
    r = (g + lbfgs.matvec(z - x))[F]
    WF = W[F]
    try:
        inner_inv = np.linalg.inv(Minv - (WF.T @ WF) / gamma)
    except np.linalg.LinAlgError:
        return None

    def hinv(v: np.ndarray) -> np.ndarray:  # B_FF^{-1} v, v of shape (|F|,) or (|F|, c)
        return v / gamma + (WF @ (inner_inv @ (WF.T @ v))) / gamma**2

    C = A[lam > 0][:, F]
    h_r = hinv(r)
    if C.shape[0]:
        h_c = hinv(C.T)
        try:
            nu = np.linalg.solve(C @ h_c, -(C @ h_r))
        except np.linalg.LinAlgError:
            return None
        delta = -(h_r + h_c @ nu)
    else:
        delta = -h_r
    if not np.all(np.isfinite(delta)):
        return None
    out = z.copy()
    out[F] = z[F] + delta
    return out
