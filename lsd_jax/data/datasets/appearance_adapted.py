"""An appearance-adapted copy of a source dataset, as FCAN's AAN stage writes it.

Written by `python -m lsd_jax.appearance_transfer` (see there); built from that directory on
first use (`config.data.source.manual_dir`). Configs `cityscapes19` and `synthia16`: the label
space of the copied labels, which must be the one the copy's record names.

One data_dir holds one built copy per config name: to keep a second copy (other settings, other
source) beside the first, give it its own name with `config_overrides={"copy": "<name>"}`.
Training on a copy other than the one built under that name is refused (`check_same_copy`).
"""
from __future__ import annotations

import dataclasses
import json

import tensorflow_datasets as tfds
from absl import logging

from lsd_jax.data.datasets import common

LAYOUT = """\
  <manual_dir>/aan.json          the copy's record (settings, source, class set, complete)
  <manual_dir>/images/<name>.png adapted RGB images
  <manual_dir>/labels/<name>.png the source's labels: trainIds of the class set, 255 = ignore"""
RECORD = "aan.json"


@dataclasses.dataclass
class AppearanceAdaptedConfig(tfds.core.BuilderConfig):
    class_set: str = "cityscapes19"
    copy: str = ""  # a name that keeps several copies apart in one data_dir


def read_record(root, dataset: str = "appearance_adapted") -> dict:
    path = tfds.core.Path(root) / RECORD
    if not path.exists():
        raise common.LayoutError(f"{dataset}: {path} does not exist; is {root} a directory "
                                 "written by python -m lsd_jax.appearance_transfer? Expected "
                                 f"layout:\n{LAYOUT}")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise common.BadFileError(f"{dataset}: {path} is not valid JSON: {e}") from e


def check_same_copy(builder, manual_dir: str | None) -> None:
    """A built copy is only used for the directory it was built from (by fingerprint)."""
    if manual_dir is None:
        return
    built = (builder.info.metadata or {}).get("fingerprint")
    wanted = read_record(manual_dir).get("fingerprint")
    if built != wanted:
        raise common.LayoutError(
            f"{builder.info.full_name} in {builder.data_dir} was built from another adapted "
            f"copy (fingerprint {built}) than {manual_dir} ({wanted}). Give this copy its own "
            "name (config.data.source.config_overrides.copy) or its own data_dir.")


class AppearanceAdapted(tfds.core.GeneratorBasedBuilder):
    """Adapted source images with the source's own labels (trainIds, 255 = ignore)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Write the copy with python -m lsd_jax.appearance_transfer "
                                    "--config ... --output DIR, and pass DIR:\n" + LAYOUT)
    BUILDER_CONFIGS = [
        AppearanceAdaptedConfig(name="cityscapes19", class_set="cityscapes19",
                                description="Labels in the 19 Cityscapes classes."),
        AppearanceAdaptedConfig(name="synthia16", class_set="synthia16",
                                description="Labels in SYNTHIA's 16 classes."),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "cityscapes19"

    def _info(self):
        return self.dataset_info_from_configs(
            description=("Source images re-rendered in the target domain's appearance (FCAN's "
                         "AAN), with the source's labels."),
            features=common.segmentation_features(),
            metadata=tfds.core.MetadataDict(),
        )

    # Not "Downloading and preparing dataset Unknown size": nothing is downloaded (as in
    # synthetic_scenes.py).
    def _log_download_bytes(self):
        logging.info("Building %s from an adapted copy in %s ...", self.info.full_name,
                     self.data_dir)

    def _log_download_done(self):
        logging.info("Built %s", self.info.full_name)

    def _split_generators(self, dl_manager):
        name = "appearance_adapted"
        root = common.require_dirs(dl_manager, ["images", "labels"], LAYOUT, name)
        record = read_record(root, name)
        stored = record.get("source", {}).get("class_set")
        if stored != self.builder_config.class_set:
            raise common.LayoutError(
                f"{name}: {root} holds labels in {stored!r}, not in "
                f"{self.builder_config.class_set!r}: use appearance_adapted/{stored}")
        if not record.get("complete"):
            raise common.LayoutError(
                f"{name}: {root} is not complete ({record.get('num_images', 0)} images written "
                "so far); run python -m lsd_jax.appearance_transfer again with the same "
                "config and --output, without --max_images, to finish it")
        images, labels = common.list_pngs(root / "images"), common.list_pngs(root / "labels")
        if set(images) != set(labels) or not images:
            lacking = sorted(set(images) ^ set(labels))
            raise common.BadFileError(common.missing_partner_message(
                name, "file(s)", lacking, "images/<name>.png and labels/<name>.png"))
        self.info.metadata.update({"fingerprint": record.get("fingerprint"),
                                   "source": record.get("source"),
                                   "target": record.get("target"),
                                   "feature_network": record.get("feature_network")})
        return {"train": self._generate_examples(images, labels)}

    def _generate_examples(self, images, labels):
        for name in sorted(images):
            yield name, {"image": images[name].read_bytes(),
                         "label": labels[name].read_bytes(), "name": name}
