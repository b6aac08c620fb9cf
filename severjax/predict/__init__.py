"""Prediction: ensembles with flip TTA (``ensemble``) and jit post-processing to Kaggle masks (``postprocess``).

The submodules keep their names (``severjax.predict.postprocess`` is the module, not its function).
"""

from severjax.predict.ensemble import Ensemble, load_members, predict_images
from severjax.predict.postprocess import PostprocessConfig

__all__ = ["Ensemble", "PostprocessConfig", "load_members", "predict_images"]
