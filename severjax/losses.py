"""Training loss of the original solution: 0.6 * BCE + 0.4 * (1 - soft Dice).

The Dice term is ONE soft Dice over the whole ``(B, H, W, C)`` tensor (sigmoid probabilities, no
threshold, eps 1e-7), as the original computed it, not a mean of per-image Dice. Under ``pmap`` the
global batch is split over devices; with ``axis_name`` the Dice sums are taken over the global batch
so that the loss value - and, after the gradients are ``pmean``'d, the gradient - equal those of one
device holding the whole batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class LossTerms(NamedTuple):
    loss: jax.Array
    bce: jax.Array
    dice_loss: jax.Array


def bce_dice_loss(logits: jax.Array, masks: jax.Array, *, bce_weight: float = 0.6,
                  dice_weight: float = 0.4, eps: float = 1e-7, axis_name: str | None = None) -> LossTerms:
    """``bce_weight * mean BCE + dice_weight * (1 - soft Dice)``; computed in float32.

    ``logits`` and ``masks`` are ``(B, H, W, C)``. With ``axis_name`` (inside ``pmap``/``shard_map``,
    every device holding the same number of images) BCE stays the local mean - its ``pmean`` is the
    global mean - and the Dice uses the global sums: see ``global_sum``.
    """
    logits = logits.astype(jnp.float32)
    masks = masks.astype(jnp.float32)
    bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, masks))
    probs = jax.nn.sigmoid(logits)
    inter = global_sum(jnp.sum(probs * masks), axis_name)
    total = global_sum(jnp.sum(probs) + jnp.sum(masks), axis_name)
    dice_loss = 1.0 - (2.0 * inter + eps) / (total + eps)
    return LossTerms(bce_weight * bce + dice_weight * dice_loss, bce, dice_loss)


def global_sum(local: jax.Array, axis_name: str | None) -> jax.Array:
    """Sum of ``local`` over the devices of ``axis_name`` whose gradient, once ``pmean``'d, is exact.

    The value is ``psum(local)``. The gradient flows through this device's ``local`` only, scaled by
    the device count, so that the mean over devices of the per-device gradients of any function of the
    global sum equals the gradient that a single device holding the whole batch would compute.
    """
    if axis_name is None:
        return local
    n = jax.lax.psum(1, axis_name)
    frozen = jax.lax.stop_gradient(local)
    return jax.lax.psum(frozen, axis_name) + n * (local - frozen)
