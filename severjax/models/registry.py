"""Model registry: ``create_model(arch, encoder, ...)`` and the table of encoders by SMP name.

Encoders come from each encoder module's ``ENCODERS`` dict (see the interface in
:mod:`severjax.models.layers`). The SE-ResNeXt and Inception-v4 modules are imported lazily and guarded:
if one fails to import, only its own encoder names fail, with the import error attached.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Tuple

import flax.linen as nn
import jax.numpy as jnp

ARCHS = ("unet", "fpn", "classifier")
# module -> the SMP encoder names it must provide
ENCODER_MODULES = {
    "severjax.models.efficientnet": tuple(f"efficientnet-b{i}" for i in range(8)),
    "severjax.models.senet": ("se_resnext50_32x4d", "se_resnext101_32x4d"),
    "severjax.models.inception_v4": ("inceptionv4",),
}
# create_model kwargs each arch accepts beyond (encoder, classes, in_channels); "first_conv" is recorded in
# model specs (how a 3-channel stem was recycled at conversion) and has no effect on the module.
ARCH_KWARGS = {
    "unet": ("dropout", "decoder_channels", "dtype", "first_conv"),
    "fpn": ("dropout", "decoder_merge_policy", "pyramid_channels", "segmentation_channels", "upsampling", "dtype",
            "first_conv"),
    "classifier": ("dropout", "dtype", "first_conv"),
}


def create_model(arch: str, encoder: str, classes: int = 4, in_channels: int = 1, **kw: Any) -> nn.Module:
    """Builds an (unbound) Flax model: ``arch`` in {"unet", "fpn", "classifier"}, ``encoder`` as SMP spells it.

    ``kw``: ``dropout``, ``dtype`` (compute dtype, a jnp dtype or its name, e.g. "bfloat16"; params stay
    float32), ``first_conv`` (recorded only), and per arch: Unet ``decoder_channels``; FPN
    ``decoder_merge_policy`` ("add"|"cat"), ``pyramid_channels``, ``segmentation_channels``, ``upsampling``.
    """
    from severjax.models.classifier import Classifier
    from severjax.models.fpn import FPN
    from severjax.models.unet import Unet

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {ARCHS}")
    unknown = sorted(set(kw) - set(ARCH_KWARGS[arch]))
    if unknown:
        raise TypeError(f"create_model({arch!r}) got unexpected options {unknown}; accepted: {ARCH_KWARGS[arch]}")
    encoder_constructor(encoder)  # fail early, naming the encoder
    first_conv = kw.pop("first_conv", None)
    if first_conv is not None and first_conv not in ("r", "g", "b", "sum", "mean"):
        raise ValueError(f"first_conv must be one of r, g, b, sum, mean; got {first_conv!r}")
    if "dtype" in kw:
        kw["dtype"] = _dtype(kw["dtype"])
    if "decoder_channels" in kw:
        kw["decoder_channels"] = tuple(kw["decoder_channels"])
    cls = {"unet": Unet, "fpn": FPN, "classifier": Classifier}[arch]
    return cls(encoder_name=encoder, classes=int(classes), in_channels=int(in_channels), **kw)


class EncoderModel(nn.Module):
    """What every model shares: the encoder named ``encoder_name`` (Flax name ``encoder``, as SMP's
    ``encoder.`` prefix), ``classes`` outputs, ``in_channels`` inputs, and the torch keys it drops.

    Subclasses declare their own fields after these, ``dtype`` among them, and call ``self.encode``
    inside their ``nn.compact`` ``__call__``.
    """

    encoder_name: str
    classes: int = 4
    in_channels: int = 1

    @property
    def torch_ignored(self) -> Tuple[str, ...]:
        return encoder_torch_ignored(self.encoder_name)

    def encode(self, x: Any, train: bool) -> Any:
        """The encoder's feature pyramid of ``x`` (NHWC)."""
        encoder = get_encoder(self.encoder_name, in_channels=self.in_channels, dtype=self.dtype, name="encoder")
        return encoder(x, train)


def get_encoder(encoder: str, *, in_channels: int, dtype: Any = jnp.float32, **kw: Any) -> nn.Module:
    """Constructs the encoder module named ``encoder`` (SMP spelling); ``kw`` may carry the Flax ``name``."""
    return encoder_constructor(encoder)(in_channels=in_channels, dtype=dtype, **kw)


def encoder_torch_ignored(name: str) -> Tuple[str, ...]:
    """Torch keys (full model prefixes, ``encoder.`` included) this encoder carries but never uses."""
    ctor = encoder_constructor(name)
    cls = getattr(ctor, "func", ctor)
    return tuple("encoder." + p for p in getattr(cls, "torch_ignored", ()))


def encoder_names() -> Tuple[str, ...]:
    """Every encoder name the registry knows (whether or not its module imports)."""
    return tuple(n for names in ENCODER_MODULES.values() for n in names)


def encoder_constructor(name: str) -> Callable[..., nn.Module]:
    """The constructor registered for ``name``; errors name the encoder and, if any, its module's import error."""
    for module_name, names in ENCODER_MODULES.items():
        if name in names:
            table = _load(module_name)
            if name not in table:
                raise KeyError(f"{module_name}.ENCODERS has no entry {name!r} (has {sorted(table)})")
            return table[name]
    raise KeyError(f"unknown encoder {name!r}; known: {list(encoder_names())}")


# ----------------------------------------------------------------------------------------------------

_TABLES: Dict[str, Dict[str, Callable[..., nn.Module]]] = {}


def _load(module_name: str) -> Dict[str, Callable[..., nn.Module]]:
    if module_name not in _TABLES:
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # a missing or broken encoder file must not break the other encoders
            raise ImportError(f"encoder module {module_name} failed to import: {e!r}") from e
        table = getattr(module, "ENCODERS", None)
        if not isinstance(table, dict):
            raise ImportError(f"encoder module {module_name} defines no ENCODERS dict")
        _TABLES[module_name] = table
    return _TABLES[module_name]


def _dtype(value: Any):
    try:
        return jnp.dtype(value).type if isinstance(value, str) else value
    except TypeError as e:
        raise ValueError(f"unknown dtype {value!r}") from e
