"""fpn / se_resnext50_32x4d at 256x416 crops, global batch 36: the original solution's fpn-se_resnext run.

    python -m severjax.train --config=configs/sx50_fpn.py --workdir=runs/fpn_sx50
"""

from __future__ import annotations

from severjax import config as defaults


def get_config():
    """Only the values that differ from severjax.config.get_config()."""
    config = defaults.get_config()
    config.seed = 66432
    config.batch_size = 36
    config.epochs = 300
    config.data.crop = (256, 416)
    config.model.arch = "fpn"
    config.model.encoder = "se_resnext50_32x4d"
    config.model.decoder_merge_policy = "cat"
    config.model.dropout = 0.1
    return config
