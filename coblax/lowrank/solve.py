"""One entry point for COBLA's relaxed problem, and a structured SQP solver that scales.

The relaxed problem (Li & Shi 2018, Eq. 2) has the shape

    minimize_x f(x)  s.t.  A x <= b  (a few rows),  lo <= x <= hi,
                           [x_j >= x_{j+1} inside each group, optional]

with f smooth (E(m) through jitted JAX callbacks) and n from 10^2 to 10^5.
:func:`solve` runs either

* ``method="slsqp"`` — scipy's SLSQP (:mod:`coblax.lowrank.sqp`), the reference;
  it solves a dense QP per iteration, O(n^3) time and O(n^2) memory;
* ``method="structured"`` — :func:`_structured`, an SQP method that exploits the
  structure: O(n·k) memory, O(n·k^2) time per iteration plus the callback.

The structured solver, per iteration k at the feasible-for-the-box iterate x:

1. **Curvature.** Limited-memory BFGS from the last k pairs (s, y), kept in the
   compact form B = γI − W M Wᵀ, W = [γS, Y] (Byrd, Nocedal & Schnabel 1994,
   Eq. 2.17); O(n·k) memory. Pairs with sᵀy ≤ 1e-10·|s||y| are skipped so B stays
   positive definite (the constraints are linear, so the Lagrangian's Hessian is
   f's and y = ∇f(x⁺) − ∇f(x)).
2. **QP subproblem, solved exactly through its dual.** With the full B the
   box-constrained QP is not separable and would need an iterative inner solver.
   Instead the QP is posed with the diagonal D = diag(B) (O(n·k²) from the compact
   form; positive because B is):

       min_z gᵀ(z−x) + ½ (z−x)ᵀ D (z−x)  s.t.  A z ≤ b,  lo ≤ z ≤ hi  [, monotone].

   For multipliers λ ≥ 0 of the few linear rows the Lagrangian separates, and its
   minimizer is closed form: z(λ) = clip(x − (g + Aᵀλ)/D, lo, hi), or, with
   monotone groups, the D-weighted isotonic (non-increasing) regression of
   x − (g + Aᵀλ)/D clipped to the box (pool-adjacent-violators; clipping a
   bounded isotonic fit is exact for bounds constant within a group). The dual
   ψ(λ) is concave and piecewise quadratic in ≤ 3 variables with gradient
   A z(λ) − b and generalized Hessian −Σ_blocks a_B a_Bᵀ / D_B over unclipped
   (pooled) blocks; a projected Newton iteration (pseudo-inverse of that ≤ 3×3
   Hessian, line search on ψ's directional derivative) finds its maximizer exactly
   (up to roundoff) in a handful of O(n) steps. This is the Euclidean projection in
   the D-metric: no dense QP ever. Why the diagonal is safe: D is positive
   definite, so the QP step is a descent direction of the merit function whenever
   ρ > ‖λ‖_∞ (Nocedal & Wright, Thm. 18.2), whatever D's quality; B's off-diagonal
   curvature comes back in step 3.
3. **Subspace refinement with the full L-BFGS matrix** (as L-BFGS-B does after its
   Cauchy point, Byrd et al. 1995 §5): on the variables the QP left strictly
   inside the box, keeping the QP's active linear rows as equalities, minimize the
   full model gᵀd + ½dᵀBd from z; the reduced inverse comes from the
   Sherman-Morrison-Woodbury formula on the compact form (O(n·k²)) and the few
   active rows by a Schur complement; the step is cut back to stay in the box and
   under the inactive rows. It is used only when it remains a descent direction
   for the merit function (at least a tenth of the diagonal step's); with
   monotone groups it is skipped (the pooled structure makes it a dense QP).
4. **Line search** on the ℓ1 merit φ(x) = f(x) + ρ Σ_j max(0, (A x − b)_j),
   ρ ≥ 1.1·‖λ‖_∞ (Nocedal & Wright 2006, §18.3), Armijo backtracking with
   safeguarded quadratic interpolation.
5. **Convergence on the KKT residual** ‖P_Ω(x − ∇f(x)) − x‖_∞ (Ω the feasible set;
   the projection is the same dual solve with D = 1), zero exactly at a KKT
   point: converged when it is ≤ ``tol``·max(1, |f(x)|).

Variable reduction (the COBLA authors' code, chongli-uw/cobla): with ``groups``
(per-layer sizes) and ``window``, each layer's triplets well before its warm-start
rank r₀ = Σ_j x0_j are fixed on (``upper``) and those well after it off
(``lower``); only a window of ``window`` triplets either side of r₀ enters the
solve, and :attr:`SolveResult.n_free` reports how many did.

References: Li & Shi, "Constrained Optimization Based Low-Rank Approximation of
Deep Neural Networks", ECCV 2018; Byrd, Nocedal & Schnabel, Math. Prog. 63, 1994;
Byrd, Lu, Nocedal & Zhu, SIAM J. Sci. Comput. 16, 1995; Nocedal & Wright,
Numerical Optimization, 2nd ed., ch. 18.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
from sklearn.isotonic import isotonic_regression

from coblax.lowrank.sqp import solve_slsqp

__all__ = ["SolveResult", "NonFiniteError", "solve", "reduce_window", "METHODS"]

METHODS = ("slsqp", "structured")

FunAndGrad = Callable[[np.ndarray], tuple[float, np.ndarray]]


class NonFiniteError(ValueError):
    """The objective returned NaN or inf; ``iteration`` and ``trace`` are kept."""

    def __init__(self, message: str, iteration: int, trace: list[dict]):
        super().__init__(message)
        self.iteration = iteration
        self.trace = trace


@dataclasses.dataclass(frozen=True)
class SolveResult:
    """Outcome of :func:`solve`.

    Attributes:
      x: the final iterate (all n variables, fixed ones included).
      value: f(x).
      success: converged (KKT residual within tolerance; for SLSQP, scipy's flag).
      status: ``"converged"``, ``"max_iter"``, ``"stalled"`` (no merit decrease
        possible any more, usually the objective's rounding noise) or
        ``"slsqp_<code>"`` for SLSQP's other exits.
      message: human-readable reason, with the last KKT residual.
      iterations: SQP iterations taken.
      n_fun: objective evaluations.
      seconds: wall time of the solve.
      kkt_residual: ‖P_Ω(x − ∇f(x)) − x‖_∞ at x.
      trace: one dict per iterate: ``iteration``, ``objective``, ``slack``
        (b − A x per row, unscaled; negative = violated) and, for the structured
        solver, ``kkt_residual``.
      n_free: variables that entered the solve (after variable reduction).
      multipliers: λ of the rows of A (structured: from the last QP; SLSQP: None).
      method: which solver ran.
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
# the separable QP and its dual
# --------------------------------------------------------------------------- #
class _Feasible:
    """Ω = {lo ≤ z ≤ hi, A z ≤ b, [non-increasing within each monotone group]}.

    ``minimize(c, D, lam0)`` solves min_z ½ Σ D_i (z_i − c_i)² s.t. z ∈ Ω exactly
    through the dual in λ (see the module docstring) and returns (z, λ).
    """

    def __init__(self, A: np.ndarray, b: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                 groups: list[tuple[int, int]] | None):
        self.A, self.b, self.lo, self.hi, self.groups = A, b, lo, hi, groups
        if groups is not None:
            for s, e in groups:
                if e > s and (np.ptp(lo[s:e]) > 0 or np.ptp(hi[s:e]) > 0):
                    raise ValueError("monotone groups need the same bounds for every variable of a group")

    def _primal(self, v: np.ndarray, D: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """z = argmin ½ Σ D (z − v)² over box [∩ monotone]; and the Hessian −∂(Az)/∂λ."""
        A, lo, hi = self.A, self.lo, self.hi
        if self.groups is None:
            z = np.clip(v, lo, hi)
            free = (v > lo) & (v < hi)
            Af = A[:, free]
            return z, (Af / D[free]) @ Af.T
        z = np.clip(v, lo, hi)  # variables outside every group: plain clip
        H = np.zeros((A.shape[0], A.shape[0]))
        free_single = np.ones(v.size, bool)
        for s, e in self.groups:
            if e - s == 0:
                continue
            free_single[s:e] = False
            zg = isotonic_regression(v[s:e], sample_weight=D[s:e], increasing=False)
            # blocks: runs of equal fitted values, each pooled from its members
            starts = np.flatnonzero(np.r_[True, np.diff(zg) != 0])
            a_blk = np.add.reduceat(A[:, s:e], starts, axis=1)
            d_blk = np.add.reduceat(D[s:e], starts)
            val = zg[starts]
            inside = (val > lo[s]) & (val < hi[s])
            H += (a_blk[:, inside] / d_blk[inside]) @ a_blk[:, inside].T
            z[s:e] = np.clip(zg, lo[s], hi[s])
        f1 = free_single & (v > lo) & (v < hi)
        Af = A[:, f1]
        H += (Af / D[f1]) @ Af.T
        return z, H

    def minimize(self, c: np.ndarray, D: np.ndarray, lam0: np.ndarray | None = None,
                 tol: float = 1e-11, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray, bool]:
        """Projected Newton ascent on the dual ψ(λ); returns (z, λ, converged).

        Each step: the Newton direction s = H_J⁺ ∇ψ_J on the working set J (rows
        with λ_j > 0 or a violated constraint; the pseudo-inverse copes with
        parallel rows, e.g. dense layers whose MAC and parameter costs per rank
        coincide), steepest ascent where H_J⁺ gives none (every variable clipped),
        then a line search on the derivative ψ'(t) = ∇ψ(λ + t s)·s alone, which is
        monotone because ψ is concave and, unlike ψ's values, not drowned by
        rounding near the solution: t = 1 if |ψ'(1)| ≤ ψ'(0)/10, else
        doubling/bisection to that condition, capped where a λ_j reaches 0.
        """
        A, b = self.A, self.b
        m = A.shape[0]
        lam = np.zeros(m) if lam0 is None else np.maximum(np.asarray(lam0, float), 0.0)
        if m == 0:
            z, _ = self._primal(c, D)
            return z, lam, True

        def evaluate(lam):
            z, H = self._primal(c - (A.T @ lam) / D, D)
            return z, H, A @ z - b

        z, H, grad = evaluate(lam)
        for _ in range(max_iter):
            pg = np.where(lam > 0, grad, np.maximum(grad, 0.0))
            if np.max(np.abs(pg)) <= tol:
                return z, lam, True
            J = (lam > 0) | (grad > 0)
            s = np.zeros(m)
            for _ in range(m):  # drop rows at λ_j = 0 that the step would push negative
                s[:] = 0.0
                s[J] = np.linalg.pinv(H[np.ix_(J, J)], rcond=1e-10, hermitian=True) @ grad[J]
                drop = J & (lam <= 0) & (s < 0)
                if not np.any(drop):
                    break
                J &= ~drop
            d0 = float(grad @ s)
            if not d0 > 1e-14 * float(np.linalg.norm(grad) * np.linalg.norm(s)):
                s = pg.copy()  # no curvature information: steepest ascent
                d0 = float(grad @ s)
            neg = s < 0
            t_cap = float(np.min(lam[neg] / -s[neg])) if np.any(neg) else np.inf

            def slope(t):
                out = evaluate(np.maximum(lam + t * s, 0.0))
                return float(out[2] @ s), out

            t = min(1.0, t_cap)
            d, out = slope(t)
            lo_t, hi_t = 0.0, None
            for _ in range(200):
                if abs(d) <= 0.1 * d0 or (d > 0 and t >= t_cap):
                    break
                if d > 0:
                    lo_t = t
                    t = min(2.0 * t, t_cap) if hi_t is None else 0.5 * (t + hi_t)
                else:
                    hi_t = t
                    t = 0.5 * (lo_t + t)
                d, out = slope(t)
            new = np.maximum(lam + t * s, 0.0)
            if np.array_equal(new, lam):
                break
            lam = new
            z, H, grad = out
        pg = np.where(lam > 0, grad, np.maximum(grad, 0.0))
        return z, lam, bool(np.max(np.abs(pg)) <= 1e3 * tol)

    def project_box(self, x: np.ndarray) -> np.ndarray:
        """x onto the box [∩ monotone] (no linear rows)."""
        z, _ = self._primal(x, np.ones_like(x))
        return z

    def kkt_residual(self, x: np.ndarray, g: np.ndarray, lam0=None) -> tuple[float, np.ndarray]:
        """‖P_Ω(x − g) − x‖_∞ and the multipliers of that projection."""
        z, lam, _ = self.minimize(x - g, np.ones_like(x), lam0)
        return float(np.max(np.abs(z - x))) if x.size else 0.0, lam


# --------------------------------------------------------------------------- #
# compact L-BFGS
# --------------------------------------------------------------------------- #
class _LBFGS:
    """B = γI − W M Wᵀ from the last ``memory`` pairs (Byrd, Nocedal & Schnabel 1994)."""

    def __init__(self, memory: int):
        self.memory = memory
        self.S: list[np.ndarray] = []
        self.Y: list[np.ndarray] = []

    def update(self, s: np.ndarray, y: np.ndarray) -> bool:
        sy = float(s @ y)
        if not sy > 1e-10 * float(np.linalg.norm(s) * np.linalg.norm(y)):
            return False
        self.S.append(s)
        self.Y.append(y)
        if len(self.S) > self.memory:
            self.S.pop(0)
            self.Y.pop(0)
        self._cache = None
        return True

    @property
    def empty(self) -> bool:
        return not self.S

    def compact(self):
        """(γ, W, M, M⁻¹) with B = γI − W M Wᵀ."""
        if getattr(self, "_cache", None) is None:
            S = np.stack(self.S, axis=1)
            Y = np.stack(self.Y, axis=1)
            s, y = self.S[-1], self.Y[-1]
            gamma = float(y @ y) / float(s @ y)
            SY = S.T @ Y
            L = np.tril(SY, -1)
            Minv = np.block([[gamma * (S.T @ S), L], [L.T, -np.diag(np.diag(SY))]])
            M = np.linalg.inv(Minv)
            self._cache = (gamma, np.hstack([gamma * S, Y]), M, Minv)
        return self._cache

    def diagonal(self) -> np.ndarray:
        gamma, W, M, _ = self.compact()
        return gamma - np.einsum("ij,ij->i", W @ M, W)

    def matvec(self, v: np.ndarray) -> np.ndarray:
        gamma, W, M, _ = self.compact()
        return gamma * v - W @ (M @ (W.T @ v))


# --------------------------------------------------------------------------- #
# the structured SQP
# --------------------------------------------------------------------------- #
def _structured(
    fg: FunAndGrad,
    x0: np.ndarray,
    omega: _Feasible,
    *,
    max_iter: int,
    tol: float,
    memory: int,
    subspace: bool,
    record: Callable[[np.ndarray, float, float], None],
    trace: list[dict],
) -> dict:
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
    record(x, f, kkt)
    lbfgs = _LBFGS(memory)
    width = float(np.max(hi - lo)) if n else 1.0
    lam = np.zeros(A.shape[0])
    rho = 0.0
    status, message = "max_iter", ""
    iterations = 0
    for k in range(1, max_iter + 1):
        if kkt <= tol * max(1.0, abs(f)):
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
            q = _subspace_step(x, g, z, lam, omega, lbfgs)
            if q is not None:
                dphi_q = float(g @ q) - rho * v0
                if dphi_q <= 0.1 * dphi_d:
                    p, dphi = q, dphi_q
        if not dphi < 0:
            status, message = "stalled", "the QP step is not a descent direction of the merit function"
            break
        phi = f + rho * v0
        alpha, accepted = 1.0, False
        for _ in range(40):
            xt = np.clip(x + alpha * p, lo, hi)
            ft, gt = evaluate(xt, k)
            phit = ft + rho * viol(xt)
            if phit <= phi + 1e-4 * alpha * dphi:
                accepted = True
                break
            # minimizer of the quadratic through φ(0), φ'(0), φ(α), safeguarded
            denom = 2.0 * (phit - phi - dphi * alpha)
            a_new = -dphi * alpha * alpha / denom if denom > 0 else 0.5 * alpha
            alpha = float(np.clip(a_new, 0.1 * alpha, 0.5 * alpha))
        if not accepted:
            status, message = "stalled", "the line search found no decrease of the merit function"
            break
        lbfgs.update(xt - x, gt - g)
        x, f, g = xt, ft, gt
        iterations = k
        kkt, lam_kkt = omega.kkt_residual(x, g, lam_kkt)
        record(x, f, kkt)
    else:
        if kkt <= tol * max(1.0, abs(f)):
            status = "converged"
    return {"x": x, "value": f, "status": status, "message": message, "iterations": iterations,
            "n_fun": counts["fun"], "kkt": kkt, "lam": lam}


def _subspace_step(x, g, z, lam, omega: _Feasible, lbfgs: _LBFGS) -> np.ndarray | None:
    """From the QP point z, minimize the full L-BFGS model on z's free variables.

    Minimizes r_Fᵀδ + ½ δᵀ B_FF δ s.t. C δ = 0 (C: the active linear rows on F),
    r = g + B (z − x), with B_FF⁻¹ by Sherman-Morrison-Woodbury on the compact form,
    then cuts the step back into the box and under the inactive rows. Returns the
    direction p = z + tδ − x, or None when there is nothing to refine.
    """
    A, b, lo, hi = omega.A, omega.b, omega.lo, omega.hi
    gamma, W, _, Minv = lbfgs.compact()
    F = (z > lo) & (z < hi)
    if not np.any(F):
        return None
    d = z - x
    r = (g + lbfgs.matvec(d))[F]
    WF = W[F]
    inner = Minv - (WF.T @ WF) / gamma
    try:
        inner_inv = np.linalg.inv(inner)
    except np.linalg.LinAlgError:
        return None

    def hinv(v: np.ndarray) -> np.ndarray:  # B_FF^{-1} v, v of shape (|F|,) or (|F|, c)
        return v / gamma + (WF @ (inner_inv @ (WF.T @ v))) / gamma**2

    active = lam > 0
    C = A[active][:, F]
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
    zF = z[F]
    with np.errstate(divide="ignore", invalid="ignore"):
        t_hi = np.where(delta > 0, (hi[F] - zF) / delta, np.inf)
        t_lo = np.where(delta < 0, (lo[F] - zF) / delta, np.inf)
    t = min(1.0, float(np.min(t_hi, initial=np.inf)), float(np.min(t_lo, initial=np.inf)))
    inactive = ~active
    if np.any(inactive):
        Ad = A[inactive][:, F] @ delta
        room = b[inactive] - A[inactive] @ z
        with np.errstate(divide="ignore", invalid="ignore"):
            t_row = np.where(Ad > 0, np.maximum(room, 0.0) / Ad, np.inf)
        t = min(t, float(np.min(t_row)))
    if not t > 0:
        return None
    out = z.copy()
    out[F] = np.clip(zF + t * delta, lo[F], hi[F])
    return out - x


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
    tol: float = 1e-6,
    memory: int = 10,
    groups: Sequence[int] | None = None,
    monotone: bool = False,
    window: int | float | None = None,
    subspace: bool = True,
    progress: Callable[[int, float], None] | None = None,
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
      tol: structured: KKT residual ‖P_Ω(x − ∇f) − x‖_∞ ≤ tol·max(1, |f|);
        slsqp: its ``ftol``.
      memory: L-BFGS pairs kept (structured).
      groups: sizes of consecutive groups (COBLA: the layers' full ranks), needed by
        ``monotone`` and ``window``.
      monotone: x_j ≥ x_{j+1} within each group (structured: isotonic projection;
        slsqp: as extra linear rows).
      window: variable reduction around x0 (see :func:`reduce_window`); None: all free.
      subspace: structured: refine each QP step with the full L-BFGS matrix.
      progress: called with (iteration, objective) at each iterate.

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
    if max_iter < 0 or not tol > 0 or memory < 1:
        raise ValueError("max_iter must be >= 0, tol > 0 and memory >= 1")
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

    def record(xr: np.ndarray, value: float, kkt: float | None = None) -> None:
        entry = {"iteration": len(trace), "objective": float(value), "slack": ((b_s - A_s @ xr) * scale).tolist()}
        if kkt is not None:
            entry["kkt_residual"] = kkt
        trace.append(entry)
        if progress is not None:
            progress(entry["iteration"], float(value))

    groups_red = None
    if monotone:
        bounds = np.cumsum([0] + red_sizes)
        groups_red = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
    omega = _Feasible(A_s, b_s, lo[idx], hi[idx], groups_red)

    start = time.perf_counter()
    if idx.size == 0:  # the reduction fixed everything: nothing to solve
        value = float(fun_and_grad(x_full)[0])
        record(np.zeros(0), value, 0.0)
        return SolveResult(x=x_full, value=value, success=True, status="converged",
                           message=f"no free variable; 0 of {n} variables free", iterations=0, n_fun=1,
                           seconds=time.perf_counter() - start, kkt_residual=0.0, trace=trace, n_free=0,
                           multipliers=None, method=method)
    if method == "structured":
        out = _structured(fg, x_full[idx], omega, max_iter=max_iter, tol=tol, memory=memory,
                          subspace=subspace, record=record, trace=trace)
        xr, value, kkt = out["x"], out["value"], out["kkt"]
        status, iterations, n_fun, lam = out["status"], out["iterations"], out["n_fun"], out["lam"] * scale
        success = status == "converged"
        reason = {"converged": "KKT residual within tolerance",
                  "max_iter": f"iteration limit ({max_iter}) reached, not converged"}.get(status, out["message"])
    else:
        xr, value, success, status, reason, iterations, n_fun, lam = _run_slsqp(
            fg, x_full[idx], A_s, b_s, omega, groups_red, max_iter, tol, trace, scale, progress)
        if last.get("x") is not None and np.array_equal(last["x"], xr):
            g_last = last["fg"][1]
        else:
            g_last = fg(xr)[1]
        kkt = omega.kkt_residual(xr, g_last)[0]
    seconds = time.perf_counter() - start
    message = f"{reason}; KKT residual {kkt:.3g} after {iterations} iterations, {idx.size} of {n} variables free"
    return SolveResult(
        x=full_x(xr), value=float(value), success=bool(success), status=status, message=message,
        iterations=int(iterations), n_fun=int(n_fun), seconds=seconds, kkt_residual=float(kkt),
        trace=trace, n_free=int(idx.size), multipliers=lam, method=method,
    )


def _run_slsqp(fg, x0, A_s, b_s, omega, groups_red, max_iter, tol, trace, scale, user_progress):
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
                      ftol=tol, progress=progress, trace=inner)
    status = {0: "converged", 9: "max_iter"}.get(res.status, f"slsqp_{res.status}")
    reason = res.message if res.status != 9 else f"iteration limit ({max_iter}) reached, not converged"
    return res.x, res.value, res.success, status, reason, res.iterations, res.n_fun, None
