"""Class sets and the procedural scenes of the embedded benchmark."""
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lsd_jax.data import classes, scenes

tfds.disable_progress_bar()


def test_class_sets():
    assert len(classes.CITYSCAPES_CLASSES) == 19 and classes.CITYSCAPES_COLORS.shape == (19, 3)
    assert classes.CITYSCAPES_COLORS[0].tolist() == [128, 64, 128]
    names16 = classes.class_names("synthia16")
    assert len(names16) == 16 and not {"terrain", "truck", "train"} & set(names16)
    names13 = [classes.CITYSCAPES_CLASSES[i] for i in classes.SYNTHIA_13]
    assert len(names13) == 13 and not {"wall", "fence", "pole"} & set(names13)
    # 19 -> 16 and back: the 16 classes survive, the 3 dropped become 255.
    to16 = classes.TRAINID19_TO_SYNTHIA16
    assert [to16[c] for c in classes.SYNTHIA_16] == list(range(16))
    assert to16[9] == to16[14] == to16[16] == to16[255] == 255
    back = classes.conversion_table("synthia16", "cityscapes19")
    assert [back[i] for i in range(16)] == list(classes.SYNTHIA_16)
    assert classes.SYNTHIA16_TO_SYNTHIA13[classes.SYNTHIA_16.index(5)] == 255  # pole
    with pytest.raises(ValueError, match="unknown class set 'x'"):
        classes.class_set("x")


def test_map_ids_and_colorize():
    ids = np.array([[7, 26, 0], [33, 255, 1]])
    np.testing.assert_array_equal(classes.map_ids(ids, classes.CITYSCAPES_LABELID_TO_TRAINID),
                                  [[0, 13, 255], [18, 255, 255]])
    with pytest.raises(ValueError, match="outside the table"):
        classes.map_ids(np.array([300]), classes.CITYSCAPES_LABELID_TO_TRAINID)
    picture = classes.colorize(np.array([[0, 255]]))
    assert picture[0, 0].tolist() == [128, 64, 128] and picture[0, 1].tolist() == [0, 0, 0]


@pytest.mark.slow
def test_classes_and_package_import_without_tensorflow():
    code = ("import sys, lsd_jax.data, lsd_jax.data.classes, lsd_jax.data.scenes; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_scene_is_deterministic_and_domains_share_layout():
    a_img, a_lbl = scenes.render_scene((0, 0, 5), 64, 128, scenes.SOURCE_APPEARANCE)
    b_img, b_lbl = scenes.render_scene((0, 0, 5), 64, 128, scenes.SOURCE_APPEARANCE)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lbl, b_lbl)
    t_img, t_lbl = scenes.render_scene((0, 0, 5), 64, 128, scenes.TARGET_APPEARANCE)
    np.testing.assert_array_equal(t_lbl, a_lbl)      # same seed: same layout
    assert np.abs(t_img.astype(int) - a_img).mean() > 20  # different appearance
    _, other = scenes.render_scene((0, 0, 6), 64, 128, scenes.SOURCE_APPEARANCE)
    assert (other != a_lbl).mean() > 0.05


def test_scene_layout_is_realistic():
    counts, sky_rows, road_rows = np.zeros(256), [], []
    for i in range(20):
        _, label = scenes.render_scene((3, 0, i), 128, 256, scenes.SOURCE_APPEARANCE)
        counts += np.bincount(label.ravel(), minlength=256)
        rows = np.arange(128)[:, None].repeat(256, 1)
        sky_rows.append(rows[label == scenes.SKY].mean())
        road_rows.append(rows[label == scenes.ROAD].mean())
    present = {classes.CITYSCAPES_CLASSES[c] for c in np.flatnonzero(counts[:19])}
    assert len(present) >= 8
    assert {"pole", "traffic sign", "traffic light", "person", "car", "road", "sky"} <= present
    assert counts[255] == 0  # every pixel labelled
    assert max(sky_rows) < min(road_rows)  # sky above, road below


def test_source_is_clean_target_is_not():
    """Source regions are flat (one colour per instance); target ones are textured and noisy."""
    def within_instance_std(appearance):
        layout_rng = np.random.default_rng(0)
        label, instance = scenes.sample_layout(layout_rng, 64, 128)
        image = scenes.render_appearance(np.random.default_rng(1), label, instance, appearance)
        biggest = np.bincount(instance.ravel()).argmax()
        return image[instance == biggest].std(axis=0).mean()
    assert within_instance_std(scenes.SOURCE_APPEARANCE) == 0
    assert within_instance_std(scenes.TARGET_APPEARANCE) > 5


def test_appearance_validation():
    with pytest.raises(ValueError, match="unknown palette 'neon'"):
        scenes.Appearance(palette="neon")
    with pytest.raises(ValueError, match="blur must be >= 0"):
        scenes.Appearance(blur=-1)


def test_synthetic_builder_deterministic(tmp_path):
    from lsd_jax.data.datasets.synthetic_scenes import SyntheticScenes, SyntheticScenesConfig

    config = SyntheticScenesConfig(name="tiny", height=32, width=64, num_train=4,
                                   num_validation=2, palette="photo", noise=5.0, seed=7)
    got = []
    for run in range(2):
        builder = SyntheticScenes(data_dir=str(tmp_path / str(run)), config=config)
        builder.download_and_prepare()
        got.append({ex["name"]: (ex["image"], ex["label"])
                    for ex in tfds.as_numpy(builder.as_dataset(split="train"))})
    assert sorted(got[0]) == [f"train_{i:06d}".encode() for i in range(4)]
    for name, (image, label) in got[0].items():
        np.testing.assert_array_equal(image, got[1][name][0])
        want_image, want_label = scenes.render_scene((7, 0, int(name[-6:])), 32, 64,
                                                     config.appearance())
        np.testing.assert_array_equal(image, want_image)
        np.testing.assert_array_equal(label[..., 0], want_label)
    assert {c.name for c in SyntheticScenes.BUILDER_CONFIGS} >= {"source", "target"}
