"""Fixed-point quantization ⟨IL, FL⟩ (Gupta et al. 2015).

Step ε = 2^-FL, range [-2^(IL-1), 2^(IL-1) - ε], round to nearest or stochastically
(unbiased), and saturate outside the range; a MAC of ⟨IL, FL⟩ operands accumulates in
⟨2 IL, 2 FL⟩ and is rounded back. Training with a quantized forward pass reuses
``coblax.nn.train.fit`` through :func:`fixed_point_apply_fn`.

Reference: Gupta, Agrawal, Gopalakrishnan & Narayanan (2015) "Deep Learning with
Limited Numerical Precision", ICML.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from coblax.compress.prune.masks import kernels, map_kernels
from coblax.compress.quantize.ste import content_key, straight_through

Params = Any
ROUNDINGS = ("nearest", "stochastic")

__all__ = [
    "ROUNDINGS",
    "validate_bits",
    "fixed_point",
    "fixed_point_mac",
    "fixed_point_apply_fn",
    "FixedPointSpec",
    "fixed_point_quantize",
]


def validate_bits(il: Any, fl: Any) -> None:
    """Check a ⟨IL, FL⟩ format: ints with il >= 1, fl >= 0, il + fl <= 32."""
    if isinstance(il, bool) or not isinstance(il, (int, np.integer)) or il < 1:
        raise ValueError(f"il (integer bits, sign included) must be an int >= 1, got {il!r}")
    if isinstance(fl, bool) or not isinstance(fl, (int, np.integer)) or fl < 0:
        raise ValueError(f"fl (fractional bits) must be an int >= 0, got {fl!r}")
    if il + fl > 32:
        raise ValueError(f"il + fl (word length) must be <= 32, got il={il}, fl={fl}")


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def _check_call(il: Any, fl: Any, rounding: str, key: Any) -> None:
    """The format, the rounding mode, and a key where stochastic rounding needs one."""
    validate_bits(il, fl)
    _check_rounding(rounding)
    if rounding == "stochastic" and key is None:
        raise ValueError("key must be a PRNG key when rounding='stochastic'")


@functools.partial(jax.jit, static_argnames=("il", "fl", "rounding"))
def _round_fixed(x: Any, il: int, fl: int, rounding: str, key: Any) -> jax.Array:
    # Work in units of ε = 2^-fl: scaling by a power of two is exact in floating
    # point, so the grid points are represented exactly (up to the word length
    # the float mantissa holds: 24 bits in float32, 53 in float64).
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    scale = 2.0**fl
    lo = -(2.0 ** (il - 1 + fl))
    hi = 2.0 ** (il - 1 + fl) - 1.0
    # Saturate first: the limits are on the grid, so rounding keeps them in range.
    u = jnp.clip(x * scale, lo, hi)
    if rounding == "nearest":
        # ⌊x⌋ if x - ⌊x⌋ < ε/2 else ⌊x⌋ + ε (ties go up).
        q = jnp.floor(u + 0.5)
    else:
        fl_u = jnp.floor(u)
        p = u - fl_u  # (x - ⌊x⌋) / ε in [0, 1)
        q = fl_u + (jax.random.uniform(key, u.shape, dtype=u.dtype) < p).astype(u.dtype)
    return (q / scale).astype(x.dtype)


def fixed_point(
    x: Any,
    il: int,
    fl: int,
    *,
    rounding: str = "nearest",
    key: jax.Array | None = None,
) -> jax.Array:
    """Round ``x`` to the fixed-point format ⟨IL, FL⟩ (Gupta et al. 2015, Sec. 3).

    ε = 2^-FL; values are first saturated to [-2^(IL-1), 2^(IL-1) - ε], then
      nearest:     ⌊x⌋ if ⌊x⌋ <= x < ⌊x⌋ + ε/2, else ⌊x⌋ + ε (ties round up);
      stochastic:  ⌊x⌋ + ε with probability (x - ⌊x⌋)/ε, else ⌊x⌋ (unbiased:
                   E[Round(x)] = x inside the range),
    where ⌊x⌋ is the largest integer multiple of ε <= x. IL counts the sign bit.

    Args:
      x: array to quantize (float).
      il, fl: integer and fractional bits (il >= 1, fl >= 0, il + fl <= 32).
      rounding: ``"nearest"`` or ``"stochastic"`` (needs ``key``).
      key: PRNG key for stochastic rounding.

    Returns:
      array of the same shape and dtype on the ⟨IL, FL⟩ grid.
    """
    _check_call(il, fl, rounding, key)
    return _round_fixed(x, int(il), int(fl), rounding, key)


def fixed_point_mac(
    a: Any,
    b: Any,
    il: int,
    fl: int,
    *,
    rounding: str = "nearest",
    key: jax.Array | None = None,
) -> jax.Array:
    """Fixed-point multiply-accumulate z = Σ_i a_i b_i of ⟨IL, FL⟩ vectors.

    Gupta et al. (2015): the operands are ⟨IL, FL⟩ numbers, their products are
    accumulated in ⟨2 IL, 2 FL⟩ (exact products, saturation at that wider range),
    and the sum is rounded back to ⟨IL, FL⟩ once with ``rounding``. ``a`` and
    ``b`` are quantized to ⟨IL, FL⟩ (nearest) first; the last axis is summed, so
    matrix arguments give a matrix product. The wide accumulator is exact as long
    as its 2 (IL + FL) bits (plus log2 of the length) fit the float mantissa.
    """
    _check_call(il, fl, rounding, key)
    return _mac(a, b, int(il), int(fl), rounding, key)


@functools.partial(jax.jit, static_argnames=("il", "fl", "rounding"))
def _mac(a: Any, b: Any, il: int, fl: int, rounding: str, key: Any) -> jax.Array:
    aq = _round_fixed(a, il, fl, "nearest", None)
    bq = _round_fixed(b, il, fl, "nearest", None)
    z = jnp.matmul(aq, bq) if jnp.ndim(bq) > 1 else jnp.sum(aq * bq, axis=-1)
    z = jnp.clip(z, -(2.0 ** (2 * il - 1)), 2.0 ** (2 * il - 1) - 2.0 ** (-2 * fl))
    return _round_fixed(z, il, fl, rounding, key)


def fixed_point_apply_fn(
    apply_fn: Callable[[Params, Any], Any],
    il: int,
    fl: int,
    rounding: str = "nearest",
    *,
    seed: int = 0,
) -> Callable[..., Any]:
    """Wrap ``apply_fn`` so that every kernel is ⟨IL, FL⟩-quantized in the forward.

    Quantized training with a full-precision copy: the forward uses
    W_q = fixed_point(W); the backward passes the gradient straight through
    (∂L/∂W := ∂L/∂W_q), so the optimizer keeps updating the float W. Use with
    ``coblax.nn.train.fit(q_apply, ...)``; deploy ``fixed_point_quantize(params)``.

    The returned ``q_apply(params, x, key=None)``: with stochastic rounding and
    no key, the key is derived from ``seed`` and a hash of the params and batch,
    so every training step draws fresh roundings, deterministically.
    """
    validate_bits(il, fl)
    _check_rounding(rounding)
    base = jax.random.key(seed)

    def q_apply(params: Params, x: Any, key: jax.Array | None = None) -> Any:
        if rounding == "stochastic" and key is None:
            key = content_key(base, params, x)
        names = {n: i for i, n in enumerate(kernels(params))}

        def q(name, w):
            k = jax.random.fold_in(key, names[name]) if key is not None else None
            return straight_through(w, _round_fixed(w, il, fl, rounding, k))

        return apply_fn(map_kernels(q, params), x)

    return q_apply


@dataclasses.dataclass(frozen=True)
class FixedPointSpec:
    """Quantize every kernel to ⟨il, fl⟩ with ``rounding``."""

    il: int
    fl: int
    rounding: str = "nearest"
    seed: int = 0


def fixed_point_quantize(params: Params, spec: FixedPointSpec) -> tuple[Params, dict[str, Any]]:
    """Stage form: ``(params, spec) -> (params with ⟨IL, FL⟩ kernels, report)``.

    The report has per-layer max |error| and saturated counts, the word length
    and the storage ratio 32 / (IL + FL) of the kernels.
    """
    validate_bits(spec.il, spec.fl)
    _check_rounding(spec.rounding)
    key = jax.random.key(spec.seed)
    names = {n: i for i, n in enumerate(kernels(params))}
    layers: dict[str, Any] = {}
    lo, hi = -(2.0 ** (spec.il - 1)), 2.0 ** (spec.il - 1) - 2.0**-spec.fl

    def q(name, w):
        wq = fixed_point(w, spec.il, spec.fl, rounding=spec.rounding,
                         key=jax.random.fold_in(key, names[name]))
        wn = np.asarray(w, dtype=np.float64)
        layers[name] = {
            "max_abs_error": float(np.max(np.abs(np.asarray(wq, np.float64) - wn), initial=0.0)),
            "saturated": int(np.sum((wn < lo) | (wn > hi))),
        }
        return wq

    out = map_kernels(q, params)
    report = {
        "method": "fixed_point",
        "il": spec.il,
        "fl": spec.fl,
        "word_length": spec.il + spec.fl,
        "compression_ratio": 32.0 / (spec.il + spec.fl),
        "layers": layers,
    }
    return out, report


