"""The tf.data pipeline on a tiny synthetic benchmark: views, alignment, slices, eval coverage."""
import hashlib

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from lsd_jax.data import classes, pipeline
from lsd_jax.data import config as data_config
from lsd_jax.models import VGG_MEAN_BGR

tfds.disable_progress_bar()

TINY = {"height": 64, "width": 128, "num_train": 12, "num_validation": 7}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    c = data_config.default_data_config()
    c.data_dir = str(tmp_path_factory.mktemp("tfds"))
    for domain in (c.source, c.target, c.eval):
        domain.config_overrides = dict(TINY)
    c.source.crop = (32, 64)
    c.target.resize = (32, 64)
    c.eval.scale = (32, 64)
    c.eval.batch_size = 6
    c.shuffle_buffer = 16
    c.views_on_device = False  # host-side views: the tf.data output is the final batch
    return c


def label_hash(label):
    return hashlib.sha1(np.ascontiguousarray(label).tobytes()).hexdigest()


def first_batches(c, n, **kwargs):
    it = pipeline.make_train_dataset(c, **kwargs).as_numpy_iterator()
    return [next(it) for _ in range(n)]


def test_train_views(config):
    (batch,) = first_batches(config, 1, process_index=0, process_count=1)
    assert set(batch) == {"source_image", "source_image01", "source_label", "target_image",
                          "target_image01"}
    for d in ("source", "target"):
        image, image01 = batch[f"{d}_image"], batch[f"{d}_image01"]
        assert image.shape == image01.shape == (2, 32, 64, 3)
        assert image.dtype == image01.dtype == np.float32
        assert 0 <= image01.min() and image01.max() <= 1
        # F's view is the [0, 1] view at 0-255 scale minus the BGR mean, channel by channel.
        np.testing.assert_allclose(image + np.array(VGG_MEAN_BGR, np.float32), image01 * 255,
                                   atol=1e-3)
    assert batch["source_label"].shape == (2, 32, 64) and batch["source_label"].dtype == np.int32
    assert set(np.unique(batch["source_label"])) <= set(range(19))


def test_channel_order_and_mean():
    rgb = tf.constant([[[10, 20, 30]]], tf.uint8)
    image, image01 = pipeline.model_views(rgb)
    np.testing.assert_allclose(image.numpy()[0, 0], [30 - 104.00699, 20 - 116.66877,
                                                     10 - 122.67892], rtol=1e-6)
    np.testing.assert_allclose(image01.numpy()[0, 0], [30 / 255, 20 / 255, 10 / 255])


def test_crop_and_flip_keep_image_and_label_aligned():
    """An image whose red channel encodes its label: any misalignment breaks the relation."""
    yy, xx = np.mgrid[0:40, 0:90]
    label = ((3 * xx + 7 * yy) % 19).astype(np.uint8)  # not symmetric under flips or shifts
    rgb = np.stack([label * 10, xx, yy], -1).astype(np.uint8)
    domain = data_config.domain_config("x", "train", flip=True)
    domain.crop = (16, 32)
    fn = pipeline.train_example_fn(domain, np.arange(256, dtype=np.uint8))
    image_png, label_png = tf.io.encode_png(rgb), tf.io.encode_png(label[..., None])
    flips = set()
    for s in range(12):
        out = fn(tf.constant([s, 1], tf.int64), image_png, label_png)
        red = np.round(out["image01"].numpy()[..., 2] * 255)  # BGR: red is the last channel
        np.testing.assert_array_equal(red, out["label"].numpy() * 10)
        flips.add(bool(out["image01"].numpy()[0, 0, 1] > out["image01"].numpy()[0, 1, 1]))
    assert flips == {True, False}  # both flipped and unflipped crops occurred


def test_deterministic_for_a_seed(config):
    a = first_batches(config, 3, process_index=0, process_count=1)
    b = first_batches(config, 3, process_index=0, process_count=1)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    other = config.copy_and_resolve_references()
    other.seed = 7
    c = first_batches(other, 3, process_index=0, process_count=1)
    assert any(not np.array_equal(x["source_label"], y["source_label"]) for x, y in zip(a, c))


def test_resume_continues_the_stream(config):
    whole = first_batches(config, 3, process_index=0, process_count=1)
    resumed = first_batches(config, 1, process_index=0, process_count=1, start_step=2)
    np.testing.assert_array_equal(whole[2]["source_label"], resumed[0]["source_label"])


def test_two_processes_see_disjoint_slices_covering_the_split(config):
    c = config.copy_and_resolve_references()
    c.source.crop, c.source.resize, c.source.flip = None, (64, 128), False  # whole images
    c.target.resize = (64, 128)
    c.batch_size = 2  # 1 per process
    seen = []
    for p in range(2):
        batches = first_batches(c, 6, process_index=p, process_count=2)  # one epoch of 6
        seen.append({label_hash(b["source_label"][0]) for b in batches})
    assert len(seen[0]) == len(seen[1]) == 6 and not seen[0] & seen[1]
    builder = pipeline.load_builder(c.source.name, c.data_dir,
                                    config_overrides=c.source.config_overrides.to_dict())
    table = classes.conversion_table("cityscapes19", "cityscapes19")
    everything = {label_hash(table[ex["label"][..., 0]].astype(np.int32))
                  for ex in tfds.as_numpy(builder.as_dataset(split="train"))}
    assert seen[0] | seen[1] == everything


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_sees_every_image_once(config, process_count):
    builder = pipeline.load_builder(config.eval.name, config.data_dir,
                                    config_overrides=config.eval.config_overrides.to_dict())
    want = sorted(label_hash(ex["label"][..., 0].astype(np.int32))
                  for ex in tfds.as_numpy(builder.as_dataset(split="validation")))
    got, batch_counts = [], set()
    for p in range(process_count):
        ds, num_batches = pipeline.make_eval_dataset(config, process_index=p,
                                                     process_count=process_count)
        batches = list(ds.as_numpy_iterator())
        assert len(batches) == num_batches
        batch_counts.add(num_batches)
        for b in batches:
            assert b["image"].shape == (6 // process_count, 32, 64, 3)
            assert b["label"].shape == (6 // process_count, 64, 128)  # full resolution
            assert b["label"].dtype == np.int32 and b["mask"].dtype == bool
            assert (b["label"][~b["mask"]] == 255).all()
            got += [label_hash(lbl) for lbl in b["label"][b["mask"]]]
    assert len(batch_counts) == 1  # every process runs the same number of batches
    assert sorted(got) == want


def test_global_arrays_on_a_mesh(config):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    batch = next(pipeline.train_batches(config, mesh))
    assert isinstance(batch["source_image"], jax.Array)
    assert batch["source_image"].shape == (2, 32, 64, 3)
    assert batch["source_label"].sharding.spec == jax.sharding.PartitionSpec("data")
    ev = next(pipeline.eval_batches(config, mesh))
    assert ev["mask"].shape == (6,) and ev["label"].shape == (6, 64, 128)


def test_clear_errors(config):
    c = config.copy_and_resolve_references()
    c.batch_size = 3
    with pytest.raises(ValueError, match=r"batch_size=3 must be a positive multiple of the "
                                         r"process count 2"):
        pipeline.make_train_dataset(c, process_index=0, process_count=2)
    c = config.copy_and_resolve_references()
    c.source.crop = (30, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        pipeline.make_train_dataset(c, process_index=0, process_count=1)
    c = config.copy_and_resolve_references()
    c.target.resize = (64, 128)
    with pytest.raises(ValueError, match=r"source images are \(32, 64\) but target"):
        pipeline.make_train_dataset(c, process_index=0, process_count=1)
    c = config.copy_and_resolve_references()
    c.source.config_overrides = {"colour": 1}
    with pytest.raises(ValueError, match=r"\['colour'\] are not fields"):
        pipeline.make_train_dataset(c, process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match="lsd_jax.data.prepare gta5/full --manual_dir"):
        pipeline.load_builder("gta5", config.data_dir)


def dataset_ops(dataset) -> set[str]:
    graph = tf.compat.v1.GraphDef.FromString(dataset._as_serialized_graph().numpy())
    return {node.op for node in graph.node} | {
        node.op for function in graph.library.function for node in function.node_def}


def test_training_and_eval_streams_hold_no_cache(config):
    """A training stream stops mid-epoch and an evaluation builds a new dataset each time: a
    cache of their split (TFDS adds one to small splits by itself) would be dropped half-filled
    at every stop, with a tf.data warning, or never read back."""
    train_ops = dataset_ops(pipeline.make_train_dataset(config, process_index=0,
                                                        process_count=1))
    eval_ops = dataset_ops(pipeline.make_eval_dataset(config, process_index=0,
                                                      process_count=1)[0])
    assert "TFRecordDataset" in train_ops | eval_ops  # the check looks at the whole pipeline
    assert not [op for op in train_ops | eval_ops if op.startswith("CacheDataset")]


def test_official_cityscapes_labels_are_label_ids():
    class Official:
        name = "cityscapes"
    image_key, label_key, table = pipeline.label_source(Official(), "synthia16")
    assert (image_key, label_key) == ("image_left", "segmentation_label")
    assert table[7] == 0 and table[26] == classes.SYNTHIA_16.index(13) and table[22] == 255


def test_views_on_device_match_host_views(config):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    on_device = config.copy_and_resolve_references()
    on_device.views_on_device = True
    host, dev = next(pipeline.train_batches(config, mesh)), next(
        pipeline.train_batches(on_device, mesh))
    assert set(host) == set(dev)
    for key in host:
        assert dev[key].dtype == host[key].dtype and dev[key].shape == host[key].shape
        # Rounding the resized target to uint8 first moves values by at most half a level.
        np.testing.assert_allclose(np.asarray(dev[key]), np.asarray(host[key]), atol=0.51)
    host_eval = next(pipeline.eval_batches(config, mesh))
    dev_eval = next(pipeline.eval_batches(on_device, mesh))
    assert set(dev_eval) == {"image", "label", "mask"}
    np.testing.assert_allclose(np.asarray(dev_eval["image"]), host_eval["image"], atol=0.51)
    np.testing.assert_array_equal(np.asarray(dev_eval["label"]), host_eval["label"])
