"""fpn / efficientnet-b5 at 256x416 crops, global batch 18: the original solution's fpn-b5 run."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def get_config():
    """Only the values that differ from configs/common.py."""
    config = common.get_config()
    config.seed = 447676
    config.batch_size = 18
    config.epochs = 250
    config.data.crop = (256, 416)
    config.model.arch = "fpn"
    config.model.encoder = "efficientnet-b5"
    config.model.decoder_merge_policy = "cat"
    config.model.dropout = 0.2
    return config
