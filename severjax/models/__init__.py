"""Models: EfficientNet / SE-ResNeXt / Inception-v4 encoders, Unet / FPN decoders, a classifier.

Architecture only; how each computation runs fast is :mod:`severjax.ops`'s business.
``create_model(arch, encoder, classes=4, in_channels=1, **kw)`` builds one (``arch`` in ``ARCHS``, ``encoder``
in ``encoder_names()``); weights from PyTorch (SMP) come in through
:func:`severjax.models.convert.convert_smp_state_dict`.
"""

from severjax.models.encoders import encoder_names
from severjax.models.registry import ARCHS, create_model

__all__ = ["ARCHS", "create_model", "encoder_names"]
