"""unet / se_resnext50_32x4d at 256x448 crops, global batch 32: the original solution's unet-se_resnext run.

    python -m severjax.train --config=configs/sx50_unet.py --workdir=runs/unet_sx50
"""

from __future__ import annotations

from severjax import config as defaults


def get_config():
    """Only the values that differ from severjax.config.get_config()."""
    config = defaults.get_config()
    config.seed = 3333
    config.batch_size = 32
    config.epochs = 250
    config.data.crop = (256, 448)
    config.model.arch = "unet"
    config.model.encoder = "se_resnext50_32x4d"
    config.model.dropout = 0.1
    return config
