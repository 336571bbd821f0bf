"""Binary weights and activations: BinaryConnect (Courbariaux et al. 2015) and binarized
networks (Courbariaux et al. 2016).

Binary weights (and activations) in the forward/backward passes, a real-valued copy
updated by the optimizer, straight-through gradients.

References: Courbariaux, Bengio & David (2015) "BinaryConnect", NIPS; Courbariaux,
Hubara, Soudry, El-Yaniv & Bengio (2016) "Binarized Neural Networks", arXiv:1602.02830.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from coblax.compress.prune.masks import kernels, map_kernels
from coblax.compress.quantize.ste import content_key, straight_through

Params = Any
BINARY_MODES = ("det", "stoch")

__all__ = [
    "BINARY_MODES",
    "hard_sigmoid",
    "binarize",
    "binaryconnect_apply_fn",
    "clip_project",
    "glorot_lr_factor",
    "glorot_lr_scale",
    "BinaryConnectMLP",
    "binarize_params",
    "sign_ste",
    "BinaryDense",
    "BinarizedMLP",
]


def hard_sigmoid(x: Any) -> jax.Array:
    """σ(x) = clip((x + 1) / 2, 0, 1) (Courbariaux et al. 2015, Eq. 3)."""
    return jnp.clip((jnp.asarray(x) + 1.0) / 2.0, 0.0, 1.0)


def binarize(w: Any, mode: str = "det", key: jax.Array | None = None) -> jax.Array:
    """BinaryConnect binarization (Courbariaux et al. 2015, Eq. 1-2).

    det:   w_b = +1 if w >= 0 else -1;
    stoch: w_b = +1 with probability p = hard_sigmoid(w), else -1 (needs ``key``).
    """
    if mode not in BINARY_MODES:
        raise ValueError(f"mode must be one of {BINARY_MODES}, got {mode!r}")
    if mode == "stoch" and key is None:
        raise ValueError("key must be a PRNG key when mode='stoch'")
    return _binarize(jnp.asarray(w), mode, key)


@functools.partial(jax.jit, static_argnames=("mode",))
def _binarize(w: jax.Array, mode: str, key: Any) -> jax.Array:
    one = jnp.ones_like(w)
    if mode == "det":
        return jnp.where(w >= 0, one, -one)
    return jnp.where(jax.random.uniform(key, w.shape, dtype=w.dtype) < hard_sigmoid(w), one, -one)


def binaryconnect_apply_fn(
    apply_fn: Callable[[Params, Any], Any], mode: str = "det", *, seed: int = 0
) -> Callable[..., Any]:
    """Wrap ``apply_fn`` so the forward (and backward) use binarized kernels.

    BinaryConnect Algorithm 1: w_b = binarize(w) in the forward pass; the
    gradient ∂C/∂w_b is applied to the real-valued w (straight-through), and
    w is clipped to [-1, 1] after each update (:func:`clip_project` as ``fit``'s
    ``project``). Biases stay real. The returned ``q_apply(params, x, key=None,
    **kwargs)`` derives its key from ``seed`` and the current params/batch in
    "stoch" mode and passes ``kwargs`` (``train=True``, ``mutable=[...]`` of a
    BatchNorm model such as :class:`BinaryConnectMLP`) on to ``apply_fn``.
    """
    if mode not in BINARY_MODES:
        raise ValueError(f"mode must be one of {BINARY_MODES}, got {mode!r}")
    base = jax.random.key(seed)

    def q_apply(params: Params, x: Any, key: jax.Array | None = None, **kwargs: Any) -> Any:
        if mode == "stoch" and key is None:
            key = content_key(base, params, x)
        names = {n: i for i, n in enumerate(kernels(params))}

        def q(name, w):
            k = jax.random.fold_in(key, names[name]) if key is not None else None
            return straight_through(w, binarize(w, mode, k))

        return apply_fn(map_kernels(q, params), x, **kwargs)

    return q_apply


def clip_project(params: Params) -> Params:
    """Clip every kernel to [-1, 1] (BinaryConnect's clip(w) after each update)."""
    return map_kernels(lambda _, w: jnp.clip(w, -1.0, 1.0), params)


def glorot_lr_factor(shape: Sequence[int]) -> float:
    """1/H with H = sqrt(1.5 / (fan_in + fan_out)), Glorot & Bengio's uniform-init bound.

    BinaryConnect scales each layer's learning rate by 1/H ("Glorot" W_LR_scale in
    Courbariaux et al.'s code): with weights clipped to [-1, 1] instead of [-H, H], the
    steps of a wide layer's real-valued weights then match their range. A dense kernel
    (in, out) has fan_in = in, fan_out = out; a conv kernel (*window, c_in, c_out) has
    fan_in = c_in · window size, fan_out = c_out · window size.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(f"a kernel has at least 2 dimensions, got shape {shape}")
    window = math.prod(shape[:-2])
    return math.sqrt((shape[-2] + shape[-1]) * window / 1.5)


def glorot_lr_scale() -> optax.GradientTransformation:
    """Multiply every kernel's update by :func:`glorot_lr_factor` (other leaves unchanged).

    Chain it after the optimizer, ``optax.chain(optax.adam(lr), glorot_lr_scale())``:
    layer l then steps with learning rate lr / H_l (Courbariaux et al. 2015).
    Stateless; the factors come from the kernels' static shapes.
    """

    def init(params: Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates: Params, state: optax.EmptyState, params: Params | None = None) -> tuple[Params, Any]:
        del params
        return map_kernels(lambda _, u: u * glorot_lr_factor(np.shape(u)), updates), state

    return optax.GradientTransformation(init, update)


def binarize_params(params: Params, mode: str = "det", *, seed: int = 0) -> Params:
    """Replace every kernel by its binarization (deployment of a BinaryConnect net)."""
    key = jax.random.key(seed)
    names = {n: i for i, n in enumerate(kernels(params))}
    return map_kernels(
        lambda n, w: binarize(w, mode, jax.random.fold_in(key, names[n])).astype(w.dtype), params)


@jax.custom_vjp
def sign_ste(x: jax.Array) -> jax.Array:
    """Sign with the straight-through estimator through hard tanh (BNN, Sec. 1.1).

    Forward q = Sign(x) (+1 for x >= 0, -1 otherwise); backward
    g_x = g_q · 1_{|x| <= 1}, the derivative of Htanh(x) = clip(x, -1, 1).
    """
    return jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)


def _sign_fwd(x):
    return sign_ste(x), x


def _sign_bwd(x, g):
    return (jnp.where(jnp.abs(x) <= 1.0, g, jnp.zeros_like(g)),)


sign_ste.defvjp(_sign_fwd, _sign_bwd)


def _uniform_pm1(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    # U[-1, 1): BinaryConnect's clip range, so every sign starts equally likely.
    return jax.random.uniform(key, shape, dtype, -1.0, 1.0)


class BinaryDense(nn.Module):
    """Dense layer y = x · Sign(W) with a real-valued ``kernel`` (STE in backward)."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _uniform_pm1, (x.shape[-1], self.features))
        y = x @ sign_ste(kernel)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


class BinarizedMLP(nn.Module):
    """Binarized MLP (Courbariaux et al. 2016): binary weights and activations.

    x (flattened, real-valued input as in the paper) -> [BinaryDense -> LayerNorm
    -> sign_ste] per hidden width -> BinaryDense -> LayerNorm -> logits.
    LayerNorm stands in for the paper's batch norm: it needs no running
    statistics, so the model fits ``apply_fn(params, x)`` training. Layers are
    named fc1, fc2, ...; clip the kernels to [-1, 1] with :func:`clip_project`.
    """

    hidden: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            h = BinaryDense(width, name=f"fc{i + 1}")(h)
            h = nn.LayerNorm(name=f"norm{i + 1}")(h)
            h = sign_ste(h)
        n = len(self.hidden) + 1
        h = BinaryDense(self.num_classes, name=f"fc{n}")(h)
        return nn.LayerNorm(name=f"norm{n}")(h)


class BinaryConnectMLP(nn.Module):
    """BinaryConnect's batch-normalised MLP (Courbariaux et al. 2015, the MNIST net).

    x (flattened) -> [Dense -> BatchNorm -> ReLU] per hidden width -> Dense ->
    BatchNorm -> logits: batch normalisation after every layer, the output layer
    included, as in the paper. With ±1 weights a d-input unit's pre-activation has scale √d, which an
    unnormalised net cannot absorb (stochastic BinaryConnect then stays at chance).
    Dense layers carry no bias (BatchNorm's offset is the bias); kernels start
    U[-1, 1) (the paper's H = 1), so each sign is equally likely. Train the kernels
    binarized with :func:`binaryconnect_apply_fn` on ``apply(..., train=True,
    mutable=["batch_stats"])``, clipped with :func:`clip_project`, at Glorot-scaled
    learning rates (:func:`glorot_lr_scale`); evaluate with ``train=False``. Layers are
    named fc1, fc2, ... and bn1, bn2, ...
    """

    hidden: Sequence[int]
    num_classes: int
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        h = x.reshape((x.shape[0], -1))
        widths = (*self.hidden, self.num_classes)
        for i, width in enumerate(widths):
            h = nn.Dense(width, use_bias=False, kernel_init=_uniform_pm1, name=f"fc{i + 1}")(h)
            h = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, epsilon=1e-4,
                             name=f"bn{i + 1}")(h)
            if i < len(self.hidden):
                h = nn.relu(h)
        return h
