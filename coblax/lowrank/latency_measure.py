"""Measuring latency tables with ``jax.jit`` on the current device, cached on disk.

One timing procedure serves the per-layer tables and the end-to-end network times
(:func:`time_calls`): every function is compiled and warmed up (two calls), each
sample runs the function n times back to back (n chosen so a sample lasts at least
``min_sample_s``: a layer of a few microseconds is not timed at the resolution of
the clock and of one dispatch) and divides by n, the functions of one table are
sampled round-robin (a load change of a shared machine hits all of them alike),
and each function's time is the median of ``repeats`` samples.

Per decomposable layer (:func:`measure_layer`): the original layer (kernel + bias,
the layer's own strides and padding; every call of a shared layer) and the
factored layer (:func:`coblax.lowrank.decompose.apply_factors` + bias) at a grid of
ranks 1 = r_1 < ... < r_G = r_cap, with r_cap the smallest of the full rank and the
MAC/parameter saturation rank (above it the layer is original whatever its latency),
all on a batch of ``batch`` random inputs. Times depend on shapes, not on values:
the kernels are random. A table is cached as JSON under
``$COBLAX_CACHE/latency`` (default ``~/.cache/coblax/latency``, the project's cache
folder) keyed by device kind, the layer's geometry, scheme, dtype, batch, grid and
the jax version.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from coblax.lowrank.allocation import LayerCost
from coblax.lowrank.decompose import Factors, TracedLayer, apply_factors
from coblax.lowrank.latency import LatencyCurve, NetworkLatency
from coblax.util.errors import CoblaxError

__all__ = [
    "CALIBRATION",
    "savings_scale",
    "LatencyError",
    "TimingOptions",
    "default_latency_cache",
    "rank_grid",
    "time_calls",
    "measure_layer",
    "measure_network",
    "check_can_time",
]

_DN = ("NHWC", "HWIO", "NHWC")


class LatencyError(CoblaxError, ValueError):
    """A latency budget that cannot be measured here (jit disabled, a failed timing...)."""


def default_latency_cache() -> Path:
    """``$COBLAX_CACHE/latency`` or ``~/.cache/coblax/latency`` (the project's cache folder)."""
    return Path(os.environ.get("COBLAX_CACHE", Path.home() / ".cache" / "coblax")) / "latency"


class TimingOptions:
    """How tables are timed: ``repeats`` samples per function (median), each at least
    ``min_sample_s`` long, ``warmup`` calls first, ``grid`` rank points per table."""

    def __init__(self, repeats: int = 15, warmup: int = 2, min_sample_s: float = 2e-3, grid: int = 8):
        if repeats < 1 or warmup < 1 or grid < 2 or not min_sample_s > 0:
            raise ValueError("timing: repeats >= 1, warmup >= 1, grid >= 2 and min_sample_s > 0 are required")
        self.repeats, self.warmup, self.min_sample_s, self.grid = int(repeats), int(warmup), float(min_sample_s), int(grid)


def check_can_time(what: str = "latency") -> None:
    """Raise :class:`LatencyError` naming ``what`` when compiled code cannot be timed here."""
    if jax.config.jax_disable_jit:
        raise LatencyError(f"{what}: a latency budget needs latency tables measured with jax.jit, but jit is "
                           "disabled here (jax.disable_jit / JAX_DISABLE_JIT); use the mac/param budgets or "
                           "enable jit")


def time_calls(fns: Sequence[Callable[[], Any]], *, repeats: int = 15, warmup: int = 2,
               min_sample_s: float = 2e-3) -> list[float]:
    """Median seconds per call of each no-argument function (see the module docstring).

    Raises:
      LatencyError: jit disabled, or a time that is not finite and positive.
    """
    check_can_time()
    for fn in fns:
        for _ in range(warmup):
            jax.block_until_ready(fn())
    inner = []
    for fn in fns:  # calls per sample, from one more warm call
        start = time.perf_counter()
        jax.block_until_ready(fn())
        once = time.perf_counter() - start
        inner.append(int(min(1000, max(1, math.ceil(min_sample_s / max(once, 1e-7))))))
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            out = None
            for _ in range(inner[i]):
                out = fn()
            jax.block_until_ready(out)
            samples[i].append((time.perf_counter() - start) / inner[i])
    times = [statistics.median(s) for s in samples]
    if not all(math.isfinite(t) and t > 0 for t in times):
        raise LatencyError(f"latency: a timing came out {times}; the device cannot be timed")
    return times


def rank_grid(layer: LayerCost, points: int) -> list[int]:
    """1 = r_1 < ... < r_G = r_cap, evenly spaced (see the module docstring)."""
    cap = max(1, min(layer.full_rank, layer.saturation_rank))
    return sorted({int(round(r)) for r in np.linspace(1, cap, max(2, points))})


def _factors_at(traced: TracedLayer, scheme: str, rank: int, dtype, key) -> Factors:
    k1, k2 = jax.random.split(key)
    if traced.kind == "dense":
        n_in, n_out = traced.kernel_shape
        first, second = (n_in, rank), (rank, n_out)
    else:
        X, Y, C, N = traced.kernel_shape
        first, second = ((X, Y, C, rank), (1, 1, rank, N)) if scheme == "zhang" else ((X, 1, C, rank), (1, Y, rank, N))
    return Factors(traced.kind, scheme, jax.random.normal(k1, first, dtype), jax.random.normal(k2, second, dtype),
                   None, traced.strides, traced.pads)


def _original_fn(traced: TracedLayer, kernel, bias):
    if traced.kind == "dense":
        return lambda x: jnp.matmul(x, kernel) + bias
    return lambda x: lax.conv_general_dilated(x, kernel, traced.strides, traced.pads, dimension_numbers=_DN) + bias


def _layer_key(traced: TracedLayer, scheme: str, dtype, batch: int, grid: Sequence[int]) -> str:
    fields = {
        "device": jax.devices()[0].device_kind, "platform": jax.default_backend(), "jax": jax.__version__,
        "kind": traced.kind, "scheme": scheme if traced.kind == "conv" else "dense",
        "kernel": list(traced.kernel_shape), "calls": [[list(i), list(o)] for i, o in traced.call_shapes],
        "strides": list(traced.strides), "pads": [list(p) for p in traced.pads], "dtype": str(np.dtype(dtype)),
        "batch": int(batch), "grid": list(grid),
    }
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def measure_layer(traced: TracedLayer, layer: LayerCost, scheme: str, *, batch: int, dtype=jnp.float32,
                  options: TimingOptions | None = None, cache: Path | None = None) -> LatencyCurve:
    """The latency table of one layer (original and factored at :func:`rank_grid`), cached."""
    options = options or TimingOptions()
    grid = rank_grid(layer, options.grid)
    path = None
    if cache is not None:
        path = Path(cache) / f"{_layer_key(traced, scheme, dtype, batch, grid)}.json"
        try:
            data = json.loads(path.read_text())
            return LatencyCurve(tuple(data["ranks"]), tuple(data["times"]), float(data["original"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # absent or unreadable: measure
    check_can_time()
    key = jax.random.PRNGKey(0)
    kernel = jax.random.normal(key, traced.kernel_shape, dtype)
    bias = jnp.zeros((traced.kernel_shape[-1],), dtype)
    fns = []
    for in_shape, _ in traced.call_shapes:  # a shared layer costs every call
        x = jax.random.normal(jax.random.PRNGKey(1), (batch, *in_shape), dtype)
        calls = [jax.jit(_original_fn(traced, kernel, bias))]
        for r in grid:
            f = _factors_at(traced, scheme, r, dtype, jax.random.PRNGKey(r))
            calls.append(jax.jit(lambda x, f=f: apply_factors(f, x, None) + bias))
        fns.append([(lambda c=c, x=x: c(x)) for c in calls])
    per_call = [time_calls(group, repeats=options.repeats, warmup=options.warmup,
                           min_sample_s=options.min_sample_s) for group in fns]
    times = np.sum(np.asarray(per_call), axis=0)
    curve = LatencyCurve(tuple(grid), tuple(float(t) for t in times[1:]), float(times[0]))
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"ranks": grid, "times": list(curve.times), "original": curve.original,
                                       "layer": traced.name, "batch": batch}))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs a re-measurement
    return curve


def measure_network(apply_fn: Callable[[Any, Any], Any], variables: Any, example_shape: Sequence[int],
                    traced: Mapping[str, TracedLayer], layers: Sequence[LayerCost], schemes: Mapping[str, str], *,
                    batch: int, dtype=jnp.float32, options: TimingOptions | None = None,
                    cache: Path | bool | None = True,
                    factored: Callable[[dict[str, int]], tuple[Callable, Any]] | None = None) -> NetworkLatency:
    """The latency model of a network: one table per layer in ``layers`` and the end-to-end time.

    In-network calibration (when ``factored`` is given): a layer timed alone need not
    save inside the network what it saves alone (XLA fuses a layer with its neighbours
    differently, and two calls cost another pass over memory), so the tables' savings
    are scaled by one factor c measured in the network itself: the networks with every
    layer at ``CALIBRATION`` fractions of its factored range (a layer whose table is
    no faster there stays original) are timed in the same round-robin group as the
    original, their measured savings S_m = T_net,O − T(r) regressed on the predicted
    S_p = Σ_i (T_i,O − t_i(r_i)) through the origin, c = Σ S_m S_p / Σ S_p², clipped
    to [0.2, 2]; every table becomes t'_i(r) = T_i,O − c (T_i,O − t_i(r)) (floored at
    0; still non-decreasing). c = 1 (no calibration) without ``factored`` or when the
    predicted savings are below 2 % of the network.

    Args:
      apply_fn: ``apply_fn(variables, x)`` of the original network in eval mode (jitted here).
      example_shape: one input's shape, without the batch axis.
      traced, layers, schemes: the decomposed layers' traces, cost vectors and schemes.
      batch: the batch size every time is measured at.
      cache: a folder, True (:func:`default_latency_cache`) or None/False (always measure).
      factored: ``factored(ranks) -> (apply_fn, variables)`` of the network factored at
        ``ranks`` (a rank >= full rank: original form), for the calibration.
    """
    check_can_time()
    options = options or TimingOptions()
    folder = default_latency_cache() if cache is True else (Path(cache) if cache else None)
    curves = {l.name: measure_layer(traced[l.name], l, schemes[l.name], batch=batch, dtype=dtype,
                                    options=options, cache=folder) for l in layers}
    # One round-robin group times the network and every layer's original form together, so
    # T_net,O and the T_i,O (hence T_rest) come from the same minutes of a machine whose load
    # drifts; each table keeps its own factored/original ratios (timed together in its group).
    x = jax.random.normal(jax.random.PRNGKey(2), (batch, *example_shape), dtype)
    fn = jax.jit(apply_fn)
    group = [lambda: fn(variables, x)]
    for l in layers:
        group += _original_calls(traced[l.name], batch, dtype)
    probes = [] if factored is None else [_probe_ranks(curves, layers, rho) for rho in CALIBRATION]
    for ranks in probes:
        p_fn, p_vars = factored(ranks)
        p_jit = jax.jit(p_fn)
        group.append(lambda p_jit=p_jit, p_vars=p_vars: p_jit(p_vars, x))
    times = time_calls(group, repeats=options.repeats, warmup=options.warmup, min_sample_s=options.min_sample_s)
    total, pos = times[0], 1
    for l in layers:
        n = len(traced[l.name].call_shapes)
        original = float(sum(times[pos:pos + n]))
        pos += n
        c = curves[l.name]
        scale = original / c.original if c.original > 0 else 1.0
        curves[l.name] = LatencyCurve(c.ranks, tuple(t * scale for t in c.times), original)
    measured = [total - t for t in times[pos:]]
    predicted = [sum(curves[l.name].original - curves[l.name].at(r[l.name]) for l in layers
                     if r[l.name] < l.full_rank) for r in probes]
    c = savings_scale(predicted, measured, total)
    if c != 1.0:
        curves = {n: LatencyCurve(k.ranks, tuple(max(0.0, k.original - c * (k.original - t)) for t in k.times),
                                  k.original) for n, k in curves.items()}
    return NetworkLatency(curves, float(total), int(batch), jax.devices()[0].device_kind, scale=c,
                          probes=tuple(zip(predicted, measured)))


#: Fractions of each layer's factored range at which the network is timed to calibrate the tables.
CALIBRATION = (0.25, 0.6)


def _probe_ranks(curves: Mapping[str, LatencyCurve], layers: Sequence[LayerCost], rho: float) -> dict[str, int]:
    """Every layer at ``rho`` of its factored range 1..min(R, saturation) − 1, or original
    (full rank) where its table is no faster there."""
    out = {}
    for l in layers:
        top = max(1, min(l.full_rank, l.saturation_rank) - 1)
        r = max(1, int(round(rho * top)))
        curve = curves[l.name]
        out[l.name] = r if r < l.full_rank and curve.at(r) < curve.original else l.full_rank
    return out


def savings_scale(predicted: Sequence[float], measured: Sequence[float], total: float) -> float:
    """c = Σ S_m S_p / Σ S_p² clipped to [0.2, 2]; 1 when the predicted savings are all
    below 2 % of the network's time (too small to measure a scale from)."""
    pairs = [(p, m) for p, m in zip(predicted, measured) if p > 0.02 * total]
    if not pairs:
        return 1.0
    num = sum(p * m for p, m in pairs)
    den = sum(p * p for p, _ in pairs)
    return float(min(2.0, max(0.2, num / den)))


def _original_calls(traced: TracedLayer, batch: int, dtype) -> list[Callable[[], Any]]:
    """No-argument calls of a layer's original form, one per call shape (as in :func:`measure_layer`)."""
    kernel = jax.random.normal(jax.random.PRNGKey(0), traced.kernel_shape, dtype)
    bias = jnp.zeros((traced.kernel_shape[-1],), dtype)
    fn = jax.jit(_original_fn(traced, kernel, bias))
    out = []
    for in_shape, _ in traced.call_shapes:
        x = jax.random.normal(jax.random.PRNGKey(1), (batch, *in_shape), dtype)
        out.append(lambda x=x: fn(x))
    return out


def latency_model(apply_fn: Callable[[Any, Any], Any], variables: Any, example: np.ndarray,
                  traced: Sequence[TracedLayer], layers: Sequence[LayerCost], schemes: Mapping[str, str], *,
                  batch: int, tables: NetworkLatency | None = None, options: TimingOptions | None = None,
                  cache: Path | bool | None = True, factored: Callable | None = None) -> NetworkLatency:
    """The latency model ``allocate`` uses: ``tables`` if given (checked to cover the layers),
    else :func:`measure_network` on inputs shaped like one ``example``.

    Raises:
      LatencyError: jit disabled (naming ``latency``); ValueError: ``tables`` missing a layer.
    """
    if tables is not None:
        if not isinstance(tables, NetworkLatency):
            raise ValueError(f"latency_tables must be a NetworkLatency (coblax.lowrank.latency), got "
                             f"{type(tables).__name__}")
        missing = [l.name for l in layers if l.name not in tables.curves]
        if missing:
            raise ValueError(f"latency_tables: no table for the decomposed layers {missing}")
        return tables
    check_can_time()
    by_name = {t.name: t for t in traced}
    dtype = np.asarray(example).dtype if np.issubdtype(np.asarray(example).dtype, np.floating) else np.float32
    return measure_network(apply_fn, variables, tuple(np.shape(example)[1:]), by_name, layers, schemes,
                           batch=batch, dtype=dtype, options=options, cache=cache, factored=factored)


__all__.append("latency_model")
