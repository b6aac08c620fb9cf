"""Classifier pieces: image labels, BCE, accuracy, tie-aware ROC AUC, train/eval steps on a tiny CNN."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import jax_utils
from flax.training import train_state
from scipy import stats

from severjax.train import classification
from severjax.train.steps import AXIS


def _trapezoid_auc(scores, labels):
    """sklearn's definition: ROC points at each distinct threshold, trapezoidal area."""
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(labels)[last_of_group]
    fps = (last_of_group + 1) - tps
    tpr = np.r_[0, tps] / labels.sum()
    fpr = np.r_[0, fps] / (len(labels) - labels.sum())
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def test_image_labels_from_masks():
    masks = np.zeros((2, 8, 8, 4), np.float32)
    masks[0, 3, 4, 1] = 1
    masks[1, :, :, 3] = 1
    np.testing.assert_array_equal(classification.image_labels(jnp.asarray(masks)), [[0, 1, 0, 0], [0, 0, 0, 1]])


def test_classifier_loss_is_mean_bce():
    logits = jnp.array([[2.0, -1.0], [0.0, 3.0]])
    labels = jnp.array([[1.0, 0.0], [1.0, 0.0]])
    p = 1 / (1 + np.exp(-np.asarray(logits)))
    expected = -np.mean(np.asarray(labels) * np.log(p) + (1 - np.asarray(labels)) * np.log(1 - p))
    np.testing.assert_allclose(classification.classifier_loss(logits, labels), expected, rtol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_roc_auc_matches_trapezoid_and_mann_whitney(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + 0.3 * labels, 1)  # rounding makes many ties
    auc = classification.roc_auc(scores, labels)
    assert auc == pytest.approx(_trapezoid_auc(scores, labels.astype(int)), abs=1e-12)
    u = stats.mannwhitneyu(scores[labels], scores[~labels]).statistic
    assert auc == pytest.approx(u / (labels.sum() * (~labels).sum()), abs=1e-12)


def test_roc_auc_edges():
    assert classification.roc_auc([0.1, 0.9], [0, 1]) == 1.0
    assert classification.roc_auc([0.9, 0.1], [0, 1]) == 0.0
    assert classification.roc_auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    assert np.isnan(classification.roc_auc([0.2, 0.3], [1, 1]))
    with pytest.raises(ValueError, match="scores"):
        classification.roc_auc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="non-finite"):
        classification.roc_auc([np.nan, 0.2], [0, 1])


def test_per_class_accuracy_and_metrics():
    probs = np.array([[0.9, 0.2], [0.4, 0.7], [0.6, 0.1], [0.0, 0.0]])
    labels = np.array([[1, 0], [0, 1], [0, 0], [1, 1]])
    np.testing.assert_allclose(classification.per_class_accuracy(probs, labels), [0.5, 0.75])
    metrics = classification.classification_metrics(probs, labels, weights=np.array([1, 1, 1, 0]))
    assert metrics["images"] == 3
    np.testing.assert_allclose(metrics["accuracy"], [2 / 3, 1.0])
    assert metrics["auc"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="shape"):
        classification.per_class_accuracy(probs[:, :1], labels)


class _TinyClassifier(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), strides=2)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(2)(x)


class _State(train_state.TrainState):
    batch_stats: dict = None


def _batch(rng, n=8):
    """Class 0 = a bright square somewhere, class 1 = a dark one; masks mark them."""
    images = rng.normal(0, 0.1, (n, 16, 16, 1)).astype(np.float32)
    masks = np.zeros((n, 16, 16, 2), np.float32)
    for i in range(n):
        for c, value in ((0, 2.0), (1, -2.0)):
            if rng.random() < 0.5:
                y, x = rng.integers(0, 12, 2)
                images[i, y:y + 4, x:x + 4, 0] = value
                masks[i, y:y + 4, x:x + 4, c] = 1
    return {"image": images, "mask": masks, "weight": np.ones(n, np.float32)}


def test_train_step_learns_and_eval_reports_auc():
    model = _TinyClassifier()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
    state = _State.create(apply_fn=model.apply, params=variables["params"], tx=optax.adam(3e-2),
                          batch_stats=variables["batch_stats"])
    p_state = jax_utils.replicate(state)
    p_train = jax.pmap(classification.train_step, axis_name=AXIS, in_axes=(0, 0, None))
    p_eval = jax.pmap(functools.partial(classification.eval_step), axis_name=AXIS)
    shard = lambda b: {k: np.asarray(v)[None] for k, v in b.items()}  # one local device
    rng = np.random.default_rng(0)
    losses = []
    for step in range(60):
        p_state, metrics = p_train(p_state, shard(_batch(rng)), jax.random.key(step))
        losses.append(float(metrics["loss"][0]))
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])
    val = [_batch(np.random.default_rng(100 + i)) for i in range(4)]
    result = classification.evaluate(p_eval, p_state, val)
    assert result["images"] == 32
    assert min(result["auc"]) > 0.8 and result["accuracy_mean"] > 0.7
    # the jit (axis_name=None) step gives the same update as the one-device pmap step (whose
    # dropout key is the step key folded with device index 0)
    batch = _batch(np.random.default_rng(5))
    jit_state, jit_metrics = jax.jit(functools.partial(classification.train_step, axis_name=None))(
        state, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.fold_in(jax.random.key(1), 0))
    pm_state, pm_metrics = p_train(jax_utils.replicate(state), shard(batch), jax.random.key(1))
    np.testing.assert_allclose(jit_metrics["loss"], pm_metrics["loss"][0], rtol=1e-5)
    np.testing.assert_allclose(jit_state.params["Dense_0"]["kernel"],
                               pm_state.params["Dense_0"]["kernel"][0], rtol=1e-4, atol=1e-6)
