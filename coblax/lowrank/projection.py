"""The feasible set of COBLA's relaxed problem and exact projections onto it.

Ω = {lo ≤ z ≤ hi, A z ≤ b, [z non-increasing within each monotone group]}.
:meth:`FeasibleSet.minimize` solves the separable QP

    min_z ½ Σ_i D_i (z_i − c_i)²  s.t.  z ∈ Ω

exactly through its dual in the multipliers λ ≥ 0 of the few linear rows: for fixed
λ the Lagrangian separates and its minimizer is closed form,
z(λ) = clip(c − Aᵀλ/D, lo, hi) (or, with monotone groups, the D-weighted isotonic
regression of c − Aᵀλ/D clipped to the box: pool-adjacent-violators; clipping a
bounded isotonic fit is exact for bounds constant within a group). The dual
ψ(λ) is concave and piecewise quadratic in ≤ 3 variables, with gradient A z(λ) − b
and generalized Hessian −Σ_blocks a_B a_Bᵀ / D_B over unclipped (pooled) blocks; a
projected Newton ascent finds its maximizer in a handful of O(n) steps. It is the
Euclidean projection in the D-metric: no dense QP ever.

The structured SQP (:mod:`coblax.lowrank.sqp_structured`) uses it three times per
iteration: the QP step (D = diag of the L-BFGS matrix), the projection of the
subspace-refined step back onto Ω, and the KKT residual ‖P_Ω(x − ∇f) − x‖_∞ (D = 1).
"""

from __future__ import annotations

import numpy as np
from sklearn.isotonic import isotonic_regression

__all__ = ["FeasibleSet", "project_budget"]


class FeasibleSet:
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

            def slope(t, lam=lam, s=s):
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


def project_budget(c: np.ndarray, A: np.ndarray, b: np.ndarray, lo: float = 0.0,
                   hi: float = 1.0) -> tuple[np.ndarray, np.ndarray, bool]:
    """Euclidean projection of ``c`` onto {lo ≤ z ≤ hi, A z ≤ b}: argmin_z ½‖z − c‖².

    The solver's own dual projection (:meth:`FeasibleSet.minimize` with D = 1), with
    the rows scaled to |b| = 1 as :func:`coblax.lowrank.solve.solve` scales them, so
    that MAC and parameter rows weigh alike in the dual's stopping test. Used by
    COBLA's joint training (:mod:`coblax.lowrank.joint`) after every step.

    Returns:
      (z, λ, converged): the projection, the multipliers of the unscaled rows and
      whether the dual ascent met its tolerance.
    """
    c = np.asarray(c, np.float64).reshape(-1)
    A = np.atleast_2d(np.asarray(A, np.float64))
    b = np.asarray(b, np.float64).reshape(-1)
    scale = np.where(np.abs(b) > 0, np.abs(b), 1.0)
    n = c.size
    omega = FeasibleSet(A / scale[:, None], b / scale, np.full(n, float(lo)), np.full(n, float(hi)), None)
    z, lam, ok = omega.minimize(c, np.ones(n))
    return z, lam / scale, ok
