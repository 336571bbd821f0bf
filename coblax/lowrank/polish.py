"""Polish: refit the rounded network's kept masks, ranks fixed (COBLA's last step).

After rounding, the kept triplets still carry the relaxed m̂ (or 1 for plain
truncation), values the relaxed solve balanced against partial triplets that the
rounding dropped. Minimizing E(m) again over the kept triplets alone, in the box
0 < m <= 1, changes neither the ranks nor either cost. On MNIST LeNet-300-100 at 3 %
of the MACs it takes the same ranks from 50.5 % to 65.8 % test accuracy
(``experiments/README.md``).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from coblax.lowrank.allocation import AllocationProblem
from coblax.lowrank.rounding import flat_mask

__all__ = ["polish_masks"]


def polish_masks(problem: AllocationProblem, masks: dict[str, np.ndarray], score, max_iter: int,
                 rtol: float = 0.0) -> tuple[dict[str, np.ndarray], dict]:
    """Minimize E over the kept triplets' masks, ranks fixed; keep it if ``score`` improves.

    The support (nonzero entries of the factored layers' masks) and so the ranks and
    both costs are unchanged; the kept masks move in [1e-6, 1] (a kept triplet stays
    kept: "nonzero = paid for"). L-BFGS-B: the problem has box bounds only. E is
    divided by its value at the rounded masks, so that L-BFGS-B's ``ftol`` = ``rtol``
    stops the fit once an iteration lowers E by less than ``rtol`` of the rounded E
    (the relaxed solve's own rule; where the rounding lost little, the fit ends in a
    few evaluations).
    """
    offsets = problem.offsets()
    m0 = flat_mask(problem, masks)
    support = np.zeros(m0.size, bool)
    for i in range(len(problem.layers)):
        block = m0[offsets[i]:offsets[i + 1]]
        if not np.all(block == 1.0):  # an original layer stays original
            support[offsets[i]:offsets[i + 1]] = block > 0
    idx = np.flatnonzero(support)
    info: dict = {"variables": int(idx.size), "kept": False}
    if idx.size == 0:
        return masks, info

    x0 = m0[idx]
    value0, grad0 = problem.loss.value_and_grad(m0)
    scale = abs(float(value0)) or 1.0

    def fun(x):
        if np.array_equal(x, x0):  # L-BFGS-B starts at x0: E there is already known
            value, grad = value0, grad0
        else:
            m = m0.copy()
            m[idx] = x
            value, grad = problem.loss.value_and_grad(m)
        return float(value) / scale, np.asarray(grad, np.float64)[idx] / scale
    options = {"maxiter": max_iter, "maxfun": 2 * max_iter}
    if rtol > 0:
        options["ftol"] = rtol
    res = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=[(1e-6, 1.0)] * idx.size,
                   options=options)
    m1 = m0.copy()
    m1[idx] = res.x
    before, after = score(m0), score(m1)
    info.update(iterations=int(res.nit), evaluations=int(res.nfev), score_before=list(before),
                score_after=list(after), kept=bool(after < before))
    if not after < before:
        return masks, info
    out = {l.name: m1[offsets[i]:offsets[i + 1]].copy() for i, l in enumerate(problem.layers)}
    return out, info
