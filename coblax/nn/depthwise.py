"""Depthwise convolution as shifted multiply-adds, for ``nn.Conv(conv_general_dilated=...)``.

XLA:CPU lowers a grouped convolution with one channel per group to a slow generic
loop: on MobileNet-v1 (width 0.5, 28×28 inputs, batch 128) the 13 depthwise convs took
1.39 s of a 1.81 s training step, against 0.21 s for the same convs written as
kh·kw shifted slices of the padded input, each multiplied by one kernel tap
(``benchmarks/bench_depthwise.py``). The network, its parameters and their
initialization are unchanged: the zoo's layers stay ``nn.Conv`` with
``feature_group_count = C`` and pass :func:`depthwise_conv` as flax's
``conv_general_dilated`` hook, which takes the fast path only for a true depthwise
convolution on CPU (GPUs and TPUs have tuned depthwise kernels) and defers every
other call to ``lax.conv_general_dilated`` unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["depthwise_conv", "is_depthwise"]

_NHWC = ("NHWC", "HWIO", "NHWC")


def _ones(v: Sequence[int] | None, n: int) -> bool:
    return v is None or tuple(v) == (1,) * n


def is_depthwise(lhs_shape: Sequence[int], rhs_shape: Sequence[int], feature_group_count: int,
                 dimension_numbers: Any) -> bool:
    """True for a 2-D NHWC convolution with one input and one output channel per group."""
    if len(lhs_shape) != 4 or len(rhs_shape) != 4:
        return False
    c = lhs_shape[-1]
    if not (feature_group_count == c and rhs_shape[2] == 1 and rhs_shape[3] == c):
        return False
    return dimension_numbers == lax.conv_dimension_numbers(tuple(lhs_shape), tuple(rhs_shape), _NHWC)


def depthwise_conv(lhs: jnp.ndarray, rhs: jnp.ndarray, window_strides: Sequence[int], padding: Any,
                   lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                   dimension_numbers: Any = None, feature_group_count: int = 1, precision: Any = None,
                   **kwargs: Any) -> jnp.ndarray:
    """``lax.conv_general_dilated`` with a fast path for depthwise 2-D convolutions on CPU.

    The fast path computes y[n, i, j, c] = Σ_{a,b} x_pad[n, s_h·i + a, s_w·j + b, c] · k[a, b, 0, c]
    (cross-correlation, as lax), with x_pad padded as ``padding`` says (``"SAME"``,
    ``"VALID"`` or explicit (lo, hi) pairs). Everything else (dilations, grouped
    convolutions with several channels per group, other layouts, other backends)
    is ``lax.conv_general_dilated(...)`` itself.
    """
    fast = (not kwargs and jax.default_backend() == "cpu" and _ones(lhs_dilation, 2) and _ones(rhs_dilation, 2)
            and is_depthwise(lhs.shape, rhs.shape, feature_group_count, dimension_numbers))
    if fast:
        kh, kw = rhs.shape[:2]
        pads = (lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), window_strides, padding)
                if isinstance(padding, str) else [tuple(p) for p in padding])
        fast = (all(lo >= 0 and hi >= 0 for lo, hi in pads)
                and lhs.shape[1] + sum(pads[0]) >= kh and lhs.shape[2] + sum(pads[1]) >= kw)
    if not fast:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count, precision=precision, **kwargs)
    sh, sw = window_strides
    x = jnp.pad(lhs, ((0, 0), pads[0], pads[1], (0, 0)))
    ho = (x.shape[1] - kh) // sh + 1
    wo = (x.shape[2] - kw) // sw + 1
    dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    out = jnp.zeros((lhs.shape[0], ho, wo, lhs.shape[-1]), dtype)
    for a in range(kh):
        for b in range(kw):
            tap = x[:, a:a + sh * (ho - 1) + 1:sh, b:b + sw * (wo - 1) + 1:sw, :]
            out = out + tap * rhs[a, b, 0]
    return out
