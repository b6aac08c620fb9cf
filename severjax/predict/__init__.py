"""Prediction: ensembles with flip TTA (``ensemble``) and jit post-processing to Kaggle masks (``postprocess``)."""

from severjax.predict.ensemble import Ensemble, load_members, predict_images
from severjax.predict.postprocess import PostprocessConfig, masks_to_rles, postprocess, reference_postprocess

__all__ = ["Ensemble", "PostprocessConfig", "load_members", "masks_to_rles", "postprocess", "predict_images",
           "reference_postprocess"]
