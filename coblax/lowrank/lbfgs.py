"""Compact limited-memory BFGS matrices (Byrd, Nocedal & Schnabel 1994).

B = γI − W M Wᵀ with W = [γS, Y] from the last ``memory`` pairs (s, y) (Eq. 2.17 of
the paper): O(n·k) memory, O(n·k²) for the diagonal and O(n·k) per product. The
structured SQP keeps B positive definite by skipping pairs with
sᵀy ≤ 1e-10·|s||y| (the constraints are linear, so the Lagrangian's Hessian is f's
and y = ∇f(x⁺) − ∇f(x)).

Pairs are plain arrays, so a solve can hand its memory to the next one
(:attr:`pairs`): COBLA's saturation re-solves restart from the curvature the
previous solve learned instead of from γI.

Reference: Byrd, Nocedal & Schnabel, "Representations of quasi-Newton matrices
and their use in limited memory methods", Math. Prog. 63, 1994.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CompactLBFGS"]


class CompactLBFGS:
    """B = γI − W M Wᵀ from the last ``memory`` accepted pairs."""

    def __init__(self, memory: int, pairs: tuple[list[np.ndarray], list[np.ndarray]] | None = None):
        self.memory = memory
        self.S: list[np.ndarray] = []
        self.Y: list[np.ndarray] = []
        self._cache = None
        for s, y in zip(*(pairs or ([], []))):
            self.update(np.asarray(s, np.float64), np.asarray(y, np.float64))

    def update(self, s: np.ndarray, y: np.ndarray) -> bool:
        """Add (s, y) if it has positive curvature; returns whether it was kept."""
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

    @property
    def pairs(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The kept (S, Y) pairs, oldest first (to warm-start another solve)."""
        return list(self.S), list(self.Y)

    def compact(self):
        """(γ, W, M, M⁻¹) with B = γI − W M Wᵀ."""
        if self._cache is None:
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
