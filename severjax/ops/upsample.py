"""Nearest upsampling with torch's index rule, and the Unet decoder's upsample + concatenate + 3x3 convolution.

:func:`upsample_concat_conv3x3` takes ``impl``: ``"native"`` (upsample, concatenate, convolve) or
``"taps"``, which builds neither the upsampled nor the concatenated map: the upsampled part is
:func:`upsample2x_conv3x3` at the input's resolution, the skip's part its own 3x3 convolution
(docs/performance.md, "Unet decoder: upsample, concatenate, convolve").
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from severjax.ops import policy
from severjax.ops.conv import conv3x3, shifted_tap_sum, tap_products


def upsample_nearest(x: jax.Array, size: Optional[Sequence[int]] = None,
                     scale_factor: Optional[float] = None) -> jax.Array:
    """``F.interpolate(x, size=..., mode="nearest")`` or ``scale_factor=...`` on NHWC, torch's legacy index rule.

    Source index ``min(floor(dst * scale), in - 1)`` with ``scale = in/out`` (``size``) or ``1/scale_factor``;
    an exact factor of two is a plain repeat.
    """
    if (size is None) == (scale_factor is None):
        raise ValueError("upsample_nearest needs exactly one of size or scale_factor")
    for axis in (1, 2):
        n_in = x.shape[axis]
        if size is not None:
            n_out, scale = int(size[axis - 1]), None
        else:
            n_out, scale = int(math.floor(n_in * scale_factor)), 1.0 / scale_factor
        x = _nearest_axis(x, axis, n_out, scale)
    return x


def upsample_concat_conv3x3(x: jax.Array, skip: Optional[jax.Array], kernel: jax.Array, size: Sequence[int], *,
                            train: bool | None, impl: str = "auto") -> jax.Array:
    """``conv3x3(concat([upsample_nearest(x, size), skip]), kernel)`` (padding 1, no bias), NHWC.

    ``kernel``: ``(3, 3, x channels + skip channels, out)``; ``skip`` may be None (nothing to concatenate).
    ``"auto"`` picks with ``policy.choose`` (``doubles``: ``size`` is exactly twice ``x``'s); ``"taps"``
    needs that. In taps, the skip's convolution is :func:`conv3x3`'s ``"taps"`` when differentiated
    (``train`` True or None: its gradient is two dots) and ``"native"`` in inference.
    """
    size = tuple(int(s) for s in size)
    doubles = size == (2 * x.shape[1], 2 * x.shape[2])
    impl = policy.choose("upsample_concat_conv", impl, train=train, doubles=doubles)
    if impl == "native":
        x = upsample_nearest(x, size=size)
        if skip is not None:
            x = jnp.concatenate([x, skip], axis=-1)
        return conv3x3(x, kernel, impl="native")
    if not doubles:
        raise ValueError(f"upsample_concat_conv3x3: taps needs size twice the input's {x.shape[1:3]}, got {size}")
    y = upsample2x_conv3x3(x, kernel[:, :, :x.shape[-1]])
    if skip is not None:
        y = y + conv3x3(skip, kernel[:, :, x.shape[-1]:], impl="native" if train is False else "taps")
    return y


def upsample2x_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``conv3x3(upsample_nearest(x, 2x), kernel)`` (padding 1, NHWC, HWIO), computed at ``x``'s resolution.

    Nearest upsampling repeats each pixel of ``x``, so every tap of every output pixel reads a pixel of ``x``:
    output row ``2i + a`` tap row ``d`` reads input row ``i + _TAP_OFFSET[a][d]`` (columns alike), and the
    zero padding maps onto the zero border of :func:`tap_products`. So one matmul of ``x`` with the nine
    taps (9 products a pixel of ``x``, against 36 for the plain convolution at 4x the pixels) and, for each of
    the four output phases, a sum of nine shifted slices of those products, interleaved.
    """
    b, h, w, _ = x.shape
    phases = shifted_tap_sum(tap_products(x, kernel), _UPSAMPLE_OFFSETS)
    rows = [jnp.stack(phases[2 * a:2 * a + 2], axis=3) for a in range(2)]  # (b, h, w, 2, out): columns 2j, 2j + 1
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, -1)


# Upsampled row 2i + a - 1 + d (tap row d of output row 2i + a) is input row i + _TAP_OFFSET[a][d];
# output phase (a, c) (rows 2i + a, columns 2j + c) sums tap (di, dj) shifted by those offsets.
_TAP_OFFSET = ((-1, 0, 0), (0, 0, 1))
_UPSAMPLE_OFFSETS = tuple(tuple((_TAP_OFFSET[a][di], _TAP_OFFSET[c][dj]) for di in range(3) for dj in range(3))
                          for a in range(2) for c in range(2))


def _nearest_axis(x, axis, n_out, scale):
    n_in = x.shape[axis]
    if n_out == n_in:
        return x
    if n_out == 2 * n_in:
        return jnp.repeat(x, 2, axis=axis)
    s = np.float32(n_in) / np.float32(n_out) if scale is None else np.float32(scale)
    idx = np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * s).astype(np.int64), n_in - 1)
    return jnp.take(x, jnp.asarray(idx, jnp.int32), axis=axis)
