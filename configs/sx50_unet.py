"""unet / se_resnext50_32x4d at 256x448 crops, global batch 32: the original solution's unet-se_resnext run."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def get_config():
    """Only the values that differ from configs/common.py."""
    config = common.get_config()
    config.seed = 3333
    config.batch_size = 32
    config.epochs = 250
    config.data.crop = (256, 448)
    config.model.arch = "unet"
    config.model.encoder = "se_resnext50_32x4d"
    config.model.dropout = 0.1
    return config
