"""Optimizer and learning-rate schedules of the original solution, in optax.

RAdam (b1 0.9, b2 0.999, eps 1e-8, rectified when N_sma >= 5, else an un-normalised bias-corrected
momentum step) with decoupled weight decay ``p -= wd * lr * p``, in two parameter groups: the
encoder (top-level params key ``"encoder"``) and everything else (the decoder and heads), each with
its own learning rate, weight decay and schedule. Biases stay in their module's group, as in the
original (excluding them from decay hurt there).

Differences from the original PyTorch RAdam, both negligible: the original adds ``eps`` to
``sqrt(v)`` before bias correction (an effective ``eps / sqrt(1 - b2**t)`` after it); optax adds it
after. The original stepped its schedule once per epoch; here it is evaluated every optimizer step
at fractional epochs (see ``lr_multiplier``).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

ENCODER = "encoder"
DECODER = "decoder"
GROUPS = (ENCODER, DECODER)
SCHEDULES = ("flat_logistic", "flat_cosine", "constant")


def create_optimizer(optim: Mapping[str, Any], *, steps_per_epoch: int, epochs: int
                     ) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """Builds the two-group RAdam from ``config.optim``; returns ``(tx, {group: lr schedule})``.

    ``tx.init`` / ``tx.update`` expect a params tree whose top level holds an ``"encoder"`` key.
    """
    schedules = {
        group: make_schedule(optim["schedule"], base_lr=optim[f"{group}_lr"],
                             steps_per_epoch=steps_per_epoch, epochs=epochs,
                             flat_epochs=optim["flat_epochs"])
        for group in GROUPS
    }
    groups = {
        group: optax.chain(
            optax.scale_by_radam(b1=optim["b1"], b2=optim["b2"], eps=optim["eps"],
                                 threshold=optim["threshold"]),
            optax.add_decayed_weights(optim[f"{group}_wd"]),
            optax.scale_by_learning_rate(schedules[group]),
        )
        for group in GROUPS
    }
    tx = optax.multi_transform(groups, param_labels)
    if optim["clip_norm"] > 0:
        tx = optax.chain(optax.clip_by_global_norm(optim["clip_norm"]), tx)
    return tx, schedules


def param_labels(params: Mapping[str, Any]) -> dict[str, Any]:
    """``"encoder"`` for every leaf under the top-level ``"encoder"`` key, ``"decoder"`` for the rest."""
    if ENCODER not in params:
        raise ValueError(
            f"params have no top-level {ENCODER!r} key (found {sorted(params)}): the optimizer's "
            f"encoder group would be empty; name the backbone submodule {ENCODER!r}")
    return {key: jax.tree_util.tree_map(lambda _, g=(ENCODER if key == ENCODER else DECODER): g, sub)
            for key, sub in params.items()}


def make_schedule(name: str, *, base_lr: float, steps_per_epoch: int, epochs: int,
                  flat_epochs: float) -> optax.Schedule:
    """``step -> base_lr * lr_multiplier(step / steps_per_epoch)`` (optax counts steps from 0)."""
    if name not in SCHEDULES:
        raise ValueError(f"config.optim.schedule={name!r}: expected one of {SCHEDULES}")
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")

    def schedule(step):
        epoch = jnp.asarray(step, jnp.float32) / steps_per_epoch
        return base_lr * lr_multiplier(name, epoch, epochs=epochs, flat_epochs=flat_epochs)

    return schedule


def lr_multiplier(name: str, epoch: jax.Array, *, epochs: int, flat_epochs: float) -> jax.Array:
    """The schedule's multiplier of the base learning rate at a (fractional) ``epoch``.

    - ``flat_logistic``: 1 for ``flat_epochs``, then the logistic survival function
      ``1 / (1 + exp((x - L/2) / (L/10)))`` (``scipy.stats.logistic.sf(x, loc=L/2, scale=L/10)``) of
      ``x = epoch - flat_epochs`` over the remaining ``L = epochs - flat_epochs`` epochs. The original
      evaluated it once per epoch at integer x with ``n_epochs = epochs + 1`` (so its L was one larger);
      here x is fractional and the last step ends at about ``sf(L) = 0.0067``.
    - ``flat_cosine``: 1 for ``flat_epochs``, then a half cosine from 1 to 0 at ``epochs``.
    - ``constant``: 1.
    """
    epoch = jnp.asarray(epoch, jnp.float32)
    if name == "constant":
        return jnp.ones_like(epoch)
    length = max(float(epochs - flat_epochs), 1e-6)
    x = jnp.clip(epoch - flat_epochs, 0.0, length)
    if name == "flat_logistic":
        decayed = 1.0 / (1.0 + jnp.exp((x - 0.5 * length) / (0.1 * length)))
    elif name == "flat_cosine":
        decayed = 0.5 * (1.0 + jnp.cos(jnp.pi * x / length))
    else:
        raise ValueError(f"unknown schedule {name!r}: expected one of {SCHEDULES}")
    return jnp.where(epoch < flat_epochs, 1.0, decayed)

