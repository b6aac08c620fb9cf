"""EfficientNet-b0..b7 encoders, as SMP 0.6.0's ``efficientnet-bN`` (lukemelas' efficientnet_pytorch).

Same module tree and names as the PyTorch encoder (``_conv_stem``, ``_bn0``, ``_blocks_<i>`` with
``_expand_conv``/``_bn0``/``_depthwise_conv``/``_bn1``/``_se_reduce``/``_se_expand``/``_project_conv``/``_bn2``),
swish activations, BatchNorm eps 1e-3 momentum 0.01, squeeze-excitation, drop-connect in training at
``0.2 * block_index / n_blocks``. Like the PyTorch code, the TF-"same" padding of every convolution is
*static*: computed once for the variant's nominal image size (224 for b0 ... 600 for b7), not for the input,
so odd-sized stages pad symmetrically. Feature taps and ``out_channels`` are SMP's.
"""

from __future__ import annotations

import functools
import math
from typing import Any, List, NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from severjax.models.layers import BatchNorm2d, Conv2d, drop_connect, same_padding
from severjax.ops import swish

Dtype = Any

# (width, depth, nominal resolution) per variant: efficientnet_pytorch's efficientnet_params.
VARIANTS = {
    "efficientnet-b0": (1.0, 1.0, 224),
    "efficientnet-b1": (1.0, 1.1, 240),
    "efficientnet-b2": (1.1, 1.2, 260),
    "efficientnet-b3": (1.2, 1.4, 300),
    "efficientnet-b4": (1.4, 1.8, 380),
    "efficientnet-b5": (1.6, 2.2, 456),
    "efficientnet-b6": (1.8, 2.6, 528),
    "efficientnet-b7": (2.0, 3.1, 600),
}

# SMP 0.6.0's encoder table: indices of the blocks whose outputs are the stride 4, 8, 16, 32 features.
OUT_INDEXES = {
    "efficientnet-b0": (2, 4, 8, 15),
    "efficientnet-b1": (4, 7, 15, 22),
    "efficientnet-b2": (4, 7, 15, 22),
    "efficientnet-b3": (4, 7, 17, 25),
    "efficientnet-b4": (5, 9, 21, 31),
    "efficientnet-b5": (7, 12, 26, 38),
    "efficientnet-b6": (8, 14, 30, 44),
    "efficientnet-b7": (10, 17, 37, 54),
}

# The b0 stages: (repeats, kernel, stride, expand ratio, in filters, out filters, se ratio).
_BASE_STAGES = (
    (1, 3, 1, 1, 32, 16, 0.25),
    (2, 3, 2, 6, 16, 24, 0.25),
    (2, 5, 2, 6, 24, 40, 0.25),
    (3, 3, 2, 6, 40, 80, 0.25),
    (3, 5, 1, 6, 80, 112, 0.25),
    (4, 5, 2, 6, 112, 192, 0.25),
    (1, 3, 1, 6, 192, 320, 0.25),
)
BN_MOMENTUM = 0.01  # torch semantics (TF's 0.99)
BN_EPS = 1e-3
DROP_CONNECT_RATE = 0.2


class BlockSpec(NamedTuple):
    """One MBConv block, fully resolved for a variant (static padding included)."""

    in_filters: int
    out_filters: int
    expand_ratio: int
    kernel: int
    stride: int
    se_filters: int
    padding: Tuple[Tuple[int, int], Tuple[int, int]]
    drop_connect: float


def efficientnet_out_channels(variant: str, in_channels: int = 3) -> Tuple[int, ...]:
    """SMP's ``encoder.out_channels`` for an EfficientNet variant (the input's channels first)."""
    blocks, stem_filters, _ = block_specs(variant)
    idx = OUT_INDEXES[variant]
    return (in_channels, stem_filters) + tuple(blocks[i].out_filters for i in idx)


def block_specs(variant: str, drop_connect_rate: float = DROP_CONNECT_RATE):
    """Returns ``(blocks, stem_filters, stem_padding)`` for a variant, as efficientnet_pytorch builds them."""
    if variant not in VARIANTS:
        raise KeyError(f"unknown EfficientNet variant {variant!r}; known: {sorted(VARIANTS)}")
    width, depth, resolution = VARIANTS[variant]
    size = (resolution, resolution)
    stem_padding = same_padding(size, 3, 2)
    size = _ceil_div(size, 2)
    raw = []
    for repeats, kernel, stride, expand, fin, fout, se in _BASE_STAGES:
        fin, fout = _round_filters(fin, width), _round_filters(fout, width)
        for r in range(int(math.ceil(depth * repeats))):
            s = stride if r == 0 else 1
            raw.append((fin if r == 0 else fout, fout, expand, kernel, s, max(1, int(fin * se)) if r == 0 else max(1, int(fout * se)), same_padding(size, kernel, s)))
            size = _ceil_div(size, s)
    n = len(raw)
    blocks = [BlockSpec(*b, drop_connect=drop_connect_rate * i / n) for i, b in enumerate(raw)]
    return blocks, _round_filters(32, width), stem_padding


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck with squeeze-excitation (efficientnet_pytorch's ``MBConvBlock``)."""

    spec: BlockSpec
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs: jax.Array, train: bool) -> jax.Array:
        s = self.spec
        bn = functools.partial(BatchNorm2d, momentum=BN_MOMENTUM, eps=BN_EPS, dtype=self.dtype)
        expanded = s.in_filters * s.expand_ratio
        x = inputs
        if s.expand_ratio != 1:
            x = Conv2d(expanded, 1, use_bias=False, dtype=self.dtype, name="_expand_conv")(x)
            x = swish(bn(name="_bn0")(x, train))
        x = Conv2d(expanded, s.kernel, s.stride, s.padding, groups=expanded, use_bias=False, dtype=self.dtype,
                   name="_depthwise_conv")(x)
        x = swish(bn(name="_bn1")(x, train))
        squeezed = jnp.mean(x, axis=(1, 2), keepdims=True, dtype=jnp.float32).astype(self.dtype)
        squeezed = Conv2d(s.se_filters, 1, dtype=self.dtype, name="_se_reduce")(squeezed)
        squeezed = Conv2d(expanded, 1, dtype=self.dtype, name="_se_expand")(swish(squeezed))
        x = nn.sigmoid(squeezed) * x
        x = Conv2d(s.out_filters, 1, use_bias=False, dtype=self.dtype, name="_project_conv")(x)
        x = bn(name="_bn2")(x, train)
        if s.stride == 1 and s.in_filters == s.out_filters:
            if train and s.drop_connect > 0:
                x = drop_connect(x, s.drop_connect, self.make_rng("dropout"))
            x = x + inputs
        return x


class EfficientNetEncoder(nn.Module):
    """SMP's EfficientNet encoder: 6 features (input, strides 2..32); the interface is in :mod:`severjax.models.base`."""

    variant: str
    in_channels: int = 3
    dtype: Dtype = jnp.float32
    drop_connect_rate: float = DROP_CONNECT_RATE

    # SMP keeps efficientnet_pytorch's unused classifier stem in the encoder; ImageNet files add ``_fc``.
    torch_ignored = ("_conv_head.", "_bn1.", "_fc.")

    @property
    def out_channels(self) -> Tuple[int, ...]:
        return efficientnet_out_channels(self.variant, self.in_channels)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> List[jax.Array]:
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"{self.variant}: expected {self.in_channels} input channels, got shape {x.shape}")
        blocks, stem_filters, stem_padding = block_specs(self.variant, self.drop_connect_rate)
        out_indexes = OUT_INDEXES[self.variant]
        features = [x]
        y = Conv2d(stem_filters, 3, 2, stem_padding, use_bias=False, dtype=self.dtype, name="_conv_stem")(x)
        y = swish(BatchNorm2d(BN_MOMENTUM, BN_EPS, self.dtype, name="_bn0")(y, train))
        features.append(y)
        for i, spec in enumerate(blocks[: out_indexes[-1] + 1]):
            y = MBConvBlock(spec, self.dtype, name=f"_blocks_{i}")(y, train)
            if i in out_indexes:
                features.append(y)
        return features


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    if not width:
        return filters
    f = filters * width
    new = max(divisor, int(f + divisor / 2) // divisor * divisor)
    if new < 0.9 * f:
        new += divisor
    return int(new)


def _ceil_div(size, stride):
    return (int(math.ceil(size[0] / stride)), int(math.ceil(size[1] / stride)))
