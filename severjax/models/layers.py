"""Layers with PyTorch semantics that every model builds on; what they compute, not how it runs fast.

:class:`Conv2d` (explicit, possibly asymmetric padding including TF-"same" static padding, stride, dilation,
groups, bias) hands the convolution to the op of its shape in :mod:`severjax.ops`, which picks the fastest
implementation for the backend; :class:`BatchNorm2d` (torch's eps/momentum and running-variance rule);
:class:`GroupNorm`; :func:`same_padding` and :func:`padding_pairs`; :func:`resize_bilinear_align_corners`
(bit-for-bit torch's ``interpolate(mode="bilinear", align_corners=True)``); :func:`drop_connect` and
:func:`channel_dropout`; the initialisers of torch and SMP.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from severjax import ops
from severjax.ops.conv import IntPair, Padding, int_pair, padding_pairs

Dtype = Any

# torch.nn.Conv2d's default init: kaiming_uniform(a=sqrt(5)) == uniform with variance 1/(3*fan_in).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# SMP's decoder init: kaiming_uniform(mode="fan_in", nonlinearity="relu").
kaiming_uniform_relu = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
# SMP's head init: xavier_uniform.
xavier_uniform = nn.initializers.xavier_uniform()


class Conv2d(nn.Module):
    """``torch.nn.Conv2d`` on NHWC inputs: explicit (possibly asymmetric) padding, stride, dilation, groups.

    ``padding`` is an int, a ``(ph, pw)`` pair (symmetric, as torch) or ``((top, bottom), (left, right))``
    (TF-"same" static padding, see :func:`same_padding`). Parameters ``kernel`` ``(kh, kw, in/groups, out)``
    and ``bias`` ``(out,)``, float32, computed in ``dtype``.

    The convolution goes to the op of its shape: depthwise (``groups == in == out``) ->
    :func:`severjax.ops.depthwise_conv`; 1x1, stride 1, no padding, one group ->
    :func:`~severjax.ops.pointwise_conv`; other grouped -> :func:`~severjax.ops.grouped_conv`; 3x3, stride 1,
    padding 1, no dilation -> :func:`~severjax.ops.conv3x3`; anything else ``lax.conv_general_dilated``.
    ``__call__``'s ``train`` is the use those ops choose their implementation by (None: not said, so one
    that is fast to differentiate).
    """

    features: int
    kernel_size: IntPair
    stride: IntPair = 1
    padding: Padding = 0
    dilation: IntPair = 1
    groups: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Callable = torch_default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array, train: Optional[bool] = None) -> jax.Array:
        in_features = x.shape[-1]
        if in_features % self.groups or self.features % self.groups:
            raise ValueError(
                f"{self.name}: in={in_features} and out={self.features} channels must divide groups={self.groups}"
            )
        kh, kw = int_pair(self.kernel_size)
        kernel = self.param("kernel", self.kernel_init, (kh, kw, in_features // self.groups, self.features))
        stride, dilation, padding = int_pair(self.stride), int_pair(self.dilation), padding_pairs(self.padding)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        if self.groups > 1 and self.groups == in_features == self.features:
            y = ops.depthwise_conv(x, kernel, stride, padding, dilation)
        elif (kh, kw) == (1, 1) and stride == (1, 1) and padding == ((0, 0), (0, 0)) and self.groups == 1:
            y = ops.pointwise_conv(x, kernel[0, 0])
        elif self.groups > 1:
            y = ops.grouped_conv(x, kernel, stride, padding, self.groups, train=train, dilation=dilation)
        elif (kh, kw) == (3, 3) and stride == (1, 1) and padding == ((1, 1), (1, 1)) and dilation == (1, 1):
            y = ops.conv3x3(x, kernel, train=train)
        else:
            y = lax.conv_general_dilated(x, kernel, stride, padding, rhs_dilation=dilation,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,)).astype(self.dtype)
        return y


class BatchNorm2d(nn.Module):
    """``torch.nn.BatchNorm2d`` on NHWC inputs, with torch's ``eps`` and ``momentum`` (0.1 = 10% new value).

    Train: normalises with the biased batch variance and updates ``running_var`` with the unbiased one
    (``n/(n-1)``), as torch does (``flax.linen.BatchNorm`` stores the biased one). Eval: the running stats,
    in torch's CPU arithmetic ``x * a + b`` with ``a = weight/sqrt(var+eps)``, ``b = bias - mean*a``.
    Statistics are computed in float32 whatever the compute ``dtype``; the output is ``dtype``.
    """

    momentum: float = 0.1
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (c,))
        bias = self.param("bias", nn.initializers.zeros_init(), (c,))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if train:
            xf = x.astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)  # two-pass: accurate (docs/performance.md, "BatchNorm")
            if not self.is_initializing():
                n = math.prod(x.shape[:-1])
                unbiased = var * (n / max(n - 1, 1))
                ra_mean.value = (1.0 - self.momentum) * ra_mean.value + self.momentum * lax.stop_gradient(mean)
                ra_var.value = (1.0 - self.momentum) * ra_var.value + self.momentum * lax.stop_gradient(unbiased)
        else:
            mean, var = ra_mean.value, ra_var.value
        a = scale * lax.rsqrt(var + self.eps)
        b = bias - mean * a
        return (x.astype(jnp.float32) * a + b).astype(self.dtype)


class GroupNorm(nn.Module):
    """``torch.nn.GroupNorm`` on NHWC inputs (params ``scale``/``bias``, torch's eps 1e-5 by default).

    Statistics as per-channel sums over H, W first, then summed within groups (two-pass variance): XLA
    reduces the NHWC layout that way faster than ``flax.linen.GroupNorm``'s reduction over a
    (B, H, W, G, C/G) view (docs/performance.md, "GroupNorm").
    """

    num_groups: int = 32
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        if c % self.num_groups:
            raise ValueError(f"{self.name}: {c} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones_init(), (c,))
        bias = self.param("bias", nn.initializers.zeros_init(), (c,))
        per_group = c // self.num_groups
        n = h * w * per_group
        xf = x.astype(jnp.float32)
        mean = jnp.repeat(jnp.sum(xf, axis=(1, 2)).reshape(b, self.num_groups, per_group).sum(-1) / n, per_group, axis=1)
        centred = xf - mean[:, None, None, :]
        var = jnp.sum(centred * centred, axis=(1, 2)).reshape(b, self.num_groups, per_group).sum(-1) / n
        a = jnp.repeat(lax.rsqrt(var + self.eps), per_group, axis=1) * scale
        return (xf * a[:, None, None, :] + (bias - mean * a)[:, None, None, :]).astype(self.dtype)


def same_padding(image_size: IntPair, kernel_size: IntPair, stride: IntPair, dilation: IntPair = 1):
    """TF-"same" padding ``((top, bottom), (left, right))`` for a given input size (extra pixel at the end).

    This is efficientnet_pytorch's ``Conv2dStaticSamePadding`` rule: output ``ceil(size/stride)``.
    """
    out = []
    for i, k, s, d in zip(int_pair(image_size), int_pair(kernel_size), int_pair(stride), int_pair(dilation)):
        o = math.ceil(i / s)
        pad = max((o - 1) * s + (k - 1) * d + 1 - i, 0)
        out.append((pad // 2, pad - pad // 2))
    return tuple(out)


def resize_bilinear_align_corners(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """``F.interpolate(x, size, mode="bilinear", align_corners=True)`` on NHWC, with torch's index/weight rule.

    ``jax.image.resize`` uses half-pixel centres (align_corners=False), hence this. Interpolates along W then
    H, in float32 weights like torch's CPU kernel.
    """
    out_h, out_w = size
    x = _lerp_axis(x, 2, out_w)
    return _lerp_axis(x, 1, out_h)


def drop_connect(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Stochastic depth per sample (efficientnet_pytorch's ``drop_connect``): zero whole samples, rescale."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def channel_dropout(rate: float, name: Optional[str] = None) -> nn.Dropout:
    """``nn.Dropout2d`` for NHWC: whole channels of a sample are zeroed (mask broadcast over H and W)."""
    return nn.Dropout(rate, broadcast_dims=(1, 2), name=name)


# ----------------------------------------------------------------------------------------------------
# helpers


def _lerp_axis(x, axis, n_out):
    n_in = x.shape[axis]
    if n_out == n_in:
        return x
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
    src = np.arange(n_out, dtype=np.float32) * scale
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    l1 = (src - i0.astype(np.float32)).astype(np.float32)
    l0 = (np.float32(1) - l1).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = n_out
    x0 = jnp.take(x, jnp.asarray(i0, jnp.int32), axis=axis)
    x1 = jnp.take(x, jnp.asarray(i1, jnp.int32), axis=axis)
    w0 = jnp.asarray(l0.reshape(shape), x.dtype)
    w1 = jnp.asarray(l1.reshape(shape), x.dtype)
    return x0 * w0 + x1 * w1
