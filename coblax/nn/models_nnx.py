"""flax.nnx twins of two zoo models: LeNet-5 and ResNet-20 (:mod:`coblax.nn.models`).

Same layers, same paths (``conv1``, ``stage2_block1/conv1``, ``fc``...), same
arithmetic as the linen versions, so the same rules select the same layers and
:func:`load_linen_variables` copies a linen model's trained variables in. nnx
layers need their input width when built, hence ``input_shape`` (H, W, C of one
example). BatchNorm and dropout follow nnx's convention: ``model.train()`` /
``model.eval()`` switch them (coblax calls ``eval()`` for E(m) and evaluation and
``train()`` for fine-tuning), so ``__call__`` takes only the input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx

from coblax.nn.models import option_a_shortcut

__all__ = ["BasicBlock", "LeNet5", "ResNet20", "load_linen_variables"]


def _pool(x: jnp.ndarray) -> jnp.ndarray:
    # as the linen zoo: pool only while there is something left to pool
    if x.shape[1] >= 2 and x.shape[2] >= 2:
        return nnx.max_pool(x, (2, 2), strides=(2, 2))
    return x


def _pooled(n: int) -> int:
    return n // 2 if n >= 2 else n


class LeNet5(nnx.Module):
    """Caffe's LeNet-5 (20-50-500), the twin of :class:`coblax.nn.models.LeNet5`:
    conv5x5(20) pool conv5x5(50) pool fc500 relu fc; SAME padding below 16x16 inputs."""

    def __init__(self, input_shape: Sequence[int], num_classes: int = 10, *, rngs: nnx.Rngs,
                 padding: str | None = None):
        h, w, c = (int(v) for v in input_shape)
        self.padding = padding or ("VALID" if h >= 16 else "SAME")
        self.conv1 = nnx.Conv(c, 20, (5, 5), padding=self.padding, rngs=rngs)
        self.conv2 = nnx.Conv(20, 50, (5, 5), padding=self.padding, rngs=rngs)
        for _ in range(2):  # conv (VALID shrinks by 4) then pool, twice
            if self.padding == "VALID":
                h, w = h - 4, w - 4
            h, w = (_pooled(h), _pooled(w)) if h >= 2 and w >= 2 else (h, w)
        self.fc1 = nnx.Linear(h * w * 50, 500, rngs=rngs)
        self.fc2 = nnx.Linear(500, num_classes, rngs=rngs)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = _pool(self.conv1(x))
        x = _pool(self.conv2(x))
        x = nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))
        return self.fc2(x)


def _bn(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)


class BasicBlock(nnx.Module):
    """ResNet basic block with He et al.'s option-A shortcut (see the linen twin)."""

    def __init__(self, in_features: int, features: int, strides: int = 1, *, rngs: nnx.Rngs):
        self.features, self.strides = features, strides
        self.conv1 = nnx.Conv(in_features, features, (3, 3), strides, padding=1, use_bias=False, rngs=rngs)
        self.bn1 = _bn(features, rngs)
        self.conv2 = nnx.Conv(features, features, (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.bn2 = _bn(features, rngs)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        short = option_a_shortcut(x, self.features, self.strides)
        return nnx.relu(h + short)


class ResNet20(nnx.Module):
    """CIFAR ResNet-20, the twin of :class:`coblax.nn.models.ResNet20`: conv 16, 3 stages
    x ``blocks`` basic blocks (``stage{s}_block{b}``), global average pool, dense ``fc``."""

    def __init__(self, input_shape: Sequence[int], num_classes: int = 10, *, rngs: nnx.Rngs,
                 blocks: int = 3, widths: Sequence[int] = (16, 32, 64)):
        c = int(input_shape[-1])
        self.conv1 = nnx.Conv(c, widths[0], (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.bn1 = _bn(widths[0], rngs)
        names, prev = [], widths[0]
        for s, width in enumerate(widths):
            for b in range(blocks):
                name = f"stage{s + 1}_block{b + 1}"
                setattr(self, name, BasicBlock(prev, width, 2 if s > 0 and b == 0 else 1, rngs=rngs))
                names.append(name)
                prev = width
        self.block_names = tuple(names)
        self.fc = nnx.Linear(prev, num_classes, rngs=rngs)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = nnx.relu(self.bn1(self.conv1(x)))
        for name in self.block_names:
            x = getattr(self, name)(x)
        return self.fc(jnp.mean(x, axis=(1, 2)))


def load_linen_variables(model: nnx.Module, variables: Mapping[str, Any]) -> nnx.Module:
    """A copy of ``model`` holding a linen twin's variables, matched by path.

    ``params`` fill ``nnx.Param`` s, ``batch_stats`` fill ``nnx.BatchStat`` s (the
    collection a linen BatchNorm keeps its running mean/var in).

    Raises:
      ValueError: an nnx variable with no linen counterpart of the same shape, by path.
    """
    copy = nnx.clone(model)
    for kind, collection in ((nnx.Param, "params"), (nnx.BatchStat, "batch_stats")):
        for path, var in nnx.to_flat_state(nnx.state(copy, kind)):
            node: Any = variables.get(collection, {})
            for part in path:
                node = node.get(str(part)) if isinstance(node, Mapping) else None
            if node is None or tuple(jnp.shape(node)) != tuple(var[...].shape):
                raise ValueError(f"{collection}/{'/'.join(map(str, path))}: no linen variable of shape "
                                 f"{tuple(var[...].shape)}")
            var[...] = jnp.asarray(node, var[...].dtype)
    return copy
