"""Precise BatchNorm: before an evaluation, running statistics := the exact mean of training-batch statistics.

With the original's BatchNorm momentum (0.01 in EfficientNet) the running statistics lag the weights by
hundreds of steps; short runs evaluate and export far better with exact ones
(``config.bn_recalibration_batches``; docs/performance.md, "Quickstart and short runs").
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from severjax.train.state import replicate_state
from severjax.train.steps import AXIS, shard_batch


def recalibrate(p_stats_step: Callable, p_state, batches: Iterable[Mapping[str, np.ndarray]], rng: jax.Array):
    """``p_state`` with its running statistics replaced by the mean over ``batches`` of their batch statistics.

    ``p_stats_step`` is :func:`statistics_step` pmapped over :data:`~severjax.train.steps.AXIS` with
    ``in_axes=(0, 0, None)``; batch ``i`` gets the dropout key ``fold_in(rng, i)``.
    """
    total, count = None, 0
    for i, batch in enumerate(batches):
        stats = p_stats_step(p_state, shard_batch(batch), jax.random.fold_in(rng, i))
        total = stats if total is None else jax.tree_util.tree_map(jnp.add, total, stats)
        count += 1
    if not count:
        raise ValueError("batch-norm recalibration got no batches")
    mean = jax.tree_util.tree_map(lambda t: np.asarray(t[0]) / count, jax.device_get(total))
    return p_state.replace(batch_stats=replicate_state(mean))


def statistics_step(state, batch: Mapping[str, jax.Array], rng: jax.Array, axis_name: str | None = AXIS) -> Any:
    """This batch's BatchNorm statistics, in the layout of ``state.batch_stats`` (call under ``pmap``).

    A train-mode forward updates each running statistic ``r`` to ``(1 - m) * r + m * s`` for the
    batch statistic ``s`` and the layer's momentum ``m``, whatever ``m`` is: two forwards, from
    ``r = 0`` and ``r = 1``, give ``m * s`` and ``1 - m + m * s``, hence ``m`` and ``s``. The running
    statistics never enter a train-mode forward, so both are exact.
    """
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

    def updated(fill):
        start = jax.tree_util.tree_map(lambda r: jnp.full_like(r, fill), state.batch_stats)
        _, out = state.apply_fn({"params": state.params, "batch_stats": start}, batch["image"], train=True,
                                rngs={"dropout": rng}, mutable=["batch_stats"])
        return out["batch_stats"]

    from_zero, from_one = updated(0.0), updated(1.0)
    stats = jax.tree_util.tree_map(lambda z, o: z / (1.0 - (o - z)), from_zero, from_one)
    return jax.lax.pmean(stats, axis_name) if axis_name is not None else stats
