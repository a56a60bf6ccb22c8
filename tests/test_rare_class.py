"""Rare-class sampling (lsd_jax/data/rare_class.py): its probabilities by hand, draws that are a
function of (seed, step) alone, so that a resumed stream is the uninterrupted one, records read
by index as TFDS reads them in order, the class-seeking crop, and the statistics file."""
import json

import numpy as np
import pytest
import tensorflow as tf

from lsd_jax.data import pipeline, rare_class
from lsd_jax.errors import ConfigError
from train_helpers import tiny_config

COUNTS = np.array([[900, 100, 0, 0],
                   [800, 150, 50, 0],
                   [700, 0, 300, 0]], np.int64)


def test_class_probabilities_by_hand():
    classes, p = rare_class.class_probabilities(COUNTS, temperature=0.1)
    np.testing.assert_array_equal(classes, [0, 1, 2])   # class 3 never occurs
    frequency = np.array([2400, 250, 350]) / 3000
    expected = np.exp((1 - frequency) / 0.1)
    np.testing.assert_allclose(p, expected / expected.sum())
    assert p[1] > p[2] > p[0]   # the rarer, the likelier


def test_images_with_class_and_a_class_no_image_holds_enough_of():
    members = rare_class.images_with_class(COUNTS, np.array([0, 1, 2]), min_pixels=100)
    assert [m.tolist() for m in members] == [[0, 1, 2], [1], [2]]
    with pytest.raises(ValueError, match=r"no source image holds more than 200 pixels of class "
                                         r"1; lower config.data.rcs.min_pixels"):
        rare_class.images_with_class(COUNTS, np.array([0, 1, 2]), min_pixels=200)


def test_draws_are_a_function_of_the_seed_pair_and_follow_the_probabilities():
    rcs = tiny_config("unused").data.rcs
    rcs.temperature, rcs.min_pixels = 0.1, 100
    draw = rare_class.sampler(COUNTS, rcs)

    def draws(seed, count):  # in a tf.data map, as the pipeline draws (eagerly: 1 ms a draw)
        seeds = tf.data.Dataset.range(count).map(
            lambda k: tf.stack([tf.constant(seed, tf.int64), k]))
        return [tuple(int(x) for x in d) for d in seeds.map(draw).as_numpy_iterator()]
    first = draws(7, 2000)
    assert draws(7, 5) == first[:5]
    assert [tuple(int(x) for x in draw(tf.constant([7, 3], tf.int64)))] == first[3:4]  # eager too
    assert draws(8, 5) != first[:5]
    # Each class at its probability, each image from those holding the class.
    _, p = rare_class.class_probabilities(COUNTS, 0.1)
    drawn = np.array([c for _, c in first])
    np.testing.assert_allclose(np.bincount(drawn, minlength=3) / len(drawn), p, atol=0.03)
    assert all(COUNTS[i, c] > 100 for i, c in first)


def test_the_crop_seeks_the_class_and_keeps_the_last_window_otherwise():
    label = np.zeros((40, 40), np.int32)
    label[25:, 25:] = 5   # 225 pixels of class 5 in one corner
    image = np.zeros((40, 40, 3), np.uint8)
    seed = tf.constant([3, 4], tf.int64)

    def found(tries):  # over 40 seeds, how often the crop holds more than 50 pixels of 5
        return np.mean([int(np.sum(rare_class.class_crop_pair(
            image, tf.constant(label), (20, 20), tf.constant([s, 1], tf.int64), 5, 50,
            tries)[1].numpy() == 5)) > 50 for s in range(40)])
    # One random 20x20 window holds more than 50 of them with probability 110/441; twenty
    # tries fail with (331/441)^20 = 0.3%.
    assert found(1) < 0.45 and found(20) > 0.9
    # No window can hold 1,000 pixels of it: the last window, whatever it holds.
    _, last = rare_class.class_crop_pair(image, tf.constant(label), (20, 20), seed, 5, 1000, 10)
    _, alone = rare_class.class_crop_pair(image, tf.constant(label), (20, 20),
                                          seed + [0, 18], 5, 1000, 1)
    np.testing.assert_array_equal(last.numpy(), alone.numpy())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The tiny source generated, and its statistics written by the command's function."""
    tmp = tmp_path_factory.mktemp("rcs")
    config = tiny_config(str(tmp / "tfds"))
    counts = rare_class.write_source_statistics(config, str(tmp / "rcs.json"))
    return config, counts, str(tmp / "rcs.json")


def test_records_read_by_index_are_those_tfds_reads_in_order(prepared):
    config, counts, _ = prepared
    source = config.data.source
    builder = pipeline.load_builder(source.name, config.data.data_dir, None,
                                    source.config_overrides.to_dict())
    locations = rare_class.record_locations(
        builder.info.splits[source.split].file_instructions)
    in_order = list(builder.as_dataset(split=source.split, shuffle_files=False)
                    .as_numpy_iterator())
    assert len(locations) == len(in_order) == counts.shape[0] == 16
    for location, example in zip(locations, in_order):
        decoded = builder.info.features.deserialize_example(
            tf.constant(rare_class.read_record(*location)))
        assert decoded["name"].numpy() == example["name"]
        np.testing.assert_array_equal(decoded["label"].numpy(), example["label"])
    # The statistics are those labels' pixel counts (here 19 classes, no ignore label).
    first = in_order[0]["label"][..., 0]
    np.testing.assert_array_equal(counts[0], np.bincount(first.ravel(), minlength=19)[:19])


def test_a_resumed_stream_is_the_uninterrupted_one(prepared):
    config, _, path = prepared
    data = config.data
    data.rcs.enabled, data.rcs.statistics, data.rcs.min_pixels = True, path, 20
    data.views_on_device = False
    whole = pipeline.make_train_dataset(data, process_index=0, process_count=1)
    batches = [b["source_label"] for b, _ in zip(whole.as_numpy_iterator(), range(4))]
    resumed = pipeline.make_train_dataset(data, process_index=0, process_count=1, start_step=2)
    tail = [b["source_label"] for b, _ in zip(resumed.as_numpy_iterator(), range(2))]
    for got, expected in zip(tail, batches[2:]):
        np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(batches[0], batches[1])
    # Two processes draw different examples for their halves of one step.
    data.batch_size = 2
    halves = [next(pipeline.make_train_dataset(data, process_index=i, process_count=2)
                   .as_numpy_iterator())["source_label"] for i in (0, 1)]
    assert not np.array_equal(*halves)


def test_statistics_of_another_source_are_refused(prepared, tmp_path):
    config, counts, path = prepared
    with pytest.raises(ValueError, match=r"dataset 'synthetic_scenes/source.*but the config's "
                                         r"source is 'gta5/1280x720/1.0.0:train'"):
        rare_class.load_statistics(path, dataset="gta5/1280x720/1.0.0:train",
                                   class_set="cityscapes19", num_classes=19)
    record = json.load(open(path))
    record["pixel_counts"] = record["pixel_counts"][:3]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="pixel_counts is not a 16 x 19 table"):
        rare_class.load_statistics(str(bad), dataset=record["dataset"],
                                   class_set="cityscapes19", num_classes=19)
    with pytest.raises(FileNotFoundError, match="python -m lsd_jax.data.rare_class"):
        rare_class.load_statistics(str(tmp_path / "none.json"), dataset="x", class_set="y",
                                   num_classes=19)


def test_a_run_checks_its_statistics_before_writing_anything(prepared, tmp_path):
    """Missing, of another source, or counting other images: refused by the run's checks
    (preflight), which come before its workdir is written; the file the command wrote passes."""
    from lsd_jax import preflight

    config, counts, path = prepared
    data = config.data
    data.rcs.enabled = True
    checked = lambda: preflight.check_datasets(data, ("source",))  # noqa: E731
    data.rcs.statistics = path
    checked()
    data.rcs.statistics = str(tmp_path / "none.json")
    with pytest.raises(ConfigError, match=r"config.data.rcs.statistics: .*none.json: no such"):
        checked()
    record = json.load(open(path))
    for field, value, message in (("dataset", "gta5/1280x720/1.0.0:train", "dataset 'gta5"),
                                  ("num_images", 15, "counts 15 images, .* has 16")):
        changed = dict(record, **{field: value})
        if field == "num_images":
            changed["pixel_counts"] = record["pixel_counts"][:15]
        (tmp_path / f"{field}.json").write_text(json.dumps(changed))
        data.rcs.statistics = str(tmp_path / f"{field}.json")
        with pytest.raises(ConfigError, match=message):
            checked()
