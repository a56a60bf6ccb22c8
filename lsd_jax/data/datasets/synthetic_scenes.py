"""The embedded benchmark: procedural street scenes in a source and a target domain.

No download: every example is drawn by `lsd_jax.data.scenes` from (config seed, split, index), so
a build is deterministic. The domains share layout distribution and label space (19 trainIds) and
differ only in appearance, which is set by the builder config. Other shifts need no code:

    config = SyntheticScenesConfig(name="target_noisy", palette="photo", noise=20.0, seed=1)
    tfds.builder("synthetic_scenes", config=config).download_and_prepare()

or, from a training config, `data.target.config_overrides = {"noise": 20.0}` (see pipeline).
"""
from __future__ import annotations

import dataclasses
import time

from absl import logging

import tensorflow_datasets as tfds

from lsd_jax.data import scenes

_SPLIT_IDS = {"train": 0, "validation": 1}


@dataclasses.dataclass
class SyntheticScenesConfig(tfds.core.BuilderConfig):
    """Size, counts, seed and the appearance (fields of `lsd_jax.data.scenes.Appearance`)."""
    height: int = 128
    width: int = 256
    num_train: int = 1000
    num_validation: int = 200
    seed: int = 0
    palette: str = "game"
    color_jitter: float = 12.0
    texture: float = 0.0
    lighting: float = 0.0
    noise: float = 0.0
    blur: float = 0.0
    gamma: float = 1.0
    class_set: str = "cityscapes19"

    def appearance(self) -> scenes.Appearance:
        return scenes.Appearance(**{f.name: getattr(self, f.name)
                                    for f in dataclasses.fields(scenes.Appearance)})


def _config(name: str, appearance: scenes.Appearance, seed: int, description: str,
            **fields) -> SyntheticScenesConfig:
    return SyntheticScenesConfig(name=name, seed=seed, description=description, **fields,
                                 **dataclasses.asdict(appearance))


class SyntheticScenes(tfds.core.GeneratorBasedBuilder):
    """Labelled procedural street scenes (image, label as trainIds, name)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First release.",
                     "1.1.0": "Thicker poles, larger signs, lights and people, taller walls and "
                               "fences: visible at FCN-8s's output stride of 8."}
    BUILDER_CONFIGS = [
        _config("source", scenes.SOURCE_APPEARANCE, seed=0,
                description="Source domain: flat, clean, saturated colours, like a game."),
        _config("target", scenes.TARGET_APPEARANCE, seed=1,
                description="Target domain: muted photographic colours, uneven lighting, "
                            "texture, sensor noise and blur."),
        _config("target_colour_only", scenes.Appearance(palette="photo", color_jitter=12.0),
                seed=1, description="Target colours only, flat and clean: a smaller shift."),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "source"

    def _info(self):
        c = self.builder_config
        c.appearance()  # validate the appearance fields before anything is generated
        return self.dataset_info_from_configs(
            description=("Procedural street scenes in two domains that share layout and label "
                         "space and differ in appearance (lsd_jax.data.scenes)."),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(c.height, c.width, 3)),
                "label": tfds.features.Image(shape=(c.height, c.width, 1)),
                "name": tfds.features.Text(),
            }),
        )

    # TFDS announces a build on stdout as "Downloading and preparing dataset Unknown size
    # (download: Unknown size, ...)", which is not true of a generated dataset; these two hooks
    # of its download_and_prepare() say what is generated, where, and how long it took.
    def _log_download_bytes(self):
        c = self.builder_config
        self._generation_start = time.perf_counter()
        logging.info("Generating %s/%s (%s + %s scenes) in %s ...", self.name, c.name,
                     f"{c.num_train:,}", f"{c.num_validation:,}", self.data_dir)

    def _log_download_done(self):
        seconds = time.perf_counter() - getattr(self, "_generation_start", time.perf_counter())
        logging.info("Generated %s/%s in %.0f s", self.name, self.builder_config.name, seconds)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        c = self.builder_config
        return {"train": self._generate_examples("train", c.num_train),
                "validation": self._generate_examples("validation", c.num_validation)}

    def _generate_examples(self, split: str, count: int):
        c = self.builder_config
        appearance = c.appearance()
        for index in range(count):
            image, label = scenes.render_scene((c.seed, _SPLIT_IDS[split], index),
                                               c.height, c.width, appearance)
            name = f"{split}_{index:06d}"
            yield name, {"image": image, "label": label[..., None], "name": name}
