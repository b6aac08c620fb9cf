"""InceptionV4 encoder as segmentation_models_pytorch 0.6.0 builds it.

SMP rewrites the original network's paddings: every 3x3 convolution gets padding 1 and every max
pool padding 1, so each reduction halves the size exactly (ceil). Features are tapped after
``features[2, 4, 8, 14, 21]``. Submodule names mirror SMP's PyTorch tree (``features.4.branch1.2.conv``,
``features.19.branch1_1a.bn`` ...) with ``.<i>`` written ``_<i>``; see ``severjax.models.convert``.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from severjax.models.layers import BatchNorm2d, Conv2d
from severjax.ops import max_pool2d

_TAPS = (2, 4, 8, 14, 21)
_OUT_CHANNELS = (64, 192, 384, 1024, 1536)


class InceptionV4Encoder(nn.Module):
    """InceptionV4 feature extractor returning SMP's six features ``[x, /2, /4, /8, /16, /32]`` (NHWC)."""

    # ImageNet head of pretrainedmodels/SMP-hub files; SMP's encoder deletes it, the converter drops it.
    torch_ignored: ClassVar[tuple[str, ...]] = ("last_linear.",)

    in_channels: int = 3
    dtype: Any = jnp.float32

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Channels of the six features, as SMP's ``encoder.out_channels`` gives them."""
        return (self.in_channels,) + _OUT_CHANNELS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"InceptionV4Encoder expects NHWC input with {self.in_channels} channels, got shape {x.shape}")
        d = dict(dtype=self.dtype)
        blocks: list[Callable[[str], nn.Module]] = [
            lambda n: BasicConv2d(32, (3, 3), stride=2, name=n, **d),
            lambda n: BasicConv2d(32, (3, 3), name=n, **d),
            lambda n: BasicConv2d(64, (3, 3), name=n, **d),
            lambda n: Mixed3a(name=n, **d),
            lambda n: Mixed4a(name=n, **d),
            lambda n: Mixed5a(name=n, **d),
            *[lambda n: InceptionA(name=n, **d)] * 4,
            lambda n: ReductionA(name=n, **d),
            *[lambda n: InceptionB(name=n, **d)] * 7,
            lambda n: ReductionB(name=n, **d),
            *[lambda n: InceptionC(name=n, **d)] * 3,
        ]
        features = [x]
        x = x.astype(self.dtype)
        for i, make in enumerate(blocks):
            x = make(f"features_{i}")(x, train)
            if i in _TAPS:
                features.append(x)
        return features


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU; a 3x3 kernel gets padding 1, as SMP patches it."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        pad = tuple(k // 2 for k in self.kernel)  # 1x7 -> (0, 3); 3x3 -> (1, 1); 1x1 -> (0, 0)
        x = Conv2d(self.features, self.kernel, stride=self.stride, padding=pad, use_bias=False,
                   dtype=self.dtype, name="conv")(x)
        x = BatchNorm2d(momentum=0.1, eps=1e-3, dtype=self.dtype, name="bn")(x, train)
        return nn.relu(x)


class Mixed3a(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return jnp.concatenate(
            [_max_pool(x), BasicConv2d(96, (3, 3), stride=2, dtype=self.dtype, name="conv")(x, train)], -1)


class Mixed4a(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b0 = _chain(self, "branch0", [(64, (1, 1)), (96, (3, 3))], x, train)
        b1 = _chain(self, "branch1", [(64, (1, 1)), (64, (1, 7)), (64, (7, 1)), (96, (3, 3))], x, train)
        return jnp.concatenate([b0, b1], -1)


class Mixed5a(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return jnp.concatenate(
            [BasicConv2d(192, (3, 3), stride=2, dtype=self.dtype, name="conv")(x, train), _max_pool(x)], -1)


class InceptionA(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b0 = BasicConv2d(96, (1, 1), dtype=self.dtype, name="branch0")(x, train)
        b1 = _chain(self, "branch1", [(64, (1, 1)), (96, (3, 3))], x, train)
        b2 = _chain(self, "branch2", [(64, (1, 1)), (96, (3, 3)), (96, (3, 3))], x, train)
        b3 = BasicConv2d(96, (1, 1), dtype=self.dtype, name="branch3_1")(_avg_pool(x), train)
        return jnp.concatenate([b0, b1, b2, b3], -1)


class ReductionA(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b0 = BasicConv2d(384, (3, 3), stride=2, dtype=self.dtype, name="branch0")(x, train)
        b1 = _chain(self, "branch1", [(192, (1, 1)), (224, (3, 3)), (256, (3, 3), 2)], x, train)
        return jnp.concatenate([b0, b1, _max_pool(x)], -1)


class InceptionB(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b0 = BasicConv2d(384, (1, 1), dtype=self.dtype, name="branch0")(x, train)
        b1 = _chain(self, "branch1", [(192, (1, 1)), (224, (1, 7)), (256, (7, 1))], x, train)
        b2 = _chain(self, "branch2", [(192, (1, 1)), (192, (7, 1)), (224, (1, 7)), (224, (7, 1)),
                                      (256, (1, 7))], x, train)
        b3 = BasicConv2d(128, (1, 1), dtype=self.dtype, name="branch3_1")(_avg_pool(x), train)
        return jnp.concatenate([b0, b1, b2, b3], -1)


class ReductionB(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b0 = _chain(self, "branch0", [(192, (1, 1)), (192, (3, 3), 2)], x, train)
        b1 = _chain(self, "branch1", [(256, (1, 1)), (256, (1, 7)), (320, (7, 1)), (320, (3, 3), 2)], x, train)
        return jnp.concatenate([b0, b1, _max_pool(x)], -1)


class InceptionC(nn.Module):
    """Inception-C. Its PyTorch attributes really are called ``branch1_0``, ``branch2_3a`` ... (no Sequential)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        def conv(features: int, kernel: tuple[int, int], name: str) -> nn.Module:
            return BasicConv2d(features, kernel, dtype=self.dtype, name=name)

        b0 = conv(256, (1, 1), "branch0")(x, train)
        b1 = conv(384, (1, 1), "branch1_0")(x, train)
        b1 = jnp.concatenate([conv(256, (1, 3), "branch1_1a")(b1, train),
                              conv(256, (3, 1), "branch1_1b")(b1, train)], -1)
        b2 = conv(384, (1, 1), "branch2_0")(x, train)
        b2 = conv(448, (3, 1), "branch2_1")(b2, train)
        b2 = conv(512, (1, 3), "branch2_2")(b2, train)
        b2 = jnp.concatenate([conv(256, (1, 3), "branch2_3a")(b2, train),
                              conv(256, (3, 1), "branch2_3b")(b2, train)], -1)
        b3 = conv(256, (1, 1), "branch3_1")(_avg_pool(x), train)
        return jnp.concatenate([b0, b1, b2, b3], -1)


def _chain(parent: nn.Module, prefix: str, specs: Sequence[tuple], x: jax.Array, train: bool) -> jax.Array:
    """Run a PyTorch ``nn.Sequential`` of BasicConv2d named ``<prefix>_<i>``; a spec is (features, kernel[, stride])."""
    for i, (features, kernel, *stride) in enumerate(specs):
        x = BasicConv2d(features, kernel, stride=stride[0] if stride else 1, dtype=parent.dtype,
                        parent=parent, name=f"{prefix}_{i}")(x, train)
    return x


def _max_pool(x: jax.Array) -> jax.Array:
    """MaxPool2d(3, stride=2, padding=1) with -inf padding (SMP's patched pools)."""
    return max_pool2d(x, 3, stride=2, padding=1)


def _avg_pool(x: jax.Array) -> jax.Array:
    """AvgPool2d(3, stride=1, padding=1, count_include_pad=False)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)
