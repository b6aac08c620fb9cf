"""Image-level defect classifier: encoder, global average pooling, dropout, linear layer.

The torch equivalent is an SMP encoder followed by SMP's ``ClassificationHead`` (pool, flatten, dropout,
linear), hence the Flax name ``classification_head_3`` for the linear layer. Used to gate small masks.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from severjax.models.base import EncoderModel
from severjax.models.layers import xavier_uniform

Dtype = Any


class Classifier(EncoderModel):
    """``__call__(x NHWC, train) -> logits (B, classes)`` float32, one logit per defect class."""

    dropout: float = 0.2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = self.encode(x, train)[-1]
        y = jnp.mean(y, axis=(1, 2), dtype=jnp.float32).astype(self.dtype)
        y = nn.Dropout(self.dropout)(y, deterministic=not train)
        y = nn.Dense(self.classes, dtype=self.dtype, kernel_init=xavier_uniform, name="classification_head_3")(y)
        return y.astype(jnp.float32)
