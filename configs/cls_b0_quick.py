"""A short classifier run for a CPU: efficientnet-b0 on the quickstart's synthetic set.

Shares configs/quickstart.py's synthetic folder (~/.cache/severjax/synthetic, generated on first use).

    python -m severjax.train --config=configs/cls_b0_quick.py --workdir=runs/cls_b0_quick
"""

from __future__ import annotations

import os

import ml_collections

from severjax import config as defaults


def get_config():
    """Only the values that differ from severjax.config.get_config()."""
    config = defaults.get_config()
    config.seed = 2
    config.batch_size = 8
    config.eval_batch_size = 8
    # 720 steps: from scratch, EfficientNet's BatchNorm momentum (0.01) needs hundreds of steps before
    # the running statistics, which evaluation uses, catch up (docs/performance.md, "Quickstart and short runs")
    config.epochs = 30
    config.eval_every_epochs = 10
    config.checkpoint_every = 100
    config.log_every = 10
    config.data.dir = os.path.expanduser("~/.cache/severjax/synthetic")
    config.data.synthetic = ml_collections.ConfigDict(dict(n_train=240, n_test=40, seed=0))
    config.data.crop = (128, 256)
    config.data.std = 0.196
    config.data.limit_val = 48
    # Crops and flips only: every training image would get one of CLAHE/blur/sharpen, which moves the
    # stem's input statistics away from those of the plain validation images (blur=1 is the identity).
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
