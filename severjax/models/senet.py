"""SE-ResNeXt encoders (se_resnext50_32x4d, se_resnext101_32x4d) as segmentation_models_pytorch 0.6.0 builds them.

Submodule names mirror SMP's PyTorch tree (``layer0.conv1``, ``layer1.0.se_module.fc1``,
``layer2.0.downsample.0`` ...) with ``.<i>`` written ``_<i>``, so a PyTorch state dict maps onto these
variables by name rules alone (see ``severjax.models.convert``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from severjax.models.layers import BatchNorm2d, Conv2d, max_pool2d, sum_of_taps, torch_default_kernel_init

# SMP 0.6.0 settings shared by every SE-ResNeXt (senet.py `senet_encoders`).
_GROUPS = 32
_BASE_WIDTH = 4
_REDUCTION = 16
_STEM_WIDTH = 64
_EXPANSION = 4


class SENetEncoder(nn.Module):
    """SE-ResNeXt feature extractor returning SMP's six features ``[x, /2, /4, /8, /16, /32]`` (NHWC).

    ``layers`` is the number of bottlenecks per stage ((3, 4, 6, 3) for 50, (3, 4, 23, 3) for 101).
    """

    # ImageNet head of pretrainedmodels/SMP-hub files; SMP's encoder deletes it, the converter drops it.
    torch_ignored: ClassVar[tuple[str, ...]] = ("last_linear.",)

    in_channels: int = 3
    layers: Sequence[int] = (3, 4, 6, 3)
    groups: int = _GROUPS
    base_width: int = _BASE_WIDTH
    reduction: int = _REDUCTION
    dtype: Any = jnp.float32
    grouped_impl: str = "auto"  # see grouped_conv2d

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Channels of the six features, as SMP's ``encoder.out_channels`` gives them."""
        return (self.in_channels, _STEM_WIDTH) + tuple(64 * 2**i * _EXPANSION for i in range(4))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"SENetEncoder expects NHWC input with {self.in_channels} channels, got shape {x.shape}")
        features = [x]
        x = _Stem(_STEM_WIDTH, dtype=self.dtype, name="layer0")(x.astype(self.dtype), train)
        features.append(x)
        x = max_pool_ceil(x, 3, 2)  # layer0.pool: Caffe-style ceil_mode
        for stage, blocks in enumerate(self.layers):
            planes = 64 * 2**stage
            for i in range(blocks):
                x = SEResNeXtBottleneck(
                    planes=planes,
                    groups=self.groups,
                    base_width=self.base_width,
                    reduction=self.reduction,
                    stride=2 if (stage > 0 and i == 0) else 1,
                    downsample=(i == 0),
                    dtype=self.dtype,
                    grouped_impl=self.grouped_impl,
                    name=f"layer{stage + 1}_{i}",
                )(x, train)
            features.append(x)
        return features


class SEResNeXtBottleneck(nn.Module):
    """ResNeXt bottleneck (type C: stride on the grouped 3x3) with a squeeze-and-excitation gate."""

    planes: int
    groups: int = _GROUPS
    base_width: int = _BASE_WIDTH
    reduction: int = _REDUCTION
    stride: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32
    grouped_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        width = math.floor(self.planes * self.base_width / 64) * self.groups
        out_ch = self.planes * _EXPANSION
        bn = functools.partial(_batch_norm, train=train, dtype=self.dtype)
        conv = functools.partial(_conv, dtype=self.dtype)

        y = nn.relu(bn(name="bn1")(conv(width, 1, name="conv1")(x)))
        y = GroupedConv2d(width, 3, stride=self.stride, padding=1, groups=self.groups, dtype=self.dtype,
                          impl=self.grouped_impl, name="conv2")(y, train)
        y = nn.relu(bn(name="bn2")(y))
        y = bn(name="bn3")(conv(out_ch, 1, name="conv3")(y))
        if self.downsample:
            # a strided 1x1 conv is a subsample then a matmul: as a strided conv, its kernel gradient (transposed
            # copies of the activations on XLA:CPU) cost ~10% of the SE-ResNeXt train step
            residual = conv(out_ch, 1, name="downsample_0")(x[:, ::self.stride, ::self.stride])
            residual = bn(name="downsample_1")(residual)
        else:
            residual = x
        y = SEModule(out_ch, self.reduction, dtype=self.dtype, name="se_module")(y)
        return nn.relu(y + residual)


class SEModule(nn.Module):
    """Squeeze-and-excitation: channel gate ``sigmoid(fc2(relu(fc1(mean_hw(x)))))`` times ``x``."""

    channels: int
    reduction: int = _REDUCTION
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = _conv(self.channels // self.reduction, 1, bias=True, dtype=self.dtype, name="fc1")(s)
        s = _conv(self.channels, 1, bias=True, dtype=self.dtype, name="fc2")(nn.relu(s))
        return x * nn.sigmoid(s)


class _Stem(nn.Module):
    """layer0 without its pool (SMP moves the pool out so the /2 feature is taken before it)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _conv(self.features, 7, stride=2, padding=3, dtype=self.dtype, name="conv1")(x)
        return nn.relu(_batch_norm(train=train, dtype=self.dtype, name="bn1")(x))


class GroupedConv2d(nn.Module):
    """``torch.nn.Conv2d(groups=g, bias=False)`` with the parameters of :class:`Conv2d` (``kernel``
    ``(kh, kw, in/g, out)``), computed by :func:`grouped_conv2d` to dodge XLA:CPU's slow grouped convolution;
    ``train`` picks the implementation with ``impl`` (:func:`resolve_grouped_impl`)."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        if c % self.groups or self.features % self.groups:
            raise ValueError(f"{self.name}: in={c} and out={self.features} channels must divide groups={self.groups}")
        k = self.kernel_size
        kernel = self.param("kernel", torch_default_kernel_init, (k, k, c // self.groups, self.features))
        pad = ((self.padding, self.padding),) * 2
        impl = resolve_grouped_impl(self.impl, c // self.groups, train)
        return grouped_conv2d(x.astype(self.dtype), kernel.astype(self.dtype), (self.stride,) * 2, pad,
                              self.groups, impl=impl)


def resolve_grouped_impl(impl: str, group_width: int, train: bool) -> str:
    """The :func:`grouped_conv2d` implementation ``"auto"`` stands for, per backend and use.

    Off CPU: ``"native"``. On CPU: ``"taps"`` for inference when a group has at most
    ``_TAPS_MAX_GROUP_WIDTH`` input channels (SE-ResNeXt's layer1 and layer2), else ``"cpu"`` (dense
    blocks); training keeps the dense blocks, whose gradients are convolutions (the taps' autodiff
    gradient is pads of every tap).
    """
    if impl != "auto":
        return impl
    if jax.default_backend() != "cpu":
        return "native"
    return "taps" if not train and group_width <= _TAPS_MAX_GROUP_WIDTH else "cpu"


def grouped_conv2d(x: jax.Array, kernel: jax.Array, stride: tuple[int, int], padding: tuple[tuple[int, int], ...],
                   groups: int, impl: str = "auto") -> jax.Array:
    """Grouped convolution, NHWC input, HWIO kernel ``(kh, kw, in/groups, out)``.

    ``impl``: ``"native"`` (``lax.conv_general_dilated(feature_group_count=groups)``), ``"cpu"``, ``"taps"``
    or ``"auto"`` (``"cpu"`` on the CPU backend, native elsewhere; :class:`GroupedConv2d` resolves it with
    :func:`resolve_grouped_impl`, which also picks ``"taps"``). XLA:CPU's grouped convolution is slow
    (SE-ResNeXt's 3x3s 3-10x PyTorch's, their gradients worse). The ``"cpu"`` path splits the channels into blocks of
    consecutive groups about ``_DENSE_BLOCK_WIDTH`` channels wide and runs each block as a dense convolution
    with its block-diagonal kernel: dense convolutions of ~32 channels run near the CPU's peak, so the
    wasted multiply-adds (8x for 4-channel groups, none for 32) cost less than every grouped formulation
    measured (native, block-diagonal over all channels, shifted taps, im2col + batched dot), and autodiff
    gives dense-convolution gradients.

    ``"taps"`` is the true grouped product as elementwise work: for each input channel ``i`` of a group, that
    channel broadcast over the group's outputs, then per tap a strided slice times the tap's weights, all
    summed (XLA fuses it into one loop). For narrow groups it beats the dense blocks' wasted work; it is for
    inference (see :func:`resolve_grouped_impl`).
    """
    stride = tuple(int(s) for s in stride)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if impl == "auto":  # no use to go by: the choice that is fast to differentiate too
        impl = resolve_grouped_impl(impl, kernel.shape[2], train=True)
    if impl == "native":
        return lax.conv_general_dilated(x, kernel, stride, padding, dimension_numbers=_DN, feature_group_count=groups)
    if impl == "taps":
        return _grouped_taps(x, kernel, stride, padding, groups)
    if impl != "cpu":
        raise ValueError(f"grouped conv impl must be 'auto', 'native', 'cpu' or 'taps', got {impl!r}")
    cin, cout = kernel.shape[2], kernel.shape[3]
    per_block = _groups_per_block(groups, cin)
    outs = []
    for g in range(0, groups, per_block):
        xs = x[..., g * cin:(g + per_block) * cin]
        ks = kernel[..., g * (cout // groups):(g + per_block) * (cout // groups)]
        outs.append(lax.conv_general_dilated(xs, _block_diagonal(ks, per_block), stride, padding, dimension_numbers=_DN))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool_ceil(x: jax.Array, kernel: int, stride: int) -> jax.Array:
    """``F.max_pool2d(x, kernel, stride, ceil_mode=True)`` on NHWC, with a cheap gradient.

    The gradient goes, as in PyTorch, to the first maximum of each window (row-major), found by comparing the
    ``kernel**2`` strided taps with the output: elementwise work, where the autodiff of ``reduce_window``
    (select-and-scatter) costs ~5% of an SE-ResNeXt train step on XLA:CPU.
    """
    return max_pool2d(x, kernel, stride=stride, ceil_mode=True)


def _max_pool_ceil_fwd(x, kernel, stride):
    y = max_pool_ceil(x, kernel, stride)
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


max_pool_ceil.defvjp(_max_pool_ceil_fwd, _max_pool_ceil_bwd)


ENCODERS: dict[str, Callable[..., SENetEncoder]] = {
    "se_resnext50_32x4d": functools.partial(SENetEncoder, layers=(3, 4, 6, 3)),
    "se_resnext101_32x4d": functools.partial(SENetEncoder, layers=(3, 4, 23, 3)),
}


# ----------------------------------------------------------------------------------------------------
# helpers

_DN = ("NHWC", "HWIO", "NHWC")
# Channels of one dense block of the CPU grouped conv. Measured on XLA:CPU (YNNPACK convolutions) over
# SE-ResNeXt-50's seven grouped-conv shapes, forward and gradient, with blocks of 16 to 1024 channels:
# 32 is the best or within 20% of it everywhere (whole-stage dense blocks: 3-10x slower in layer1/layer2).
_DENSE_BLOCK_WIDTH = 32
# Widest group (input channels) the inference forward computes as elementwise taps. Measured on XLA:CPU at
# 2x256x416 (SE-ResNeXt-50): layer1 (4 a group) 2.0-2.3 against 4.5 ms for the dense blocks, layer2's strided
# conv (8) 2.3-2.8 against 3.5 ms; at 16 a group XLA's loop is 20x slower than the dense blocks. Whole Unet
# forward, in-process A/B: 198 -> 189-191 ms.
_TAPS_MAX_GROUP_WIDTH = 8


def _groups_per_block(groups: int, group_width: int) -> int:
    """Groups a dense block holds: the most that fit in ``_DENSE_BLOCK_WIDTH`` channels and divide ``groups``."""
    per = max(1, min(groups, _DENSE_BLOCK_WIDTH // group_width))
    while groups % per:
        per -= 1
    return per


def _grouped_taps(x: jax.Array, kernel: jax.Array, stride: tuple[int, int], padding: tuple[tuple[int, int], ...],
                  groups: int) -> jax.Array:
    """Grouped convolution as a sum over the input channels ``i`` of a group of depthwise taps: output channel
    ``g * cout_g + j`` reads input channel ``g * cin_g + i``, broadcast over the group's outputs."""
    # pad once, before the broadcasts: padding each one made the whole Unet-sx50 forward 1.6x slower (335 ms)
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    n, h, w, _ = xp.shape
    cin_g, cout = kernel.shape[2:]
    xg = xp.reshape(n, h, w, groups, cin_g)
    out = None
    for i in range(cin_g):
        xi = jnp.broadcast_to(xg[..., i:i + 1], (n, h, w, groups, cout // groups)).reshape(n, h, w, cout)
        part = sum_of_taps(xi, kernel[:, :, i:i + 1], stride)
        out = part if out is None else out + part
    return out


def _block_diagonal(kernel: jax.Array, groups: int) -> jax.Array:
    """``(kh, kw, in/g, out)`` grouped kernel -> the equivalent dense ``(kh, kw, in, out)`` kernel."""
    if groups == 1:
        return kernel
    kh, kw, ci, co = kernel.shape
    k = kernel.reshape(kh, kw, ci, groups, co // groups)
    eye = jnp.eye(groups, dtype=kernel.dtype)
    return jnp.einsum("hwcgo,Gg->hwGcgo", k, eye).reshape(kh, kw, groups * ci, co)


def _conv(features: int, kernel: int, *, stride: int = 1, padding: int = 0, groups: int = 1,
          bias: bool = False, dtype: Any = jnp.float32, name: str | None = None) -> nn.Module:
    """A PyTorch Conv2d (symmetric padding), float32 params, compute in ``dtype``."""
    return Conv2d(features, kernel, stride=stride, padding=padding, groups=groups, use_bias=bias,
                  dtype=dtype, name=name)


def _batch_norm(*, train: bool, dtype: Any = jnp.float32, name: str | None = None) -> Callable:
    """BatchNorm2d with PyTorch defaults (momentum 0.1, eps 1e-5), bound to the train flag."""
    return functools.partial(BatchNorm2d(momentum=0.1, eps=1e-5, dtype=dtype, name=name), train=train)
