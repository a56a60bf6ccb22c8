"""DAFormer's rare-class sampling (Hoyer et al., CVPR 2022), stateless.

Instead of streaming the source in shuffled order, every source example of a step is drawn:

1. a class c with probability P(c) = softmax((1 - f_c) / T) over the classes that occur, f_c
   the fraction of the source's labelled pixels that are c (T = `data.rcs.temperature`, 0.01:
   the rarer a class, the likelier);
2. uniformly, a source image holding more than `min_pixels` pixels of c;
3. a random crop, drawn again up to `crop_tries` times until it holds more than
   `min_pixels * min_crop_ratio` pixels of c (else the last one is kept).

Every draw is a stateless function of (seed, step, the example's slot in the global batch),
so a resumed run reads exactly what the uninterrupted one would: no stream position to skip.
DAFormer draws from Python's global generator. Images are read by index from the TFDS
dataset's TFRecord files (`record_locations`, one pass over the record headers at start-up).

The per-image class pixel counts are written once, by the command

    python -m lsd_jax.data.rare_class --config configs/gta_deeplab.py:dacs --output rcs.json

which reads config.data.source's labels as training does (dataset, split, class set) at the
stored resolution; `min_pixels` counts pixels at that resolution (DAFormer's 3,000 are at
GTA5's 1914x1052).
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from lsd_jax.errors import ConfigError

FILE_FORMAT = "lsd_jax.rare_class_statistics"
FILE_VERSION = 1
IGNORE_LABEL = 255
_HEADER = 12  # a TFRecord: uint64 length, uint32 CRC of it, the data, uint32 CRC of the data


# ----------------------------------------------------------------------------- statistics

def pixel_counts(label_maps, num_classes: int) -> np.ndarray:
    """(images, classes) int64: how many pixels of each class every label map holds (labels
    of the class set, the ignore label left out)."""
    rows = []
    for labels in label_maps:
        labels = np.asarray(labels).ravel()
        rows.append(np.bincount(labels[labels != IGNORE_LABEL], minlength=num_classes))
    return np.asarray(rows, np.int64).reshape(len(rows), num_classes)


def check_enabled(rcs) -> None:
    """Sampling switched on needs the statistics file (preflight and the pipeline ask)."""
    if rcs.enabled and not rcs.statistics:
        raise ConfigError("config.data.rcs.enabled is set without config.data.rcs.statistics: "
                         "write them once with `python -m lsd_jax.data.rare_class --config "
                         "<this config> --output FILE` and set the field to FILE")


def save_statistics(path: str, counts: np.ndarray, *, dataset: str, class_set: str) -> None:
    """JSON, written beside `path` and renamed over it (a reader never sees half a file)."""
    record = {"format": FILE_FORMAT, "version": FILE_VERSION, "dataset": dataset,
              "class_set": class_set, "num_images": int(counts.shape[0]),
              "num_classes": int(counts.shape[1]), "pixel_counts": counts.tolist()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def load_statistics(path: str, *, dataset: str, class_set: str, num_classes: int) -> np.ndarray:
    """The counts of `save_statistics`, checked against the dataset and class set they must
    describe; each failure a ValueError (FileNotFoundError) naming the file and the field."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"rare-class statistics {path}: no such file (write it with "
                                "`python -m lsd_jax.data.rare_class --config ... --output PATH`)")
    try:
        with open(path) as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"rare-class statistics {path}: not JSON ({error})") from None
    if not isinstance(record, dict) or record.get("format") != FILE_FORMAT:
        raise ValueError(f"rare-class statistics {path}: not a {FILE_FORMAT} file")
    if record.get("version") != FILE_VERSION:
        raise ValueError(f"rare-class statistics {path}: version {record.get('version')!r}, "
                         f"expected {FILE_VERSION}")
    for field, expected in (("dataset", dataset), ("class_set", class_set),
                            ("num_classes", num_classes)):
        if record.get(field) != expected:
            raise ValueError(f"rare-class statistics {path}: {field} {record.get(field)!r}, "
                             f"but the config's source is {expected!r}; write them again for "
                             "this source")
    counts = np.asarray(record.get("pixel_counts"), np.int64)
    if counts.shape != (record.get("num_images"), num_classes) or (counts < 0).any():
        raise ValueError(f"rare-class statistics {path}: pixel_counts is not a "
                         f"{record.get('num_images')} x {num_classes} table of counts")
    return counts


def source_statistics(data, builder) -> np.ndarray:
    """`data.rcs.statistics`, checked against the source it must describe (`builder`, read at
    `data.source.split`): by the run's checks before anything is written, and by the pipeline
    that draws from it. Every failure a ConfigError naming the field."""
    from lsd_jax.data import classes

    check_enabled(data.rcs)
    path, split = data.rcs.statistics, data.source.split
    try:
        counts = load_statistics(path, dataset=f"{builder.info.full_name}:{split}",
                                 class_set=data.class_set,
                                 num_classes=len(classes.class_set(data.class_set)))
    except (OSError, ValueError) as error:
        raise ConfigError(f"config.data.rcs.statistics: {error}") from None
    images = builder.info.splits[split].num_examples
    if counts.shape[0] != images:
        raise ConfigError(f"config.data.rcs.statistics={path!r} counts {counts.shape[0]} images, "
                          f"{data.source.name}:{split} has {images}: write them again for this "
                          "source")
    return counts


def class_probabilities(counts: np.ndarray, temperature: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(classes that occur, their sampling probabilities softmax((1 - f_c) / T))."""
    totals = counts.sum(axis=0).astype(np.float64)
    classes = np.flatnonzero(totals > 0)
    frequency = totals[classes] / totals.sum()
    logits = (1.0 - frequency) / temperature
    probabilities = np.exp(logits - logits.max())
    return classes, probabilities / probabilities.sum()


def images_with_class(counts: np.ndarray, classes: np.ndarray, min_pixels: int
                      ) -> list[np.ndarray]:
    """Per class, the indices of the images holding more than `min_pixels` of it (none: an
    error naming the class, as DAFormer asserts)."""
    members = []
    for c in classes:
        holding = np.flatnonzero(counts[:, c] > min_pixels)
        if holding.size == 0:
            raise ValueError(f"rare-class sampling: no source image holds more than "
                             f"{min_pixels} pixels of class {int(c)}; lower "
                             "config.data.rcs.min_pixels")
        members.append(holding)
    return members


# ----------------------------------------------------------------------------- reading by index

def record_locations(file_instructions) -> list[tuple[str, int, int]]:
    """(file, offset of the data, length) of every record of a split, in the split's order,
    from TFDS's file instructions (file, skip, take) and the records' headers."""
    locations = []
    for instruction in file_instructions:
        path = os.fspath(instruction.filename)
        found, position = [], 0
        with open(path, "rb") as f:
            while True:
                header = f.read(_HEADER)
                if not header:
                    break
                if len(header) < _HEADER:
                    raise ValueError(f"{path}: a truncated record at byte {position}")
                length = struct.unpack("<Q", header[:8])[0]
                found.append((path, position + _HEADER, length))
                position += _HEADER + length + 4
                f.seek(position)
        take = instruction.take if instruction.take >= 0 else len(found) - instruction.skip
        locations.extend(found[instruction.skip:instruction.skip + take])
    return locations


def read_record(path: bytes | str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise ValueError(f"{path}: record at byte {offset} is truncated")
    return data


# ----------------------------------------------------------------------------- the stream

def sampler(counts: np.ndarray, rcs):
    """A TF function (seed pair) -> (image index, class) drawing as in the module docstring."""
    import tensorflow as tf

    classes, probabilities = class_probabilities(counts, rcs.temperature)
    members = images_with_class(counts, classes, rcs.min_pixels)
    sizes = tf.constant([m.size for m in members], tf.int64)
    starts = tf.constant(np.concatenate([[0], np.cumsum([m.size for m in members])[:-1]]),
                         tf.int64)
    flat = tf.constant(np.concatenate(members), tf.int64)
    log_p = tf.constant(np.log(probabilities)[None], tf.float32)
    class_ids = tf.constant(classes, tf.int32)

    def draw(seed):
        which = tf.random.stateless_categorical(log_p, 1, seed, dtype=tf.int32)[0, 0]
        k = tf.random.stateless_uniform([], seed + [0, 1], 0, sizes[which], dtype=tf.int64)
        return flat[starts[which] + k], class_ids[which]
    return draw


def class_crop_pair(image, label, size, seed, cls, min_count, tries: int):
    """A random crop of image and label, drawn again (up to `tries` windows) until it holds
    more than `min_count` pixels of `cls`; the last window if none does."""
    import tensorflow as tf

    shape = tf.shape(label)
    chosen = None
    for t in range(tries - 1, -1, -1):   # built backwards: the first good window wins
        s = seed + [0, 10 + 2 * t]
        top = tf.random.stateless_uniform([], s, 0, shape[0] - size[0] + 1, dtype=tf.int32)
        left = tf.random.stateless_uniform([], s + [0, 1], 0, shape[1] - size[1] + 1,
                                           dtype=tf.int32)
        window = tf.stack([top, left])
        if chosen is None:
            chosen = window
            continue
        count = tf.reduce_sum(tf.cast(
            label[top:top + size[0], left:left + size[1]] == cls, tf.float32))
        chosen = tf.where(count > float(min_count), window, chosen)
    top, left = chosen[0], chosen[1]
    return (image[top:top + size[0], left:left + size[1]],
            label[top:top + size[0], left:left + size[1]])


# ----------------------------------------------------------------------------- the command

def write_source_statistics(config, output: str) -> np.ndarray:
    """Count every class's pixels in each of config.data.source's training labels and save."""
    from lsd_jax import size_constraints
    from lsd_jax.data import classes

    num_classes = len(classes.class_set(config.data.class_set))
    source = config.data.source
    print(f"rare-class statistics of {source.name}:{source.split} in {config.data.class_set} "
          "(labels at the stored resolution)", flush=True)
    labels, total, dataset = size_constraints.source_label_maps(config)
    counts = pixel_counts(labels, num_classes)
    save_statistics(output, counts, dataset=dataset, class_set=config.data.class_set)
    print(f"wrote the class pixel counts of {counts.shape[0]} images to {output}", flush=True)
    return counts


def define_flags() -> None:
    """The command's own flags (besides --config), on absl's global FLAGS."""
    from absl import flags

    flags.DEFINE_string("output", None, "Where to write the statistics (JSON).")
    flags.mark_flag_as_required("output")


def _command() -> None:
    """`python -m lsd_jax.data.rare_class`."""
    from lsd_jax.commands import run_config_command

    run_config_command("lsd_jax.data.rare_class", define_flags,
                       lambda FLAGS: write_source_statistics(FLAGS.config, FLAGS.output))


if __name__ == "__main__":
    _command()
