"""What segmentation and classifier training differ in, behind one interface: :class:`Task`."""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple

import ml_collections
import numpy as np
import optax

from severjax.train import classification, segmentation


class Task(NamedTuple):
    """The steps, the evaluation and the figure that selects the best model."""

    train_step: Callable  # (state, batch, rng) -> (state, metrics), under pmap
    eval_step: Callable  # (state, batch) -> device outputs, under pmap
    evaluate: Callable  # (p_eval_step, p_state, host batches) -> dict of figures
    score_name: str  # the figure of ``evaluate`` that selects the best model (higher is better)
    # Used when ``score_name`` is NaN because it is undefined on this validation split (a classifier's
    # ROC AUC when no class has both positive and negative images). Whether it is defined depends on
    # the split's labels only, so one run never compares the two figures with each other.
    fallback_name: str | None = None

    def score(self, val: Mapping[str, Any]) -> float:
        """The model-selection figure of the evaluation ``val``; raises ``FloatingPointError`` if not finite."""
        value = float(val[self.score_name])
        if np.isnan(value) and self.fallback_name is not None:
            value = float(val[self.fallback_name])
        if not np.isfinite(value):
            raise FloatingPointError(f"validation {self.score_name} is {value}: {val}")
        return value


def make_task(config: ml_collections.ConfigDict, schedules: Mapping[str, optax.Schedule]) -> Task:
    """Segmentation (unet/fpn: BCE + Dice, best by val Dice) or classifier (BCE, best by val ROC AUC).

    The classifier is picked by the mean ROC AUC over the classes where it is defined, not by accuracy:
    with rare classes the accuracy at 0.5 sits at the majority baseline for many evaluations and would
    pin the best model to the first one. Accuracy stands in only where no class's AUC is defined.
    """
    if config.model.arch == "classifier":
        return Task(functools.partial(classification.train_step, schedules=schedules,
                                      bce_weight=float(config.loss.bce_weight)),
                    classification.eval_step, classification.evaluate, "auc_mean", "accuracy_mean")
    return Task(functools.partial(segmentation.train_step, loss_config=dict(config.loss), schedules=schedules),
                segmentation.eval_step, segmentation.evaluate, "dice_mean")
