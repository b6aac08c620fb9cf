"""Every training default, in one place: the other config files only set values.

``get_config()`` returns the ``ml_collections.ConfigDict`` that ``python -m severjax.train`` reads;
``severjax.train.validate_config`` rejects any key that is not defined here.
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The defaults shared by every run (the original solution's values where it had one)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.batch_size = 18  # GLOBAL batch over all devices and hosts
    config.eval_batch_size = 8  # global, full 256x1600 images
    config.epochs = 250
    config.steps_per_epoch = 0  # 0 = n_train // batch_size
    config.eval_every_epochs = 1
    # stop after this many epochs without a better validation score (the original meant 50/100; its
    # monitoring was broken so it never stopped); 0 = never
    config.early_stop_epochs = 0
    config.checkpoint_every = 500  # steps between periodic train-state saves (epoch ends always save)
    config.keep_checkpoints = 2  # latest K periodic checkpoints, plus the best by val dice
    config.log_every = 20  # steps between TensorBoard scalars
    # optimizer steps run by one device call (unrolled into one XLA program; calls never straddle an epoch
    # end or a checkpoint). 0 = 1, except 3 on a CPU whose malloc gets no huge pages (severjax.hostmem):
    # there XLA faults its whole scratch buffer in again at every call, 4 KiB at a time (FPN-b5 on 2 cores:
    # 0.81 s a step at 3 instead of 1.02 s at 1; with huge pages 0.69 s at 1). More steps a call compile
    # longer and need more memory (XLA's peak at 3 against 1, batch 2: FPN-b5 2.05 against 1.79 GB,
    # Unet-sx50 1.79 against 1.24 GB).
    config.steps_per_call = 0
    config.progress_bar = True
    config.init_weights = ""  # "" or an exported model dir (tools/convert_weights.py output)
    # Before each evaluation, replace the BatchNorm running statistics by their exact mean over this
    # many training batches ("precise BN"); 0 = keep the running averages (the original's behaviour).
    config.bn_recalibration_batches = 0

    config.data = ml_collections.ConfigDict()
    config.data.dir = "./data/severstal"  # Kaggle layout: train.csv, train_images/ [, test_images/]
    config.data.tfds_dir = ""  # "" = <data.dir>/tfds
    config.data.synthetic = None  # or ConfigDict(n_train, n_test, seed): generate into data.dir if empty
    config.data.crop = (256, 416)
    config.data.image_shape = (256, 1600)
    config.data.val_fraction = 0.2
    config.data.split_seed = 0
    config.data.mean = 0.3439
    config.data.std = 0.0383  # the original's value (really the variance; the true std is ~0.196)
    config.data.workers = 0  # grain worker processes (0 = in-process)
    config.data.limit_train = 0  # 0 = all
    config.data.limit_val = 0
    config.data.pseudo_csv = ""
    config.data.pseudo_images = ""
    config.data.pseudo_alpha = -0.15

    config.aug = ml_collections.ConfigDict()
    config.aug.crop_nonempty_p = 0.5
    config.aug.clahe_clip = (1.0, 4.0)
    config.aug.blur = 3
    config.aug.sharpen_alpha = (0.2, 0.3)
    config.aug.oneof = (0.5, 0.3, 0.3)  # CLAHE, blur, sharpen
    config.aug.hflip = 0.5
    config.aug.vflip = 0.5

    config.model = ml_collections.ConfigDict()
    config.model.arch = "fpn"
    config.model.encoder = "efficientnet-b5"
    config.model.classes = 4
    config.model.in_channels = 1
    config.model.dropout = 0.2
    config.model.decoder_merge_policy = "cat"
    config.model.first_conv = "r"
    config.model.dtype = "float32"  # compute dtype: "float32" or "bfloat16" (params stay float32)

    config.loss = ml_collections.ConfigDict()
    config.loss.bce_weight = 0.6
    config.loss.dice_weight = 0.4
    config.loss.dice_eps = 1e-7

    config.optim = ml_collections.ConfigDict()
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.threshold = 5.0  # RAdam rectification when N_sma >= threshold
    config.optim.encoder_lr = 7e-5
    config.optim.encoder_wd = 3e-5
    config.optim.decoder_lr = 3e-3
    config.optim.decoder_wd = 3e-4
    config.optim.clip_norm = 0.0  # global-norm clipping, 0 = off
    config.optim.schedule = "flat_logistic"  # or "flat_cosine", "constant"
    config.optim.flat_epochs = 30
    return config
