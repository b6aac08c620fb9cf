"""Shared layers with PyTorch semantics, and the encoder interface every encoder follows.

Encoder interface
-----------------
An encoder is a ``flax.linen.Module`` constructed with the fields ``in_channels: int`` and
``dtype: Any = jnp.float32`` (the compute dtype; parameters stay float32), plus its own fields.

* ``__call__(self, x, train: bool) -> list`` of 6 feature maps, NHWC, like SMP 0.6.0's encoders:
  ``features[0]`` is the input ``x`` itself, then feature maps at strides 2, 4, 8, 16, 32.
* ``out_channels`` (class attribute or property): tuple of 6 ints, the channels of those maps; equal to
  SMP 0.6.0's ``encoder.out_channels`` for the same ``in_channels`` (so ``out_channels[0] == in_channels``).
* ``torch_ignored`` (class attribute): tuple of torch state-dict key prefixes, relative to the encoder,
  that the PyTorch encoder carries but never uses in ``forward`` (EfficientNet's ``_conv_head.``/``_bn1.``,
  ImageNet heads such as ``_fc.`` or ``last_linear.``). The converter drops exactly those, and says so.
* The module file exposes ``ENCODERS: dict[str, Callable[..., nn.Module]]`` mapping each SMP encoder name
  it provides to a constructor called as ``ENCODERS[name](in_channels=..., dtype=...)`` (for instance
  ``functools.partial(SENetEncoder, variant="se_resnext50_32x4d")``). ``severjax.models.registry`` collects them.
* Train-mode behaviour: BatchNorm via :class:`BatchNorm2d` (batch statistics, running stats in the
  ``batch_stats`` collection), random ops take their key from ``self.make_rng("dropout")``.

Naming rule (PyTorch state-dict key <-> Flax variable path)
-----------------------------------------------------------
Flax submodules are named after the PyTorch module attributes, so conversion is a table of name rules
(implemented once in :func:`severjax.models.convert.torch_key_to_flax_path`):

* Split the torch key on ``"."``; glue every all-digit segment onto the segment before it with ``"_"``.
  ``encoder._blocks.3._bn1.weight`` -> module path ``encoder/_blocks_3/_bn1``;
  ``decoder.seg_blocks.0.block.1.block.0.weight`` -> ``decoder/seg_blocks_0/block_1/block_0``;
  ``segmentation_head.0.weight`` -> ``segmentation_head_0``. Name torch ``nn.Sequential``/``nn.ModuleList``
  children ``f"{attr}_{index}"`` in Flax. Torch names that literally contain ``_<digits>`` (Inception-v4's
  ``branch1_0``) keep their name unchanged: the rule only ever rewrites ``.<digits>``.
* Leaves: ``Conv2d`` ``kernel`` <-> ``weight`` (OIHW -> HWIO; a depthwise kernel ``(C, 1, kh, kw)`` becomes
  ``(kh, kw, 1, C)``, the Flax ``feature_group_count`` layout), ``bias`` <-> ``bias``; ``nn.Dense`` ``kernel``
  <-> ``weight`` transposed; ``BatchNorm2d``/``GroupNorm`` ``scale``/``bias`` <-> ``weight``/``bias``;
  ``batch_stats`` ``mean``/``var`` <-> ``running_mean``/``running_var`` (``num_batches_tracked`` is dropped:
  Flax keeps no counter and torch uses it only when ``momentum=None``).

Layers here: :class:`Conv2d` (explicit padding including TF-"same" static padding, stride, dilation, groups,
bias; a fast depthwise path on CPU), :class:`BatchNorm2d` (torch eps/momentum and running-variance rule),
:class:`GroupNorm`,
:func:`max_pool2d` (``ceil_mode``), :func:`resize_bilinear_align_corners` and :func:`upsample_nearest`
(bit-for-bit the index rules of ``torch.nn.functional.interpolate``), :func:`drop_connect`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Dtype = Any
IntPair = Union[int, Tuple[int, int]]
Padding = Union[int, Tuple[int, int], Tuple[Tuple[int, int], Tuple[int, int]]]

# torch.nn.Conv2d's default init: kaiming_uniform(a=sqrt(5)) == uniform with variance 1/(3*fan_in).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# SMP's decoder init: kaiming_uniform(mode="fan_in", nonlinearity="relu").
kaiming_uniform_relu = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
# SMP's head init: xavier_uniform.
xavier_uniform = nn.initializers.xavier_uniform()


class Conv2d(nn.Module):
    """``torch.nn.Conv2d`` on NHWC inputs: explicit (possibly asymmetric) padding, stride, dilation, groups.

    ``padding`` is an int, a ``(ph, pw)`` pair (symmetric, as torch) or ``((top, bottom), (left, right))``
    (TF-"same" static padding, see :func:`same_padding`). Depthwise convolutions (``groups == in == out``)
    run as a sum of shifted slices on CPU (``depthwise_impl="auto"``), where XLA's grouped convolution is slow.
    ``cpu_taps``: a 3x3, stride 1, padding 1 convolution runs on CPU as :func:`conv3x3_taps` (pays off for
    few output channels only; see there).
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
    depthwise_impl: str = "auto"
    cpu_taps: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = x.shape[-1]
        if in_features % self.groups or self.features % self.groups:
            raise ValueError(
                f"{self.name}: in={in_features} and out={self.features} channels must divide groups={self.groups}"
            )
        kh, kw = _pair(self.kernel_size)
        kernel = self.param("kernel", self.kernel_init, (kh, kw, in_features // self.groups, self.features))
        stride, dilation, padding = _pair(self.stride), _pair(self.dilation), padding_pairs(self.padding)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        if self.groups > 1 and self.groups == in_features == self.features:
            y = depthwise_conv2d(x, kernel, stride, padding, dilation, impl=self.depthwise_impl)
        elif (kh, kw) == (1, 1) and stride == (1, 1) and padding == ((0, 0), (0, 0)) and self.groups == 1:
            y = pointwise_conv2d(x, kernel[0, 0])
        elif (self.cpu_taps and jax.default_backend() == "cpu" and (kh, kw) == (3, 3) and stride == (1, 1)
              and padding == ((1, 1), (1, 1)) and dilation == (1, 1) and self.groups == 1):
            y = conv3x3_taps(x, kernel)
        else:
            y = lax.conv_general_dilated(
                x, kernel, stride, padding, rhs_dilation=dilation,
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups,
            )
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,)).astype(self.dtype)
        return y


def pointwise_conv2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` over the last axis of NHWC ``x`` (``kernel`` ``(in, out)``): a 1x1 convolution.

    On CPU, with a custom gradient: the kernel gradient ``x^T g`` is one dot contracting the flattened
    positions of both (2-D) operands, which XLA:CPU runs as is. Autodiff's 4-D contraction gets the cotangent
    laid out transposed instead, and the BatchNorm-backward fusion that produces it then writes it column by
    column: ~40% of an SE-ResNeXt layer1 bottleneck's train step, ~6% of an EfficientNet-b5 FPN's (70 ms).
    """
    if jax.default_backend() == "cpu":
        return _pointwise_cpu(x, kernel)
    return _pointwise(x, kernel)


def _pointwise(x, kernel):
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def _pointwise_cpu(x, kernel):
    return _pointwise(x, kernel)


def _pointwise_fwd(x, kernel):
    return _pointwise(x, kernel), (x, kernel)


def _pointwise_bwd(res, g):
    x, kernel = res
    dx = lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
    xf, gf = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dk = lax.dot_general(xf, gf, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dx, dk.astype(kernel.dtype)


_pointwise_cpu.defvjp(_pointwise_fwd, _pointwise_bwd)


def tap_products(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Every tap's products of a ``(3, 3, in, out)`` kernel with NHWC ``x``: ``(b, h, w, 3, 3, out)``, entry
    ``[:, i, j, di, dj]`` = ``x[:, i, j] @ kernel[di, dj]``.

    One matmul of ``x`` with the nine taps' kernels side by side (``in -> 9 * out``, :func:`pointwise_conv2d`,
    so its gradients are two plain dots); a 3x3 convolution is then :func:`shifted_tap_sum` of it.
    """
    b, h, w, c = x.shape
    o = kernel.shape[-1]
    return pointwise_conv2d(x, kernel.transpose(2, 0, 1, 3).reshape(c, 9 * o)).reshape(b, h, w, 3, 3, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def shifted_tap_sum(p: jax.Array, offsets: Tuple[Tuple[Tuple[int, int], ...], ...]) -> Tuple[jax.Array, ...]:
    """Sums of shifted tap products, one output per phase: ``out[k][:, i, j] = sum_t p[:, i + r, j + s, t]``
    over the nine taps ``t = (di, dj)`` with ``(r, s) = offsets[k][3 * di + dj]`` (each in -1..1), reading
    zero outside ``p``.

    A custom gradient of the same gather form (``dp[:, i, j, t] = sum_k dout[k][:, i - r, j - s]``): autodiff
    transposes each slice into a pad and sums 9 of them per phase, which XLA:CPU fused with the incoming
    gradient's producers into one slow loop (Unet-sx50 decoder: ~120 ms a train step).
    """
    return tuple(_tap_sum(p, phase) for phase in offsets)


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

# conv3x3 (padding 1): tap (di, dj) of output pixel (i, j) reads input pixel (i + di - 1, j + dj - 1)
_CONV3X3_OFFSETS = (tuple((di - 1, dj - 1) for di in range(3) for dj in range(3)),)


def conv3x3_taps(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``Conv2d(3x3, padding=1, stride=1, bias=False)`` on NHWC as :func:`tap_products` plus a shifted sum.

    The same multiply-adds as a direct convolution, but on XLA:CPU its gradient (two dots and a shifted sum)
    can beat the convolution's. Alone, Unet's 16->4 head at 2x256x416: backward 4.8 against 13.1 ms, forward
    5.7 against 6.6 ms; inside the whole Unet-sx50 train step only the forward gain showed, so Unet uses it
    for inference. Unet's skip convolutions (64-1024 -> 32-256 channels) gain in training (see
    ``unet.UpsampleConcatConv``). For wide outputs at high resolution the ``9 * out`` products cost more
    memory traffic than they save (16->16 at 2x256x416: forward 24.5 against 4.7 ms).
    """
    return shifted_tap_sum(tap_products(x, kernel), _CONV3X3_OFFSETS)[0]


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
            var = jnp.mean(jnp.square(xf - mean), axis=axes)  # two-pass: accurate, and as fast here as one-pass
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

    Statistics as per-channel sums over H, W first, then summed within groups (two-pass variance):
    on CPU 2-4x faster than ``flax.linen.GroupNorm``'s reduction over a (B, H, W, G, C/G) view.
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
    for i, k, s, d in zip(_pair(image_size), _pair(kernel_size), _pair(stride), _pair(dilation)):
        o = math.ceil(i / s)
        pad = max((o - 1) * s + (k - 1) * d + 1 - i, 0)
        out.append((pad // 2, pad - pad // 2))
    return tuple(out)


def padding_pairs(padding: Padding) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Normalises torch/TF padding specs to ``((top, bottom), (left, right))``."""
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    ph, pw = padding
    if isinstance(ph, int) and isinstance(pw, int):
        return ((ph, ph), (pw, pw))
    return (tuple(ph), tuple(pw))


# ----------------------------------------------------------------------------------------------------
# Depthwise convolution


def depthwise_conv2d(x, kernel, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), impl="auto"):
    """Depthwise convolution, NHWC input and ``(kh, kw, 1, C)`` kernel (channel multiplier 1).

    ``impl``: ``"native"`` (``lax.conv_general_dilated`` with ``feature_group_count``), ``"taps"`` (sum over
    the ``kh*kw`` taps of strided slices times the per-channel weights; XLA fuses it into one loop) or
    ``"auto"``: taps on CPU, native elsewhere. The taps path has a custom gradient: the input part is a
    taps correlation with the flipped kernel, the weight part one fused multi-output reduction.
    """
    stride, dilation = tuple(_pair(stride)), tuple(_pair(dilation))
    padding = tuple(tuple(p) for p in padding_pairs(padding))
    if impl == "auto":
        impl = "taps" if jax.default_backend() == "cpu" else "native"
    if impl == "native":
        return lax.conv_general_dilated(
            x, kernel, stride, padding, rhs_dilation=dilation,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
        )
    if impl != "taps":
        raise ValueError(f"depthwise impl must be 'auto', 'native' or 'taps', got {impl!r}")
    return _depthwise_taps(x, kernel, stride, padding, dilation)


def sum_of_taps(x: jax.Array, kernel: jax.Array, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1)) -> jax.Array:
    """Depthwise convolution (``(kh, kw, 1, C)`` kernel, explicit ``padding`` pairs) as the sum over the taps of
    strided slices times the per-channel weights, with plain autodiff (:func:`depthwise_conv2d` adds its custom
    gradient). XLA fuses it into one loop."""
    return _taps_padded(jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0))), kernel, stride, dilation)


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
    flipped kernel; 2-4x faster on CPU than the transpose of the strided slices (a sum of pads)."""
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


# ----------------------------------------------------------------------------------------------------
# Pooling, resizing, stochastic depth


def max_pool2d(x: jax.Array, kernel_size: IntPair, stride: Optional[IntPair] = None, padding: IntPair = 0,
               ceil_mode: bool = False) -> jax.Array:
    """``torch.nn.functional.max_pool2d`` on NHWC (implicit -inf padding, torch's ``ceil_mode`` rule)."""
    (kh, kw), (sh, sw) = _pair(kernel_size), _pair(stride if stride is not None else kernel_size)
    ph, pw = _pair(padding)
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


def resize_bilinear_align_corners(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """``F.interpolate(x, size, mode="bilinear", align_corners=True)`` on NHWC, with torch's index/weight rule.

    ``jax.image.resize`` uses half-pixel centres (align_corners=False), hence this. Interpolates along W then
    H, in float32 weights like torch's CPU kernel.
    """
    out_h, out_w = size
    x = _lerp_axis(x, 2, out_w)
    return _lerp_axis(x, 1, out_h)


def upsample_nearest(x: jax.Array, size: Optional[Sequence[int]] = None, scale_factor: Optional[float] = None) -> jax.Array:
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


@jax.custom_vjp
def swish(x: jax.Array) -> jax.Array:
    """``x * sigmoid(x)`` (``nn.silu``) with a hand-written gradient that keeps ``x`` and recomputes the sigmoid.

    Autodiff of ``nn.silu`` saves ``sigmoid(x)``, which the forward then writes as an extra output of each
    BatchNorm + swish fusion; here the backward fusion recomputes it from ``x`` (EfficientNet-b5 FPN train
    step on 2 CPU cores: 2.2% faster, in-process A/B).
    """
    return x * jax.nn.sigmoid(x)


def _swish_fwd(x):
    return swish(x), x


def _swish_bwd(x, g):
    s = jax.nn.sigmoid(x)
    return (g * (s * (1 + x * (1 - s))),)


swish.defvjp(_swish_fwd, _swish_bwd)


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


def _pair(v) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return (int(v[0]), int(v[1]))
    return (int(v), int(v))


def _nearest_axis(x, axis, n_out, scale):
    n_in = x.shape[axis]
    if n_out == n_in:
        return x
    if n_out == 2 * n_in:
        return jnp.repeat(x, 2, axis=axis)
    s = np.float32(n_in) / np.float32(n_out) if scale is None else np.float32(scale)
    idx = np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * s).astype(np.int64), n_in - 1)
    return jnp.take(x, jnp.asarray(idx, jnp.int32), axis=axis)


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
