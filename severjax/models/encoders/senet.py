"""SE-ResNeXt encoders (se_resnext50_32x4d, se_resnext101_32x4d) as segmentation_models_pytorch 0.6.0 builds them.

Submodule names mirror SMP's PyTorch tree (``layer0.conv1``, ``layer1.0.se_module.fc1``,
``layer2.0.downsample.0`` ...) with ``.<i>`` written ``_<i>``, so a PyTorch state dict maps onto these
variables by name rules alone (see ``severjax.models.convert``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from severjax.models.layers import BatchNorm2d, Conv2d
from severjax.ops import max_pool_ceil

# SMP 0.6.0 settings shared by every SE-ResNeXt (senet.py `senet_encoders`).
_GROUPS = 32
_BASE_WIDTH = 4
_REDUCTION = 16
_STEM_WIDTH = 64
_EXPANSION = 4


class SENetEncoder(nn.Module):
    """SE-ResNeXt feature extractor returning SMP's six features ``[x, /2, /4, /8, /16, /32]`` (NHWC).

    ``layers`` is the number of bottlenecks per stage ((3, 4, 6, 3) for 50, (3, 4, 23, 3) for 101).
    """

    # ImageNet head of pretrainedmodels/SMP-hub files; SMP's encoder deletes it, the converter drops it.
    torch_ignored: ClassVar[tuple[str, ...]] = ("last_linear.",)

    in_channels: int = 3
    layers: Sequence[int] = (3, 4, 6, 3)
    groups: int = _GROUPS
    base_width: int = _BASE_WIDTH
    reduction: int = _REDUCTION
    dtype: Any = jnp.float32

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Channels of the six features, as SMP's ``encoder.out_channels`` gives them."""
        return (self.in_channels, _STEM_WIDTH) + tuple(64 * 2**i * _EXPANSION for i in range(4))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"SENetEncoder expects NHWC input with {self.in_channels} channels, got shape {x.shape}")
        features = [x]
        x = _Stem(_STEM_WIDTH, dtype=self.dtype, name="layer0")(x.astype(self.dtype), train)
        features.append(x)
        x = max_pool_ceil(x, 3, 2)  # layer0.pool: Caffe-style ceil_mode
        for stage, blocks in enumerate(self.layers):
            planes = 64 * 2**stage
            for i in range(blocks):
                x = SEResNeXtBottleneck(
                    planes=planes,
                    groups=self.groups,
                    base_width=self.base_width,
                    reduction=self.reduction,
                    stride=2 if (stage > 0 and i == 0) else 1,
                    downsample=(i == 0),
                    dtype=self.dtype,
                    name=f"layer{stage + 1}_{i}",
                )(x, train)
            features.append(x)
        return features


class SEResNeXtBottleneck(nn.Module):
    """ResNeXt bottleneck (type C: stride on the grouped 3x3) with a squeeze-and-excitation gate."""

    planes: int
    groups: int = _GROUPS
    base_width: int = _BASE_WIDTH
    reduction: int = _REDUCTION
    stride: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        width = math.floor(self.planes * self.base_width / 64) * self.groups
        out_ch = self.planes * _EXPANSION
        bn = functools.partial(_batch_norm, train=train, dtype=self.dtype)
        conv = functools.partial(_conv, dtype=self.dtype)

        y = nn.relu(bn(name="bn1")(conv(width, 1, name="conv1")(x)))
        y = conv(width, 3, stride=self.stride, padding=1, groups=self.groups, name="conv2")(y, train)
        y = nn.relu(bn(name="bn2")(y))
        y = bn(name="bn3")(conv(out_ch, 1, name="conv3")(y))
        if self.downsample:
            # a strided 1x1 conv is a subsample then a matmul, so it runs as one (ops.pointwise_conv): as a strided
            # convolution its kernel gradient makes transposed copies of the activations on XLA:CPU
            # (docs/performance.md, "Pointwise convolutions")
            residual = conv(out_ch, 1, name="downsample_0")(x[:, ::self.stride, ::self.stride])
            residual = bn(name="downsample_1")(residual)
        else:
            residual = x
        y = SEModule(out_ch, self.reduction, dtype=self.dtype, name="se_module")(y)
        return nn.relu(y + residual)


class SEModule(nn.Module):
    """Squeeze-and-excitation: channel gate ``sigmoid(fc2(relu(fc1(mean_hw(x)))))`` times ``x``."""

    channels: int
    reduction: int = _REDUCTION
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = _conv(self.channels // self.reduction, 1, bias=True, dtype=self.dtype, name="fc1")(s)
        s = _conv(self.channels, 1, bias=True, dtype=self.dtype, name="fc2")(nn.relu(s))
        return x * nn.sigmoid(s)


class _Stem(nn.Module):
    """layer0 without its pool (SMP moves the pool out so the /2 feature is taken before it)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _conv(self.features, 7, stride=2, padding=3, dtype=self.dtype, name="conv1")(x)
        return nn.relu(_batch_norm(train=train, dtype=self.dtype, name="bn1")(x))


# ----------------------------------------------------------------------------------------------------
# helpers


def _conv(features: int, kernel: int, *, stride: int = 1, padding: int = 0, groups: int = 1,
          bias: bool = False, dtype: Any = jnp.float32, name: str | None = None) -> nn.Module:
    """A PyTorch Conv2d (symmetric padding), float32 params, compute in ``dtype``."""
    return Conv2d(features, kernel, stride=stride, padding=padding, groups=groups, use_bias=bias,
                  dtype=dtype, name=name)


def _batch_norm(*, train: bool, dtype: Any = jnp.float32, name: str | None = None) -> Callable:
    """BatchNorm2d with PyTorch defaults (momentum 0.1, eps 1e-5), bound to the train flag."""
    return functools.partial(BatchNorm2d(momentum=0.1, eps=1e-5, dtype=dtype, name=name), train=train)
