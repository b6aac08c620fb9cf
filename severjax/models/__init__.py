"""Models: EfficientNet / SE-ResNeXt / Inception-v4 encoders, Unet / FPN decoders, a classifier.

``create_model(arch, encoder, classes=4, in_channels=1, **kw)`` builds one; weights from PyTorch (SMP) come
in through :func:`severjax.models.convert.convert_smp_state_dict`.
"""

from severjax.models.registry import create_model, encoder_names

__all__ = ["create_model", "encoder_names"]
