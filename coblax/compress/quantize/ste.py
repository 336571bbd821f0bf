"""Pieces shared by the quantized forward passes: the straight-through estimator and
a PRNG key drawn from the current values (for stochastic rounding inside ``fit``).

Reference: Bengio, Léonard & Courville (2013) "Estimating or Propagating Gradients
Through Stochastic Neurons", arXiv:1308.3432 (the straight-through estimator).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from coblax.compress.prune.masks import kernels

Params = Any

__all__ = ["straight_through", "content_key"]


def straight_through(w: jax.Array, q: jax.Array) -> jax.Array:
    """Forward value ``q``, gradient d/dw = identity (straight-through estimator)."""
    return w + jax.lax.stop_gradient(q - w)


def content_key(base: jax.Array, params: Params, x: Any) -> jax.Array:
    """A PRNG key that changes whenever the params or the batch change.

    ``fit``'s ``apply_fn(params, x)`` carries no key; folding a hash of the
    current values into a fixed seed gives fresh, reproducible randomness at
    every training step without extra state.
    """
    total = jnp.float32(0.0)
    for w in kernels(params).values():
        total = total + jnp.sum(jnp.asarray(w, jnp.float32))
    total = total + jnp.sum(jnp.asarray(x, jnp.float32))
    bits = jax.lax.bitcast_convert_type(jax.lax.stop_gradient(total), jnp.int32)
    return jax.random.fold_in(base, bits)

