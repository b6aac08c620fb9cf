"""efficientnet-b1 defect classifier (4 sigmoid outputs, 1-channel stem) for gating and pseudo labels.

The original solution's classifier gated its segmentation at prediction time (``min_area = t0*c -
t0*(c-1)*p``); its training values are not in its repository, so these follow its segmentation runs
(RAdam groups, flat-then-logistic schedule, normalisation) with near-full-width crops, as the first
place's classifiers (224x1568) had. Image labels are ``mask.any`` over the crop, loss = BCE per class;
validation reports per-class accuracy and ROC AUC on full 256x1600 images.

    python -m severjax.train --config=configs/cls_b1.py --workdir=runs/cls_b1
"""

from __future__ import annotations

from severjax import config as defaults


def get_config():
    """Only the values that differ from severjax.config.get_config()."""
    config = defaults.get_config()
    config.seed = 1901
    config.batch_size = 16
    config.eval_batch_size = 8
    config.epochs = 60
    config.early_stop_epochs = 15
    config.data.crop = (256, 1568)
    config.model.arch = "classifier"
    config.model.encoder = "efficientnet-b1"
    config.model.dropout = 0.2
    config.loss.bce_weight = 1.0
    config.loss.dice_weight = 0.0
    config.optim.encoder_lr = 1e-4
    config.optim.decoder_lr = 1e-3
    config.optim.decoder_wd = 3e-5
    config.optim.flat_epochs = 10
    return config
