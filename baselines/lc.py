"""LC rank selection: learning-compression with an augmented Lagrangian (Idelbayev & Carreira-Perpiñán 2020).

The ranks are learned while the weights adapt. With w the decomposable kernels
(matricized as in the problem), Delta(Theta) their low-rank approximations and
Lagrange multipliers lambda, the LC algorithm alternates, for mu_k = mu0 * a^k:

* L step (learning): SGD on   L(w) + mu/2 ||w - Delta(Theta) - lambda/mu||^2
  over every weight of the network (:class:`coblax.lowrank.training.NetworkTrainer`);
* C step (compression), per layer i independently: with A_i = w_i - lambda_i/mu
  and its singular values s_ij, the rank

      r_i = argmin_r  alpha * c_i(r) + mu/2 * sum_{j>r} s_ij^2 / n_i,

  n_i = ||A_i||_F^2 (``normalize``, the reference's choice for deep nets) or 1, and
  Delta_i = the rank-r_i truncated SVD of A_i (A_i itself in original form: a layer
  whose factored form is not cheaper keeps its original form, tail 0);
* multipliers: lambda <- lambda - mu (w - Delta(Theta)).

The paper sweeps alpha (its lambda) for one cost and reports the ranks each alpha
gives; users here give two budgets, so every C step bisects alpha to the smallest
value whose ranks meet both, with c_i(r) = 2 [theta N_C,i(r) / N_C,max + (1 - theta)
N_M,i(r) / N_M,max], at each of ``mixes`` values of theta in [0, 1] (the ratio of the
two budgets' multipliers), and keeps the theta whose ranks lose the least normalized
tail energy (:func:`c_step_mixed`; ``mixes = 1``: theta = 1/2, the plain sum). The ranks
of the last C step are the allocation, and LC's network is handed on: the trained
variables with each decomposable kernel set to the last C step's A_i, whose rank-r_i
truncated SVD, Delta_i, is what the factored network keeps
(:class:`~coblax.lowrank.training.TrainedVariables`); the common fine-tuning then starts
from it. Truncating the original weights at LC's ranks instead throws its training
away (each fix measured: experiments/README.md, "Issue 18: the ResNet-20 benchmark"). The first C step (lambda = 0,
mu = mu0) is the direct compression that starts LC. The L steps' SGD steps are
LC's own cost: ``training_steps`` and ``lc_seconds`` in the record's diagnostics.

Without a network to train (``problem.training`` is None, e.g. on a bare
problem) only that direct-compression C step runs, and the status says so
(``"direct_compression"``).

Reference defaults (UCMerced-ML/LC-model-compression, ``examples/cvpr2020``):
20 LC steps, mu0 = 9e-5, a = 1.09, each L step 15 epochs of SGD with Nesterov
momentum 0.9, batch 128, learning rate 0.09 decayed by 0.98 after each L step,
normalized C step. Here the L step is counted in SGD steps (``l_steps``, default
100; the reference's 15 epochs are ~5,900 steps of 128 CIFAR-10 images per L step).

Reference: Y. Idelbayev, M. Á. Carreira-Perpiñán, "Low-rank compression of neural
nets: learning the rank of each layer", CVPR 2020.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from coblax.baselines._budget import check_floor, clip_ranks, ok_allocation
from coblax.lowrank.allocation import Allocation, AllocationProblem, LayerCost, is_feasible
from coblax.lowrank.decompose import get_kernel
from coblax.lowrank.training import TrainedVariables, set_kernel

__all__ = ["LC", "c_step", "c_step_mixed", "c_step_rank", "tail_energies"]


def tail_energies(s: np.ndarray) -> np.ndarray:
    """tail[r] = sum_{j > r} s_j^2 for r = 0..len(s) (tail[len(s)] = 0)."""
    s2 = np.asarray(s, np.float64) ** 2
    return np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])


def _combined(problem: AllocationProblem, layer: LayerCost, r: int, theta: float = 0.5) -> float:
    """c(r) = 2 [theta N_C(r) / N_C,max + (1 - theta) N_M(r) / N_M,max] (theta = 1/2: the plain sum)."""
    s_mac = problem.mac_max if problem.mac_max > 0 else 1.0
    s_par = problem.param_max if problem.param_max > 0 else 1.0
    return 2.0 * (theta * layer.macs(r) / s_mac + (1.0 - theta) * layer.params(r) / s_par)


def _candidates(layer: LayerCost, min_rank: int) -> list[int]:
    top = min(layer.saturation_rank, layer.full_rank)
    return list(range(min(min_rank, layer.full_rank), top)) + [layer.full_rank]


def c_step_rank(problem: AllocationProblem, layer: LayerCost, s: np.ndarray, alpha: float, mu: float,
                normalize: bool = True, theta: float = 0.5) -> int:
    """argmin_r alpha c(r) + mu/2 tail(r) / n over the layer's candidate ranks (ties: cheaper)."""
    return _LayerTable(problem, layer, s, normalize).rank(alpha, mu, theta)


class _LayerTable:
    """One layer's candidate ranks with their normalized costs and tails: the C step's
    argmin for any (alpha, theta) in one vectorized pass."""

    def __init__(self, problem: AllocationProblem, layer: LayerCost, s: np.ndarray, normalize: bool):
        tail = tail_energies(s)
        norm = float(tail[0]) if normalize and tail[0] > 0 else 1.0
        self._layer, self._tail = layer, tail / norm
        self.ranks = np.asarray(_candidates(layer, problem.min_rank))
        self.mac = np.array([_combined(problem, layer, int(r), 1.0) for r in self.ranks])
        self.par = np.array([_combined(problem, layer, int(r), 0.0) for r in self.ranks])
        self.tail = np.array([self.distortion(int(r)) for r in self.ranks])

    def rank(self, alpha: float, mu: float, theta: float) -> int:
        c = theta * self.mac + (1.0 - theta) * self.par
        value = alpha * c + 0.5 * mu * self.tail
        best = value.min()
        tied = np.flatnonzero(value <= best)
        return int(self.ranks[tied[np.argmin(c[tied])]])

    def distortion(self, r: int) -> float:
        """tail(r) / n, 0 in original form."""
        return 0.0 if self._layer.is_original(int(r)) else float(self._tail[min(int(r), len(self._tail) - 1)])


def c_step(problem: AllocationProblem, spectra: Mapping[str, np.ndarray], mu: float, *, normalize: bool = True,
           iters: int = 100, theta: float = 0.5, tables: Mapping[str, _LayerTable] | None = None
           ) -> tuple[float, dict[str, int]]:
    """(alpha, ranks): the smallest alpha whose C-step ranks meet both budgets, at cost mix ``theta``.

    alpha = 0 first (no cost: the tail alone), then alpha_max = 1 doubled until
    feasible, then ``iters`` bisection rounds; ranks are non-increasing in alpha.

    Raises:
      BudgetError: if even min_rank everywhere is infeasible (naming ``lc``).
    """
    check_floor(problem, "lc")
    tables = tables or {layer.name: _LayerTable(problem, layer, spectra[layer.name], normalize)
                        for layer in problem.layers}

    def ranks_at(alpha: float) -> dict[str, int]:
        return clip_ranks(problem, {n: t.rank(alpha, mu, theta) for n, t in tables.items()})

    if is_feasible(problem, ranks_at(0.0)):
        return 0.0, ranks_at(0.0)
    lo, hi = 0.0, 1.0
    while not is_feasible(problem, ranks_at(hi)):
        lo, hi = hi, 2.0 * hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if is_feasible(problem, ranks_at(mid)):
            hi = mid
        else:
            lo = mid
    return hi, ranks_at(hi)


def c_step_mixed(problem: AllocationProblem, spectra: Mapping[str, np.ndarray], mu: float, *,
                 normalize: bool = True, iters: int = 100, mixes: int = 11) -> tuple[float, float, dict[str, int]]:
    """(alpha, theta, ranks): :func:`c_step` at each cost mix theta in ``mixes`` evenly spaced
    values of [0, 1] (one: theta = 1/2), keeping the ranks of least total distortion
    sum_i tail_i(r_i) / n_i (ties: the theta nearest 1/2).

    Why: two budgets have two Lagrange multipliers. One alpha on the plain sum of the
    normalized costs (theta = 1/2) charges the budget that is slack as much as the
    binding one; on ResNet-20 at 0.5 that left the parameters at 0.16 of the budget's
    reference and cut every stage-3 conv to rank 1. theta is the ratio of the two
    multipliers, alpha their scale.
    """
    tables = {layer.name: _LayerTable(problem, layer, spectra[layer.name], normalize) for layer in problem.layers}
    thetas = [0.5] if mixes == 1 else list(np.linspace(0.0, 1.0, mixes))
    best = None
    for theta in sorted(thetas, key=lambda t: abs(t - 0.5)):
        alpha, ranks = c_step(problem, spectra, mu, normalize=normalize, iters=iters, theta=theta, tables=tables)
        distortion = sum(tables[n].distortion(r) for n, r in ranks.items())
        if best is None or distortion < best[0] - 1e-12 * max(1.0, abs(best[0])):
            best = (distortion, alpha, float(theta), ranks)
    return best[1], best[2], best[3]


def _truncated(a: np.ndarray, r: int, layer: LayerCost) -> np.ndarray:
    if layer.is_original(r):
        return a
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


@dataclasses.dataclass(frozen=True)
class LC:
    """LC rank selection (see the module docstring for the algorithm and the reference defaults).

    Attributes:
      steps: LC iterations (L step + C step each); reference 20.
      mu0, mu_inc: penalty schedule mu_k = mu0 * mu_inc^k; reference 9e-5, 1.09.
      l_steps: SGD steps per L step (reference: 15 epochs).
      lr, lr_decay: SGD learning rate of L step k is lr * lr_decay^k; reference 0.09, 0.98.
      batch_size: examples per SGD step; reference 128.
      normalize: divide the C step's tail by ||w - lambda/mu||^2; reference True.
      iters: bisection rounds on alpha per C step.
      mixes: cost mixes theta tried per C step (:func:`c_step_mixed`; 1: the plain sum
        of the two normalized costs, one multiplier for both budgets).
      progress: show a progress bar over the LC steps (the runner sets it; a MobileNet
        record spends 5-10 min in them).
    stats: ``training_steps``, ``lc_seconds``, ``alpha``/``theta``/``mu`` (last C step),
      ``lc_trace`` (per LC step: mu, alpha, mean L-step loss, ranks), ``mac_ratio``,
      ``param_ratio``.
    """

    steps: int = 20
    mu0: float = 9e-5
    mu_inc: float = 1.09
    l_steps: int = 100
    lr: float = 0.09
    lr_decay: float = 0.98
    batch_size: int = 128
    normalize: bool = True
    iters: int = 100
    mixes: int = 11
    progress: bool = False

    name: ClassVar[str] = "lc"

    def __post_init__(self) -> None:
        for key in ("steps", "l_steps", "batch_size", "iters", "mixes"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "steps" else 1):
                raise ValueError(f"{key} must be an integer >= {0 if key == 'steps' else 1}, got {v!r}")
        for key in ("mu0", "lr"):
            if not float(getattr(self, key)) > 0.0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)!r}")
        for key in ("mu_inc", "lr_decay"):
            if not float(getattr(self, key)) > 0.0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)!r}")

    def __call__(self, problem: AllocationProblem) -> Allocation:
        check_floor(problem, self.name)
        start = time.perf_counter()
        trainer = problem.training
        if trainer is None:
            spectra = {layer.name: np.asarray(layer.sigma, np.float64) for layer in problem.layers}
            alpha, theta, ranks = c_step_mixed(problem, spectra, self.mu0, normalize=self.normalize,
                                               iters=self.iters, mixes=self.mixes)
            return self._result(problem, ranks, "direct_compression",
                                {"alpha": alpha, "theta": theta, "mu": self.mu0, "training_steps": 0, "lc_trace": []},
                                start)
        if tuple(trainer.names) != problem.names:
            raise ValueError(f"lc: the trainer's layers {trainer.names} are not the problem's {problem.names}")
        by_name = {layer.name: layer for layer in problem.layers}
        variables = trainer.variables
        w = trainer.matrices(variables)
        lam = {n: np.zeros_like(m) for n, m in w.items()}

        def compress(mu: float):
            shifted = {n: w[n] - lam[n] / mu for n in w}
            spectra = {n: np.linalg.svd(a, compute_uv=False) for n, a in shifted.items()}
            alpha, theta, ranks = c_step_mixed(problem, spectra, mu, normalize=self.normalize, iters=self.iters,
                                               mixes=self.mixes)
            delta = {n: _truncated(shifted[n], ranks[n], by_name[n]) for n in w}
            return alpha, theta, ranks, delta, shifted

        alpha, theta, ranks, delta, shifted = compress(self.mu0)  # direct compression: lambda = 0
        trace = [{"step": 0, "mu": self.mu0, "alpha": alpha, "theta": theta, "loss": None, "ranks": ranks}]
        mu = self.mu0
        trainer_steps0 = trainer.steps_done
        bar = tqdm(range(self.steps), desc="lc L/C steps", unit="step", disable=not self.progress, leave=False)
        for k in bar:
            mu = self.mu0 * self.mu_inc**k
            targets = trainer.to_kernels({n: delta[n] + lam[n] / mu for n in w})
            variables, loss = trainer.penalized_steps(variables, targets, mu, self.l_steps,
                                                      self.lr * self.lr_decay**k)
            w = trainer.matrices(variables)
            alpha, theta, ranks, delta, shifted = compress(mu)
            lam = {n: lam[n] - mu * (w[n] - delta[n]) for n in w}
            trace.append({"step": k + 1, "mu": mu, "alpha": alpha, "theta": theta, "loss": loss, "ranks": ranks})
            bar.set_postfix(loss=f"{loss:.4f}", mu=f"{mu:.3g}", rank=sum(ranks.values()))
        bar.close()
        stats = {"alpha": alpha, "theta": theta, "mu": mu, "training_steps": trainer.steps_done - trainer_steps0,
                 "lc_trace": trace,
                 "constraint_violation": float(np.sqrt(sum(np.sum((w[n] - delta[n]) ** 2) for n in w)))}
        allocation = self._result(problem, ranks, "ok", stats, start)
        if not self.steps:  # nothing trained: the original weights, as for every method
            return allocation
        params = variables["params"]
        for name, kernel in trainer.to_kernels(shifted).items():  # A_i: its rank-r_i SVD is Delta_i
            params = set_kernel(params, name, jnp.asarray(kernel, np.asarray(get_kernel(variables, name)).dtype))
        return dataclasses.replace(allocation, weights=TrainedVariables({**variables, "params": params}))

    def _result(self, problem: AllocationProblem, ranks: dict[str, int], status: str, stats: dict,
                start: float) -> Allocation:
        return ok_allocation(problem, ranks, dict(stats, lc_seconds=time.perf_counter() - start), status)
