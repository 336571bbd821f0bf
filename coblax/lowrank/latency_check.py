"""The end-to-end latency check of a latency budget: measure the allocated network, and
re-allocate under a corrected budget when it runs slower than the budget.

The per-layer tables predict the network's time as T_rest + Σ_i t_i(r_i)
(:class:`~coblax.lowrank.latency.NetworkLatency`), with T_rest taken by difference and
the tables' savings calibrated on two probe networks. On small networks the
prediction still misses by a few points of the original's time (LeNet-5 at batch 64:
predicted 0.494, measured 0.557 of the original): layers timed alone and inside the
network fuse differently. Such a miss is close to an offset that does not depend on
the ranks, so the check asks the allocator again for a network predicted faster by
the measured excess,

    λ_{k+1} = p_k − γ (ρ_k − λ),     γ = 1.1 (a slight over-correction, for noise),

where p_k and ρ_k are the predicted and the measured ratio T(r_k) / T_net,O of the
k-th allocation (both networks timed in one round-robin group:
:func:`~coblax.lowrank.latency_measure.time_calls`). It starts from the prediction,
not from the budget λ_k, because an allocation need not use its whole budget (ranks
are integers). It re-allocates at most ``checks`` times. The first allocation measured within the
budget is kept (it has the largest corrected budget, so the most capacity); when none
is, the one that measured fastest is, and the report says so (``met = False``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from coblax.lowrank.allocation import Allocation, AllocationProblem
from coblax.lowrank.latency import NetworkLatency
from coblax.lowrank.latency_measure import TimingOptions, time_calls

__all__ = ["GAIN", "measure_ratio", "network_measure", "check_latency", "corrected_fraction"]

#: γ: the correction's gain on the measured miss.
GAIN = 1.1


def measure_ratio(original: tuple[Callable, Any], candidate: tuple[Callable, Any], x: jax.Array,
                  options: TimingOptions | None = None) -> float:
    """T(candidate) / T(original): both ``(apply_fn, variables)`` jitted and timed on
    ``x`` in one round-robin group (median of warm samples)."""
    options = options or TimingOptions()
    fns = []
    for apply_fn, variables in (original, candidate):
        jitted = jax.jit(apply_fn)
        fns.append(lambda f=jitted, v=variables: f(v, x))
    t_orig, t_cand = time_calls(fns, repeats=options.repeats, warmup=options.warmup,
                                min_sample_s=options.min_sample_s)
    return t_cand / t_orig


def corrected_fraction(predicted: float, measured: float, target: float, floor: float) -> float:
    """λ_{k+1} = max(floor, p_k − γ (ρ_k − λ))."""
    return max(floor, predicted - GAIN * (measured - target))


def _floor_fraction(problem: AllocationProblem, timing: NetworkLatency) -> float:
    """The smallest latency fraction the tables can reach (every layer at min_rank, or
    original where that is faster), as :func:`~coblax.lowrank.costs.with_latency` states it."""
    return timing.ratio(problem.layers, {l.name: min(problem.min_rank, l.full_rank) for l in problem.layers})


def network_measure(original: tuple[Callable, Any], factored: Callable[[Mapping[str, int]], tuple[Callable, Any]],
                    example_shape: Sequence[int], batch: int, *, dtype: Any = jnp.float32,
                    options: TimingOptions | None = None) -> Callable[[Mapping[str, int]], float]:
    """``measure(ranks)``: the measured ratio of ``factored(ranks)`` to ``original``
    (both ``(apply_fn, variables)``) at ``batch`` inputs shaped ``example_shape``."""
    x = jax.random.normal(jax.random.PRNGKey(3), (batch, *example_shape), dtype)
    return lambda ranks: measure_ratio(original, factored(ranks), x, options)


def check_latency(
    allocation: Allocation,
    problem: AllocationProblem,
    run: Callable[[AllocationProblem], Allocation],
    timing: NetworkLatency,
    target: float,
    measure: Callable[[Mapping[str, int]], float],
    *,
    checks: int = 2,
) -> Allocation:
    """``allocation`` measured end to end, re-allocated (``run``) under corrected latency
    budgets while it measures slower than ``target`` (at most ``checks`` times).

    Args:
      allocation, problem: the first allocation and the problem it solved (its
        ``latency_max`` is ``timing.budget(target)``).
      run: problem -> allocation (the allocator, with its loss oracle attached).
      timing: the latency model the problem's tables come from.
      target: the latency budget λ, a fraction of the original network's time.
      measure: ranks -> measured latency ratio of the network at those ranks
        (:func:`network_measure`).

    Returns the kept allocation with ``stats["latency"]`` extended by ``end_to_end``
    (every attempt's budget fraction, predicted and measured ratio),
    ``measured_ratio``, ``budget_fraction_used`` and ``met``.
    """
    floor = _floor_fraction(problem, timing)
    used, attempts, current = float(target), [], allocation
    while True:
        ratio = float(measure(current.ranks))
        predicted = timing.ratio(problem.layers, current.ranks)
        attempts.append({"fraction": used, "predicted": predicted, "measured": ratio, "allocation": current})
        if ratio <= target or len(attempts) > checks:
            break
        nxt = corrected_fraction(predicted, ratio, target, floor)
        if nxt >= predicted - 1e-9:  # at the tables' floor: nothing faster to ask for
            break
        used = nxt
        current = run(dataclasses.replace(problem, latency_max=timing.budget(used)))
    met = [a for a in attempts if a["measured"] <= target]
    kept = met[0] if met else min(attempts, key=lambda a: a["measured"])
    report = {
        "end_to_end": [{k: v for k, v in a.items() if k != "allocation"} for a in attempts],
        "measured_ratio": kept["measured"],
        "budget_fraction_used": kept["fraction"],
        "met": bool(met),
    }
    chosen = kept["allocation"]
    latency_stats = {**chosen.stats.get("latency", {}), **report}
    return dataclasses.replace(chosen, stats={**chosen.stats, "latency": latency_stats})
