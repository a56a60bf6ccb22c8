"""The tf.data input pipeline: per-process slices of TFDS datasets -> global jax.Arrays.

Training batches (`train_batches`) are dicts of global arrays sharded over the mesh's data axis:
  source_image    (N, H, W, 3) float32  F's input: BGR, 0-255, minus VGG_MEAN_BGR (Caffe)
  source_image01  (N, H, W, 3) float32  G's and D's view: BGR in [0, 1]
  source_label    (N, H, W)    int32    trainIds of config.class_set, 255 = ignore
  target_image, target_image01          as the source; target labels are never read
Evaluation batches (`eval_batches`):
  image (N, He, We, 3) float32 F's view at the eval scale; label (N, Hl, Wl) int32 at full
  resolution; mask (N,) bool, False for the padding that fills the last batch.
N is the global batch; every process reads its own slice (tfds.split_for_jax_process) and
contributes N / process_count examples. The same seed gives the same batches.
With `views_on_device` (the default) tf.data carries uint8 `*image_u8` images and the float
views are made on the accelerators by `device_views`; `train_batches`/`eval_batches` hand out
the same keys either way.

All labels of one eval split must share one resolution (Cityscapes: 1024x2048; the synthetic
benchmark: its scene size); set `eval.label_size` to resize them (nearest) when they do not.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lsd_jax.data import classes, rare_class
from lsd_jax.errors import ConfigError
from lsd_jax.models import VGG_MEAN_BGR, check_training_size

# TFDS's own Cityscapes builder stores labelIds under other feature names.
OFFICIAL_CITYSCAPES = "cityscapes"


# ----------------------------------------------------------------------------- datasets


def _overridden_config(builder_cls, config_name: str | None, overrides: dict):
    base = (builder_cls.builder_configs[config_name] if config_name
            else builder_cls.builder_configs[builder_cls.DEFAULT_BUILDER_CONFIG_NAME])
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"config_overrides {unknown} are not fields of {builder_cls.name}'s "
                          f"builder config; it has {sorted(fields)}")
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
    return dataclasses.replace(base, name=f"{base.name}_{digest}", **overrides)


def load_builder(name: str, data_dir: str | None, manual_dir: str | None = None,
                 config_overrides: dict | None = None) -> tfds.core.DatasetBuilder:
    """The TFDS builder for `name`, prepared: generated for synthetic_scenes, built from
    `manual_dir` when given, otherwise it must have been built before (clear error if not)."""
    import lsd_jax.data.datasets  # noqa: F401  (registers our builders with TFDS)

    overrides = dict(config_overrides or {})
    if overrides:
        base_name, _, config_name = name.partition("/")
        builder_cls = tfds.builder_cls(base_name)
        builder = builder_cls(data_dir=data_dir,
                              config=_overridden_config(builder_cls, config_name, overrides))
    else:
        builder = tfds.builder(name, data_dir=data_dir)
    if not is_prepared(builder):
        if builder.name == "synthetic_scenes" or manual_dir:
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                manual_dir=manual_dir))
        else:
            raise FileNotFoundError(
                f"dataset {name!r} is not built in {builder.data_dir}. Build it once with "
                f"`python -m lsd_jax.data.prepare {builder.info.full_name.rsplit('/', 1)[0]} "
                f"--manual_dir <extracted files> --data_dir {data_dir or '~/tensorflow_datasets'}`"
                ", or set manual_dir in the data config (see docs/data.md).")
    if builder.name == "appearance_adapted":
        from lsd_jax.data.datasets.appearance_adapted import check_same_copy

        check_same_copy(builder, manual_dir)
    return builder


def is_prepared(builder) -> bool:
    """builder.is_prepared(), without the warning TFDS logs for every dataset not built yet
    ("Variant folder ... has no dataset_info.json"): a missing dataset is not a problem here,
    it is built or reported."""
    info_file = tfds.core.Path(builder.data_path) / "dataset_info.json"
    return info_file.exists() and builder.is_prepared()


def stored_class_set(builder) -> str:
    """The label space a builder stores (our builders say so in their config)."""
    return getattr(builder.builder_config, "class_set", "cityscapes19")


def label_source(builder, wanted_class_set: str) -> tuple[str, str, np.ndarray]:
    """(image feature, label feature, id table) mapping stored label values to `wanted`."""
    if builder.name == OFFICIAL_CITYSCAPES:
        table = classes.conversion_table("cityscapes19", wanted_class_set)[
            classes.CITYSCAPES_LABELID_TO_TRAINID]
        return "image_left", "segmentation_label", table
    return "image", "label", classes.conversion_table(stored_class_set(builder), wanted_class_set)


def read_encoded(builder, split: str, *, shuffle: bool, seed: int | None):
    """(image bytes, label bytes) pairs of a split; decoding is left to the pipeline so that
    shuffle buffers hold compact encoded files."""
    image_key, label_key, _ = label_source(builder, "cityscapes19")
    skip = {image_key: tfds.decode.SkipDecoding(), label_key: tfds.decode.SkipDecoding()}
    # No TFDS auto-cache (`ds.cache()` of small splits): a training stream is endless and stops
    # part-way through an epoch, so its cache would be filled only to be discarded (tf.data
    # warns about exactly that at every stop), and an evaluation builds a new dataset each
    # time, so a cache would never be read back either. Small files stay in the OS's cache.
    ds = builder.as_dataset(split=split, shuffle_files=shuffle, decoders=skip,
                            read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False))
    return ds.map(lambda ex: (ex[image_key], ex[label_key]),
                  num_parallel_calls=tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------- transforms


def decode_pair(image_bytes, label_bytes, table: tf.Tensor):
    """-> (H, W, 3) uint8 RGB image, (H, W) int32 labels of the wanted class set."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    label = tf.io.decode_png(label_bytes, channels=1)[..., 0]
    return image, tf.gather(table, tf.cast(label, tf.int32))


def resize_pair(image, label, size):
    """Bilinear (antialiased, like PIL) for the image, nearest for the label."""
    image = tf.image.resize(image, size, method="bilinear", antialias=True)
    label = tf.image.resize(label[..., None], size, method="nearest")[..., 0]
    return image, label


def random_crop_pair(image, label, size, seed):
    """The same random window of image and label (stateless: a function of `seed`)."""
    shape = tf.shape(label)
    tf.debugging.assert_greater_equal(
        shape, tf.constant(size), message=f"image smaller than the crop size {tuple(size)}; "
                                          "set a larger resize or a smaller crop")
    top = tf.random.stateless_uniform([], seed, 0, shape[0] - size[0] + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], seed + 1, 0, shape[1] - size[1] + 1, dtype=tf.int32)
    return (image[top:top + size[0], left:left + size[1]],
            label[top:top + size[0], left:left + size[1]])


def random_flip_pair(image, label, seed):
    flip = tf.random.stateless_uniform([], seed + 2) < 0.5
    return (tf.cond(flip, lambda: image[:, ::-1], lambda: image),
            tf.cond(flip, lambda: label[:, ::-1], lambda: label))


def to_uint8(image):
    """Round and clip (antialiased resizing overshoots 0-255 slightly) to uint8 RGB."""
    if image.dtype == tf.uint8:
        return image
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def model_views(image):
    """RGB image (0-255, any dtype) -> (F's view: BGR minus the Caffe mean, BGR in [0, 1])."""
    # Clipped because antialiased resizing overshoots 0-255 slightly at edges.
    bgr = tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 255.0)[..., ::-1]
    return bgr - tf.constant(VGG_MEAN_BGR, tf.float32), bgr / 255.0


def output_size(domain) -> tuple[int, int]:
    """(H, W) of a domain's training images: the crop, else the resize; one of them is needed."""
    size = domain.crop if domain.crop is not None else domain.resize
    if size is None:
        raise ConfigError(f"data config for {domain.name!r}: set `crop` or `resize` (H, W); "
                          "images of varying size cannot be batched")
    if domain.crop is not None and domain.resize is not None and (
            domain.crop[0] > domain.resize[0] or domain.crop[1] > domain.resize[1]):
        raise ConfigError(f"data config for {domain.name!r}: crop {tuple(domain.crop)} is "
                          f"larger than resize {tuple(domain.resize)}")
    return tuple(size)


def train_example_fn(domain, table: np.ndarray, views_on_device: bool = False, rcs=None):
    """(seed, image bytes, label bytes[, class]) -> {"image", "image01", "label"} at the output
    size, or {"image_u8", "label"} (uint8 RGB, views made later on device) if views_on_device.
    With `rcs` (config.data.rcs) the crop is drawn again until it holds the sampled class."""
    size = output_size(domain)
    table = tf.constant(table, tf.int32)

    def fn(seed, image_bytes, label_bytes, cls=None):
        image, label = decode_pair(image_bytes, label_bytes, table)
        if domain.resize is not None:
            image, label = resize_pair(image, label, tuple(domain.resize))
        if domain.crop is not None and rcs is not None:
            image, label = rare_class.class_crop_pair(
                image, label, tuple(domain.crop), seed, cls, rcs.min_pixels * rcs.min_crop_ratio,
                rcs.crop_tries)
        elif domain.crop is not None:
            image, label = random_crop_pair(image, label, tuple(domain.crop), seed)
        elif domain.resize is None:
            tf.debugging.assert_equal(tf.shape(label), tf.constant(size))
        if domain.flip:
            image, label = random_flip_pair(image, label, seed)
        label.set_shape(size)
        if views_on_device:
            image = to_uint8(image)
            image.set_shape((*size, 3))
            return {"image_u8": image, "label": label}
        image_f, image01 = model_views(image)
        image_f.set_shape((*size, 3))
        image01.set_shape((*size, 3))
        return {"image": image_f, "image01": image01, "label": label}

    return fn


# ----------------------------------------------------------------------------- train


def per_process_batch(global_batch: int, process_count: int, what: str = "batch_size") -> int:
    if global_batch < 1 or global_batch % process_count:
        raise ConfigError(f"data.{what}={global_batch} must be a positive multiple of the "
                          f"process count {process_count}: each process loads "
                          f"{what} / process_count examples")
    return global_batch // process_count


def _process(process_index, process_count):
    """(index, count) of this process; explicit values let tests play several processes."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is outside [0, process_count={count})")
    return index, count


def process_split(split: str, process_index: int, process_count: int):
    """This process's slice of a split: disjoint slices that together cover it (sizes differ
    by at most one; nothing is dropped)."""
    return tfds.split_for_jax_process(split, process_index=process_index,
                                      process_count=process_count, drop_remainder=False)


def _domain_seed(seed: int, process_index: int, domain_index: int) -> int:
    """Distinct, reproducible streams per (seed, process, domain)."""
    return (seed * 1_000_003 + process_index * 7919 + domain_index * 104_729) % (2 ** 31)


def rare_class_stream(config, domain, builder, table: np.ndarray, *, seed: int,
                      process_index: int, batch: int, start_step: int) -> tf.data.Dataset:
    """The source drawn by rare-class sampling (lsd_jax/data/rare_class.py): example j of this
    process at step t is a function of (seed, t, its slot in the global batch) alone."""
    counts = rare_class.source_statistics(config, builder)
    locations = rare_class.record_locations(builder.info.splits[domain.split].file_instructions)
    if len(locations) != counts.shape[0]:  # the records read by index, as the split counts them
        raise ConfigError(f"{domain.name}:{domain.split}: {len(locations)} records in its files, "
                          f"{counts.shape[0]} examples in its metadata")
    draw = rare_class.sampler(counts, config.rcs)
    image_key, label_key, _ = label_source(builder, "cityscapes19")
    skip = {image_key: tfds.decode.SkipDecoding(), label_key: tfds.decode.SkipDecoding()}
    features = builder.info.features

    def read(index):
        return rare_class.read_record(*locations[int(index)])

    def example(step, slot):
        slot_seed = tf.stack([tf.constant(seed, tf.int64),
                              step * config.batch_size + process_index * batch + slot])
        index, cls = draw(slot_seed)
        serialized = tf.py_function(read, [index], tf.string)
        record = features.deserialize_example(serialized, decoders=skip)
        return slot_seed, record[image_key], record[label_key], cls

    steps = tf.data.Dataset.range(start_step, 2 ** 62)
    return steps.flat_map(lambda step: tf.data.Dataset.range(batch).map(
        lambda slot: example(step, slot)))


def domain_stream(config, domain, domain_index: int, *, process_index: int, process_count: int,
                  start_step: int = 0) -> tf.data.Dataset:
    """One domain's per-process stream of batched {"image", "image01", "label"}."""
    batch = per_process_batch(config.batch_size, process_count)
    builder = load_builder(domain.name, config.data_dir, domain.manual_dir,
                           domain.config_overrides.to_dict())
    _, _, table = label_source(builder, config.class_set)
    seed = _domain_seed(config.seed, process_index, domain_index)
    parallel = tf.data.AUTOTUNE if config.num_parallel_calls < 0 else config.num_parallel_calls
    if domain_index == 0 and config.rcs.enabled:
        ds = rare_class_stream(config, domain, builder, table, seed=seed,
                               process_index=process_index, batch=batch, start_step=start_step)
        fn = train_example_fn(domain, table, config.get("views_on_device", False), config.rcs)
        ds = ds.map(fn, num_parallel_calls=parallel, deterministic=True)
        return ds.batch(batch, drop_remainder=True)
    split = process_split(domain.split, process_index, process_count)
    ds = read_encoded(builder, split, shuffle=True, seed=seed)
    ds = ds.shuffle(config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    example_seeds = tf.data.Dataset.random(seed=seed).batch(2)
    ds = tf.data.Dataset.zip(example_seeds, ds).map(lambda s, ex: (s, *ex))
    # Resuming: skip what was consumed, before decoding (reads records, decodes nothing).
    ds = ds.skip(start_step * batch)
    fn = train_example_fn(domain, table, config.get("views_on_device", False))
    ds = ds.map(fn, num_parallel_calls=parallel, deterministic=True)
    return ds.batch(batch, drop_remainder=True)


def make_train_dataset(config, *, process_index: int | None = None,
                       process_count: int | None = None, start_step: int = 0,
                       one_size: bool = True) -> tf.data.Dataset:
    """This process's endless stream of training batches (numpy-ready dicts, per-process batch).

    start_step: batches already consumed (when resuming); the stream continues from there.
    one_size: both domains at one size, a multiple of 32 (LSD: `methods.needs_one_size`);
    otherwise each domain has its own fixed size.
    """
    process_index, process_count = _process(process_index, process_count)
    src_size, tgt_size = output_size(config.source), output_size(config.target)
    if one_size:
        check_training_size(*src_size)
    if one_size and src_size != tgt_size:
        raise ConfigError(f"source images are {src_size} but target images {tgt_size}; set "
                          "data.source.crop/resize and data.target.crop/resize to one size")
    streams = [domain_stream(config, d, i, process_index=process_index,
                             process_count=process_count, start_step=start_step)
               for i, d in enumerate((config.source, config.target))]

    def merge(src, tgt):
        out = {f"source_{k}": v for k, v in src.items()}
        out.update({f"target_{k}": v for k, v in tgt.items() if k != "label"})
        return out

    ds = tf.data.Dataset.zip(*streams).map(merge)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(config.prefetch)


# ----------------------------------------------------------------------------- eval


def eval_label_size(builder, split: str, label_key: str, label_size) -> tuple[int, int]:
    """The one label resolution of an eval split: configured, or that of its first example."""
    if label_size is not None:
        return tuple(label_size)
    first = next(iter(builder.as_dataset(
        split=split, decoders={label_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(try_autocache=False)).take(1)))
    shape = tf.shape(tf.io.decode_png(first[label_key], channels=1))
    return int(shape[0]), int(shape[1])


def eval_num_batches(builder, split: str, process_count: int, batch: int) -> int:
    """Batches every process runs: enough for the largest slice (slices differ by at most 1)."""
    largest = max(builder.info.splits[process_split(split, i, process_count)].num_examples
                  for i in range(process_count))
    return max(1, math.ceil(largest / batch))


def make_eval_dataset(config, *, process_index: int | None = None,
                      process_count: int | None = None) -> tuple[tf.data.Dataset, int]:
    """(this process's eval batches, number of batches). Every example of the split is seen
    exactly once across processes; each process pads its slice with masked examples so that
    all run the same number of batches (collectives need that)."""
    process_index, process_count = _process(process_index, process_count)
    e = config.eval
    batch = per_process_batch(e.batch_size, process_count, "eval.batch_size")
    builder = load_builder(e.name, config.data_dir, e.manual_dir, e.config_overrides.to_dict())
    image_key, label_key, table_np = label_source(builder, config.class_set)
    table = tf.constant(table_np, tf.int32)
    scale, label_size = tuple(e.scale), eval_label_size(builder, e.split, label_key, e.label_size)
    split = process_split(e.split, process_index, process_count)
    count = builder.info.splits[split].num_examples
    num_batches = eval_num_batches(builder, e.split, process_count, batch)

    def prepare(image_bytes, label_bytes):
        image, label = decode_pair(image_bytes, label_bytes, table)
        image = tf.image.resize(image, scale, method="bilinear", antialias=True)
        if e.label_size is not None:
            label = tf.image.resize(label[..., None], label_size, method="nearest")[..., 0]
        else:
            tf.debugging.assert_equal(
                tf.shape(label), tf.constant(label_size), message=(
                    f"eval labels of {e.name}:{e.split} differ in size; set "
                    f"data.eval.label_size to resize them to one size"))
        label.set_shape(label_size)
        if config.get("views_on_device", False):
            image = to_uint8(image)
            image.set_shape((*scale, 3))
            return {"image_u8": image, "label": label, "mask": tf.constant(True)}
        image_f, _ = model_views(image)
        image_f.set_shape((*scale, 3))
        return {"image": image_f, "label": label, "mask": tf.constant(True)}

    ds = read_encoded(builder, split, shuffle=False, seed=None).map(
        prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    padding = {("image_u8" if config.get("views_on_device", False) else "image"):
               tf.zeros((*scale, 3), tf.uint8 if config.get("views_on_device", False)
                        else tf.float32),
               "label": tf.fill(label_size, tf.constant(classes.IGNORE_LABEL, tf.int32)),
               "mask": tf.constant(False)}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_batches * batch - count))
    return ds.batch(batch, drop_remainder=True).prefetch(2), num_batches


# ----------------------------------------------------------------------------- to devices


def global_batch(local_batch: dict, mesh: Mesh, data_axis: str = "data") -> dict:
    """This process's numpy batch -> global jax.Arrays sharded over `data_axis` of `mesh`."""
    sharding = NamedSharding(mesh, PartitionSpec(data_axis))
    local_devices = mesh.shape[data_axis] // jax.process_count()
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if value.shape[0] % max(local_devices, 1):
            raise ValueError(f"{key}: this process's batch of {value.shape[0]} cannot be split "
                             f"over its {local_devices} devices on mesh axis {data_axis!r}; "
                             "make the global batch a multiple of the data-axis size")
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


@jax.jit
def _device_views(batch: dict) -> dict:
    mean = jax.numpy.asarray(VGG_MEAN_BGR, jax.numpy.float32)
    out = {}
    for key, value in batch.items():
        if not key.endswith("image_u8"):
            out[key] = value
            continue
        bgr = value[..., ::-1].astype(jax.numpy.float32)
        out[key[:-len("_u8")]] = bgr - mean
        out[key[:-len("_u8")] + "01"] = bgr * (1.0 / 255.0)
    return out


def device_views(batch: dict, keep_image01: bool = True) -> dict:
    """Global batch with uint8 RGB `*image_u8` arrays -> the float32 views the steps take
    (`*image`: BGR minus the Caffe mean; `*image01`: BGR in [0, 1]), computed where the arrays
    live and sharded like them."""
    out = _device_views(batch)
    if not keep_image01:
        out = {k: v for k, v in out.items() if not k.endswith("image01")}
    return out


def train_batches(config, mesh: Mesh, *, start_step: int = 0,
                  process_index: int | None = None, process_count: int | None = None,
                  one_size: bool = True) -> Iterator[dict]:
    """Endless global training batches for this process (see the module docstring)."""
    ds = make_train_dataset(config, start_step=start_step, process_index=process_index,
                            process_count=process_count, one_size=one_size)
    for batch in ds.as_numpy_iterator():
        batch = global_batch(batch, mesh, config.data_axis)
        yield device_views(batch) if config.get("views_on_device", False) else batch


def eval_batches(config, mesh: Mesh, *, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict]:
    """One pass over the eval split as global batches (padding has mask False)."""
    ds, _ = make_eval_dataset(config, process_index=process_index, process_count=process_count)
    for batch in ds.as_numpy_iterator():
        batch = global_batch(batch, mesh, config.data_axis)
        yield (device_views(batch, keep_image01=False) if config.get("views_on_device", False)
               else batch)
