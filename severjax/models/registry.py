"""Model registry: ``create_model(arch, encoder, ...)`` and ``ARCHS``, the architectures it builds.

Encoders are named as SMP spells them; their table is :mod:`severjax.models.encoders`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from severjax.models.classifier import Classifier
from severjax.models.convert import FIRST_CONV_MODES
from severjax.models.decoders.fpn import FPN
from severjax.models.decoders.unet import Unet
from severjax.models.encoders import encoder_constructor

# arch -> its module class
_MODELS = {"unet": Unet, "fpn": FPN, "classifier": Classifier}
ARCHS = tuple(_MODELS)
# create_model kwargs each arch accepts beyond (encoder, classes, in_channels); "first_conv" is recorded in
# model specs (how a 3-channel stem was recycled at conversion) and has no effect on the module.
ARCH_KWARGS = {
    "unet": ("dropout", "decoder_channels", "dtype", "first_conv"),
    "fpn": ("dropout", "decoder_merge_policy", "pyramid_channels", "segmentation_channels", "upsampling", "dtype",
            "first_conv"),
    "classifier": ("dropout", "dtype", "first_conv"),
}


def create_model(arch: str, encoder: str, classes: int = 4, in_channels: int = 1, **kw: Any) -> nn.Module:
    """Builds an (unbound) Flax model: ``arch`` in ``ARCHS``, ``encoder`` as SMP spells it.

    ``kw``: ``dropout``, ``dtype`` (compute dtype, a jnp dtype or its name, e.g. "bfloat16"; params stay
    float32), ``first_conv`` (recorded only), and per arch: Unet ``decoder_channels``; FPN
    ``decoder_merge_policy`` ("add"|"cat"), ``pyramid_channels``, ``segmentation_channels``, ``upsampling``.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {ARCHS}")
    unknown = sorted(set(kw) - set(ARCH_KWARGS[arch]))
    if unknown:
        raise TypeError(f"create_model({arch!r}) got unexpected options {unknown}; accepted: {ARCH_KWARGS[arch]}")
    encoder_constructor(encoder)  # fail early, naming the encoder
    first_conv = kw.pop("first_conv", None)
    if first_conv is not None and first_conv not in FIRST_CONV_MODES:
        raise ValueError(f"first_conv must be one of {', '.join(FIRST_CONV_MODES)}; got {first_conv!r}")
    if "dtype" in kw:
        kw["dtype"] = _dtype(kw["dtype"])
    if "decoder_channels" in kw:
        kw["decoder_channels"] = tuple(kw["decoder_channels"])
    return _MODELS[arch](encoder_name=encoder, classes=int(classes), in_channels=int(in_channels), **kw)


def _dtype(value: Any):
    try:
        return jnp.dtype(value).type if isinstance(value, str) else value
    except TypeError as e:
        raise ValueError(f"unknown dtype {value!r}") from e
