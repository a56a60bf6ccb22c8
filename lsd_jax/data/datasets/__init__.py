"""TFDS builders. Importing this package registers them with TFDS under these names:

  gta5                  GTA5 (manual dir: images/, labels/); configs full, 1280x720, 1280x720_jpeg
  synthia               SYNTHIA-RAND-CITYSCAPES (manual dir: RGB/, GT/LABELS/); configs 16, 19
  cityscapes_extracted  Cityscapes from extracted leftImg8bit/ + gtFine/; configs full, 1024x512
  synthetic_scenes      the embedded two-domain benchmark, generated (no download)
  appearance_adapted    a source copy written by FCAN's AAN stage; configs cityscapes19, synthia16

TFDS's own `cityscapes` builder (official zip files) is left as it is; the input pipeline
accepts it as a target too. The builders' names differ from it so that both can be registered.
"""
from lsd_jax.data.datasets.appearance_adapted import AppearanceAdapted
from lsd_jax.data.datasets.cityscapes import CityscapesExtracted
from lsd_jax.data.datasets.gta5 import Gta5
from lsd_jax.data.datasets.synthetic_scenes import SyntheticScenes
from lsd_jax.data.datasets.synthia import Synthia

__all__ = ["AppearanceAdapted", "CityscapesExtracted", "Gta5", "SyntheticScenes", "Synthia"]
