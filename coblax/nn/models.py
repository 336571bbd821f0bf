"""Flax (linen) models: LeNet-300-100, LeNet-5, a small CNN, a small VGG, SqueezeNet.

Every layer that carries a weight matrix is an ``nn.Dense`` or ``nn.Conv`` with an
explicit name, so the decomposition finds it by its path (``"conv1"``,
``"fire2/expand3x3"``). Any other Flax model built from ``nn.Dense`` / ``nn.Conv``
works with coblax as well; these are the bundled ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["MLP", "LeNet5", "SmallCNN", "VGGSmall", "Fire", "SqueezeNet", "build_model", "MODEL_NAMES"]


def _flatten(x: jnp.ndarray) -> jnp.ndarray:
    return x.reshape((x.shape[0], -1))


def _pool(x: jnp.ndarray) -> jnp.ndarray:
    # Pool only while there is something left to pool: the same net serves 8x8 and 32x32 inputs.
    if x.shape[1] >= 2 and x.shape[2] >= 2:
        return nn.max_pool(x, (2, 2), strides=(2, 2))
    return x


class MLP(nn.Module):
    """Fully connected ReLU net; ``hidden=(300, 100)`` is LeNet-300-100 (fc1..fc3)."""

    num_classes: int = 10
    hidden: Sequence[int] = (300, 100)

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = _flatten(x)
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"fc{i + 1}")(x))
        return nn.Dense(self.num_classes, name=f"fc{len(self.hidden) + 1}")(x)


class LeNet5(nn.Module):
    """Caffe's LeNet-5 (20-50-500): conv5x5(20) pool conv5x5(50) pool fc500 relu fc.

    As in Caffe there is no non-linearity after the convolutions. Inputs smaller
    than 16x16 (the bundled 8x8 digits) use SAME padding so the net still fits.
    """

    num_classes: int = 10
    padding: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        padding = self.padding or ("VALID" if x.shape[1] >= 16 else "SAME")
        x = nn.Conv(20, (5, 5), padding=padding, name="conv1")(x)
        x = _pool(x)
        x = nn.Conv(50, (5, 5), padding=padding, name="conv2")(x)
        x = _pool(x)
        x = nn.relu(nn.Dense(500, name="fc1")(_flatten(x)))
        return nn.Dense(self.num_classes, name="fc2")(x)


class SmallCNN(nn.Module):
    """Three 3x3 conv layers (16-32-64) and two dense layers (128, classes)."""

    num_classes: int = 10
    channels: Sequence[int] = (16, 32, 64)
    dense: int = 128

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for i, ch in enumerate(self.channels):
            x = nn.relu(nn.Conv(ch, (3, 3), padding="SAME", name=f"conv{i + 1}")(x))
            if i > 0:
                x = _pool(x)
        x = nn.relu(nn.Dense(self.dense, name="fc1")(_flatten(x)))
        return nn.Dense(self.num_classes, name="fc2")(x)


class VGGSmall(nn.Module):
    """VGG-style stack: ``stages`` of two 3x3 convs each, max-pool after each stage."""

    num_classes: int = 10
    stages: Sequence[int] = (32, 64, 128)
    dense: int = 256

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for s, ch in enumerate(self.stages):
            for j in range(2):
                x = nn.relu(nn.Conv(ch, (3, 3), padding="SAME", name=f"conv{s + 1}_{j + 1}")(x))
            x = _pool(x)
        x = nn.relu(nn.Dense(self.dense, name="fc1")(_flatten(x)))
        return nn.Dense(self.num_classes, name="fc2")(x)


class Fire(nn.Module):
    """SqueezeNet Fire module: squeeze 1x1 (s1x1) -> expand 1x1 (e1x1) ++ 3x3 (e3x3).

    Iandola et al. 2016 keep s1x1 < e1x1 + e3x3 so the 3x3 filters see few channels.
    """

    s1x1: int
    e1x1: int
    e3x3: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.s1x1 >= self.e1x1 + self.e3x3:
            raise ValueError(
                f"Fire: s1x1={self.s1x1} must be < e1x1 + e3x3 = {self.e1x1 + self.e3x3}"
            )
        s = nn.relu(nn.Conv(self.s1x1, (1, 1), name="squeeze1x1")(x))
        e1 = nn.relu(nn.Conv(self.e1x1, (1, 1), name="expand1x1")(s))
        e3 = nn.relu(nn.Conv(self.e3x3, (3, 3), padding="SAME", name="expand3x3")(s))
        return jnp.concatenate([e1, e3], axis=-1)


class SqueezeNet(nn.Module):
    """A SqueezeNet of Fire modules sized for 8x8, 28x28 and 32x32 inputs.

    conv1 3x3 (stride 2 on inputs >= 28), fire2..fire5 with a max-pool after fire3,
    dropout-free, conv10 1x1 to the classes, global average pooling (as the paper,
    no dense classifier). Pooling is late, per the paper's strategy 3.
    """

    num_classes: int = 10
    width: int = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        w = self.width
        stride = 2 if x.shape[1] >= 28 else 1
        x = nn.relu(nn.Conv(32 * w, (3, 3), strides=stride, padding="SAME", name="conv1")(x))
        x = Fire(8 * w, 16 * w, 16 * w, name="fire2")(x)
        x = Fire(8 * w, 16 * w, 16 * w, name="fire3")(x)
        x = _pool(x)
        x = Fire(16 * w, 32 * w, 32 * w, name="fire4")(x)
        x = Fire(16 * w, 32 * w, 32 * w, name="fire5")(x)
        x = nn.Conv(self.num_classes, (1, 1), name="conv10")(x)
        return jnp.mean(x, axis=(1, 2))


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "lenet_300_100": lambda **kw: MLP(hidden=(300, 100), **kw),
    "lenet5": LeNet5,
    "small_cnn": SmallCNN,
    "vgg_small": VGGSmall,
    "squeezenet": SqueezeNet,
}
MODEL_NAMES: tuple[str, ...] = tuple(sorted(_BUILDERS))


def build_model(name: str, *, num_classes: int, input_shape: Sequence[int] = (), **options: Any) -> nn.Module:
    """Build a bundled model by name.

    Args:
      name: one of :data:`MODEL_NAMES`.
      num_classes: output width.
      input_shape: (H, W, C) of one example; kept for interface symmetry (the
        models adapt to it at trace time).
      **options: the model's own fields (``hidden`` for mlp, ``channels``...).
    """
    del input_shape
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
    for key, value in options.items():
        if isinstance(value, list):
            options[key] = tuple(value)
    try:
        return _BUILDERS[name](num_classes=num_classes, **options)
    except TypeError as err:
        raise ValueError(f"bad option for model {name!r}: {err}") from None
