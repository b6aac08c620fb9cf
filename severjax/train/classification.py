"""Image-level defect classifier training: labels from masks, BCE, train/eval steps, accuracy and ROC AUC.

The classifier (``create_model("classifier", encoder, classes=4)``, logits ``(B, 4)``) says which
defect classes an image holds; prediction uses it to gate the segmentation (larger minimum areas where
it doubts, see ``severjax.predict.postprocess``) and ``severjax-pseudo-label`` to keep confident test
images. The steps follow :mod:`severjax.train.segmentation`'s conventions (same ``TrainState``, same
``pmap`` axis), so the trainer switches on ``config.model.arch == "classifier"`` (:mod:`severjax.train.tasks`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from severjax.train.steps import AXIS, shard_batch


def train_step(state, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               schedules: Mapping[str, optax.Schedule] | None = None, bce_weight: float = 1.0,
               axis_name: str | None = AXIS) -> tuple[Any, dict[str, jax.Array]]:
    """One optimizer step of the classifier on this device's share of the batch (call under ``pmap``).

    ``state`` is a :class:`severjax.train.state.TrainState` (``apply_fn``, ``params``, ``batch_stats``);
    the labels are ``image_labels(batch["mask"])`` unless the batch carries ``"labels"``; the loss is
    ``bce_weight`` (``config.loss.bce_weight``) times the BCE. Gradients, BatchNorm statistics and metrics
    are ``pmean``'d over ``axis_name`` (``None``: single device, for ``jit``).
    """
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    labels = batch["labels"] if "labels" in batch else image_labels(batch["mask"])

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
            rngs={"dropout": rng}, mutable=["batch_stats"])
        return bce_weight * classifier_loss(logits, labels), (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    accuracy = jnp.mean(((logits > 0) == (labels > 0.5)).astype(jnp.float32))
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        batch_stats = jax.lax.pmean(batch_stats, axis_name)
    new_state = state.apply_gradients(grads=grads).replace(batch_stats=batch_stats)
    metrics = {"loss": loss, "bce": loss, "accuracy": accuracy, "grad_norm": optax.global_norm(grads)}
    if axis_name is not None:
        metrics = jax.lax.pmean(metrics, axis_name)
    for group, schedule in (schedules or {}).items():
        metrics[f"lr_{group}"] = schedule(state.step)
    return new_state, metrics


def eval_step(state, batch: Mapping[str, jax.Array], axis_name: str | None = AXIS) -> dict[str, jax.Array]:
    """Probabilities, labels and weights of this device's images (gathered on the host for the AUC)."""
    del axis_name  # nothing is reduced on device: ROC AUC needs every score
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                            batch["image"], train=False)
    labels = batch["labels"] if "labels" in batch else image_labels(batch["mask"])
    return {"probs": jax.nn.sigmoid(logits.astype(jnp.float32)), "labels": labels,
            "weight": batch["weight"].astype(jnp.float32)}


def evaluate(p_eval_step: Callable, p_state, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """Runs the pmapped :func:`eval_step` over host-local batches; per-class accuracy and AUC over all hosts.

    With several processes the outputs are all-gathered, so every process returns the same figures.
    """
    outs = []
    for batch in batches:
        out = jax.device_get(p_eval_step(p_state, shard_batch(batch)))
        outs.append({k: np.asarray(v).reshape((-1,) + np.shape(v)[2:]) for k, v in out.items()})
    if not outs:
        raise ValueError("validation produced no images (check config.data.val_fraction / limit_val)")
    merged = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        merged = {k: np.asarray(multihost_utils.process_allgather(v)).reshape((-1,) + v.shape[1:])
                  for k, v in merged.items()}
    return classification_metrics(merged["probs"], merged["labels"], merged["weight"])


def classification_metrics(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
                           ) -> dict[str, Any]:
    """Per-class accuracy and ROC AUC (and their means) of ``(N, C)`` probabilities.

    Images with weight 0 (padding) are dropped. ``auc_mean`` averages the classes whose AUC is defined
    (NaN when none is).
    """
    probs, labels = np.asarray(probs), np.asarray(labels)
    if weights is not None:
        keep = np.asarray(weights) > 0
        probs, labels = probs[keep], labels[keep]
    accuracy = per_class_accuracy(probs, labels)
    auc = np.array([roc_auc(probs[:, c], labels[:, c]) for c in range(probs.shape[1])])
    defined = auc[~np.isnan(auc)]
    return {"accuracy": [float(a) for a in accuracy], "accuracy_mean": float(accuracy.mean()),
            "auc": [float(a) for a in auc], "auc_mean": float(defined.mean()) if defined.size else float("nan"),
            "images": int(len(probs))}


def image_labels(masks: jax.Array) -> jax.Array:
    """Per-image class presence ``(B, C)`` float32 from masks ``(B, H, W, C)`` (any pixel > 0.5)."""
    if masks.ndim != 4:
        raise ValueError(f"image_labels: masks must be (B, H, W, C), got shape {masks.shape}")
    return jnp.any(masks > 0.5, axis=(1, 2)).astype(jnp.float32)


def classifier_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean binary cross-entropy over images and classes, in float32 (one sigmoid per class)."""
    if logits.shape != labels.shape:
        raise ValueError(f"classifier_loss: logits {logits.shape} and labels {labels.shape} differ")
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                                       labels.astype(jnp.float32)))


def per_class_accuracy(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5,
                       weights: np.ndarray | None = None) -> np.ndarray:
    """Fraction of images per class whose ``probs > threshold`` equals the label, float64 ``(C,)``.

    ``weights`` (``(N,)``, e.g. 0 for padding images) weight the images.
    """
    probs, labels = np.asarray(probs), np.asarray(labels)
    if probs.shape != labels.shape or probs.ndim != 2:
        raise ValueError(f"per_class_accuracy: probs {probs.shape} and labels {labels.shape} must be the "
                         "same (N, C) shape")
    weights = np.ones(len(probs)) if weights is None else np.asarray(weights, np.float64)
    if weights.sum() <= 0:
        raise ValueError("per_class_accuracy: no image has a positive weight")
    correct = (probs > threshold) == (labels > 0.5)
    return (correct * weights[:, None]).sum(0) / weights.sum()


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1-D), ties counted as half.

    Equals sklearn's ``roc_auc_score`` (the trapezoidal area, which is the Mann-Whitney statistic
    with average ranks for ties). Returns NaN when ``labels`` hold only one class: the area is then
    undefined (sklearn raises; a validation split may lack a class's positives, which must not stop
    training - the NaN is reported as such).
    """
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"roc_auc: {scores.size} scores but {labels.size} labels")
    if not np.isfinite(scores).all():
        raise ValueError(f"roc_auc: scores hold non-finite values: {scores[~np.isfinite(scores)][:5]}")
    positive = labels > 0.5
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    group_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks
