"""Segmentation training (Unet, FPN): the BCE + Dice train step, the validation Dice step and its evaluation.

Both steps run under ``pmap`` over :data:`~severjax.train.steps.AXIS`, each device holding its share of
the global batch: gradients, BatchNorm statistics and metrics are ``pmean``'d, and the Dice term of the
loss is taken over the global batch (``severjax.losses``), so the step equals one device holding it all.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import jax_utils

from severjax import losses
from severjax.metrics import dice_per_image_class
from severjax.train.steps import AXIS, params_finite, shard_batch


def train_step(state, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               loss_config: Mapping[str, float], schedules: Mapping[str, optax.Schedule] | None = None,
               axis_name: str | None = AXIS) -> tuple[Any, dict[str, jax.Array]]:
    """One optimizer step of a ``TrainState`` on this device's share of the global batch (call under ``pmap``).

    ``rng`` is the step's key, the same on every device; each device folds in its index for dropout.
    ``loss_config``: ``config.loss`` (``bce_weight``, ``dice_weight``, ``dice_eps``); ``schedules`` the
    learning rates to report. With ``axis_name=None`` it is a plain single-device step (for ``jit``).
    """
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
            rngs={"dropout": rng}, mutable=["batch_stats"])
        terms = losses.bce_dice_loss(logits, batch["mask"], bce_weight=loss_config["bce_weight"],
                                     dice_weight=loss_config["dice_weight"], eps=loss_config["dice_eps"],
                                     axis_name=axis_name)
        return terms.loss, (terms, updates.get("batch_stats", {}))

    (_, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    new_state = state.apply_gradients(grads=grads)
    if axis_name is not None:
        batch_stats = jax.lax.pmean(batch_stats, axis_name)
    new_state = new_state.replace(batch_stats=batch_stats)
    metrics = {"loss": terms.loss, "bce": terms.bce, "dice_loss": terms.dice_loss,
               "grad_norm": optax.global_norm(grads)}
    if axis_name is not None:
        metrics = jax.lax.pmean(metrics, axis_name)
    metrics["params_finite"] = params_finite(new_state.params)
    for group, schedule in (schedules or {}).items():
        metrics[f"lr_{group}"] = schedule(state.step)
    return new_state, metrics


def eval_step(state, batch: Mapping[str, jax.Array], axis_name: str | None = AXIS) -> dict[str, jax.Array]:
    """Per-class Dice sums (probabilities thresholded at 0.5) weighted by ``batch["weight"]``.

    Padding images carry weight 0. Returns ``{"dice_sum": (C,), "count": ()}`` summed over devices.
    The original thresholded the logits at 0.5 (probability 0.62) by mistake; this uses probabilities.
    """
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                            batch["image"], train=False)
    pred = jax.nn.sigmoid(logits.astype(jnp.float32)) > 0.5
    dice = dice_per_image_class(pred, batch["mask"] > 0.5)
    weight = batch["weight"].astype(jnp.float32)
    out = {"dice_sum": jnp.sum(dice * weight[:, None], axis=0), "count": jnp.sum(weight)}
    return jax.lax.psum(out, axis_name) if axis_name is not None else out


def evaluate(p_eval_step: Callable, p_state, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """Runs the pmapped :func:`eval_step` over host-local batches; returns per-class and mean Dice."""
    dice_sum, count = None, 0.0
    for batch in batches:
        out = jax.device_get(jax_utils.unreplicate(p_eval_step(p_state, shard_batch(batch))))
        dice_sum = out["dice_sum"] if dice_sum is None else dice_sum + out["dice_sum"]
        count += float(out["count"])
    if not count:
        raise ValueError("validation produced no images (check config.data.val_fraction / limit_val)")
    per_class = [float(v) for v in np.asarray(dice_sum, np.float64) / count]
    return {"dice": per_class, "dice_mean": float(np.mean(per_class)), "images": int(round(count))}
