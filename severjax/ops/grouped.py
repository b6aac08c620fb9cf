"""Grouped convolution (``torch.nn.Conv2d(groups=g)``, g below the channel count): three implementations.

* ``"native"``: ``lax.conv_general_dilated(feature_group_count=groups)``.
* ``"dense_blocks"``: the channels split into blocks of consecutive groups about :data:`DENSE_BLOCK_WIDTH`
  channels wide, each block a dense convolution with its block-diagonal kernel. XLA:CPU's grouped
  convolution is slow, dense convolutions of a few dozen channels run near the CPU's peak, so the wasted
  multiply-adds (8x for 4-channel groups, none for 32) cost less than the grouped forms, and autodiff gives
  dense-convolution gradients.
* ``"taps"``: the true grouped product as elementwise work: for each input channel ``i`` of a group, that
  channel broadcast over the group's outputs, then per tap a strided slice times the tap's weights, all
  summed (XLA fuses it into one loop). For narrow groups it skips the dense blocks' wasted work; its
  autodiff gradient is pads of every tap, so it is an inference form.

docs/performance.md, "Grouped convolutions", has the measurements behind the block width and the policy.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from severjax.ops import policy
from severjax.ops.conv import DIMENSION_NUMBERS, IntPair, Padding, int_pair, padding_pairs, sum_of_taps

# Channels of one dense block of "dense_blocks": the width at which XLA:CPU's dense convolutions over
# SE-ResNeXt-50's grouped shapes ran best or near it, forward and gradient.
DENSE_BLOCK_WIDTH = 32


def grouped_conv(x: jax.Array, kernel: jax.Array, stride: IntPair, padding: Padding, groups: int,
                 impl: str = "auto", train: bool | None = None, dilation: IntPair = 1) -> jax.Array:
    """Grouped convolution, NHWC input, HWIO kernel ``(kh, kw, in/groups, out)``, no bias.

    ``impl``: ``"native"``, ``"dense_blocks"``, ``"taps"`` (see the module docstring) or ``"auto"``, which
    asks ``policy.choose`` with the use ``train`` and the group width (input channels a group).
    """
    stride, dilation, padding = int_pair(stride), int_pair(dilation), padding_pairs(padding)
    impl = policy.choose("grouped_conv", impl, train=train, group_width=kernel.shape[2])
    if impl == "taps":
        return _grouped_taps(x, kernel, stride, padding, dilation, groups)
    if impl == "dense_blocks":
        return _dense_blocks(x, kernel, stride, padding, dilation, groups)
    return lax.conv_general_dilated(x, kernel, stride, padding, rhs_dilation=dilation,
                                    dimension_numbers=DIMENSION_NUMBERS, feature_group_count=groups)


def _dense_blocks(x, kernel, stride, padding, dilation, groups):
    cin, cout = kernel.shape[2], kernel.shape[3]
    per_block = _groups_per_block(groups, cin)
    outs = []
    for g in range(0, groups, per_block):
        xs = x[..., g * cin:(g + per_block) * cin]
        ks = kernel[..., g * (cout // groups):(g + per_block) * (cout // groups)]
        outs.append(lax.conv_general_dilated(xs, _block_diagonal(ks, per_block), stride, padding,
                                             rhs_dilation=dilation, dimension_numbers=DIMENSION_NUMBERS))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)


def _groups_per_block(groups: int, group_width: int) -> int:
    """Groups a dense block holds: the most that fit in ``DENSE_BLOCK_WIDTH`` channels and divide ``groups``."""
    per = max(1, min(groups, DENSE_BLOCK_WIDTH // group_width))
    while groups % per:
        per -= 1
    return per


def _block_diagonal(kernel: jax.Array, groups: int) -> jax.Array:
    """``(kh, kw, in/g, out)`` grouped kernel -> the equivalent dense ``(kh, kw, in, out)`` kernel."""
    if groups == 1:
        return kernel
    kh, kw, ci, co = kernel.shape
    k = kernel.reshape(kh, kw, ci, groups, co // groups)
    eye = jnp.eye(groups, dtype=kernel.dtype)
    return jnp.einsum("hwcgo,Gg->hwGcgo", k, eye).reshape(kh, kw, groups * ci, co)


def _grouped_taps(x: jax.Array, kernel: jax.Array, stride: tuple[int, int], padding: Sequence[tuple[int, int]],
                  dilation: tuple[int, int], groups: int) -> jax.Array:
    """Grouped convolution as a sum over the input channels ``i`` of a group of depthwise taps: output channel
    ``g * cout_g + j`` reads input channel ``g * cin_g + i``, broadcast over the group's outputs."""
    # padded once, before the broadcasts, which would each carry a padded copy otherwise
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    n, h, w, _ = xp.shape
    cin_g, cout = kernel.shape[2:]
    xg = xp.reshape(n, h, w, groups, cin_g)
    out = None
    for i in range(cin_g):
        xi = jnp.broadcast_to(xg[..., i:i + 1], (n, h, w, groups, cout // groups)).reshape(n, h, w, cout)
        part = sum_of_taps(xi, kernel[:, :, i:i + 1], stride, ((0, 0), (0, 0)), dilation)
        out = part if out is None else out + part
    return out
