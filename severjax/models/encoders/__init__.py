"""Encoders by their SMP names: THE table of encoder names, and how to build one.

Each family lives in its own module (``efficientnet``, ``senet``, ``inception_v4``), imported when one of
its names is first built: a family that fails to import fails only its own names, with the import error
attached. The interface every encoder follows is documented in :mod:`severjax.models.base`.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Dict, Mapping, Tuple

import flax.linen as nn
import jax.numpy as jnp

# SMP encoder name -> (family module in this package, encoder class, fields fixed by the name)
ENCODERS: Dict[str, Tuple[str, str, Mapping[str, Any]]] = {
    **{f"efficientnet-b{i}": ("efficientnet", "EfficientNetEncoder", {"variant": f"efficientnet-b{i}"})
       for i in range(8)},
    "se_resnext50_32x4d": ("senet", "SENetEncoder", {"layers": (3, 4, 6, 3)}),
    "se_resnext101_32x4d": ("senet", "SENetEncoder", {"layers": (3, 4, 23, 3)}),
    "inceptionv4": ("inception_v4", "InceptionV4Encoder", {}),
}


def get_encoder(encoder: str, *, in_channels: int, dtype: Any = jnp.float32, **kw: Any) -> nn.Module:
    """Constructs the encoder module named ``encoder`` (SMP spelling); ``kw`` may carry the Flax ``name``."""
    return encoder_constructor(encoder)(in_channels=in_channels, dtype=dtype, **kw)


def encoder_names() -> Tuple[str, ...]:
    """Every encoder name the table holds (whether or not its family imports)."""
    return tuple(ENCODERS)


def encoder_constructor(name: str) -> Callable[..., nn.Module]:
    """The constructor of ``name``, called as ``(in_channels=..., dtype=..., **kw)``; errors name the encoder
    and, if its family fails to import, the import error."""
    if name not in ENCODERS:
        raise KeyError(f"unknown encoder {name!r}; known: {list(ENCODERS)}")
    family, class_name, fields = ENCODERS[name]
    cls = getattr(_family(family), class_name, None)
    if cls is None:
        raise ImportError(f"encoder {name!r}: {__name__}.{family} defines no {class_name}")
    return functools.partial(cls, **fields)


def encoder_torch_ignored(name: str) -> Tuple[str, ...]:
    """Torch keys (full model prefixes, ``encoder.`` included) this encoder carries but never uses."""
    cls = encoder_constructor(name).func
    return tuple("encoder." + p for p in getattr(cls, "torch_ignored", ()))


@functools.lru_cache(maxsize=None)
def _family(family: str) -> Any:
    module_name = f"{__name__}.{family}"
    try:
        return importlib.import_module(module_name)
    except Exception as e:  # a missing or broken family must not break the others
        raise ImportError(f"encoder module {module_name} failed to import: {e!r}") from e
