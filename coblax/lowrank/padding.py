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
from typing import Any

import jax
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


# -- one layout per (model, scheme): layers kept in their original form as exact full-rank factors


def exact_factors(kernel: np.ndarray, like: Factors) -> tuple[Factors, str]:
    """``kernel`` as full-rank factors with ``like``'s layout, exactly; and which factor is the identity.

    The matricized kernel W (rows x cols, :func:`~coblax.lowrank.decompose.matricize`)
    is I·W when rows <= cols and W·I otherwise: R = min(rows, cols) is the layer's full
    rank, so the factors have the shapes of ``like`` padded to full rank. The identity
    factor passes its input through exactly (each output is one input times 1 plus
    zeros), so the network computes the original layer's products; only the order of
    the sums may differ from the original convolution's.

    Returns:
      (factors, ``"first"`` or ``"second"``: the identity, to be kept frozen).
    """
    from coblax.lowrank.decompose import arrange, layer_like, matricize

    w = matricize(np.asarray(kernel), like.kind, like.scheme)
    rows, cols = w.shape
    layer = layer_like(like, np.shape(kernel))
    dt = np.asarray(kernel).dtype
    if rows <= cols:
        return arrange(np.eye(rows, dtype=dt), np.ones(rows, dt), w, layer, like.scheme, dt), "first"
    return arrange(w, np.ones(cols, dt), np.eye(cols, dtype=dt), layer, like.scheme, dt), "second"


@dataclasses.dataclass(frozen=True)
class FrozenFactorsApply:
    """An apply function that keeps the factors flagged in the ``frozen`` collection fixed.

    ``variables["frozen"][name][k]`` (k = ``"first"`` / ``"second"``) is a float
    scalar; where it is 1 the factor passes through ``stop_gradient``, so its
    gradient is exactly zero and Adam / SGD / momentum never move it (zero moments:
    zero update); the flags get zero gradients too. A value (hashable) like
    :class:`~coblax.lowrank.decompose.FactoredApply`: records with one layout share
    one compiled step whatever they freeze.
    """

    inner: Any

    def __call__(self, variables, x, **kwargs):
        frozen = variables["frozen"]
        factors = {
            n: {k: jnp.where(frozen[n][k] > 0.5, jax.lax.stop_gradient(v), v) for k, v in f.items()}
            for n, f in variables["factors"].items()
        }
        rest = {k: v for k, v in variables.items() if k not in ("factors", "frozen")}
        mutable = kwargs.get("mutable")
        if not mutable or isinstance(mutable, bool):
            return self.inner({**rest, "factors": factors}, x, **kwargs)
        # a training call whose state collections include the flags (a model with BatchNorm):
        # the model never sees them; they come back unchanged with the updated state
        kwargs["mutable"] = [m for m in mutable if m != "frozen"]
        logits, updated = self.inner({**rest, "factors": factors}, x, **kwargs)
        return logits, {**updated, "frozen": frozen}


@dataclasses.dataclass(frozen=True)
class FinetuneLayout:
    """The factored network a record fine-tunes: its factors and which of them stay fixed.

    ``frozen`` is None when no layer is frozen (the network is ``factors`` as they are).
    """

    factors: dict
    frozen: dict | None = None

    def variables(self, params: Any) -> dict:
        """The variables to fine-tune (``factored_variables`` plus the ``frozen`` flags)."""
        from coblax.lowrank.factored import factored_variables

        variables = factored_variables(params, self.factors)
        if self.frozen is not None:
            variables["frozen"] = {n: {k: jnp.float32(v) for k, v in f.items()} for n, f in self.frozen.items()}
        return variables

    def apply_fn(self, model: Any, **bound: Any):
        """The apply function of these variables (``apply_fn_for`` with the frozen factors kept fixed)."""
        from coblax.lowrank.decompose import apply_fn_for

        inner = apply_fn_for(model, self.factors, **bound)
        return inner if self.frozen is None else FrozenFactorsApply(inner)


def finetune_layout(kept: Mapping[str, Factors], full: Mapping[str, Factors], params: Any,
                    examples_seen: float = 0.0, max_extra_work: float = MAX_EXTRA_WORK) -> FinetuneLayout:
    """One layout for every record of a (model, scheme), when its extra work is small.

    Records differ in their ranks and in which layers they keep in the original form
    (an allocation at full rank), so padding alone still left several layouts per
    scheme (``compare_squeezenet_digits``: 7 fine-tuning steps compiled for 14
    records). Here every layer of ``full`` is factored at full rank: the layers of
    ``kept`` zero-padded (:func:`pad_factors`), the others as their exact factors
    (:func:`exact_factors`) with the identity factor frozen, so that fine-tuning
    trains the original kernel (the gradient of W·I with I fixed is the gradient of
    W). Every record of the (model, scheme) then has the same shapes, and one compiled
    fine-tuning step and evaluation serve them all.

    Falls back to :func:`pad_to_full_rank` (same rule, ``kept`` alone) when the
    extra work of the shared layout, (its weights - the record's own) x
    ``examples_seen``, is above ``max_extra_work``.

    Args:
      kept: the record's truncated factors (layers left out are kept original).
      full: the full factors of every decomposable layer (their layouts).
      params: the base variables (the original kernels).
    """
    def weights(f: Factors, rank: int) -> int:
        first, second = np.shape(f.first), np.shape(f.second)
        return rank * int(np.prod(first[:-1]) + np.prod(second[:-2]) * second[-1])

    from coblax.lowrank.decompose import get_kernel, slice_count

    if any(slice_count(f.scheme) for f in list(kept.values()) + list(full.values())):
        return FinetuneLayout(dict(kept))  # ALDS's sliced layers (k matrices each): no padded layout
    missing = [n for n in full if n not in kept]
    extra = sum(weights(f, full_rank_of(f)) - weights(f, int(np.shape(f.first)[-1])) for f in kept.values())
    extra += sum(weights(full[n], full_rank_of(full[n])) - int(np.size(get_kernel(params, n))) for n in missing)
    if not full or extra * float(examples_seen) > max_extra_work:  # (no layer original: frozen flags all 0)
        return FinetuneLayout(pad_to_full_rank(kept, examples_seen, max_extra_work))
    factors, frozen = {}, {}
    for n, like in full.items():  # the order of full: one tree structure for every record
        if n in kept:
            factors[n] = pad_factors(kept[n], full_rank_of(kept[n]))
            frozen[n] = {"first": 0.0, "second": 0.0}
        else:
            factors[n], identity = exact_factors(get_kernel(params, n), like)
            frozen[n] = {"first": float(identity == "first"), "second": float(identity == "second")}
    return FinetuneLayout(factors, frozen)


__all__ += ["FinetuneLayout", "FrozenFactorsApply", "exact_factors", "finetune_layout"]
