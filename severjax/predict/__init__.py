"""Prediction: ensembles with flip TTA (``ensemble``), streamed over image folders (``stream``), jit
post-processing to Kaggle masks (``postprocess``, ``components``) and saved probabilities (``probs``).

The submodules keep their names (``severjax.predict.postprocess`` is the module, not its function).
"""

from severjax.predict.ensemble import Ensemble, load_members
from severjax.predict.postprocess import PostprocessConfig
from severjax.predict.stream import predict_images

__all__ = ["Ensemble", "PostprocessConfig", "load_members", "predict_images"]
