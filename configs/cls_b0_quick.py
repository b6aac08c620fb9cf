"""A classifier run that trains in about ten minutes on a 2-core CPU: efficientnet-b0 on the quickstart's synthetic set.

Shares configs/quickstart.py's synthetic folder (~/.cache/severjax/synthetic, generated on first use).
"""

from __future__ import annotations

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def get_config():
    """Only the values that differ from configs/common.py."""
    config = common.get_config()
    config.seed = 2
    config.batch_size = 8
    config.eval_batch_size = 8
    # 720 steps: from scratch, the BatchNorm running variances start at 1 and decay by torch's momentum
    # 0.01 a step towards true variances of ~0.01-0.1; after 300 steps the stem's is still ~4x too big
    # and the eval-mode outputs are nearly constant (train-mode outputs already separate the classes).
    config.epochs = 30
    config.eval_every_epochs = 10
    config.checkpoint_every = 100
    config.log_every = 10
    config.data.dir = os.path.expanduser("~/.cache/severjax/synthetic")
    config.data.synthetic = ml_collections.ConfigDict(dict(n_train=240, n_test=40, seed=0))
    config.data.crop = (128, 256)
    config.data.std = 0.196
    config.data.limit_val = 48
    # Crops and flips only: every training image gets one of CLAHE/blur/sharpen, which moves the stem's
    # input texture variance ~2.5x away from the plain validation images' (blur=1 is the identity).
    config.aug.oneof = (0.0, 1.0, 0.0)
    config.aug.blur = 1
    config.model.arch = "classifier"
    config.model.encoder = "efficientnet-b0"
    config.model.dropout = 0.0
    config.loss.bce_weight = 1.0
    config.loss.dice_weight = 0.0
    config.optim.encoder_lr = 1e-3
    config.optim.decoder_lr = 3e-3
    config.optim.schedule = "flat_cosine"
    config.optim.flat_epochs = 10
    return config
