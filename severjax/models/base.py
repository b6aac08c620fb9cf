"""What every model shares: :class:`EncoderModel`, and the interface every encoder follows.

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
* Its SMP names are rows of the one table in :mod:`severjax.models.encoders` (name -> family module,
  class, fixed fields), which builds it as ``cls(in_channels=..., dtype=..., **fields)``.
* Train-mode behaviour: BatchNorm via :class:`severjax.models.layers.BatchNorm2d` (batch statistics,
  running stats in the ``batch_stats`` collection), random ops take their key from
  ``self.make_rng("dropout")``.
* Flax submodules are named after the PyTorch module attributes (the rules are in
  :mod:`severjax.models.convert`), so PyTorch weights load by name.
"""

from __future__ import annotations

from typing import Any, Tuple

import flax.linen as nn

from severjax.models.encoders import encoder_torch_ignored, get_encoder


class EncoderModel(nn.Module):
    """The encoder named ``encoder_name`` (Flax name ``encoder``, as SMP's ``encoder.`` prefix), ``classes``
    outputs, ``in_channels`` inputs, and the torch keys the model drops.

    Subclasses declare their own fields after these, ``dtype`` among them, and call ``self.encode``
    inside their ``nn.compact`` ``__call__``: encoder -> decoder -> head, as SMP's base model.
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
