"""SQP driver: ``scipy.optimize.minimize(method="SLSQP")`` over JAX callbacks.

Solves  min_x f(x)  s.t.  A x <= b,  lo <= x <= hi  (the relaxed COBLA problem
has exactly this shape: E(m) and two linear budgets). The objective callback
returns value and gradient together; the constraint values are a jitted JAX
function and their Jacobian, being constant, is computed once. Every iterate's
objective and constraint slacks are recorded.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

__all__ = ["SQPResult", "solve_slsqp"]


@dataclasses.dataclass(frozen=True)
class SQPResult:
    """Outcome of one SLSQP solve.

    ``trace`` holds one dict per iterate: ``iteration``, ``objective`` and
    ``slack`` (b - A x per constraint row; negative = violated).
    """

    x: np.ndarray
    value: float
    success: bool
    status: int
    message: str
    iterations: int
    n_fun: int
    n_jac: int
    seconds: float
    trace: list[dict]


class _LatestPoint:
    """``fun_and_grad`` that remembers its latest point: SLSQP asks for it again (the
    callback, the result), and only for the latest one. ``calls`` counts the evaluations."""

    def __init__(self, fun_and_grad: Callable[[np.ndarray], tuple[float, np.ndarray]]) -> None:
        self.fun_and_grad, self.key, self.value, self.calls = fun_and_grad, None, None, 0

    def __call__(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        key = x.tobytes()
        if key != self.key:
            self.calls += 1
            self.value, self.key = self.fun_and_grad(x), key
        return self.value


def solve_slsqp(
    fun_and_grad: Callable[[np.ndarray], tuple[float, np.ndarray]],
    x0: np.ndarray,
    A: np.ndarray,
    b: np.ndarray,
    *,
    lower: float | np.ndarray = 0.0,
    upper: float | np.ndarray = 1.0,
    max_iter: int = 100,
    ftol: float = 1e-6,
    progress: Callable[[int, float], None] | None = None,
    trace: list[dict] | None = None,
) -> SQPResult:
    """Minimize ``fun_and_grad`` under ``A x <= b`` and box bounds with SLSQP.

    Rows of A and b are scaled to unit norm of b so that both budgets weigh alike
    in SLSQP's merit function (MACs and parameters differ by orders of magnitude).
    Iterates are appended to ``trace`` when given (kept if the callback raises).
    """
    A = np.atleast_2d(np.asarray(A, dtype=np.float64))
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    scale = np.where(np.abs(b) > 0, np.abs(b), 1.0)
    A_s, b_s = A / scale[:, None], b / scale
    A_j, b_j = jnp.asarray(A_s, jnp.float32), jnp.asarray(b_s, jnp.float32)
    cons_value = jax.jit(lambda x: b_j - A_j @ x.astype(jnp.float32))
    cons_jac = -A_s  # constant

    n = x0.shape[0]
    lo = np.broadcast_to(np.asarray(lower, dtype=np.float64), (n,))
    hi = np.broadcast_to(np.asarray(upper, dtype=np.float64), (n,))
    x0 = np.clip(np.asarray(x0, dtype=np.float64), lo, hi)

    evaluate = _LatestPoint(fun_and_grad)
    trace = [] if trace is None else trace

    def record(x: np.ndarray) -> None:
        value, _ = evaluate(x)
        slack = (b_s - A_s @ x) * scale
        trace.append({"iteration": len(trace), "objective": float(value), "slack": slack.tolist()})
        if progress is not None:
            progress(len(trace) - 1, float(value))

    record(x0)
    start = time.perf_counter()
    res = scipy.optimize.minimize(
        evaluate,
        x0,
        jac=True,
        method="SLSQP",
        bounds=list(zip(lo, hi)),
        constraints=[{"type": "ineq", "fun": lambda x: np.asarray(cons_value(jnp.asarray(x)), np.float64),
                      "jac": lambda x: cons_jac}],
        options={"maxiter": max_iter, "ftol": ftol},
        callback=record,
    )
    seconds = time.perf_counter() - start
    x = np.clip(res.x, lo, hi)
    return SQPResult(
        x=x,
        value=float(evaluate(x)[0]),
        success=bool(res.success),
        status=int(res.status),
        message=str(res.message),
        iterations=int(res.nit),
        n_fun=evaluate.calls,
        n_jac=int(getattr(res, "njev", evaluate.calls) or evaluate.calls),
        seconds=seconds,
        trace=trace,
    )
