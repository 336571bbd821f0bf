"""Analytic empirical VBMF (Nakajima et al. 2013) and the rank allocator built on it.

Model: V = B A^T + E with V of size L x M (L <= M; any input is transposed so),
Gaussian priors on the columns of A and B whose variances are estimated (empirical
Bayes), and noise E with i.i.d. N(0, sigma^2) entries. With alpha = L / M and the
singular values gamma_h of V, the global EVB solution keeps component h iff

    gamma_h > gamma_EVB = sqrt( M sigma^2 (1 + tau_) (1 + alpha / tau_) ),

where tau_ is the positive zero of Psi(tau) = log(tau + 1) + alpha log(tau/alpha + 1)
- tau (tau_ ~= 2.5129 sqrt(alpha); we solve for it exactly). The kept components are
shrunk to the posterior mean

    gamma_hat_h = gamma_h / 2 * (1 - (L+M) sigma^2 / gamma_h^2
                  + sqrt((1 - (L+M) sigma^2 / gamma_h^2)^2 - 4 L M sigma^4 / gamma_h^4)).

If sigma^2 is unknown it minimizes the free energy, which up to constants is (per M)

    F(sigma^2) = L log sigma^2 + ||V||_F^2 / (M sigma^2)
                 + sum_{h : x_h > x_} Psi(tau(x_h)),       x_h = gamma_h^2 / (M sigma^2),

with x_ = (1 + tau_)(1 + alpha/tau_) and tau(x) = (x - 1 - alpha + sqrt((x - 1 - alpha)^2
- 4 alpha)) / 2. The minimizer lies in [sigma_lo^2, sigma_hi^2] with
sigma_hi^2 = ||V||_F^2 / (L M) and sigma_lo^2 = max(gamma_{H+1}^2 / (M x_),
sum_{h > H} gamma_h^2 / (M (L - H))), H = ceil(L / (1 + alpha)) - 1; F is not convex,
so we scan a log grid on that interval and refine the best point with a bounded scalar
minimization.

EVBMF needs only the singular values and the shape, so :func:`evbmf_from_singular_values`
does the work and :func:`evbmf` just takes the SVD. Kim et al. (ICLR 2016) pick the
Tucker ranks of a CNN with it; the ``vbmf`` allocator applies it per layer matrix.

References:
  S. Nakajima, M. Sugiyama, S. D. Babacan, R. Tomioka, "Global analytic solution of
  fully-observed variational Bayesian matrix factorization", JMLR 14, 2013.
  S. Nakajima, R. Tomioka, M. Sugiyama, S. D. Babacan, "Condition for perfect
  dimensionality recovery by variational Bayesian PCA", JMLR 16, 2015 (bounds on sigma^2).
  Y.-D. Kim, E. Park, S. Yoo, T. Choi, L. Yang, D. Shin, "Compression of deep
  convolutional neural networks for fast and low power mobile applications", ICLR 2016.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from coblax.baselines._budget import threshold_allocation
from coblax.lowrank.allocation import Allocation, AllocationProblem

__all__ = ["EVBMFResult", "evbmf", "evbmf_from_singular_values", "evb_tau", "VBMF"]

_GRID = 256  # log-grid points for the global scan of the free energy


@dataclasses.dataclass(frozen=True)
class EVBMFResult:
    """Outcome of analytic EVBMF.

    Attributes:
      rank: number of singular values above the threshold.
      sigma2: noise variance (estimated, or the one given).
      threshold: gamma_EVB, the singular-value threshold.
      posterior: posterior-mean singular values, same length as the input (zeros
        beyond ``rank``).
      shape: (L, M) with L <= M, the orientation used internally.
      free_energy: F(sigma2) of the module docstring (up to constants), NaN if sigma2
        was given.
    """

    rank: int
    sigma2: float
    threshold: float
    posterior: np.ndarray
    shape: tuple[int, int]
    free_energy: float = math.nan


def evb_tau(alpha: float) -> float:
    """tau_: the positive zero of Psi(tau) = log(tau+1) + alpha log(tau/alpha+1) - tau.

    Psi(0) = 0, Psi'(0) = 1 and Psi is concave, so the positive zero is unique.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    return float(brentq(lambda t: _psi(t, alpha), 1e-9, 50.0, xtol=1e-14, rtol=1e-14))


def _psi(tau: np.ndarray | float, alpha: float) -> np.ndarray | float:
    return np.log(tau + 1.0) + alpha * np.log(tau / alpha + 1.0) - tau


def _tau_of_x(x: np.ndarray, alpha: float) -> np.ndarray:
    d = x - (1.0 + alpha)
    return 0.5 * (d + np.sqrt(np.maximum(d * d - 4.0 * alpha, 0.0)))


def _free_energy(sigma2: float, s2: np.ndarray, energy: float, L: int, M: int, alpha: float,
                 x_bar: float) -> float:
    x = s2 / (M * sigma2)
    kept = x[x > x_bar]
    return float(
        L * math.log(sigma2) + energy / (M * sigma2) + np.sum(_psi(_tau_of_x(kept, alpha), alpha))
    )


def evbmf_from_singular_values(
    s: np.ndarray, shape: tuple[int, int], sigma2: float | None = None
) -> EVBMFResult:
    """Analytic EVBMF from the singular values of an L x M matrix (see module docstring).

    Args:
      s: singular values (any order, non-negative), at most min(shape) of them;
        missing ones are taken as zero.
      shape: the matrix shape, either orientation.
      sigma2: known noise variance; None estimates it by free-energy minimization.
    Returns:
      :class:`EVBMFResult` (posterior values in the input's descending order).
    """
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be two positive dimensions, got {shape}")
    L, M = sorted(int(d) for d in shape)
    s = np.sort(np.asarray(s, dtype=np.float64).ravel())[::-1]
    if s.size > L:
        raise ValueError(f"s has {s.size} singular values but shape {shape} allows at most {L}")
    if np.any(s < 0) or not np.all(np.isfinite(s)):
        raise ValueError("s must hold finite, non-negative singular values")
    if sigma2 is not None and not sigma2 > 0:
        raise ValueError(f"sigma2 must be positive or None, got {sigma2}")
    alpha = L / M
    tau_ = evb_tau(alpha)
    x_bar = (1.0 + tau_) * (1.0 + alpha / tau_)
    free = math.nan
    if sigma2 is None and (s.size == 0 or s[0] == 0.0):
        # The zero matrix: nothing to keep, no noise to estimate.
        return EVBMFResult(0, 0.0, 0.0, np.zeros_like(s), (L, M), math.nan)
    if sigma2 is not None and (s.size == 0 or s[0] == 0.0):
        tau = math.sqrt(M * sigma2 * x_bar)
        return EVBMFResult(0, float(sigma2), tau, np.zeros_like(s), (L, M))
    # EVBMF is scale-equivariant (sigma^2 ~ c^2, threshold and posterior ~ c): work with
    # s / s_1 so that tiny or huge singular values neither underflow nor overflow.
    c = float(s[0])
    u = s / c
    u2 = u**2
    if sigma2 is None:
        v2, free = _estimate_sigma2(u2, float(np.sum(u2)), L, M, alpha, x_bar)
        free += 2.0 * L * math.log(c)  # F(c^2 v) = F_scaled(v) + L log c^2
        sigma2 = v2 * c * c
    else:
        v2 = sigma2 / c / c
    threshold = math.sqrt(M * v2 * x_bar)
    rank = int(np.count_nonzero(u > threshold))
    post = np.zeros_like(s)
    q = v2 / u2[:rank]  # sigma^2 / gamma^2 (< 1 / (M x_) for the kept components)
    a = 1.0 - (L + M) * q
    post[:rank] = 0.5 * u[:rank] * (a + np.sqrt(np.maximum(a * a - 4.0 * L * M * q * q, 0.0)))
    return EVBMFResult(rank, float(sigma2), threshold * c, post * c, (L, M), free)


def _estimate_sigma2(
    s2: np.ndarray, energy: float, L: int, M: int, alpha: float, x_bar: float
) -> tuple[float, float]:
    full = np.zeros(L)
    full[: s2.size] = s2
    h_bar = math.ceil(L / (1.0 + alpha)) - 1
    upper = energy / (L * M)
    lower = max(full[h_bar] / (M * x_bar), float(np.mean(full[h_bar:])) / M)
    # Guard the log: an exactly low-rank matrix gives lower = 0.
    lower = min(max(lower, upper * 1e-12), upper)

    def f(log_s2: float) -> float:
        return _free_energy(math.exp(log_s2), s2, energy, L, M, alpha, x_bar)

    lo, hi = math.log(lower), math.log(upper)
    if hi - lo < 1e-12:
        return upper, f(hi)
    grid = np.linspace(lo, hi, _GRID)
    values = np.array([f(u) for u in grid])
    i = int(np.argmin(values))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, _GRID - 1)]
    res = minimize_scalar(f, bounds=(a, b), method="bounded", options={"xatol": 1e-10})
    best_u, best_f = (res.x, res.fun) if res.fun <= values[i] else (grid[i], values[i])
    return math.exp(best_u), float(best_f)


def evbmf(Y: np.ndarray, sigma2: float | None = None) -> EVBMFResult:
    """Analytic EVBMF of a 2-D array of any orientation.

    Args:
      Y: the observed matrix.
      sigma2: known noise variance, or None to estimate it.
    Returns:
      :class:`EVBMFResult`; ``rank`` is the EVB estimate of the signal rank.
    """
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim != 2:
        raise ValueError(f"Y must be a 2-D array, got {Y.ndim} dimensions")
    s = np.linalg.svd(Y, compute_uv=False)
    return evbmf_from_singular_values(s, Y.shape, sigma2)


@dataclasses.dataclass(frozen=True)
class VBMF:
    """EVBMF rank allocator in budget mode.

    Each layer's natural rank is the EVBMF rank of its matrix (from its singular
    values and shape). In budget mode one multiplier t >= 0 scales every layer's
    threshold and the allocator returns the LARGEST ranks #{sigma_ij > t gamma_EVB,i}
    that meet both budgets, i.e. the smallest such t — below 1 (down to 0 = full
    rank) when the natural ranks leave budget unused, above 1 when they overrun it.

    stats: ``threshold_multiplier``, ``natural_ranks``, ``natural_mac_ratio``,
    ``natural_param_ratio``, ``thresholds``, ``sigma2`` (per layer), ``mac_ratio``,
    ``param_ratio``.
    """

    name: ClassVar[str] = "vbmf"

    def __call__(self, problem: AllocationProblem) -> Allocation:
        results = {
            layer.name: evbmf_from_singular_values(layer.sigma, layer.shape)
            for layer in problem.layers
        }
        return threshold_allocation(
            problem,
            {name: r.threshold for name, r in results.items()},
            self.name,
            {"sigma2": {name: r.sigma2 for name, r in results.items()}},
        )
