"""Max pooling with torch's semantics, and the ceil-mode pool of SE-ResNeXt's stem with a cheaper gradient.

:func:`max_pool_ceil` takes ``impl``: ``"native"`` (:func:`max_pool2d`, whose autodiff is XLA's
select-and-scatter) or ``"taps_grad"`` (the same forward; the gradient found by comparing the strided taps
with the output, elementwise work; docs/performance.md, "Max pooling").
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from severjax.ops import policy
from severjax.ops.conv import IntPair, int_pair


def max_pool2d(x: jax.Array, kernel_size: IntPair, stride: Optional[IntPair] = None, padding: IntPair = 0,
               ceil_mode: bool = False) -> jax.Array:
    """``torch.nn.functional.max_pool2d`` on NHWC (implicit -inf padding, torch's ``ceil_mode`` rule)."""
    (kh, kw), (sh, sw) = int_pair(kernel_size), int_pair(stride if stride is not None else kernel_size)
    ph, pw = int_pair(padding)
    pads = []
    for size, k, s, p in ((x.shape[1], kh, sh, ph), (x.shape[2], kw, sw, pw)):
        if ceil_mode:
            out = -(-(size + 2 * p - k) // s) + 1
            if (out - 1) * s >= size + p:  # the last window must start inside the input or left padding
                out -= 1
        else:
            out = (size + 2 * p - k) // s + 1
        pads.append((p, max((out - 1) * s + k - size - p, 0)))
    # a Python -inf init lets JAX recognise the max monoid (reduce_window_max, differentiable)
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, kh, kw, 1), (1, sh, sw, 1), ((0, 0), *pads, (0, 0)))


def max_pool_ceil(x: jax.Array, kernel: int, stride: int, impl: str = "auto") -> jax.Array:
    """``F.max_pool2d(x, kernel, stride, ceil_mode=True)`` on NHWC (square window, no padding).

    ``"taps_grad"``: the gradient goes, as in PyTorch, to the first maximum of each window (row-major),
    found by comparing the ``kernel**2`` strided taps with the output.
    """
    if policy.choose("max_pool_ceil", impl) == "taps_grad":
        return _max_pool_ceil_taps_grad(x, kernel, stride)
    return max_pool2d(x, kernel, stride=stride, ceil_mode=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool_ceil_taps_grad(x, kernel, stride):
    return max_pool2d(x, kernel, stride=stride, ceil_mode=True)


def _max_pool_ceil_fwd(x, kernel, stride):
    y = _max_pool_ceil_taps_grad(x, kernel, stride)
    return y, (x, y)


def _max_pool_ceil_bwd(kernel, stride, res, g):
    x, y = res
    b, h, w, c = x.shape
    oh, ow = y.shape[1:3]
    hp, wp = max((oh - 1) * stride + kernel, h), max((ow - 1) * stride + kernel, w)
    xp = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)), constant_values=-jnp.inf)
    taken = jnp.zeros(y.shape, bool)
    zero = jnp.zeros((), g.dtype)
    dx = None
    for i in range(kernel):
        for j in range(kernel):
            tap = lax.slice(xp, (0, i, j, 0), (b, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
                            (1, stride, stride, 1))
            hit = (tap == y) & ~taken
            taken = taken | hit
            # back to the tap's input positions: the transpose of the strided slice is an interior pad
            part = lax.pad(jnp.where(hit, g, zero), zero,
                           ((0, 0, 0), (i, hp - i - (oh - 1) * stride - 1, stride - 1),
                            (j, wp - j - (ow - 1) * stride - 1, stride - 1), (0, 0, 0)))
            dx = part if dx is None else dx + part
    return (dx[:, :h, :w],)


_max_pool_ceil_taps_grad.defvjp(_max_pool_ceil_fwd, _max_pool_ceil_bwd)
