"""severjax: JAX/Flax reimplementation of a top Severstal steel-defect segmentation solution."""

__version__ = "0.1.0"
