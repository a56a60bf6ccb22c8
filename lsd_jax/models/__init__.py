"""The three LSD networks: F+C (VGG16 FCN-8s), the generator G and the discriminator D."""

from lsd_jax.models.discriminator import Discriminator
from lsd_jax.models.generator import Generator
from lsd_jax.models.vgg_fcn import VGG_MEAN_BGR, FCN8s, check_training_size

__all__ = ["FCN8s", "Generator", "Discriminator", "VGG_MEAN_BGR", "check_training_size"]
