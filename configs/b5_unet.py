"""unet / efficientnet-b5 at 256x384 crops, global batch 18: the original solution's unet-b5 run."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def get_config():
    """Only the values that differ from configs/common.py."""
    config = common.get_config()
    config.seed = 642
    config.batch_size = 18
    config.epochs = 250
    config.data.crop = (256, 384)
    config.model.arch = "unet"
    config.model.encoder = "efficientnet-b5"
    config.model.dropout = 0.1
    return config
