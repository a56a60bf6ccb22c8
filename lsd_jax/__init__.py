"""lsd_jax: LSD-seg (CVPR 2018) adversarial domain adaptation for semantic segmentation in JAX."""

__version__ = "0.1.0"
