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
from jax import lax

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
        x = UpsampleConcatConv(self.features, self.dtype, name="conv1_0")(x, size, skip, train)
        x = nn.relu(BatchNorm2d(dtype=self.dtype, name="conv1_1")(x, train))
        x = Conv2d(self.features, 3, padding=1, use_bias=False, dtype=self.dtype, kernel_init=kaiming_uniform_relu,
                   name="conv2_0")(x)
        return nn.relu(BatchNorm2d(dtype=self.dtype, name="conv2_1")(x, train))


class UpsampleConcatConv(nn.Module):
    """``Conv2d(features, 3, padding=1, bias=False)`` of ``concat([upsample_nearest(x, size), skip])``.

    Parameter ``kernel`` ``(3, 3, x channels + skip channels, features)``, as :class:`Conv2d`'s. ``impl``:
    ``"plain"`` (upsample, concatenate, convolve), ``"subpixel"`` or ``"auto"``: subpixel on CPU when ``size``
    is exactly twice ``x``'s, except in training for inputs of more than ``_SUBPIXEL_MAX_TRAIN_CHANNELS``
    channels, plain otherwise. Subpixel convolves the upsampled part on the small map: the 3x3 kernel over a
    2x nearest upsample reads, for each of the four output phases, a 2x2 window of ``x`` with row/column-summed
    weights, so four 2x2 convolutions of ``x`` (4 taps a pixel, not 9) interleaved, plus the skip's own 3x3
    convolution; no upsampled or concatenated map is built (Unet-sx50: ~12% fewer forward FLOPs).
    """

    features: int
    dtype: Dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, size: Sequence[int], skip, train: bool = False) -> jax.Array:
        cin = x.shape[-1] + (0 if skip is None else skip.shape[-1])
        kernel = self.param("kernel", kaiming_uniform_relu, (3, 3, cin, self.features)).astype(self.dtype)
        x = x.astype(self.dtype)
        skip = None if skip is None else skip.astype(self.dtype)
        size = tuple(int(s) for s in size)
        impl = self.impl
        if impl == "auto":
            doubles = size == (2 * x.shape[1], 2 * x.shape[2])
            wide = train and x.shape[-1] > _SUBPIXEL_MAX_TRAIN_CHANNELS
            impl = "subpixel" if doubles and not wide and jax.default_backend() == "cpu" else "plain"
        if impl == "plain":
            x = upsample_nearest(x, size=size)
            if skip is not None:
                x = jnp.concatenate([x, skip], axis=-1)
            return _conv3x3(x, kernel)
        if impl != "subpixel":
            raise ValueError(f"{self.name}: impl must be 'auto', 'plain' or 'subpixel', got {impl!r}")
        if size != (2 * x.shape[1], 2 * x.shape[2]):
            raise ValueError(f"{self.name}: subpixel needs size twice the input's {x.shape[1:3]}, got {size}")
        y = upsample2x_conv3x3(x, kernel[:, :, :x.shape[-1]])
        if skip is not None:
            y = y + _conv3x3(skip, kernel[:, :, x.shape[-1]:])
        return y


def upsample2x_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``conv3x3(upsample_nearest(x, 2x), kernel)`` (padding 1, NHWC, HWIO) as four 2x2 convolutions of ``x``.

    Output row ``2i`` reads upsampled rows ``2i-1, 2i, 2i+1`` = input rows ``i-1, i, i``: a 2-row window over
    rows ``(i-1, i)`` with kernel rows ``(k0, k1 + k2)``; row ``2i+1`` reads ``i, i, i+1``: window ``(i, i+1)``
    with ``(k0 + k1, k2)``. Columns alike. Zero padding maps onto zero padding of ``x``.
    """
    rows = []
    for row_taps, row_pad in _PHASES:
        cols = []
        for col_taps, col_pad in _PHASES:
            # the phase's 2x2 kernel in one pass over the 3x3 one: each tap a sum of 1, 2 or 4 of its taps
            taps = [sum(kernel[i, j] for i in rt for j in ct) for rt in row_taps for ct in col_taps]
            kc = jnp.stack(taps).reshape(2, 2, *kernel.shape[2:])
            cols.append(lax.conv_general_dilated(x, kc, (1, 1), (row_pad, col_pad), dimension_numbers=_DN))
        rows.append(jnp.stack(cols, axis=3))  # (B, h, w, 2, C)
    b, h, w, _, c = rows[0].shape
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, c)


_DN = ("NHWC", "HWIO", "NHWC")
# Output phase 0 (even rows/columns) reads input offsets (-1, 0) with kernel taps ({0}, {1, 2}); phase 1
# reads (0, +1) with ({0, 1}, {2}); the pads are the (low, high) zero padding of ``x`` that gives those windows.
_PHASES = ((((0,), (1, 2)), (1, 0)), (((0, 1), (2,)), (0, 1)))
# Measured on XLA:CPU in the Unet-sx50 train step: subpixel saves 40-80% of decoder blocks 3-4 (64 and 32
# input channels). Blocks 1-2 gain 20% alone but lose it in the whole step: the separate skip convolution's
# kernel gradient makes XLA recompute the encoder stage's last BN/SE/residual ops inside a transposing copy
# (~100 ms); block 0 (2048 channels on 8x14) is 15% dearer alone. Forward passes gain 20-50% everywhere.
_SUBPIXEL_MAX_TRAIN_CHANNELS = 64


def _conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN)
