"""A small run for a laptop CPU: efficientnet-b0 FPN on a synthetic set (tools/quickstart.sh).

The synthetic set (Kaggle layout, 240 train + 40 test images) is generated into
~/.cache/severjax/synthetic on first use. From scratch (no ImageNet weights), full-height 256x256
crops and a high learning rate; validation every 2 epochs on 32 images, after replacing the
BatchNorm running statistics by exact ones (EfficientNet's momentum 0.01 needs thousands of steps).

    python -m severjax.train --config=configs/quickstart.py --workdir=runs/quickstart
"""

from __future__ import annotations

import os

import ml_collections

from severjax import config as defaults


def get_config():
    """Only the values that differ from severjax.config.get_config()."""
    config = defaults.get_config()
    config.seed = 1
    config.batch_size = 8
    config.eval_batch_size = 8
    config.epochs = 16  # 24 steps an epoch, 384 in all (docs/performance.md, "Quickstart and short runs")
    config.eval_every_epochs = 2
    config.checkpoint_every = 100
    config.log_every = 8
    config.bn_recalibration_batches = 8
    config.data.dir = os.path.expanduser("~/.cache/severjax/synthetic")
    config.data.synthetic = ml_collections.ConfigDict(dict(n_train=240, n_test=40, seed=0))
    config.data.crop = (256, 256)
    config.data.std = 0.196  # the true std: inputs of unit scale train faster from scratch
    config.data.limit_val = 32
    config.model.arch = "fpn"
    config.model.encoder = "efficientnet-b0"
    config.model.decoder_merge_policy = "add"
    config.model.dropout = 0.0
    config.optim.encoder_lr = 2e-3
    config.optim.decoder_lr = 5e-3
    config.optim.schedule = "flat_cosine"
    config.optim.flat_epochs = 3
    return config
