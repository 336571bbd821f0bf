"""The spectrum an allocator asks for: full factors in the weight or the whitened metric.

Most allocators rank triplets by the singular values of the weight; some are defined
on the data-aware ``whitened`` spectrum (BALF: the SVD of each kernel in the metric
of its inputs, :func:`coblax.lowrank.decompose.factorize_whitened`). An allocator
declares it with a ``spectrum`` attribute; :func:`allocator_spectrum` reads it and
:func:`whitened_factors` builds the whitened factors of any set of layers, each
with its own scheme (one Gram pass over the data per scheme).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from coblax.lowrank.decompose import (
    Factors,
    TracedLayer,
    factorize_whitened,
    get_kernel,
    input_grams,
    slice_count,
)

__all__ = ["allocator_spectrum", "whitened_factors"]


def allocator_spectrum(allocator: Any, default: str = "weight") -> str:
    """The spectrum ``allocator`` is defined on (its ``spectrum`` attribute), else ``default``."""
    return str(getattr(allocator, "spectrum", default) or default)


def whitened_factors(
    model: Any,
    variables: Any,
    layers: Sequence[TracedLayer],
    schemes: Mapping[str, str],
    x: np.ndarray,
    *,
    batch_size: int = 250,
    eps: float = 1e-6,
) -> dict[str, Factors]:
    """Whitened full factors of ``layers`` (``schemes[name]`` each) from the Gram matrices on ``x``.

    Not built for the sliced conv scheme ``alds:k`` (a ValueError names the layer).
    """
    for l in layers:
        if l.kind == "conv" and slice_count(schemes[l.name]):
            raise ValueError(f"layer {l.name}: the whitened spectrum is not built for the sliced scheme "
                             f"{schemes[l.name]!r}")
    grams: dict[str, np.ndarray] = {}
    for scheme in sorted({schemes[l.name] for l in layers}):
        group = [l for l in layers if schemes[l.name] == scheme]
        grams.update(input_grams(model, variables, group, x, scheme, batch_size=batch_size))
    return {
        l.name: factorize_whitened(get_kernel(variables, l.name), l, schemes[l.name], grams[l.name], eps)
        for l in layers
    }
