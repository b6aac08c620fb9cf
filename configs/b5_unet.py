"""unet / efficientnet-b5 at 256x384 crops, global batch 18: the original solution's unet-b5 run.

    python -m severjax.train --config=configs/b5_unet.py --workdir=runs/unet_b5
"""

from __future__ import annotations

from severjax import config as defaults


def get_config():
    """Only the values that differ from severjax.config.get_config()."""
    config = defaults.get_config()
    config.seed = 642
    config.batch_size = 18
    config.epochs = 250
    config.data.crop = (256, 384)
    config.model.arch = "unet"
    config.model.encoder = "efficientnet-b5"
    config.model.dropout = 0.1
    return config
