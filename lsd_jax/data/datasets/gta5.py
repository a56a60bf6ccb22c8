"""GTA5 (Richter et al., "Playing for Data", 2016): 24,966 game frames with Cityscapes labels.

Build: python -m lsd_jax.data.prepare gta5/1280x720_jpeg --manual_dir /data/gta5
   (or tfds build NAME --imports lsd_jax.data.datasets --manual_dir ...; see docs/data.md)
"""
from __future__ import annotations

import dataclasses

import numpy as np

import tensorflow_datasets as tfds

from lsd_jax.data import classes
from lsd_jax.data.datasets import common

LAYOUT = """\
  <manual_dir>/images/00001.png ... 24966.png   RGB frames, mostly 1914x1052
  <manual_dir>/labels/00001.png ... 24966.png   palette PNGs whose palette index is the labelId"""


@dataclasses.dataclass
class Gta5Config(tfds.core.BuilderConfig):
    """resize: (H, W) to store resized copies (cuts decode cost in training); None = original."""
    resize: tuple[int, int] | None = None
    image_format: str = "png"
    class_set: str = "cityscapes19"


def read_palette_ids(path) -> np.ndarray:
    """The palette indices of a GTA5 label: the labelIds. tf.image would expand the palette."""
    label = common.open_image(path, "label")
    if label.mode not in ("P", "L"):
        raise common.BadFileError(
            f"label {path} has PIL mode {label.mode!r}; GTA5 labels must be palette ('P') or "
            "greyscale ('L') PNGs whose pixel values are the Cityscapes labelIds")
    return np.asarray(label)


class Gta5(tfds.core.GeneratorBasedBuilder):
    """GTA5 images with labels as Cityscapes trainIds (uint8, 255 = ignore)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the images and labels from https://download.visinf.tu-darmstadt.de/data/"
        "from_games/ and extract them so that the manual directory reads:\n" + LAYOUT)
    BUILDER_CONFIGS = [
        Gta5Config(name="full", description="Original images and labels."),
        Gta5Config(name="1280x720", resize=(720, 1280),
                   description="Resized to 1280x720 (labels nearest), PNG."),
        Gta5Config(name="1280x720_jpeg", resize=(720, 1280), image_format="jpeg",
                   description="Resized to 1280x720 (labels nearest), images JPEG quality 95: "
                               "the cheapest to decode."),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "full"

    def __init__(self, *, skip_bad_files: bool = False, **kwargs):
        """skip_bad_files: leave out (and report) pairs with a missing or unreadable file
        instead of failing. Pairs whose image and label sizes differ are always left out."""
        self._skip_bad_files = skip_bad_files
        super().__init__(**kwargs)

    def _info(self):
        return self.dataset_info_from_configs(
            description=common.describe(self, (
                "GTA5 street scenes rendered by a game; labels are Cityscapes trainIds "
                "(255 = ignore). Pairs whose image and label sizes differ are left out.")),
            features=common.segmentation_features(image_format=self.builder_config.image_format),
            homepage="https://download.visinf.tu-darmstadt.de/data/from_games/",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        root = common.require_dirs(dl_manager, ["images", "labels"], LAYOUT, "gta5")
        images, labels = common.list_pngs(root / "images"), common.list_pngs(root / "labels")
        if not images and not labels:
            raise common.LayoutError(f"gta5: {root}/images and {root}/labels hold no .png files. "
                                     f"Expected layout:\n{LAYOUT}")
        report = common.BuildReport("gta5")
        for have, lacking, lack_dir in (("image", set(images) - set(labels), "labels"),
                                        ("label", set(labels) - set(images), "images")):
            if lacking and not self._skip_bad_files:
                raise common.BadFileError(common.missing_partner_message(
                    "gta5", f"{have}(s)", sorted(lacking), f"expected {lack_dir}/<name>.png"))
        pairs = []
        for name in sorted(set(images) | set(labels)):
            pair = self._check_pair(name, images.get(name), labels.get(name), report)
            if pair is not None:
                pairs.append(pair)
        report.publish(self.info)
        return {"train": self._generate_examples(pairs, report)}

    def _check_pair(self, name, image_path, label_path, report):
        """(name, image, label) if the pair is usable; None (reported) if it is left out."""
        if image_path is None or label_path is None:
            lack = "labels/" if label_path is None else "images/"
            report.leave_out(name, f"no partner in {lack}")
            return None
        try:
            image_size = common.image_size(image_path, "image")
            label_size = common.image_size(label_path, "label")
        except common.BadFileError:
            if not self._skip_bad_files:
                raise
            report.leave_out(name, "unreadable or truncated file")
            return None
        if image_size != label_size:
            report.leave_out(name, "image and label sizes differ")
            return None
        return name, image_path, label_path

    def _generate_examples(self, pairs, report):
        yield from common.generate_pairs(
            pairs, read_ids=read_palette_ids, id_table=classes.CITYSCAPES_LABELID_TO_TRAINID,
            known_ids=classes.CITYSCAPES_KNOWN_IDS, resize=self.builder_config.resize,
            image_format=self.builder_config.image_format,
            skip_bad_files=self._skip_bad_files, report=report)
        report.publish(self.info)
