"""fpn / efficientnet-b5 at 256x416 crops, global batch 18: the original solution's fpn-b5 run.

    python -m severjax.train --config=configs/b5_fpn.py --workdir=runs/fpn_b5
"""

from __future__ import annotations

from severjax import config as defaults


def get_config():
    """Only the values that differ from severjax.config.get_config()."""
    config = defaults.get_config()
    config.seed = 447676
    config.batch_size = 18
    config.epochs = 250
    config.data.crop = (256, 416)
    config.model.arch = "fpn"
    config.model.encoder = "efficientnet-b5"
    config.model.decoder_merge_policy = "cat"
    config.model.dropout = 0.2
    return config
