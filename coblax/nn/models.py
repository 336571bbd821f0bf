"""Flax (linen) models: LeNet-300-100, LeNet-5, a small CNN, a small VGG, SqueezeNet,
and a BatchNorm zoo for 32x32 inputs: ResNet-20, a MobileNet-v1 and VGG-16-BN.

The BatchNorm models take ``train`` (``model.apply(v, x, train=True,
mutable=["batch_stats"], rngs={"dropout": key})`` while training; ``train=False``,
the default, uses the running statistics and turns dropout off).

Every layer that carries a weight matrix is an ``nn.Dense`` or ``nn.Conv`` with an
explicit name, so the decomposition finds it by its path (``"conv1"``,
``"fire2/expand3x3"``). Any other Flax model built from ``nn.Dense`` / ``nn.Conv``
works with coblax as well; these are the bundled ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from coblax.nn.depthwise import depthwise_conv

__all__ = [
    "MLP", "LeNet5", "SmallCNN", "VGGSmall", "Fire", "SqueezeNet", "BasicBlock", "ResNet20",
    "MobileNetV1", "VGG16BN", "build_model", "MODEL_NAMES",
]


def _flatten(x: jnp.ndarray) -> jnp.ndarray:
    return x.reshape((x.shape[0], -1))


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
    """2x2 max-pool, stride 2, of an NHWC batch while both spatial sides are >= 2.

    Pool only while there is something left to pool: the same net serves 8x8 and
    32x32 inputs.
    """
    if x.shape[1] >= 2 and x.shape[2] >= 2:
        return nn.max_pool(x, (2, 2), strides=(2, 2))
    return x


__all__.append("max_pool_2x2")


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
        x = max_pool_2x2(x)
        x = nn.Conv(50, (5, 5), padding=padding, name="conv2")(x)
        x = max_pool_2x2(x)
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
                x = max_pool_2x2(x)
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
            x = max_pool_2x2(x)
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
        x = max_pool_2x2(x)
        x = Fire(16 * w, 32 * w, 32 * w, name="fire4")(x)
        x = Fire(16 * w, 32 * w, 32 * w, name="fire5")(x)
        x = nn.Conv(self.num_classes, (1, 1), name="conv10")(x)
        return jnp.mean(x, axis=(1, 2))


def _bn(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def option_a_shortcut(x: jnp.ndarray, features: int, strides: int) -> jnp.ndarray:
    """He et al.'s parameter-free shortcut (option A, CIFAR): identity, or ``x`` subsampled
    by ``strides`` with its channels zero-padded (evenly on both sides) to ``features``."""
    if strides == 1 and x.shape[-1] == features:
        return x
    extra = features - x.shape[-1]
    return jnp.pad(x[:, ::strides, ::strides, :], ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


__all__.append("option_a_shortcut")


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, ReLU.

    The shortcut is He et al.'s option A for CIFAR (parameter-free): identity, or
    when the block halves the resolution, a stride-2 subsampling with the new
    channels zero-padded.
    """

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        h = nn.Conv(self.features, (3, 3), self.strides, padding=1, use_bias=False, name="conv1")(x)
        h = nn.relu(_bn(train, "bn1")(h))
        h = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, name="conv2")(h)
        h = _bn(train, "bn2")(h)
        short = option_a_shortcut(x, self.features, self.strides)
        return nn.relu(h + short)


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016, §4.2): 3x3 conv 16, 3 stages x 3 basic blocks
    (16, 32, 64 channels, stride 2 at stages 2 and 3), global average pool, dense.

    ``depth = 6n + 2`` with ``blocks = n``; 0.27 M parameters, 40.55 M MACs at 32x32.
    """

    num_classes: int = 10
    blocks: int = 3
    widths: Sequence[int] = (16, 32, 64)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = nn.Conv(self.widths[0], (3, 3), padding=1, use_bias=False, name="conv1")(x)
        x = nn.relu(_bn(train, "bn1")(x))
        for s, width in enumerate(self.widths):
            for b in range(self.blocks):
                strides = 2 if s > 0 and b == 0 else 1
                x = BasicBlock(width, strides, name=f"stage{s + 1}_block{b + 1}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)


#: MobileNet-v1 depthwise-separable blocks (pointwise width, depthwise stride) for 32x32 inputs.
MOBILENET_V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


class MobileNetV1(nn.Module):
    """MobileNet-v1 (Howard et al. 2017) for 32x32 inputs: conv3x3 32 (stride 1),
    13 depthwise-separable blocks (depthwise 3x3 - BN - ReLU - pointwise 1x1 - BN -
    ReLU), global average pool, dense. ``width`` is the width multiplier α.

    Only the first conv, the pointwise convs and the dense layer are decomposable;
    the depthwise convs are grouped (a fixed cost).
    """

    num_classes: int = 10
    width: float = 1.0
    blocks: Sequence[tuple[int, int]] = MOBILENET_V1_BLOCKS

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        def w(c: int) -> int:
            return max(8, int(c * self.width))

        x = nn.Conv(w(32), (3, 3), padding=1, use_bias=False, name="conv1")(x)
        x = nn.relu(_bn(train, "bn1")(x))
        for i, (out, stride) in enumerate(self.blocks):
            c = x.shape[-1]
            x = nn.Conv(c, (3, 3), stride, padding=1, feature_group_count=c, use_bias=False,
                        conv_general_dilated=depthwise_conv, name=f"block{i + 1}_dw")(x)
            x = nn.relu(_bn(train, f"block{i + 1}_dw_bn")(x))
            x = nn.Conv(w(out), (1, 1), use_bias=False, name=f"block{i + 1}_pw")(x)
            x = nn.relu(_bn(train, f"block{i + 1}_pw_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)


#: VGG-16 configuration: conv widths, "M" for a 2x2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class VGG16BN(nn.Module):
    """VGG-16 with BatchNorm for 32x32 inputs: 13 conv3x3-BN-ReLU (no conv bias: BN
    has one), five max-pools (to 1x1x512), dense 512 - ReLU - dropout - dense.
    ``width`` multiplies every conv's channels (1.0 is VGG-16).
    """

    num_classes: int = 10
    dense: int = 512
    dropout: float = 0.5
    width: float = 1.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        i = 0
        for v in VGG16_CFG:
            if v == "M":
                x = max_pool_2x2(x)
                continue
            i += 1
            x = nn.Conv(max(1, int(int(v) * self.width)), (3, 3), padding=1, use_bias=False, name=f"conv{i}")(x)
            x = nn.relu(_bn(train, f"bn{i}")(x))
        x = _flatten(x)
        x = nn.relu(nn.Dense(self.dense, name="fc1")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="fc2")(x)


def training_options(model: nn.Module, variables: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``model.apply`` kwargs, :func:`coblax.nn.train.fit` kwargs) to train ``model``.

    A model whose ``__call__`` takes ``train`` is called with ``train=True``; every
    collection other than ``params`` (and ``factors``) is mutable state and the
    ``dropout`` stream gets keys. A model without ``train`` needs nothing.
    """
    if "train" not in inspect.signature(type(model).__call__).parameters:
        return {}, {}
    state = tuple(k for k in variables if k not in ("params", "factors"))
    return {"train": True}, {"mutable": state, "rng_streams": ("dropout",)}


__all__.append("training_options")


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "lenet_300_100": lambda **kw: MLP(hidden=(300, 100), **kw),
    "lenet5": LeNet5,
    "small_cnn": SmallCNN,
    "vgg_small": VGGSmall,
    "squeezenet": SqueezeNet,
    "resnet20": ResNet20,
    "mobilenet_v1": MobileNetV1,
    "vgg16_bn": VGG16BN,
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
