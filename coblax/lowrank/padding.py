"""Zero-padding truncated factors to full rank, so that records share one compiled step.

Every allocation gives each layer its own rank, so each record's factored network
has its own shapes and its fine-tuning step and evaluation are compiled anew
(``compare_squeezenet_digits``: 14 of 14 records compiled their own step, about
two thirds of their fine-tuning time). Padding every factored layer to its full
rank R with zero columns of the first factor and zero rows of the second gives all
records of one (model, scheme) the same shapes whenever they keep the same layers
factored:

    W = U_r V_r = [U_r 0] [V_r; 0]

and the padding stays zero in training: the gradient of the padded columns of U
is Xᵀ (∂L/∂Y) Vpadᵀ = 0 because the padded rows of V are zero, and symmetrically,
so SGD and Adam (zero moments: zero update) never move them. The network
computes the same function with more work per step; :func:`pad_to_full_rank`
pads only when that extra work is small (short fine-tunings, small layers), where
one compile costs more than the extra steps (measured with
``benchmarks/bench_compiles.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from coblax.lowrank.decompose import Factors

__all__ = ["MAX_EXTRA_WORK", "full_rank_of", "pad_factors", "pad_to_full_rank"]

#: Pad only when the extra multiply-adds of fine-tuning stay below this many weight-uses:
#: (padded - unpadded factor weights) x training examples seen. A compile of a step costs
#: seconds; 1e9 extra weight-uses cost about a second on one CPU core. Measured on
#: compare_squeezenet_digits (1,437 images, one epoch): padding every record halved the
#: fine-tuning step compiles (14 -> 7 per 14 records) and was the fastest variant.
MAX_EXTRA_WORK = 1e9


def full_rank_of(f: Factors) -> int:
    """The full rank of the layer ``f`` factors, from its kernels' shapes.

    dense: min(in, out); zhang: min(X·Y·C, N); tai: min(X·C, Y·N).
    """
    first, second = np.shape(f.first), np.shape(f.second)
    return int(min(np.prod(first[:-1]), np.prod(second[:-2]) * second[-1]))


def pad_factors(f: Factors, rank: int) -> Factors:
    """``f`` with zero triplets appended up to ``rank`` (first: last axis, second: axis -2)."""
    r = int(np.shape(f.first)[-1])
    if rank <= r:
        return f
    first, second, sigma = np.asarray(f.first), np.asarray(f.second), np.asarray(f.sigma)
    first = np.concatenate([first, np.zeros(first.shape[:-1] + (rank - r,), first.dtype)], axis=-1)
    shape = list(second.shape)
    shape[-2] = rank - r
    second = np.concatenate([second, np.zeros(shape, second.dtype)], axis=-2)
    sigma = np.concatenate([sigma, np.zeros(rank - r, sigma.dtype)])
    return dataclasses.replace(f, first=jnp.asarray(first), second=jnp.asarray(second), sigma=jnp.asarray(sigma))


def pad_to_full_rank(kept: Mapping[str, Factors], examples_seen: float = 0.0,
                     max_extra_work: float = MAX_EXTRA_WORK) -> dict[str, Factors]:
    """Every layer of ``kept`` padded to its full rank, when the extra work is small.

    Args:
      kept: the truncated factors of one record.
      examples_seen: training examples its fine-tuning sees (examples x epochs).
      max_extra_work: pad only if (padded - unpadded weights) x ``examples_seen`` is
        at most this (:data:`MAX_EXTRA_WORK`); else ``kept`` is returned unchanged and
        its shapes compile their own step, which is then cheaper than the extra steps.
    """
    def size(f: Factors, rank: int) -> int:
        first, second = np.shape(f.first), np.shape(f.second)
        return rank * int(np.prod(first[:-1]) + np.prod(second[:-2]) * second[-1])

    extra = sum(size(f, full_rank_of(f)) - size(f, int(np.shape(f.first)[-1])) for f in kept.values())
    if not kept or extra * float(examples_seen) > max_extra_work:
        return dict(kept)
    return {n: pad_factors(f, full_rank_of(f)) for n, f in kept.items()}
