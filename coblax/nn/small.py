"""Small architectures of the seed (section 6) and their costs counted by formula.

* Fire module (Iandola et al. 2016): squeeze 1×1 to s₁ₓ₁ channels, expand to
  e₁ₓ₁ 1×1 and e₃ₓ₃ 3×3 filters, concatenated. The design space of the paper:
  expand width E = e₁ₓ₁ + e₃ₓ₃, squeeze ratio SR = s₁ₓ₁ / E, 3×3 fraction
  pct₃ₓ₃ = e₃ₓ₃ / E (:func:`fire_dims`). The module itself is
  :class:`coblax.nn.models.Fire`.
* Depthwise-separable convolution (MobileNet; the seed's "Why depthwise separable
  convolution is so efficient"): a K×K depthwise conv (one filter per input
  channel) then a 1×1 pointwise conv to N channels.
* Flattened convolution (Jin, Dundar & Culurciello 2014): every C×Y×X filter is
  the rank-1 product α ⊗ β ⊗ γ, computed as a C×1×1 (1×1 across channels) conv
  to N channels, then a 1×Y×1 vertical and a 1×1×X horizontal depthwise conv:
  parameters O(XYC) → O(X + Y + C), operations O(mnCXY) → O(mn(C + X + Y)) per filter.

Costs (per example; MACs = multiply-accumulates; ``SAME`` padding, stride 1 so the
output is H×W; biases are parameters but no MACs, pooling and activations are free,
as in coblax's cost model):

| layer | MACs | parameters |
|---|---|---|
| conv K×K, C → N | H·W·K²·C·N | K²·C·N + N |
| depthwise separable | H·W·K²·C + H·W·C·N | K²·C + C + C·N + N |
| flattened | H·W·N·(C + Y + X) | N·(C + Y + X) + N |
| Fire | H·W·(C·s + s·e₁ + 9·s·e₃) | C·s + s + s·e₁ + e₁ + 9·s·e₃ + e₃ |

The seed's example (8×8×3 → 8×8×256, 5×5): standard 1,228,800 MACs, depthwise
separable 4,800 + 49,152 = 53,952 (the slide prints 3,800 for the depthwise part;
8·8·25·3 = 4,800).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from coblax.nn.depthwise import depthwise_conv
from coblax.nn.models import Fire, max_pool_2x2

__all__ = [
    "Cost",
    "conv_cost",
    "dense_cost",
    "depthwise_separable_cost",
    "flattened_cost",
    "fire_cost",
    "fire_dims",
    "DepthwiseSeparable",
    "FlattenedConv",
    "FireNet",
    "BlockNet",
    "BLOCKS",
    "fire_net_cost",
    "block_net_cost",
]

BLOCKS = ("standard", "depthwise", "flattened")


@dataclasses.dataclass(frozen=True)
class Cost:
    """MACs per example and parameters (weights + biases) of a layer or network."""

    macs: int
    params: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.macs + other.macs, self.params + other.params)


def conv_cost(h: int, w: int, kh: int, kw: int, c_in: int, c_out: int, groups: int = 1,
              bias: bool = True) -> Cost:
    """A conv with output h×w: MACs h·w·kh·kw·(C/g)·N, parameters kh·kw·(C/g)·N (+ N)."""
    if c_in % groups or c_out % groups:
        raise ValueError(f"groups={groups} must divide c_in={c_in} and c_out={c_out}")
    k = kh * kw * (c_in // groups) * c_out
    return Cost(h * w * k, k + (c_out if bias else 0))


def dense_cost(n_in: int, n_out: int) -> Cost:
    """A dense layer: n_in·n_out MACs and n_in·n_out + n_out parameters."""
    return Cost(n_in * n_out, n_in * n_out + n_out)


def depthwise_separable_cost(h: int, w: int, c_in: int, c_out: int, k: int, bias: bool = True) -> Cost:
    """K×K depthwise (C filters) then 1×1 pointwise C → N, output h×w."""
    return conv_cost(h, w, k, k, c_in, c_in, groups=c_in, bias=bias) + conv_cost(
        h, w, 1, 1, c_in, c_out, bias=bias)


def flattened_cost(h: int, w: int, c_in: int, c_out: int, ky: int, kx: int) -> Cost:
    """C×1×1 conv to N, 1×Y×1 and 1×1×X depthwise convs; one bias vector at the end."""
    return (conv_cost(h, w, 1, 1, c_in, c_out, bias=False)
            + conv_cost(h, w, ky, 1, c_out, c_out, groups=c_out, bias=False)
            + conv_cost(h, w, 1, kx, c_out, c_out, groups=c_out, bias=True))


def fire_cost(h: int, w: int, c_in: int, s1x1: int, e1x1: int, e3x3: int) -> Cost:
    """Fire module on an h×w×C input (all three convs keep h×w)."""
    return (conv_cost(h, w, 1, 1, c_in, s1x1) + conv_cost(h, w, 1, 1, s1x1, e1x1)
            + conv_cost(h, w, 3, 3, s1x1, e3x3))


def fire_dims(expand: int, squeeze_ratio: float, pct3x3: float) -> tuple[int, int, int]:
    """(s₁ₓ₁, e₁ₓ₁, e₃ₓ₃) of a Fire module with expand width E (Iandola et al., Sec. 5).

    s₁ₓ₁ = round(SR·E) ≥ 1, e₃ₓ₃ = round(pct₃ₓ₃·E) clipped to [1, E − 1] (both
    expand branches present), e₁ₓ₁ = E − e₃ₓ₃. SR must be < 1 (s₁ₓ₁ < e₁ₓ₁ + e₃ₓ₃).
    """
    if expand < 2:
        raise ValueError(f"expand must be >= 2, got {expand}")
    if not 0.0 < squeeze_ratio < 1.0:
        raise ValueError(f"squeeze_ratio must be in (0, 1), got {squeeze_ratio}")
    if not 0.0 <= pct3x3 <= 1.0:
        raise ValueError(f"pct3x3 must be in [0, 1], got {pct3x3}")
    s = min(max(1, round(squeeze_ratio * expand)), expand - 1)
    e3 = min(max(1, round(pct3x3 * expand)), expand - 1)
    return s, expand - e3, e3


class DepthwiseSeparable(nn.Module):
    """K×K depthwise conv (``depthwise``) then 1×1 pointwise conv (``pointwise``), SAME."""

    features: int
    kernel: int = 3

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        x = nn.Conv(c, (self.kernel, self.kernel), padding="SAME", feature_group_count=c,
                    conv_general_dilated=depthwise_conv, name="depthwise")(x)
        return nn.Conv(self.features, (1, 1), name="pointwise")(x)


class FlattenedConv(nn.Module):
    """Flattened convolution: C×1×1 (``lateral``), 1×Y×1 (``vertical``), 1×1×X (``horizontal``).

    Output filter f is α_f ⊗ β_f ⊗ γ_f (rank 1); SAME padding, one bias at the end.
    """

    features: int
    kernel: tuple[int, int] = (3, 3)  # (Y, X)

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        ky, kx = self.kernel
        n = self.features
        x = nn.Conv(n, (1, 1), use_bias=False, name="lateral")(x)
        x = nn.Conv(n, (ky, 1), padding="SAME", feature_group_count=n, use_bias=False,
                    conv_general_dilated=depthwise_conv, name="vertical")(x)
        return nn.Conv(n, (1, kx), padding="SAME", feature_group_count=n, conv_general_dilated=depthwise_conv,
                       name="horizontal")(x)


def _pool_shape(h: int, w: int) -> tuple[int, int]:
    """Spatial size after ``models.max_pool_2x2`` (2×2 max-pool while both sides are >= 2)."""
    return (h // 2, w // 2) if h >= 2 and w >= 2 else (h, w)


class FireNet(nn.Module):
    """A small SqueezeNet for 8×8 and 28×28 inputs, sized by the Fire design space.

    conv1 3×3 (``stem`` channels; stride 2 on inputs ≥ 28), fire2, fire3, max-pool,
    fire4 (expand widths E, E, 2E with :func:`fire_dims`), conv10 1×1 to the classes,
    global average pooling.
    """

    num_classes: int = 10
    stem: int = 32
    expand: int = 32
    squeeze_ratio: float = 0.125
    pct3x3: float = 0.5

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        stride = 2 if x.shape[1] >= 28 else 1
        x = nn.relu(nn.Conv(self.stem, (3, 3), strides=stride, padding="SAME", name="conv1")(x))
        for i, e in enumerate((self.expand, self.expand, 2 * self.expand)):
            x = Fire(*fire_dims(e, self.squeeze_ratio, self.pct3x3), name=f"fire{i + 2}")(x)
            if i == 1:
                x = max_pool_2x2(x)
        x = nn.Conv(self.num_classes, (1, 1), name="conv10")(x)
        return jnp.mean(x, axis=(1, 2))


class BlockNet(nn.Module):
    """A stem conv then one block per entry of ``channels``, each followed by a max-pool.

    ``block``: ``"standard"`` K×K conv, ``"depthwise"`` :class:`DepthwiseSeparable`,
    ``"flattened"`` :class:`FlattenedConv`; the stem (3×3 conv, stride 2 on inputs
    ≥ 28) and the dense classifier are the same for all three, so the comparison
    isolates the block.
    """

    num_classes: int = 10
    block: str = "standard"
    stem: int = 16
    channels: Sequence[int] = (32, 64)
    kernel: int = 3

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.block not in BLOCKS:
            raise ValueError(f"unknown block {self.block!r}; valid: {', '.join(BLOCKS)}")
        stride = 2 if x.shape[1] >= 28 else 1
        x = nn.relu(nn.Conv(self.stem, (3, 3), strides=stride, padding="SAME", name="stem")(x))
        k = self.kernel
        for i, ch in enumerate(self.channels):
            name = f"block{i + 1}"
            if self.block == "standard":
                x = nn.Conv(ch, (k, k), padding="SAME", name=name)(x)
            elif self.block == "depthwise":
                x = DepthwiseSeparable(ch, k, name=name)(x)
            else:
                x = FlattenedConv(ch, (k, k), name=name)(x)
            x = max_pool_2x2(nn.relu(x))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes, name="fc")(x)


def _stem_shape(h: int, w: int) -> tuple[int, int, int]:
    stride = 2 if h >= 28 else 1
    return -(-h // stride), -(-w // stride), stride


def fire_net_cost(net: FireNet, input_shape: Sequence[int]) -> Cost:
    """MACs and parameters of a :class:`FireNet` on one (H, W, C) input, by formula."""
    h, w, c = input_shape
    h, w, _ = _stem_shape(h, w)
    total = conv_cost(h, w, 3, 3, c, net.stem)
    c = net.stem
    for i, e in enumerate((net.expand, net.expand, 2 * net.expand)):
        s, e1, e3 = fire_dims(e, net.squeeze_ratio, net.pct3x3)
        total += fire_cost(h, w, c, s, e1, e3)
        c = e1 + e3
        if i == 1:
            h, w = _pool_shape(h, w)
    return total + conv_cost(h, w, 1, 1, c, net.num_classes)


def block_net_cost(net: BlockNet, input_shape: Sequence[int]) -> Cost:
    """MACs and parameters of a :class:`BlockNet` on one (H, W, C) input, by formula."""
    h, w, c = input_shape
    h, w, _ = _stem_shape(h, w)
    total = conv_cost(h, w, 3, 3, c, net.stem)
    c, k = net.stem, net.kernel
    for ch in net.channels:
        if net.block == "standard":
            total += conv_cost(h, w, k, k, c, ch)
        elif net.block == "depthwise":
            total += depthwise_separable_cost(h, w, c, ch, k)
        else:
            total += flattened_cost(h, w, c, ch, k, k)
        c = ch
        h, w = _pool_shape(h, w)
    return total + dense_cost(h * w * c, net.num_classes)
