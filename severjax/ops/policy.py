"""The one policy: backend x use (training or inference) x shape -> the implementation each op runs.

Every op in ``severjax.ops`` has a standard implementation, XLA's own op (``STANDARD``), and on XLA:CPU
faster formulations of the same maths (``CANDIDATES``). An op called with ``impl="auto"`` asks
:func:`choose`; nothing outside ``severjax.ops`` asks which backend it runs on. Off CPU every op is its
standard implementation: GPUs and TPUs run XLA's convolutions well, and the CPU formulations were
measured on CPUs only (the figures are in docs/performance.md).

The backend is the one programs are traced for: ``jax.default_backend()``, or the platform named by
:func:`platform` while a program is lowered for another one (``jax.export`` for cuda or tpu from a CPU
host), so an exported accelerator program never holds a CPU-only kernel.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import jax

# op -> XLA's standard implementation of it (what every non-CPU backend runs)
STANDARD: dict[str, str] = {
    "pointwise_conv": "native",  # one dot over the channel axis
    "depthwise_conv": "native",  # conv_general_dilated, feature_group_count = channels
    "grouped_conv": "native",  # conv_general_dilated, feature_group_count = groups
    "conv3x3": "native",  # conv_general_dilated, 3x3, stride 1, padding 1
    "upsample_concat_conv": "native",  # nearest upsample, concatenate the skip, 3x3 convolution
    "max_pool_ceil": "native",  # reduce_window max, autodiff's select-and-scatter gradient
    "swish": "native",  # x * sigmoid(x), autodiff's gradient
    "small_components": "all",  # label every (image, class) plane on the device at once
}
# op -> every implementation it has (the standard one first); each computes the same values
CANDIDATES: dict[str, tuple[str, ...]] = {
    "pointwise_conv": ("native", "dot_grad"),
    "depthwise_conv": ("native", "taps"),
    "grouped_conv": ("native", "dense_blocks", "taps"),
    "conv3x3": ("native", "taps"),
    "upsample_concat_conv": ("native", "taps"),
    "max_pool_ceil": ("native", "taps_grad"),
    "swish": ("native", "recompute_grad"),
    "small_components": ("all", "per_plane", "host"),
}
# Widest group (input channels) a grouped convolution runs as elementwise taps in CPU inference; wider
# groups run as dense block-diagonal convolutions (docs/performance.md, "Grouped convolutions").
TAPS_MAX_GROUP_WIDTH = 8
# Most output channels a 3x3 convolution runs as tap products in CPU inference (a segmentation head);
# wider outputs cost more memory traffic than they save (docs/performance.md, "3x3 convolutions as taps").
CONV3X3_TAPS_MAX_FEATURES = 8
# Training steps a device call on a CPU whose malloc gets no huge pages (docs/performance.md, "Steps a call").
CPU_STEPS_PER_CALL_WITHOUT_HUGE_PAGES = 3
# Compiler options for one-off programs (model initialisation) on CPU: XLA's expensive passes spend
# minutes on the many random ops of an initialiser that runs once.
CPU_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

_override = threading.local()


def backend() -> str:
    """The platform programs are being traced for: the innermost :func:`platform`, else JAX's default."""
    return getattr(_override, "platform", None) or jax.default_backend()


@contextlib.contextmanager
def platform(name: str) -> Iterator[None]:
    """Trace for platform ``name`` ("cpu", "cuda", "rocm", "tpu"): ops choose as they would there.

    For cross-platform lowering, e.g. ``with platform("cuda"): jax.export.export(f, platforms=("cuda",))``.
    """
    previous = getattr(_override, "platform", None)
    _override.platform = "gpu" if name in ("cuda", "rocm") else name
    try:
        yield
    finally:
        _override.platform = previous


def choose(op: str, impl: str = "auto", *, train: bool | None = None, **facts: Any) -> str:
    """The implementation of ``op`` to run: ``impl`` itself unless it is ``"auto"``, then by the rules below.

    ``train``: whether the call is differentiated (None: unknown, so the choice must be fast to
    differentiate). ``facts`` the rules read: ``group_width`` (grouped_conv: input channels a group),
    ``features`` (conv3x3: output channels), ``doubles`` (upsample_concat_conv: the output is exactly
    twice the input's size).

    On CPU: pointwise convolutions as a dot with a two-dot gradient; depthwise convolutions as sums of
    shifted slices; grouped convolutions as elementwise taps in inference for groups of at most
    ``TAPS_MAX_GROUP_WIDTH`` channels, else as dense block-diagonal convolutions; a 3x3 convolution with at
    most ``CONV3X3_TAPS_MAX_FEATURES`` outputs as tap products in inference; the Unet's upsample +
    concatenate + 3x3 convolution as taps at the low resolution when it doubles the size; the ceil-mode max
    pool with a gradient from its strided taps; swish with a gradient that recomputes the sigmoid;
    small-component removal on the host. Elsewhere: ``STANDARD``.
    """
    if op not in CANDIDATES:
        raise ValueError(f"unknown op {op!r}; known: {sorted(CANDIDATES)}")
    if impl != "auto":
        if impl not in CANDIDATES[op]:
            raise ValueError(f"{op}: impl must be 'auto' or one of {CANDIDATES[op]}, got {impl!r}")
        return impl
    if backend() != "cpu":
        return STANDARD[op]
    inference = train is False
    if op == "pointwise_conv":
        return "dot_grad"
    if op == "depthwise_conv":
        return "taps"
    if op == "grouped_conv":
        return "taps" if inference and _fact(op, facts, "group_width") <= TAPS_MAX_GROUP_WIDTH else "dense_blocks"
    if op == "conv3x3":
        return "taps" if inference and _fact(op, facts, "features") <= CONV3X3_TAPS_MAX_FEATURES else "native"
    if op == "upsample_concat_conv":
        return "taps" if _fact(op, facts, "doubles") else "native"
    if op == "max_pool_ceil":
        return "taps_grad"
    if op == "swish":
        return "recompute_grad"
    return "host"  # small_components


def steps_per_call(value: int, huge_pages: bool | None = None) -> int:
    """Optimizer steps a training device call runs: ``value``, or for 0 the backend's default.

    0 means 1, except ``CPU_STEPS_PER_CALL_WITHOUT_HUGE_PAGES`` on a CPU whose malloc gets no huge pages
    (``huge_pages``, default :func:`severjax.ops.hostmem.huge_pages_on`): there XLA faults its scratch
    buffer in again at every call, and fewer, longer calls pay that less often.
    """
    if value:
        return int(value)
    if backend() != "cpu":
        return 1
    if huge_pages is None:
        from severjax.ops import hostmem

        huge_pages = hostmem.huge_pages_on()
    return 1 if huge_pages else CPU_STEPS_PER_CALL_WITHOUT_HUGE_PAGES


def init_compile_options() -> dict[str, Any] | None:
    """``compiler_options`` for programs that run once (initialisers): ``CPU_FAST_COMPILE`` on CPU."""
    return dict(CPU_FAST_COMPILE) if backend() == "cpu" else None


def _fact(op: str, facts: dict[str, Any], name: str) -> Any:
    if name not in facts:
        raise TypeError(f"choose({op!r}) needs the fact {name}=...")
    return facts[name]
