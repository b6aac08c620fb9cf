"""The competition metric: Dice per (image, class) pair, an empty/empty pair scoring 1.

``dice_per_image_class`` and ``kaggle_score`` are jit-able jnp functions over batches;
``score_annotations`` scores two RLE tables (truth vs submission) on the host, one (image, class) pair at
a time with ``severjax.data.rle.rle_dice``, so memory stays flat for any number of images.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from severjax.data.rle import KAGGLE_SHAPE, rle_dice


def dice_per_image_class(pred, truth):
    """Dice of each (image, class) pair: float32 ``(B, C)`` from boolean ``(B, H, W, C)`` masks.

    ``2|P∩T| / (|P| + |T|)``, and exactly 1 where both masks are empty (the competition's rule).
    """
    pred = jnp.asarray(pred).astype(jnp.float32)
    truth = jnp.asarray(truth).astype(jnp.float32)
    inter = jnp.sum(pred * truth, axis=(1, 2))
    total = jnp.sum(pred, axis=(1, 2)) + jnp.sum(truth, axis=(1, 2))
    return jnp.where(total > 0, 2.0 * inter / jnp.maximum(total, 1.0), 1.0)


def kaggle_score(pred, truth):
    """The competition score of a batch: mean Dice over every (image, class) pair."""
    return jnp.mean(dice_per_image_class(pred, truth))


def dice_from_masks_np(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """numpy twin of ``dice_per_image_class`` for one image: ``(H, W, C)`` -> ``(C,)``."""
    pred = np.asarray(pred, bool)
    truth = np.asarray(truth, bool)
    inter = np.logical_and(pred, truth).sum(axis=(0, 1))
    total = pred.sum(axis=(0, 1)) + truth.sum(axis=(0, 1))
    return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)


def score_annotations(truth: Mapping[str, Sequence[str]], submission: Mapping[str, Sequence[str]],
                      shape=KAGGLE_SHAPE) -> tuple[np.ndarray, float]:
    """Scores ``{image_id: [4 RLE]}`` tables: returns (per-class mean Dice ``(4,)``, overall mean).

    Both must hold exactly the same images; a difference is an error that names them.
    """
    only_truth = sorted(set(truth) - set(submission))
    only_sub = sorted(set(submission) - set(truth))
    if only_truth or only_sub:
        parts = []
        if only_truth:
            parts.append(f"{len(only_truth)} image(s) in the truth but not the submission: {_head(only_truth)}")
        if only_sub:
            parts.append(f"{len(only_sub)} image(s) in the submission but not the truth: {_head(only_sub)}")
        raise ValueError("; ".join(parts))
    if not truth:
        raise ValueError("nothing to score: the truth holds no images")
    dice = np.zeros((len(truth), 4), np.float64)
    for row, image_id in enumerate(sorted(truth)):
        for c in range(4):
            dice[row, c] = rle_dice(truth[image_id][c], submission[image_id][c], shape)
    return dice.mean(axis=0), float(dice.mean())


def _head(names: Sequence[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")
