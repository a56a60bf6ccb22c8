"""SYNTHIA-RAND-CITYSCAPES (Ros et al., 2016): 9,400 rendered frames, 16-bit multi-channel labels.

Build: python -m lsd_jax.data.prepare synthia/16 --manual_dir /data/synthia
   (or tfds build NAME --imports lsd_jax.data.datasets --manual_dir ...; see docs/data.md)
"""
from __future__ import annotations

import dataclasses

import numpy as np

import tensorflow_datasets as tfds

from lsd_jax.data import classes
from lsd_jax.data.datasets import common

LAYOUT = """\
  <manual_dir>/RGB/0000000.png ... 0009399.png         RGB frames, 1280x760
  <manual_dir>/GT/LABELS/0000000.png ... 0009399.png   16-bit PNGs, class id in the first channel"""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclasses.dataclass
class SynthiaConfig(tfds.core.BuilderConfig):
    """class_set: label space stored; num_validation: last files (by name) kept for validation."""
    class_set: str = "synthia16"
    num_validation: int = 100


def png_bit_depth(data: bytes, path) -> int:
    """Bit depth from a PNG's IHDR chunk (byte 24): 16-bit labels must be decoded as uint16."""
    if len(data) < 26 or not data.startswith(PNG_SIGNATURE):
        raise common.BadFileError(f"label {path} is not a PNG file (or is truncated)")
    return data[24]


def read_synthia_ids(path) -> np.ndarray:
    """Class ids of a SYNTHIA label: the first channel of a 16-bit (or 8-bit) PNG."""
    import tensorflow as tf  # only the builder needs TensorFlow; PIL cannot read 16-bit RGB

    data = tfds.core.Path(path).read_bytes()
    dtype = tf.uint16 if png_bit_depth(data, path) == 16 else tf.uint8
    try:
        decoded = tf.io.decode_png(data, channels=0, dtype=dtype).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
        raise common.BadFileError(f"label {path} cannot be decoded: {e.message}") from e
    return decoded[..., 0].astype(np.int32)


def synthia_table(class_set: str) -> np.ndarray:
    """SYNTHIA id -> label index of `class_set` (65536 entries)."""
    to_19 = classes.SYNTHIA_ID_TO_TRAINID
    return classes.conversion_table("cityscapes19", class_set)[to_19]


class Synthia(tfds.core.GeneratorBasedBuilder):
    """SYNTHIA-RAND-CITYSCAPES with labels as trainIds of the 16- or 19-class set."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download SYNTHIA-RAND-CITYSCAPES from https://synthia-dataset.net/ and extract it so "
        "that the manual directory reads:\n" + LAYOUT)
    BUILDER_CONFIGS = [
        SynthiaConfig(name="16", class_set="synthia16",
                      description="16 classes (no terrain, truck, train), indexed 0..15 in the "
                                  "order of lsd_jax.data.classes.SYNTHIA_16."),
        SynthiaConfig(name="19", class_set="cityscapes19",
                      description="All 19 Cityscapes trainIds."),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "16"

    def __init__(self, *, skip_bad_files: bool = False, **kwargs):
        """skip_bad_files: leave out (and report) pairs with a missing or unreadable file."""
        self._skip_bad_files = skip_bad_files
        super().__init__(**kwargs)

    def _info(self):
        return self.dataset_info_from_configs(
            description=common.describe(self, (
                "SYNTHIA-RAND-CITYSCAPES: rendered street scenes. Splits as the LSD "
                "reference: train = all but the last 100 frames, validation = the last "
                "100. Labels are trainIds (255 = ignore).")),
            features=common.segmentation_features(),
            homepage="https://synthia-dataset.net/",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        root = common.require_dirs(dl_manager, ["RGB", "GT/LABELS"], LAYOUT, "synthia")
        images = common.list_pngs(root / "RGB")
        labels = common.list_pngs(root / "GT" / "LABELS")
        if not images and not labels:
            raise common.LayoutError(f"synthia: {root}/RGB and {root}/GT/LABELS hold no .png "
                                     f"files. Expected layout:\n{LAYOUT}")
        report = common.BuildReport("synthia")
        for have, lacking, where in (("image", set(images) - set(labels), "GT/LABELS"),
                                     ("label", set(labels) - set(images), "RGB")):
            if lacking and not self._skip_bad_files:
                raise common.BadFileError(common.missing_partner_message(
                    "synthia", f"{have}(s)", sorted(lacking), f"expected {where}/<name>.png"))
            for name in lacking:
                report.leave_out(name, f"no partner in {where}/")
        names = sorted(set(images) & set(labels))
        num_val = self.builder_config.num_validation
        if len(names) <= num_val:
            raise common.LayoutError(
                f"synthia: {len(names)} complete pairs in {root}, but the last {num_val} are the "
                f"validation split and the rest train: need more than {num_val}.")
        pairs = [(n, images[n], labels[n]) for n in names]
        report.publish(self.info)
        return {"train": self._generate_examples(pairs[:-num_val], report),
                "validation": self._generate_examples(pairs[-num_val:], report)}

    def _generate_examples(self, pairs, report):
        yield from common.generate_pairs(
            pairs, read_ids=read_synthia_ids, id_table=synthia_table(self.builder_config.class_set),
            known_ids=classes.SYNTHIA_KNOWN_IDS, resize=None, image_format="png",
            skip_bad_files=self._skip_bad_files, report=report)
        report.publish(self.info)
