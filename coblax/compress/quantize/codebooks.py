"""Vector quantization of a weight matrix: product and residual quantization (Gong et al. 2014).

Also the compression ratios the paper prints for scalar k-means, PQ and RQ.

Reference: Gong, Liu, Yang & Bourdev (2014) "Compressing Deep Convolutional Networks
using Vector Quantization", arXiv:1412.6115.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

Params = Any

__all__ = [
    "kmeans_compression_ratio",
    "pq_compression_ratio",
    "rq_compression_ratio",
    "ProductQuantization",
    "product_quantize",
    "ResidualQuantization",
    "residual_quantize",
]


def kmeans_compression_ratio(k: int) -> float:
    """32 / log2 k: scalar k-means on 32-bit floats, codebook neglected (Gong et al.)."""
    if k < 2:
        raise ValueError(f"k must be >= 2 for a finite ratio, got {k}")
    return 32.0 / math.log2(k)


def pq_compression_ratio(m: int, n: int, k: int, s: int) -> float:
    """32 m n / (32 k n + log2(k) m s) for product quantization (Gong et al. Sec. 3.2).

    W is m x n, split column-wise into s blocks of n/s columns; every block has its
    own k centroids of length n/s (32 k n codebook bits in all) and each of the m
    rows stores one log2(k)-bit code per block.
    """
    return 32.0 * m * n / (32.0 * k * n + math.log2(k) * m * s)


def rq_compression_ratio(m: int, n: int, k: int, t: int) -> float:
    """m / (t k + log2(k) t n) for residual quantization, as printed by Gong et al.

    W is m x n, t stages of k centroids. This is the formula of the paper and of
    the course (kept verbatim so tables match); it is *not* the exact bit ratio of
    coding the m rows (vectors of length n) with t codebooks, which is
    32 m n / (32 t k n + t m log2 k) — see ``ResidualQuantization.storage_ratio``.
    """
    return m / (t * k + math.log2(k) * t * n)


def _nearest(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    d = (X**2).sum(1)[:, None] - 2.0 * X @ C.T + (C**2).sum(1)[None, :]
    return np.argmin(d, axis=1)


def _kmeans_vectors(X: np.ndarray, k: int, iters: int, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on the rows of X with k-means++ seeding.

    Ends with centroids = means of the previous assignment (empty clusters keep
    theirs) and codes = nearest centroid, so the result never has a larger error
    than coding every row by the zero vector (what residual quantization needs to
    be monotone).
    """
    N = X.shape[0]
    C = np.empty((k, X.shape[1]))
    C[0] = X[rng.integers(N)]
    d2 = ((X - C[0]) ** 2).sum(1)
    for j in range(1, k):
        tot = d2.sum()
        p = d2 / tot if tot > 0 else np.full(N, 1.0 / N)
        C[j] = X[rng.choice(N, p=p)]
        d2 = np.minimum(d2, ((X - C[j]) ** 2).sum(1))
    a = _nearest(X, C)
    for _ in range(iters):
        counts = np.bincount(a, minlength=k)
        sums = np.zeros_like(C)
        np.add.at(sums, a, X)
        C = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], C)
        a_new = _nearest(X, C)
        if np.array_equal(a_new, a):
            break
        a = a_new
    return C, _nearest(X, C)


def _check_matrix_k(W: Any, k: int, rows: int | None = None) -> np.ndarray:
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"W must be a 2-D matrix (m, n), got shape {W.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"k must be an int >= 2, got {k!r}")
    if k > W.shape[0]:
        raise ValueError(f"k={k} exceeds the number of rows m={W.shape[0]} to cluster")
    return W


@dataclasses.dataclass(frozen=True, eq=False)
class ProductQuantization:
    """Product quantization of W (m x n) into s column blocks (Gong et al. 2014).

    Attributes:
      codebooks: (s, k, n/s) — block i's centroids.
      codes: (m, s) int — row r of block i is codebooks[i, codes[r, i]].
      reconstruction: (m, n) float32.
      error: ||W - Ŵ||_F^2.
      compression_ratio: :func:`pq_compression_ratio` (exact bit count).
    """

    codebooks: np.ndarray
    codes: np.ndarray
    reconstruction: np.ndarray
    error: float
    compression_ratio: float


def product_quantize(W: Any, n_blocks: int, k: int, *, iters: int = 50, seed: int = 0
                     ) -> ProductQuantization:
    """Product quantization (Gong et al. 2014, Sec. 3.2).

    W ∈ R^{m x n} is split column-wise into s = ``n_blocks`` submatrices
    W = [W^1, ..., W^s], W^i ∈ R^{m x (n/s)}; k-means on the m rows of each W^i
    gives its codebook; each row segment is replaced by its nearest centroid.
    For a flax Dense kernel (in, out), m = in and n = out.

    Args:
      W: (m, n) matrix; n must be divisible by ``n_blocks``.
      n_blocks: s >= 1.
      k: centroids per block, 2 <= k <= m.
      iters, seed: k-means iterations and seeding.
    """
    W = _check_matrix_k(W, k)
    m, n = W.shape
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, (int, np.integer)) or n_blocks < 1:
        raise ValueError(f"n_blocks must be an int >= 1, got {n_blocks!r}")
    if n % n_blocks:
        raise ValueError(f"n_blocks={n_blocks} must divide the number of columns n={n}")
    rng = np.random.default_rng(seed)
    width = n // n_blocks
    books = np.empty((n_blocks, k, width))
    codes = np.empty((m, n_blocks), dtype=np.int32)
    recon = np.empty_like(W)
    for i in range(n_blocks):
        block = W[:, i * width:(i + 1) * width]
        C, a = _kmeans_vectors(block, k, iters, rng)
        books[i], codes[:, i] = C, a
        recon[:, i * width:(i + 1) * width] = C[a]
    return ProductQuantization(
        codebooks=books.astype(np.float32),
        codes=codes,
        reconstruction=recon.astype(np.float32),
        error=float(np.sum((W - recon) ** 2)),
        compression_ratio=pq_compression_ratio(m, n, k, n_blocks),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class ResidualQuantization:
    """Residual quantization of W (m x n) with t stages (Gong et al. 2014).

    Attributes:
      codebooks: (t, k, n) — stage j's centroids (vectors of length n).
      codes: (m, t) int — Ŵ_r = Σ_j codebooks[j, codes[r, j]].
      reconstruction: (m, n) float32.
      errors: ||W - Ŵ||_F^2 after each stage (non-increasing).
      compression_ratio: :func:`rq_compression_ratio` (the paper's formula).
      storage_ratio: exact 32 m n / (32 t k n + t m log2 k).
    """

    codebooks: np.ndarray
    codes: np.ndarray
    reconstruction: np.ndarray
    errors: tuple[float, ...]
    compression_ratio: float
    storage_ratio: float

    @property
    def error(self) -> float:
        return self.errors[-1]


def residual_quantize(W: Any, n_stages: int, k: int, *, iters: int = 50, seed: int = 0
                      ) -> ResidualQuantization:
    """Residual quantization (Gong et al. 2014, Sec. 3.3).

    The m rows of W ∈ R^{m x n} (vectors of length n) are quantized into k
    centres; the residuals are quantized again, recursively, for t = ``n_stages``
    stages: Ŵ_r = Σ_{j=1..t} c^j_{a_j(r)}. The error never increases with t,
    because each stage's centroids are cluster means (never worse than 0).

    Args:
      W: (m, n) matrix.
      n_stages: t >= 1.
      k: centroids per stage, 2 <= k <= m.
      iters, seed: k-means iterations and seeding.
    """
    W = _check_matrix_k(W, k)
    if isinstance(n_stages, bool) or not isinstance(n_stages, (int, np.integer)) or n_stages < 1:
        raise ValueError(f"n_stages must be an int >= 1, got {n_stages!r}")
    m, n = W.shape
    rng = np.random.default_rng(seed)
    books = np.empty((n_stages, k, n))
    codes = np.empty((m, n_stages), dtype=np.int32)
    residual = W.copy()
    errors = []
    for j in range(n_stages):
        C, a = _kmeans_vectors(residual, k, iters, rng)
        books[j], codes[:, j] = C, a
        residual = residual - C[a]
        errors.append(float(np.sum(residual**2)))
    recon = W - residual
    return ResidualQuantization(
        codebooks=books.astype(np.float32),
        codes=codes,
        reconstruction=recon.astype(np.float32),
        errors=tuple(errors),
        compression_ratio=rq_compression_ratio(m, n, k, n_stages),
        storage_ratio=32.0 * m * n / (32.0 * n_stages * k * n + n_stages * m * math.log2(k)),
    )


