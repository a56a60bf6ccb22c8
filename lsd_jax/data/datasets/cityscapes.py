"""Cityscapes (Cordts et al., 2016) from the extracted leftImg8bit/ and gtFine/ folders.

Build: python -m lsd_jax.data.prepare cityscapes_extracted/full --manual_dir /data/cityscapes
   (or tfds build NAME --imports lsd_jax.data.datasets --manual_dir ...; see docs/data.md)
(TFDS's own `cityscapes` builder reads the official zip files instead; the pipeline takes both.)
"""
from __future__ import annotations

import dataclasses

import numpy as np

import tensorflow_datasets as tfds

from lsd_jax.data import classes
from lsd_jax.data.datasets import common

LAYOUT = """\
  <manual_dir>/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  <manual_dir>/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png"""

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


@dataclasses.dataclass
class CityscapesConfig(tfds.core.BuilderConfig):
    """resize: (H, W) to store resized images and labels (nearest); None = original 2048x1024."""
    resize: tuple[int, int] | None = None
    class_set: str = "cityscapes19"


def read_label_ids(path) -> np.ndarray:
    label = common.open_image(path, "label")
    if label.mode not in ("L", "P"):
        raise common.BadFileError(f"label {path} has PIL mode {label.mode!r}; expected a "
                                  "single-channel *_gtFine_labelIds.png (not the colour PNG)")
    return np.asarray(label)


def _city_files(split_dir, suffix: str) -> dict[str, object]:
    """{"<city>_<seq>_<frame>": path} over every city folder of a split."""
    files = {}
    for city in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        files.update(common.list_pngs(city, suffix))
    return files


class CityscapesExtracted(tfds.core.GeneratorBasedBuilder):
    """Cityscapes fine annotations as trainIds (uint8, 255 = ignore); train and validation."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
        "https://www.cityscapes-dataset.com/ and extract both into the manual directory:\n"
        + LAYOUT)
    BUILDER_CONFIGS = [
        CityscapesConfig(name="full", description="Original 2048x1024 images and labels."),
        CityscapesConfig(name="1024x512", resize=(512, 1024),
                         description="Images and labels resized to 1024x512: a cheap target "
                                     "stream for training. Evaluate on `full` (labels at full "
                                     "resolution)."),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "full"

    def __init__(self, *, skip_bad_files: bool = False, **kwargs):
        """skip_bad_files: leave out (and report) pairs with a missing or unreadable file."""
        self._skip_bad_files = skip_bad_files
        super().__init__(**kwargs)

    def _info(self):
        return self.dataset_info_from_configs(
            description=common.describe(self, (
                "Cityscapes leftImg8bit images with gtFine labels mapped labelId -> "
                "trainId (255 = ignore). The train split keeps its labels for honest "
                "model selection on a held-out slice of it.")),
            features=common.segmentation_features(),
            homepage="https://www.cityscapes-dataset.com/",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        root = common.require_dirs(
            dl_manager,
            ["leftImg8bit/train", "leftImg8bit/val", "gtFine/train", "gtFine/val"],
            LAYOUT, "cityscapes_extracted")
        report = common.BuildReport("cityscapes_extracted")
        splits = {}
        for split, folder in (("train", "train"), ("validation", "val")):
            splits[split] = self._generate_examples(
                self._pairs(root, folder, report), report)
        report.publish(self.info)
        return splits

    def _pairs(self, root, folder, report):
        images = _city_files(root / "leftImg8bit" / folder, IMAGE_SUFFIX)
        labels = _city_files(root / "gtFine" / folder, LABEL_SUFFIX)
        if not images:
            raise common.LayoutError(
                f"cityscapes_extracted: no *{IMAGE_SUFFIX} files under "
                f"{root}/leftImg8bit/{folder}/<city>/. Expected layout:\n{LAYOUT}")
        for have, lacking, expected in (
                ("image", set(images) - set(labels), f"gtFine/{folder}/<city>/<name>{LABEL_SUFFIX}"),
                ("label", set(labels) - set(images),
                 f"leftImg8bit/{folder}/<city>/<name>{IMAGE_SUFFIX}")):
            if lacking and not self._skip_bad_files:
                raise common.BadFileError(common.missing_partner_message(
                    "cityscapes_extracted", f"{have}(s)", sorted(lacking), f"expected {expected}"))
            for name in lacking:
                report.leave_out(name, f"no partner ({expected})")
        return [(n, images[n], labels[n]) for n in sorted(set(images) & set(labels))]

    def _generate_examples(self, pairs, report):
        yield from common.generate_pairs(
            pairs, read_ids=read_label_ids, id_table=classes.CITYSCAPES_LABELID_TO_TRAINID,
            known_ids=classes.CITYSCAPES_KNOWN_IDS, resize=self.builder_config.resize,
            image_format="png", skip_bad_files=self._skip_bad_files, report=report)
        report.publish(self.info)
