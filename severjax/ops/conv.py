"""Convolutions by their shape: pointwise (1x1), depthwise, and 3x3 with padding 1; the tap sums they share.

Each op computes ``lax.conv_general_dilated``'s values (NHWC input, HWIO kernel) and takes ``impl``:
``"auto"`` asks :func:`severjax.ops.policy.choose`, or one of ``policy.CANDIDATES[op]`` is named outright.

* :func:`pointwise_conv`: ``"native"`` (one ``dot_general``) or ``"dot_grad"`` (the same dot with a
  two-dot gradient; docs/performance.md, "Pointwise convolutions").
* :func:`depthwise_conv`: ``"native"`` (a grouped convolution) or ``"taps"`` (a sum of strided slices times
  the per-channel weights, with its own gradient; docs/performance.md, "Depthwise convolutions").
* :func:`conv3x3`: ``"native"`` or ``"taps"`` (:func:`tap_products` plus :func:`shifted_tap_sum`;
  docs/performance.md, "3x3 convolutions as taps").

Shape arguments: ``stride``/``dilation`` an int or a pair, ``padding`` as :func:`padding_pairs` reads it.
"""

from __future__ import annotations

import functools
from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

from severjax.ops import policy

IntPair = Union[int, Sequence[int]]
Padding = Union[int, Sequence[int], Sequence[Sequence[int]]]
PaddingPairs = Tuple[Tuple[int, int], Tuple[int, int]]

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def pointwise_conv(x: jax.Array, kernel: jax.Array, impl: str = "auto") -> jax.Array:
    """``x @ kernel`` over the last axis of NHWC ``x`` (``kernel`` ``(in, out)``): a 1x1 convolution.

    ``"dot_grad"`` gives the kernel gradient ``x^T g`` as one dot of the flattened 2-D operands, which
    XLA:CPU runs as is; autodiff's 4-D contraction wants the cotangent laid out transposed, and the fusion
    that produces it then writes it column by column.
    """
    impl = policy.choose("pointwise_conv", impl)
    if impl == "dot_grad":
        return _pointwise_dot_grad(x, kernel)
    return _pointwise(x, kernel)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: IntPair = 1, padding: Padding = 0,
                   dilation: IntPair = 1, impl: str = "auto") -> jax.Array:
    """Depthwise convolution, NHWC input and ``(kh, kw, 1, C)`` kernel (channel multiplier 1).

    ``"native"``: ``lax.conv_general_dilated`` with ``feature_group_count = C``. ``"taps"``: the sum over the
    ``kh * kw`` taps of strided slices times the per-channel weights (:func:`sum_of_taps`; XLA fuses it into
    one loop), with a custom gradient: the input part a taps correlation of the output gradient with the
    flipped kernel, the kernel part one fused multi-output reduction.
    """
    stride, dilation, padding = int_pair(stride), int_pair(dilation), padding_pairs(padding)
    impl = policy.choose("depthwise_conv", impl)
    if impl == "taps":
        return _depthwise_taps(x, kernel, stride, padding, dilation)
    return lax.conv_general_dilated(x, kernel, stride, padding, rhs_dilation=dilation,
                                    dimension_numbers=DIMENSION_NUMBERS, feature_group_count=x.shape[-1])


def conv3x3(x: jax.Array, kernel: jax.Array, impl: str = "auto", train: bool | None = None) -> jax.Array:
    """A 3x3 convolution, stride 1, padding 1, no bias, NHWC input and ``(3, 3, in, out)`` kernel.

    ``"taps"``: :func:`tap_products` (one matmul) plus :func:`shifted_tap_sum`, the same multiply-adds as a
    direct convolution; its gradient is two dots and a shifted sum. It pays off for few output channels:
    for wide outputs the ``9 * out`` products cost more memory traffic than they save. ``train`` is the use
    ``"auto"`` goes by (``policy.choose``).
    """
    impl = policy.choose("conv3x3", impl, train=train, features=kernel.shape[-1])
    if impl == "taps":
        return shifted_tap_sum(tap_products(x, kernel), _CONV3X3_OFFSETS)[0]
    return lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DIMENSION_NUMBERS)


def tap_products(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Every tap's products of a ``(3, 3, in, out)`` kernel with NHWC ``x``: ``(b, h, w, 3, 3, out)``, entry
    ``[:, i, j, di, dj]`` = ``x[:, i, j] @ kernel[di, dj]``.

    One matmul of ``x`` with the nine taps' kernels side by side (``in -> 9 * out``, :func:`pointwise_conv`);
    a 3x3 convolution is then :func:`shifted_tap_sum` of it.
    """
    b, h, w, c = x.shape
    o = kernel.shape[-1]
    return pointwise_conv(x, kernel.transpose(2, 0, 1, 3).reshape(c, 9 * o)).reshape(b, h, w, 3, 3, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def shifted_tap_sum(p: jax.Array, offsets: Tuple[Tuple[Tuple[int, int], ...], ...]) -> Tuple[jax.Array, ...]:
    """Sums of shifted tap products, one output per phase: ``out[k][:, i, j] = sum_t p[:, i + r, j + s, t]``
    over the nine taps ``t = (di, dj)`` with ``(r, s) = offsets[k][3 * di + dj]`` (each in -1..1), reading
    zero outside ``p``.

    Its gradient has the same gather form (``dp[:, i, j, t] = sum_k dout[k][:, i - r, j - s]``); autodiff
    would transpose each slice into a pad and sum nine of them a phase, which XLA:CPU fuses with the
    incoming gradient's producers into one slow loop.
    """
    return tuple(_tap_sum(p, phase) for phase in offsets)


def sum_of_taps(x: jax.Array, kernel: jax.Array, stride: Tuple[int, int] = (1, 1),
                padding: PaddingPairs = ((0, 0), (0, 0)), dilation: Tuple[int, int] = (1, 1)) -> jax.Array:
    """Depthwise convolution (``(kh, kw, 1, C)`` kernel, ``padding`` as pairs) as the sum over the taps of
    strided slices times the per-channel weights, with plain autodiff (:func:`depthwise_conv` adds its
    custom gradient). XLA fuses it into one loop."""
    return _taps_padded(jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0))), kernel, stride, dilation)


def int_pair(v: IntPair) -> Tuple[int, int]:
    """An int or a pair (torch's way of writing a kernel size, stride or dilation) as a pair of ints."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return (int(v[0]), int(v[1]))
    return (int(v), int(v))


def padding_pairs(padding: Padding) -> PaddingPairs:
    """Torch/TF padding specs -> ``((top, bottom), (left, right))``: an int, a symmetric ``(ph, pw)`` pair
    (as torch writes it) or the pairs themselves (TF-"same" static padding)."""
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    ph, pw = padding
    if isinstance(ph, int) and isinstance(pw, int):
        return ((ph, ph), (pw, pw))
    return ((int(ph[0]), int(ph[1])), (int(pw[0]), int(pw[1])))


# ----------------------------------------------------------------------------------------------------
# pointwise


def _pointwise(x, kernel):
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def _pointwise_dot_grad(x, kernel):
    return _pointwise(x, kernel)


def _pointwise_fwd(x, kernel):
    return _pointwise(x, kernel), (x, kernel)


def _pointwise_bwd(res, g):
    x, kernel = res
    dx = lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
    xf, gf = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dk = lax.dot_general(xf, gf, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dx, dk.astype(kernel.dtype)


_pointwise_dot_grad.defvjp(_pointwise_fwd, _pointwise_bwd)


# ----------------------------------------------------------------------------------------------------
# shifted tap sums (3x3 convolutions as taps)

# conv3x3 (padding 1): tap (di, dj) of output pixel (i, j) reads input pixel (i + di - 1, j + dj - 1)
_CONV3X3_OFFSETS = (tuple((di - 1, dj - 1) for di in range(3) for dj in range(3)),)


def _tap_sum(p, phase):
    out = None
    for t, (r, s) in enumerate(phase):
        tap = _shift(p[:, :, :, t // 3, t % 3], r, s)
        out = tap if out is None else out + tap
    return out


def _shift(x, r, s):
    """``z[:, i, j] = x[:, i + r, j + s]``, zero outside ``x`` (``|r|, |s| <= 1``)."""
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return lax.slice(x, (0, 1 + r, 1 + s, 0), (b, 1 + r + h, 1 + s + w, c))


def _shifted_tap_sum_fwd(p, offsets):
    return shifted_tap_sum(p, offsets), None


def _shifted_tap_sum_bwd(offsets, _, g):
    taps = []
    for t in range(9):
        acc = None
        for phase, gk in zip(offsets, g):
            r, s = phase[t]
            part = _shift(gk, -r, -s)
            acc = part if acc is None else acc + part
        taps.append(acc)
    b, h, w, c = g[0].shape
    return (jnp.stack(taps, axis=3).reshape(b, h, w, 3, 3, c),)


shifted_tap_sum.defvjp(_shifted_tap_sum_fwd, _shifted_tap_sum_bwd)


# ----------------------------------------------------------------------------------------------------
# depthwise taps


def _taps_padded(x, kernel, stride, dilation):
    kh, kw = kernel.shape[:2]
    (sh, sw), (dh, dw) = stride, dilation
    b, h, w, c = x.shape
    oh = (h - (kh - 1) * dh - 1) // sh + 1
    ow = (w - (kw - 1) * dw - 1) // sw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = lax.slice(
                x, (0, i * dh, j * dw, 0), (b, i * dh + (oh - 1) * sh + 1, j * dw + (ow - 1) * sw + 1, c),
                (1, sh, sw, 1),
            ) * kernel[i, j, 0]
            out = tap if out is None else out + tap
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_taps(x, kernel, stride, padding, dilation):
    return sum_of_taps(x, kernel, stride, padding, dilation)


def _depthwise_taps_fwd(x, kernel, stride, padding, dilation):
    # the padded input is the residual: the kernel gradient reads it, and keeping x as well would keep two copies
    xpad = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    return _taps_padded(xpad, kernel, stride, dilation), (xpad, kernel)


def _depthwise_taps_bwd(stride, padding, dilation, res, g):
    xpad, kernel = res
    (top, bottom), (left, right) = padding
    x_shape = (xpad.shape[0], xpad.shape[1] - top - bottom, xpad.shape[2] - left - right, xpad.shape[3])
    dx = _depthwise_input_grad(g, kernel, x_shape, stride, padding, dilation).astype(xpad.dtype)
    dk = _depthwise_kernel_grad(xpad, g, kernel.shape, stride, dilation).astype(kernel.dtype)
    return dx, dk


_depthwise_taps.defvjp(_depthwise_taps_fwd, _depthwise_taps_bwd)


def _depthwise_input_grad(g, kernel, x_shape, stride, padding, dilation):
    """d(loss)/d(x): a stride-1 taps correlation of ``g`` (zero-dilated by the stride, padded) with the
    flipped kernel, cheaper on XLA:CPU than the transpose of the strided slices (a sum of pads)."""
    kh, kw = kernel.shape[:2]
    config = [(0, 0, 0)]
    for axis, (k, s, d, (lo_pad, _)) in enumerate(zip((kh, kw), stride, dilation, padding)):
        lo = (k - 1) * d - lo_pad
        hi = x_shape[1 + axis] + (k - 1) * d - lo - ((g.shape[1 + axis] - 1) * s + 1)
        config.append((lo, hi, s - 1))
    config.append((0, 0, 0))
    g = lax.pad(g, jnp.zeros((), g.dtype), config)
    return sum_of_taps(g, kernel[::-1, ::-1], (1, 1), ((0, 0), (0, 0)), dilation)


_ROW_BLOCK_BYTES = 1 << 19  # ~512 KiB of input rows per scan step keeps the taps' reads in cache


def _depthwise_kernel_grad(x, g, kernel_shape, stride, dilation):
    """d(loss)/d(kernel) of the taps convolution, ``x`` the padded input: ``sum_{b,y,x} x[b, i+s*y, j+s*x, c] g[b, y, x, c]``.

    A scan over blocks of output rows (cache-sized), each reducing all ``kh*kw`` tap products with ONE
    variadic ``lax.reduce``: a single fused pass over the block (separate reductions each re-read it, and
    XLA's CPU runtime materialises the strided tap slices for them).
    """
    kh, kw = kernel_shape[:2]
    (sh, sw), (dh, dw) = stride, dilation
    b, oh, ow, c = g.shape
    row_bytes = b * x.shape[2] * c * x.dtype.itemsize * sh
    rows = int(max(1, min(oh, _ROW_BLOCK_BYTES // max(row_bytes, 1))))
    n_blocks = -(-oh // rows)
    g = jnp.pad(g, ((0, 0), (0, n_blocks * rows - oh), (0, 0), (0, 0)))
    need = (n_blocks * rows - 1) * sh + (kh - 1) * dh + 1
    if x.shape[1] < need:
        x = jnp.pad(x, ((0, 0), (0, need - x.shape[1]), (0, 0), (0, 0)))
    span = (rows - 1) * sh + (kh - 1) * dh + 1

    def body(acc, block):
        gb = lax.dynamic_slice_in_dim(g, block * rows, rows, axis=1).astype(jnp.float32)
        xb = lax.dynamic_slice_in_dim(x, block * rows * sh, span, axis=1).astype(jnp.float32)
        products = tuple(
            lax.slice(xb, (0, i * dh, j * dw, 0), (b, i * dh + (rows - 1) * sh + 1, j * dw + (ow - 1) * sw + 1, c),
                      (1, sh, sw, 1)) * gb
            for i in range(kh) for j in range(kw)
        )
        zeros = tuple(jnp.zeros((), jnp.float32) for _ in products)
        sums = lax.reduce(products, zeros, lambda u, v: tuple(p + q for p, q in zip(u, v)), (0, 1, 2))
        return acc + jnp.stack(sums), None

    acc, _ = lax.scan(body, jnp.zeros((kh * kw, c), jnp.float32), jnp.arange(n_blocks))
    return acc.reshape(kh, kw, 1, c)
