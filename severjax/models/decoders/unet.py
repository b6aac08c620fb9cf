"""Unet, as SMP 0.6.0's ``smp.Unet`` (decoder channels 256..16, nearest upsampling, no attention/center).

One addition from the original solution: an optional channel dropout (``nn.Dropout2d``) on the decoder
output, before the segmentation head (default 0: SMP's plain Unet). Flax names mirror SMP's module tree:
``encoder``, ``decoder/blocks_<i>/conv{1,2}_{0,1}``, ``segmentation_head_0``.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from severjax.models.base import EncoderModel
from severjax.models.layers import BatchNorm2d, Conv2d, channel_dropout, kaiming_uniform_relu, xavier_uniform
from severjax.ops import upsample_concat_conv3x3

Dtype = Any


class Unet(EncoderModel):
    """Encoder + Unet decoder + 3x3 conv head; ``__call__(x NHWC, train) -> logits (B, H, W, classes)`` float32."""

    dropout: float = 0.0
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        features = self.encode(x, train)
        y = UnetDecoder(tuple(self.decoder_channels), self.dtype, name="decoder")(features, train)
        y = channel_dropout(self.dropout)(y, deterministic=not train)
        # train: the head's 3x3 convolution may run as taps in inference only (ops.conv3x3; docs/performance.md,
        # "3x3 convolutions as taps")
        y = Conv2d(self.classes, 3, padding=1, dtype=self.dtype, kernel_init=xavier_uniform,
                   name="segmentation_head_0")(y, train)
        return y.astype(jnp.float32)


class UnetDecoder(nn.Module):
    """SMP's ``UnetDecoder``: from the stride-32 map up, each block upsamples (nearest) to the next skip's size."""

    decoder_channels: Tuple[int, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: List[jax.Array], train: bool) -> jax.Array:
        if len(features) != len(self.decoder_channels) + 1:
            raise ValueError(f"Unet decoder with {len(self.decoder_channels)} blocks needs "
                             f"{len(self.decoder_channels) + 1} features, got {len(features)}")
        sizes = [f.shape[1:3] for f in features][::-1]
        skips = features[1:][::-1]
        x = skips[0]
        for i, channels in enumerate(self.decoder_channels):
            skip = skips[i + 1] if i + 1 < len(skips) else None
            x = UnetDecoderBlock(channels, self.dtype, name=f"blocks_{i}")(x, sizes[i + 1], skip, train)
        return x


class UnetDecoderBlock(nn.Module):
    """Upsample to ``size`` (nearest), concatenate the skip, then (3x3 conv, BatchNorm, ReLU) twice."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: Sequence[int], skip, train: bool) -> jax.Array:
        x = UpsampleConcatConv(self.features, self.dtype, name="conv1_0")(x, size, skip, train)
        x = nn.relu(BatchNorm2d(dtype=self.dtype, name="conv1_1")(x, train))
        x = Conv2d(self.features, 3, padding=1, use_bias=False, dtype=self.dtype, kernel_init=kaiming_uniform_relu,
                   name="conv2_0")(x)
        return nn.relu(BatchNorm2d(dtype=self.dtype, name="conv2_1")(x, train))


class UpsampleConcatConv(nn.Module):
    """``Conv2d(features, 3, padding=1, bias=False)`` of ``concat([upsample_nearest(x, size), skip])``, computed
    by :func:`severjax.ops.upsample_concat_conv3x3` (which may never build the upsampled map).

    Parameter ``kernel`` ``(3, 3, x channels + skip channels, features)``, as :class:`Conv2d`'s.
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: Sequence[int], skip, train: bool = False) -> jax.Array:
        cin = x.shape[-1] + (0 if skip is None else skip.shape[-1])
        kernel = self.param("kernel", kaiming_uniform_relu, (3, 3, cin, self.features)).astype(self.dtype)
        skip = None if skip is None else skip.astype(self.dtype)
        return upsample_concat_conv3x3(x.astype(self.dtype), skip, kernel, size, train=train)
