"""Optimal hard threshold for singular values (Gavish & Donoho 2014) and its allocator.

For Y = X + sigma Z, Y of size m x n with m <= n, beta = m / n and Z with i.i.d.
N(0, 1) entries, the asymptotically MSE-optimal hard threshold is

    known sigma:    tau = lambda*(beta) sqrt(n) sigma,
                    lambda*(beta) = sqrt(2(beta+1)
                                    + 8 beta / ((beta+1) + sqrt(beta^2 + 14 beta + 1))),
    unknown sigma:  tau = omega(beta) y_med,      omega(beta) = lambda*(beta) / sqrt(mu_beta),

with y_med the median singular value of Y and mu_beta the median of the
Marchenko–Pastur distribution with ratio beta (density
sqrt((b - t)(t - a)) / (2 pi beta t) on [a, b] = [(1 - sqrt beta)^2, (1 + sqrt beta)^2]).
For square matrices lambda*(1) = 4/sqrt(3) and omega(1) ~= 2.858. The paper's cubic fit
omega(beta) ~= 0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43 is :func:`omega_approx`;
:func:`omega` computes mu_beta by integrating the density and root-finding.

Reference: M. Gavish, D. L. Donoho, "The optimal hard threshold for singular values is
4/sqrt(3)", IEEE Trans. Inf. Theory 60(8), 2014.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import numpy as np
from scipy.integrate import quad
from scipy.optimize import brentq

from coblax.baselines._budget import threshold_allocation
from coblax.lowrank.allocation import Allocation, AllocationProblem

__all__ = [
    "lambda_star",
    "mp_median",
    "omega",
    "omega_approx",
    "threshold",
    "GavishDonoho",
]


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must lie in (0, 1], got {beta}")
    return beta


def lambda_star(beta: float) -> float:
    """Known-noise optimal threshold coefficient lambda*(beta) (Gavish & Donoho, eq. 11)."""
    beta = _check_beta(beta)
    return math.sqrt(
        2.0 * (beta + 1.0) + 8.0 * beta / ((beta + 1.0) + math.sqrt(beta**2 + 14.0 * beta + 1.0))
    )


@functools.lru_cache(maxsize=1024)
def mp_median(beta: float) -> float:
    """Median of the Marchenko–Pastur law with ratio beta in (0, 1]."""
    beta = _check_beta(beta)
    a = (1.0 - math.sqrt(beta)) ** 2
    b = (1.0 + math.sqrt(beta)) ** 2

    def density(t: float) -> float:
        if t <= 0.0:  # the pole at t = a = 0 (beta = 1); some QUADPACK builds evaluate it
            return 0.0
        return math.sqrt(max((b - t) * (t - a), 0.0)) / (2.0 * math.pi * beta * t)

    def cdf_minus_half(x: float) -> float:
        # The density has integrable square-root edges (and a 1/sqrt(t) pole at a = 0 when
        # beta = 1); adaptive quad with tight tolerances handles both.
        return quad(density, a, x, limit=200, epsabs=1e-13, epsrel=1e-12)[0] - 0.5

    return float(brentq(cdf_minus_half, a, b, xtol=1e-14, rtol=1e-13))


def omega(beta: float) -> float:
    """Unknown-noise coefficient omega(beta) = lambda*(beta) / sqrt(mu_beta)."""
    beta = _check_beta(beta)
    return lambda_star(beta) / math.sqrt(mp_median(beta))


def omega_approx(beta: float) -> float:
    """The paper's cubic fit 0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43."""
    beta = _check_beta(beta)
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def threshold(
    singular_values: np.ndarray, shape: tuple[int, int], sigma: float | None = None
) -> float:
    """Gavish–Donoho hard threshold for the singular values of an m x n matrix.

    Args:
      singular_values: all min(m, n) singular values of the observed matrix (only
        their median is used, and only when ``sigma`` is None).
      shape: the matrix shape, either orientation; beta = min/max, n = max.
      sigma: known noise standard deviation (per entry), or None.
    Returns:
      lambda*(beta) sqrt(n) sigma if sigma is known, else omega(beta) median(s).
    """
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be two positive dimensions, got {shape}")
    m, n = sorted(int(d) for d in shape)
    beta = m / n
    if sigma is not None:
        if not sigma >= 0:
            raise ValueError(f"sigma must be non-negative or None, got {sigma}")
        return lambda_star(beta) * math.sqrt(n) * float(sigma)
    s = np.asarray(singular_values, dtype=np.float64).ravel()
    if s.size == 0:
        raise ValueError("singular_values must not be empty when sigma is None")
    return omega(beta) * float(np.median(s))


@dataclasses.dataclass(frozen=True)
class GavishDonoho:
    """Gavish–Donoho rank allocator (unknown noise) in budget mode.

    Natural rank of a layer: #{sigma_ij > omega(beta_i) median_j sigma_ij}. As for
    ``vbmf``, one multiplier t >= 0 scales every threshold and the allocator returns
    the largest ranks #{sigma_ij > t tau_i} meeting both budgets (the smallest t,
    possibly < 1, down to 0 = full rank).

    stats: ``threshold_multiplier``, ``natural_ranks``, ``natural_mac_ratio``,
    ``natural_param_ratio``, ``thresholds``, ``mac_ratio``, ``param_ratio``.
    """

    name: ClassVar[str] = "gavish_donoho"

    def __call__(self, problem: AllocationProblem) -> Allocation:
        taus = {layer.name: threshold(layer.sigma, layer.shape) for layer in problem.layers}
        return threshold_allocation(problem, taus, self.name)
