"""The GTA5, SYNTHIA and Cityscapes builders on a few files written in the real formats:
palette PNGs (GTA5), 16-bit 3-channel PNGs (SYNTHIA), labelIds PNGs (Cityscapes)."""
import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from lsd_jax.data import classes
from lsd_jax.data.datasets import common
from lsd_jax.data.datasets.cityscapes import CityscapesExtracted
from lsd_jax.data.datasets.gta5 import Gta5, Gta5Config
from lsd_jax.data.datasets.synthia import Synthia, SynthiaConfig

tfds.disable_progress_bar()

# docs/methods.md, section 5, written out again here so that the tables are checked against
# the text.
SPEC_CITYSCAPES = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                   24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SPEC_SYNTHIA = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11,
                17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}


def id_grid(ids, height=8, width=16):
    """A label map holding each of `ids`, tiled, plus a record of which pixel holds which id."""
    flat = np.resize(np.asarray(ids), height * width)
    return flat.reshape(height, width)


def write_palette_png(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    palette = np.random.default_rng(0).integers(0, 256, (256, 3)).astype(np.uint8)
    image.putpalette(palette.ravel().tolist())  # colours != ids: a colour decode would be wrong
    image.save(path)


def write_rgb_png(path, height=8, width=16, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def write_uint16_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_png(tf.constant(array, tf.uint16)).numpy())


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def build(builder_cls, manual_dir, data_dir, **kwargs):
    builder = builder_cls(data_dir=str(data_dir), **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


def examples(builder, split):
    return {ex["name"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split=split))}


def expected_train_ids(ids, pairs):
    out = np.full(ids.shape, 255, np.uint8)
    for raw, train in pairs.items():
        out[ids == raw] = train
    return out


# ----------------------------------------------------------------------------- GTA5


@pytest.fixture
def gta5_dir(tmp_path):
    root = tmp_path / "gta5"
    all_ids = id_grid(list(range(34)) + [255])          # every labelId, known and void
    unknown = id_grid([7, 26, 40, 200])                   # 40 and 200 are outside the known set
    for name, ids in (("00001", all_ids), ("00002", unknown)):
        write_rgb_png(root / "images" / f"{name}.png", seed=int(name))
        write_palette_png(root / "labels" / f"{name}.png", ids)
    # A pair whose image and label sizes differ (like GTA5's 1276x697 images): left out.
    write_rgb_png(root / "images" / "00003.png", height=7, width=12)
    write_palette_png(root / "labels" / "00003.png", all_ids)
    return root, {"00001": all_ids, "00002": unknown}


def test_gta5_maps_every_id_and_reports(gta5_dir, tmp_path):
    root, ids = gta5_dir
    builder = build(Gta5, root, tmp_path / "tfds")
    got = examples(builder, "train")
    assert sorted(got) == ["00001", "00002"]
    for name, raw in ids.items():
        np.testing.assert_array_equal(got[name]["label"][..., 0],
                                      expected_train_ids(raw, SPEC_CITYSCAPES))
    # The original image bytes are stored: decoding them gives the written pixels back.
    np.testing.assert_array_equal(got["00001"]["image"],
                                  np.asarray(Image.open(root / "images" / "00001.png")))
    # Left-out pair and unknown ids: in the description and the metadata, also after reloading.
    reloaded = tfds.builder("gta5", data_dir=str(tmp_path / "tfds"))
    assert "00003" in reloaded.info.description
    assert "image and label sizes differ" in reloaded.info.description
    meta = json.loads((tmp_path / "tfds" / "gta5" / "full" / "1.0.0" / "metadata.json").read_text())
    assert meta["left_out"] == {"image and label sizes differ": ["00003"]}
    assert meta["num_left_out"] == 1
    assert meta["files_with_unknown_label_ids"] == ["00002"]
    assert set(meta["unknown_label_ids"]) == {"40", "200"}
    assert meta["unknown_label_ids"]["40"] == int((ids["00002"] == 40).sum())


def test_gta5_resized_config(gta5_dir, tmp_path):
    root, ids = gta5_dir
    config = Gta5Config(name="small", resize=(4, 8), image_format="jpeg")
    builder = build(Gta5, root, tmp_path / "tfds", config=config)
    got = examples(builder, "train")
    assert got["00001"]["image"].shape == (4, 8, 3)
    # Nearest resize (PIL samples pixel centres) of an 8x16 map to 4x8 keeps odd rows/columns.
    np.testing.assert_array_equal(got["00001"]["label"][..., 0],
                                  expected_train_ids(ids["00001"], SPEC_CITYSCAPES)[1::2, 1::2])


def test_gta5_missing_partner(gta5_dir, tmp_path):
    root, _ = gta5_dir
    write_rgb_png(root / "images" / "00004.png")
    with pytest.raises(common.BadFileError, match=r"00004.*labels/<name>.png|labels/<name>.png.*00004"):
        build(Gta5, root, tmp_path / "tfds")
    builder = build(Gta5, root, tmp_path / "tfds2", skip_bad_files=True)
    assert builder.info.splits["train"].num_examples == 2
    assert "00004" in builder.info.description
    assert builder.info.metadata["left_out"]["no partner in labels/"] == ["00004"]


def test_gta5_truncated_png(gta5_dir, tmp_path):
    root, _ = gta5_dir
    truncate(root / "images" / "00002.png")
    with pytest.raises(common.BadFileError, match=r"images/00002.png"):
        build(Gta5, root, tmp_path / "tfds")
    builder = build(Gta5, root, tmp_path / "tfds2", skip_bad_files=True)
    assert sorted(examples(builder, "train")) == ["00001"]
    assert builder.info.metadata["left_out"]["unreadable or truncated file"] == ["00002"]


def test_gta5_colour_label_rejected(gta5_dir, tmp_path):
    root, _ = gta5_dir
    write_rgb_png(root / "labels" / "00001.png")  # an RGB label, not a palette PNG
    with pytest.raises(common.BadFileError, match=r"labels/00001.png.*palette"):
        build(Gta5, root, tmp_path / "tfds")


@pytest.mark.parametrize("make", ["empty", "no_labels", "missing"])
def test_gta5_bad_layout_prints_expected_layout(tmp_path, make):
    root = tmp_path / "gta5"
    if make == "empty":
        (root / "images").mkdir(parents=True)
        (root / "labels").mkdir()
    elif make == "no_labels":
        write_rgb_png(root / "images" / "00001.png")
    with pytest.raises(common.LayoutError, match=r"<manual_dir>/labels/00001.png"):
        build(Gta5, root, tmp_path / "tfds")


# ----------------------------------------------------------------------------- SYNTHIA


def synthia_label(ids, seed):
    """16-bit 3-channel label: class id in channel 0, other (instance-like) values elsewhere."""
    other = np.random.default_rng(seed).integers(0, 65535, (*ids.shape, 2))
    return np.concatenate([ids[..., None], other], axis=-1)


@pytest.fixture
def synthia_dir(tmp_path):
    root = tmp_path / "synthia"
    ids = {"0000000": id_grid(list(range(23))), "0000001": id_grid([3, 8, 500, 40000]),
           "0000002": id_grid([1, 2, 16, 18, 20])}
    for i, (name, grid) in enumerate(ids.items()):
        write_rgb_png(root / "RGB" / f"{name}.png", seed=i)
        write_uint16_png(root / "GT" / "LABELS" / f"{name}.png", synthia_label(grid, i))
    return root, ids


@pytest.mark.parametrize("class_set", ["cityscapes19", "synthia16"])
def test_synthia_maps_first_channel(synthia_dir, tmp_path, class_set):
    root, ids = synthia_dir
    config = SynthiaConfig(name=f"t_{class_set}", class_set=class_set, num_validation=1)
    builder = build(Synthia, root, tmp_path / "tfds", config=config)
    train, val = examples(builder, "train"), examples(builder, "validation")
    assert sorted(train) == ["0000000", "0000001"] and sorted(val) == ["0000002"]
    to_wanted = classes.conversion_table("cityscapes19", class_set)
    for name, ex in {**train, **val}.items():
        want = to_wanted[expected_train_ids(ids[name], SPEC_SYNTHIA)]
        np.testing.assert_array_equal(ex["label"][..., 0], want)
    if class_set == "synthia16":  # terrain (16), truck (18), train (20) are ignored
        assert set(np.unique(val["0000002"]["label"])) == {2, 9, 255}
    meta = builder.info.metadata
    assert meta["files_with_unknown_label_ids"] == ["0000001"]
    assert set(meta["unknown_label_ids"]) == {"500", "40000"}


def test_synthia_builder_configs():
    assert {c.name: c.class_set for c in Synthia.BUILDER_CONFIGS} == {
        "16": "synthia16", "19": "cityscapes19"}
    assert all(c.num_validation == 100 for c in Synthia.BUILDER_CONFIGS)


def test_synthia_bad_inputs(synthia_dir, tmp_path):
    root, _ = synthia_dir
    config = SynthiaConfig(name="t", num_validation=1)
    (root / "RGB" / "0000001.png").unlink()
    with pytest.raises(common.BadFileError, match=r"0000001"):
        build(Synthia, root, tmp_path / "a", config=config)
    write_rgb_png(root / "RGB" / "0000001.png")
    truncate(root / "GT" / "LABELS" / "0000000.png")
    with pytest.raises(common.BadFileError, match=r"GT/LABELS/0000000.png"):
        build(Synthia, root, tmp_path / "b", config=config)
    builder = build(Synthia, root, tmp_path / "c", config=config, skip_bad_files=True)
    assert builder.info.metadata["left_out"] == {"unreadable or truncated file": ["0000000"]}
    with pytest.raises(common.LayoutError, match=r"GT/LABELS/0000000.png"):
        build(Synthia, tmp_path / "nowhere", tmp_path / "d", config=config)


# ----------------------------------------------------------------------------- Cityscapes


@pytest.fixture
def cityscapes_dir(tmp_path):
    root = tmp_path / "cityscapes"
    ids = {"train": {"aachen_000000_000019": id_grid(list(range(34)) + [255]),
                     "bremen_000001_000019": id_grid([7, 99])},
           "val": {"lindau_000000_000019": id_grid([26, 33, 0])}}
    for folder, files in ids.items():
        for i, (name, grid) in enumerate(files.items()):
            city = name.split("_")[0]
            write_rgb_png(root / "leftImg8bit" / folder / city / f"{name}_leftImg8bit.png", seed=i)
            path = root / "gtFine" / folder / city / f"{name}_gtFine_labelIds.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grid.astype(np.uint8), mode="L").save(path)
    return root, ids


def test_cityscapes_maps_label_ids(cityscapes_dir, tmp_path):
    root, ids = cityscapes_dir
    builder = build(CityscapesExtracted, root, tmp_path / "tfds")
    for split, folder in (("train", "train"), ("validation", "val")):
        got = examples(builder, split)
        assert sorted(got) == sorted(ids[folder])
        for name, raw in ids[folder].items():
            np.testing.assert_array_equal(got[name]["label"][..., 0],
                                          expected_train_ids(raw, SPEC_CITYSCAPES))
    assert builder.info.metadata["unknown_label_ids"] == {
        "99": int((ids["train"]["bremen_000001_000019"] == 99).sum())}


def test_cityscapes_bad_inputs(cityscapes_dir, tmp_path):
    root, _ = cityscapes_dir
    (root / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(common.BadFileError, match=r"gtFine/val/<city>.*lindau_000000_000019"):
        build(CityscapesExtracted, root, tmp_path / "a")
    with pytest.raises(common.LayoutError, match=r"leftImg8bit/\{train,val\}/<city>"):
        build(CityscapesExtracted, root / "gtFine", tmp_path / "b")


def test_spec_tables():
    """Every id of the tables in docs/methods.md, section 5 lands on its trainId; every other id
    on 255."""
    for table, spec in ((classes.CITYSCAPES_LABELID_TO_TRAINID, SPEC_CITYSCAPES),
                        (classes.SYNTHIA_ID_TO_TRAINID, SPEC_SYNTHIA)):
        want = np.full(len(table), 255)
        for raw, train in spec.items():
            want[raw] = train
        np.testing.assert_array_equal(table, want)


# ----------------------------------------------------------------------------- prepare

@pytest.mark.parametrize("name, manual, message", [
    ("gta6", None, r"^unknown dataset 'gta6': expected one of gta5, synthia, "),
    ("gta5/720p", None, r"^gta5 has no config '720p': expected one of full, 1280x720, "),
    ("gta5/1280x720", None, r"^gta5/1280x720 is built from its downloaded files: give "
                            r"--manual_dir"),
    ("synthia/16", "missing", r"^--manual_dir .*missing: not a directory$"),
    ("cityscapes_extracted/full", "empty", r"^cityscapes_extracted.*\(docs/data.md has the "
                                           r"layout\)$"),
])
def test_prepare_refuses_bad_input_in_one_line_and_leaves_nothing_behind(
        tmp_path, name, manual, message):
    """`python -m lsd_jax.data.prepare`'s checks: before anything is created, or, for a build
    that fails on the files, with what it had created removed."""
    from lsd_jax.data import prepare

    data_dir = tmp_path / "tfds"
    manual_dir = None if manual is None else tmp_path / manual
    if manual == "empty":
        manual_dir.mkdir()
    with pytest.raises(prepare.PrepareError, match=message) as error:
        prepare.prepare(name, str(data_dir), manual_dir and str(manual_dir), False)
    assert "\n" not in str(error.value)
    assert not data_dir.exists()
