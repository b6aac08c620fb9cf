"""Unet, as SMP 0.6.0's ``smp.Unet`` (decoder channels 256..16, nearest upsampling, no attention/center).

One addition from the original solution: an optional channel dropout (``nn.Dropout2d``) on the decoder
output, before the segmentation head (default 0: SMP's plain Unet). Flax names mirror SMP's module tree:
``encoder``, ``decoder/blocks_<i>/conv{1,2}_{0,1}``, ``segmentation_head_0``.
"""

from __future__ import annotations

import functools
from typing import Any, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from severjax.models.layers import BatchNorm2d, Conv2d, channel_dropout, kaiming_uniform_relu, upsample_nearest, xavier_uniform
from severjax.models.registry import EncoderModel

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
        y = Conv2d(self.classes, 3, padding=1, dtype=self.dtype, kernel_init=xavier_uniform,
                   name="segmentation_head_0")(y)
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
        x = upsample_nearest(x, size=tuple(size))
        if skip is not None:
            x = jnp.concatenate([x.astype(self.dtype), skip.astype(self.dtype)], axis=-1)
        conv = functools.partial(Conv2d, self.features, 3, padding=1, use_bias=False, dtype=self.dtype,
                                 kernel_init=kaiming_uniform_relu)
        for j in (1, 2):
            x = conv(name=f"conv{j}_0")(x)
            x = nn.relu(BatchNorm2d(dtype=self.dtype, name=f"conv{j}_1")(x, train))
        return x
