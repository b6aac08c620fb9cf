"""How computations run fast: the same maths as a standard op, by the implementation each backend runs best.

``severjax.ops.policy`` is the one place that asks which backend a program is for and picks an
implementation per op and use (training or inference); every op here takes ``impl="auto"`` and asks it.
Models call these ops by what they compute and never test the backend. ``severjax.ops.hostmem`` tunes
the host allocator that XLA:CPU's scratch buffers come from.

Modules, one concept each:

* ``conv``: :func:`pointwise_conv` (1x1), :func:`depthwise_conv`, :func:`conv3x3` (3x3, padding 1), and the
  tap sums their fast forms share (:func:`tap_products`, :func:`shifted_tap_sum`, :func:`sum_of_taps`).
* ``grouped``: :func:`grouped_conv` (native, dense block-diagonal blocks, or elementwise taps).
* ``upsample``: :func:`upsample_nearest` (torch's index rule) and :func:`upsample_concat_conv3x3`, the Unet
  decoder's upsample + concatenate + 3x3 convolution (native, or taps at the low resolution).
* ``pooling``: :func:`max_pool2d` (torch's semantics, ``ceil_mode``) and :func:`max_pool_ceil`.
* ``activations``: :func:`swish`.

Each op's implementations compute the same values; ``policy.CANDIDATES`` lists them, ``policy.STANDARD``
names XLA's own. docs/performance.md has the measurements behind every choice.
"""

from __future__ import annotations

import importlib
from typing import Any

# public op -> its module. Loaded on first use: entry points import ``severjax.ops.hostmem`` first thing,
# before they restart the process, and that must not import JAX.
_OPS = {
    "pointwise_conv": "conv", "depthwise_conv": "conv", "conv3x3": "conv", "tap_products": "conv",
    "shifted_tap_sum": "conv", "sum_of_taps": "conv",
    "grouped_conv": "grouped",
    "upsample_nearest": "upsample", "upsample_concat_conv3x3": "upsample", "upsample2x_conv3x3": "upsample",
    "max_pool2d": "pooling", "max_pool_ceil": "pooling",
    "swish": "activations",
}
__all__ = sorted(_OPS)


def __getattr__(name: str) -> Any:
    if name not in _OPS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_OPS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_OPS))
