"""FPN, as SMP 0.6.0's ``smp.FPN`` (pyramid 256, segmentation 128, GroupNorm(32), merge add|cat).

Interpolation exactly where SMP has it: nearest x2 in the top-down pathway (``FPNBlock``), bilinear x2 with
``align_corners=True`` inside the segmentation blocks, bilinear x4 ``align_corners=True`` after the head.
``Dropout2d`` (whole channels) on the merged pyramid. Flax names mirror SMP's module tree:
``decoder/p5``, ``decoder/p{4,3,2}/skip_conv``, ``decoder/seg_blocks_<i>/block_<j>/block_{0,1}``,
``segmentation_head_0``.
"""

from __future__ import annotations

from typing import Any, List

import flax.linen as nn
import jax
import jax.numpy as jnp

from severjax.models.base import EncoderModel
from severjax.models.layers import (Conv2d, GroupNorm, channel_dropout, kaiming_uniform_relu,
                                    resize_bilinear_align_corners, xavier_uniform)
from severjax.ops import upsample_nearest

Dtype = Any
MERGE_POLICIES = ("add", "cat")


class FPN(EncoderModel):
    """Encoder + FPN decoder + 1x1 conv head + x4 bilinear upsampling; logits ``(B, H, W, classes)`` float32.

    Input height and width must be multiples of 32 (SMP raises the same).
    """

    dropout: float = 0.2
    decoder_merge_policy: str = "add"
    pyramid_channels: int = 256
    segmentation_channels: int = 128
    upsampling: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        h, w = x.shape[1:3]
        if h % 32 or w % 32:
            raise ValueError(f"FPN input height and width must be multiples of 32, got {h}x{w}; pad the image to "
                             f"{-(-h // 32) * 32}x{-(-w // 32) * 32}")
        if self.decoder_merge_policy not in MERGE_POLICIES:
            raise ValueError(f"decoder_merge_policy must be one of {MERGE_POLICIES}, got {self.decoder_merge_policy!r}")
        features = self.encode(x, train)
        y = FPNDecoder(self.pyramid_channels, self.segmentation_channels, self.dropout, self.decoder_merge_policy,
                       self.dtype, name="decoder")(features, train)
        y = Conv2d(self.classes, 1, dtype=self.dtype, kernel_init=xavier_uniform, name="segmentation_head_0")(y)
        if self.upsampling > 1:
            y = resize_bilinear_align_corners(y, (y.shape[1] * self.upsampling, y.shape[2] * self.upsampling))
        return y.astype(jnp.float32)


class FPNDecoder(nn.Module):
    """Top-down pyramid p5..p2, one segmentation block per level (upsampled to stride 4), merge, Dropout2d."""

    pyramid_channels: int = 256
    segmentation_channels: int = 128
    dropout: float = 0.2
    merge_policy: str = "add"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: List[jax.Array], train: bool) -> jax.Array:
        c2, c3, c4, c5 = features[-4:]
        p5 = Conv2d(self.pyramid_channels, 1, dtype=self.dtype, kernel_init=kaiming_uniform_relu, name="p5")(c5)
        p4 = FPNBlock(self.pyramid_channels, self.dtype, name="p4")(p5, c4)
        p3 = FPNBlock(self.pyramid_channels, self.dtype, name="p3")(p4, c3)
        p2 = FPNBlock(self.pyramid_channels, self.dtype, name="p2")(p3, c2)
        pyramid = [
            SegmentationBlock(self.segmentation_channels, n_up, self.dtype, name=f"seg_blocks_{i}")(p)
            for i, (p, n_up) in enumerate(zip((p5, p4, p3, p2), (3, 2, 1, 0)))
        ]
        if self.merge_policy == "add":
            x = pyramid[0] + pyramid[1] + pyramid[2] + pyramid[3]
        else:
            x = jnp.concatenate(pyramid, axis=-1)
        return channel_dropout(self.dropout)(x, deterministic=not train)


class FPNBlock(nn.Module):
    """Nearest x2 upsampling of the coarser level plus a 1x1 conv of the skip."""

    pyramid_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
        x = upsample_nearest(x, scale_factor=2.0)
        skip = Conv2d(self.pyramid_channels, 1, dtype=self.dtype, kernel_init=kaiming_uniform_relu, name="skip_conv")(skip)
        return x + skip


class SegmentationBlock(nn.Module):
    """``n_upsamples`` (at least one) Conv3x3GNReLU blocks, each but a 0-upsample one followed by bilinear x2."""

    features: int
    n_upsamples: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Conv3x3GNReLU(self.features, self.n_upsamples > 0, self.dtype, name="block_0")(x)
        for j in range(1, self.n_upsamples):
            x = Conv3x3GNReLU(self.features, True, self.dtype, name=f"block_{j}")(x)
        return x


class Conv3x3GNReLU(nn.Module):
    """3x3 conv (no bias), GroupNorm(32, eps 1e-5), ReLU, optional bilinear x2 (align_corners=True)."""

    features: int
    upsample: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Conv2d(self.features, 3, padding=1, use_bias=False, dtype=self.dtype, kernel_init=kaiming_uniform_relu,
                   name="block_0")(x)
        x = GroupNorm(32, 1e-5, self.dtype, name="block_1")(x)
        x = nn.relu(x)
        if self.upsample:
            x = resize_bilinear_align_corners(x, (x.shape[1] * 2, x.shape[2] * 2))
        return x
