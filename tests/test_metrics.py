import jax
import numpy as np

from severjax import metrics
from severjax.data.rle import rle_encode


def test_dice_rules():
    pred = np.zeros((2, 4, 5, 4), bool)
    truth = np.zeros_like(pred)
    pred[0, :2, :, 0] = True   # 10 px
    truth[0, :1, :, 0] = True  # 5 px, inside pred
    truth[1, 0, 0, 1] = True   # missed entirely
    pred[1, 3, 3, 2] = True    # false positive
    d = np.asarray(jax.jit(metrics.dice_per_image_class)(pred, truth))
    expect = np.ones((2, 4))
    expect[0, 0] = 2 * 5 / 15
    expect[1, 1] = 0.0
    expect[1, 2] = 0.0
    np.testing.assert_allclose(d, expect, rtol=1e-6)
    np.testing.assert_allclose(float(metrics.kaggle_score(pred, truth)), expect.mean(), rtol=1e-6)
    for i in range(2):
        np.testing.assert_allclose(metrics.dice_from_masks_np(pred[i], truth[i]), expect[i], rtol=1e-6)


def test_score_annotations_matches_batch_metric():
    rng = np.random.default_rng(0)
    shape = (16, 24)
    pred = rng.random((5,) + shape + (4,)) < 0.2
    truth = rng.random((5,) + shape + (4,)) < 0.2
    pred[0, ..., 1] = False
    truth[0, ..., 1] = False
    t = {f"{i}.jpg": [rle_encode(truth[i, ..., c]) for c in range(4)] for i in range(5)}
    p = {f"{i}.jpg": [rle_encode(pred[i, ..., c]) for c in range(4)] for i in range(5)}
    per_class, mean = metrics.score_annotations(t, p, shape)
    np.testing.assert_allclose(mean, float(metrics.kaggle_score(pred, truth)), rtol=1e-6)
    np.testing.assert_allclose(per_class, np.asarray(metrics.dice_per_image_class(pred, truth)).mean(0), rtol=1e-6)
