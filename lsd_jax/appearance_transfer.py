"""FCAN's appearance adaptation (AAN): an adapted copy of the source dataset, made offline.

Each source image is re-rendered "in the style of the target domain" (docs/methods.md,
section 11): starting from white noise, an image o is optimised so that its deep features match
the source image's (content) and its Gram matrices match the mean Gram matrices over the target
images (style):

    L(o) = sum_l w_s^l ||M_o^l - M_s^l||^2 + alpha * sum_l w_t^l ||G_o^l - mean_t G_t^l||^2

at conv1 and the end of each stage of an ImageNet ResNet-50 (res2c, res3d, res4f, res5c), with
1,000 steps o <- o - w_i * g / |g|, w_i = 10 (I - i) / I. The adapted images and the source's
own labels are written as a dataset the training pipeline reads (`appearance_adapted`).

    python -m lsd_jax.appearance_transfer --config configs/gta.py --output /data/gta5_aan \\
        [--config.aan.weights=resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5] \\
        [--max_images N]

    python -m lsd_jax.main --config configs/gta.py:fcan \\
        --config.data.source.manual_dir=/data/gta5_aan --workdir runs/fcan

It reads config.data.source (the images to adapt, at their stored size, or config.aan.resize)
and config.data.target (its training split: unlabelled images only, never an evaluation set).
The mean target Gram matrices are computed once and kept in the output directory; images are
written one by one, so a killed run continues where it stopped (images already written are
not redone) and a finished one does nothing. The output directory records its settings
(`aan.json`); a run with other settings is refused rather than mixed into it.

Where this reading of the paper is a choice (say so to users, docs/methods.md section 11):
- |g| is the mean absolute value of the gradient over the image (the L1 norm divided by the
  number of values). With the plain L1 norm, 1,000 steps of total length sum_i w_i ~ 5,000
  would move a 1024x512 image by 0.003 grey levels per value: nothing would change.
- The Gram matrices are averaged over positions, G = F^T F / N, so that target images of any
  size average meaningfully; the style term compares N_l * G (the paper's unnormalised sum at
  the source image's size), which is exactly the paper's loss when the sizes agree. alpha keeps
  the paper's 1e-14.
- The content and style weights w_s^l, w_t^l are not given in the paper: 1 each by default.
- The result is clipped to 0-255 only when written.
- `config.aan.start="source"` starts from the source image instead of white noise (a common
  variant of style transfer): features that cannot be inverted, such as a random network's,
  then still keep the scene. From noise, a random width-1/4 ResNet-50 leaves the images noise
  after 1,000 steps (its conv1 has 16 channels after a ReLU: far from invertible).

Without `config.aan.weights` the feature network is a ResNet-50 with fixed random He-normal
weights (seed config.aan.seed): random convolutional features still carry colour and texture
statistics (Ustyuzhaninov et al., 2017), which is what the embedded benchmark's domains differ
in, but they are no stand-in for ImageNet features on real images, and alpha would have to be
tuned for them (on the selection slice).

The optimisation (`adapt_images`) imports neither TensorFlow nor the data stack; the command
(`write_adapted_copy`) does.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zlib
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lsd_jax.models import VGG_MEAN_BGR
from lsd_jax.models.resnet import FEATURE_NAMES, ImageNetResNet

RECORD = "aan.json"
GRAMS = "target_grams.npz"
LOSSES = "losses.jsonl"
FILE_FORMAT = "lsd_jax.appearance_adapted"
# Where the optimisation starts: white noise (the paper), or the source image itself.
STARTS = ("noise", "source")


class AppearanceTransferError(ValueError):
    """Bad AAN settings, or an output directory that holds another copy."""


class Objective(NamedTuple):
    """What the optimisation matches: static under jit (hashable)."""
    layers: tuple[str, ...]
    content_weights: tuple[float, ...]
    style_weights: tuple[float, ...]
    alpha: float
    iterations: int
    step_size: float


def objective_from_config(aan) -> Objective:
    layers = tuple(aan.layers)
    unknown = [name for name in layers if name not in FEATURE_NAMES]
    if not layers or unknown:
        raise AppearanceTransferError(f"config.aan.layers={layers}: expected a non-empty subset "
                                      f"of {FEATURE_NAMES}")
    for field in ("content_weights", "style_weights"):
        values = tuple(float(v) for v in aan[field])
        if len(values) != len(layers) or min(values) < 0:
            raise AppearanceTransferError(
                f"config.aan.{field}={values}: expected one weight >= 0 per layer of "
                f"config.aan.layers ({len(layers)})")
    for field in ("alpha", "step_size"):
        if not aan[field] > 0:
            raise AppearanceTransferError(f"config.aan.{field}={aan[field]}: expected > 0")
    if aan.iterations < 1:
        raise AppearanceTransferError(f"config.aan.iterations={aan.iterations}: expected >= 1")
    if aan.start not in STARTS:
        raise AppearanceTransferError(f"config.aan.start={aan.start!r}: expected one of {STARTS}")
    return Objective(layers, tuple(float(v) for v in aan.content_weights),
                     tuple(float(v) for v in aan.style_weights), float(aan.alpha),
                     int(aan.iterations), float(aan.step_size))


# ----------------------------------------------------------------------------- pixels


def caffe_from_rgb(rgb: jax.Array) -> jax.Array:
    """uint8 (or 0-255 float) RGB -> the networks' input: BGR, the ImageNet mean subtracted."""
    return rgb[..., ::-1].astype(jnp.float32) - jnp.asarray(VGG_MEAN_BGR, jnp.float32)


def rgb_from_caffe(x: np.ndarray) -> np.ndarray:
    """The inverse, clipped and rounded to uint8 RGB."""
    bgr = np.asarray(x, np.float32) + np.asarray(VGG_MEAN_BGR, np.float32)
    return np.clip(np.rint(bgr[..., ::-1]), 0, 255).astype(np.uint8)


def white_noise(seed: int, name: str, shape: Sequence[int]) -> jax.Array:
    """The starting image of one source image: uniform RGB noise, 0-255, in network input
    space. Keyed by the image's name, so it does not depend on batching or on resuming."""
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return caffe_from_rgb(jax.random.uniform(key, (*shape[:2], 3), maxval=255.0))


# ----------------------------------------------------------------------------- the objective


def gram(feature: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, C, C): F^T F averaged over the H*W positions, in float32."""
    b, h, w, c = feature.shape
    f = feature.reshape(b, h * w, c).astype(jnp.float32)
    return jnp.einsum("bnc,bnd->bcd", f, f) / (h * w)


def losses(features: dict, content: dict, target_grams: dict, objective: Objective):
    """(content term, style term), each (B,): the two sums of L, per image."""
    content_term = style_term = 0.0
    for name, w_s, w_t in zip(objective.layers, objective.content_weights,
                              objective.style_weights):
        f = features[name].astype(jnp.float32)
        content_term += w_s * jnp.sum(jnp.square(f - content[name]), axis=(1, 2, 3))
        positions = f.shape[1] * f.shape[2]
        # N^2 ||G_o - mean G_t||^2 = ||F^T F - N mean G_t||^2: the paper's unnormalised form.
        style_term += w_t * positions ** 2 * jnp.sum(
            jnp.square(gram(f) - target_grams[name]), axis=(1, 2))
    return content_term, objective.alpha * style_term


def adapt_images(apply_fn: Callable, variables, content_images: jax.Array, start: jax.Array,
                 target_grams: dict, objective: Objective):
    """Optimise a batch of images (network input space, (B, H, W, 3)) from `start` towards the
    content of `content_images` and the target style. Each image takes its own normalised
    steps (the batch's images do not interact). Returns (images, (content, style) at the start,
    (content, style) at the end), the terms per image. Pure; jit it with `objective` static."""
    content = {k: jax.lax.stop_gradient(v) for k, v in apply_fn(variables, content_images).items()
               if k in objective.layers}

    def terms(x):
        return losses(apply_fn(variables, x), content, target_grams, objective)

    def total(x):
        content_term, style_term = terms(x)
        return jnp.sum(content_term + style_term)

    def step(i, x):
        g = jax.grad(total)(x)
        g_mean_abs = jnp.mean(jnp.abs(g), axis=(1, 2, 3), keepdims=True)
        rate = objective.step_size * (objective.iterations - i) / objective.iterations
        return x - rate * g / jnp.maximum(g_mean_abs, jnp.finfo(jnp.float32).tiny)

    images = jax.lax.fori_loop(0, objective.iterations, step, start)
    return images, terms(start), terms(images)


def gram_sums(apply_fn: Callable, variables, images: jax.Array, layers: Sequence[str]) -> dict:
    """{layer: sum over the batch of each image's Gram matrix} of network-input images."""
    features = apply_fn(variables, images)
    return {name: jnp.sum(gram(features[name]), axis=0) for name in layers}


# ----------------------------------------------------------------------------- feature network


def feature_network(aan) -> tuple[Callable, dict, str]:
    """(apply_fn, variables, description) of the feature network config.aan names."""
    model = ImageNetResNet(width=aan.width, blocks=tuple(aan.resnet_blocks))
    shape = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    if aan.weights:
        from lsd_jax import weights

        if aan.width != 1.0:
            raise AppearanceTransferError(f"config.aan.width={aan.width} with config.aan."
                                          "weights: ImageNet weights fit width 1.0 only")
        variables = weights.import_keras_resnet(aan.weights, jax.eval_shape(model.init,
                                                jax.random.key(0), shape))
        variables = jax.tree.map(jnp.asarray, variables)
        description = f"ImageNet ResNet (blocks {tuple(aan.resnet_blocks)}) from {aan.weights}"
    else:
        variables = random_features(model, aan.seed)
        description = (f"random ResNet (blocks {tuple(aan.resnet_blocks)}, width {aan.width}, "
                       f"He-normal, seed {aan.seed}): no ImageNet weights given "
                       "(config.aan.weights)")
    return jax.jit(model.apply), variables, description


def random_features(model: ImageNetResNet, seed: int) -> dict:
    """The network's variables with He-normal convolutions (BatchNorm the identity), so that
    activations keep their scale through the depth."""
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 64, 64, 3)))
    he = jax.nn.initializers.he_normal()
    leaves, treedef = jax.tree.flatten(variables["params"])
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    params = jax.tree.unflatten(treedef, [he(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    return {**variables, "params": params}


# ----------------------------------------------------------------------------- the command


def _settings_record(config, source_builder, target_builder, class_set: str,
                     network: str) -> dict:
    aan, data = config.aan, config.data
    # Through JSON, so that it compares equal to what a record file holds (lists, not tuples).
    return json.loads(json.dumps({
        "format": FILE_FORMAT,
        "source": {"dataset": source_builder.info.full_name, "split": data.source.split,
                   "class_set": class_set, "resize": _tuple_or_none(aan.resize)},
        "target": {"dataset": target_builder.info.full_name, "split": data.target.split,
                   "resize": _tuple_or_none(data.target.resize),
                   "max_images": aan.max_target_images},
        "objective": objective_from_config(aan)._asdict(),
        "feature_network": network,
        "start": aan.start,
        "seed": aan.seed,
    }))


def _tuple_or_none(value):
    return None if value is None else [int(v) for v in value]


def fingerprint(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _check_or_write_record(output: str, settings: dict) -> dict:
    """The output's record: new, or an existing one with the same settings (else an error
    naming what differs)."""
    path = os.path.join(output, RECORD)
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
        if record.get("format") != FILE_FORMAT:
            raise AppearanceTransferError(f"{path}: not an appearance-adapted copy's record "
                                          f"(format {record.get('format')!r})")
        differing = sorted(k for k in settings if record.get(k) != settings[k])
        if differing:
            details = "; ".join(f"{k}: {record.get(k)} there, {settings[k]} now"
                                for k in differing)
            raise AppearanceTransferError(
                f"{output} holds an adapted copy made with other settings ({details}). Use "
                "another --output, or the settings it was made with.")
        return record
    record = {**settings, "fingerprint": fingerprint(settings), "complete": False}
    _write_json(path, record)
    return record


def _write_json(path: str, value: dict) -> None:
    _atomic_write(path, json.dumps(value, indent=1).encode())


def _atomic_write(path: str, data: bytes) -> None:
    """Write to a temporary name, then rename: a killed run never leaves half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _decode(data: bytes) -> np.ndarray:
    """An encoded label map as stored: (H, W) class ids."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def _decode_rgb(data: bytes) -> np.ndarray:
    """An encoded image as (H, W, 3) uint8 RGB, whatever its mode (grey, palette, RGBA)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _resized(image: np.ndarray, label: np.ndarray | None, size):
    """Image bilinear, label nearest, to size = (H, W)."""
    from PIL import Image

    height, width = size
    image = np.asarray(Image.fromarray(image).convert("RGB").resize((width, height),
                                                                    Image.BILINEAR))
    if label is not None:
        label = np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))
    return image, label


def _equal_size_batches(items: Iterable, batch_size: int, size_of: Callable) -> Iterator[list]:
    """Consecutive items in lists of at most batch_size with equal size_of(item)."""
    batch = []
    for item in items:
        if batch and (len(batch) == batch_size or size_of(item) != size_of(batch[0])):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _read_once():
    """Read once, in order: TFDS's auto-cache of small splits would be cut short by take()
    (and tf.data warns that it was)."""
    import tensorflow_datasets as tfds

    return tfds.ReadConfig(try_autocache=False)


def _target_images(config, builder, image_key: str) -> Iterator[np.ndarray]:
    import tensorflow_datasets as tfds

    target, limit = config.data.target, config.aan.max_target_images
    ds = builder.as_dataset(split=target.split, shuffle_files=False,
                            decoders={image_key: tfds.decode.SkipDecoding()},
                            read_config=_read_once())
    if limit is not None:
        ds = ds.take(limit)
    for example in ds.as_numpy_iterator():
        image = _decode_rgb(example[image_key])
        if target.resize is not None:
            image, _ = _resized(image, None, target.resize)
        yield image


def mean_target_grams(config, builder, image_key, apply_fn, variables, output: str,
                      progress) -> dict:
    """The mean Gram matrices over config.data.target's training images, computed once and
    kept in the output directory."""
    path = os.path.join(output, GRAMS)
    layers = tuple(config.aan.layers)
    if os.path.exists(path):
        with np.load(path) as stored:
            return {name: jnp.asarray(stored[name]) for name in layers}
    sums_fn = jax.jit(gram_sums, static_argnums=(0, 3))
    sums, count = None, 0
    total = builder.info.splits[config.data.target.split].num_examples
    if config.aan.max_target_images is not None:
        total = min(total, config.aan.max_target_images)
    bar = progress(total=total, desc="target Gram matrices", unit="image")
    for batch in _equal_size_batches(_target_images(config, builder, image_key),
                                     config.aan.batch_size, lambda image: image.shape):
        part = sums_fn(apply_fn, variables, caffe_from_rgb(jnp.asarray(np.stack(batch))),
                       layers)
        sums = part if sums is None else {k: sums[k] + part[k] for k in layers}
        count += len(batch)
        bar.update(len(batch))
    bar.close()
    if not count:
        raise AppearanceTransferError(f"config.data.target {config.data.target.name}:"
                                      f"{config.data.target.split} holds no images")
    means = {k: np.asarray(v, np.float64) / count for k, v in sums.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **{k: v.astype(np.float32) for k, v in means.items()},
             num_images=np.int64(count))
    _atomic_write(path, buffer.getvalue())
    return {k: jnp.asarray(v, jnp.float32) for k, v in means.items()}


def _source_examples(config, builder, image_key, label_key, max_images) -> Iterator[tuple]:
    """(name, image bytes, label bytes) of config.data.source's split, in stored order."""
    import tensorflow_datasets as tfds

    source = config.data.source
    skip = {image_key: tfds.decode.SkipDecoding(), label_key: tfds.decode.SkipDecoding()}
    ds = builder.as_dataset(split=source.split, shuffle_files=False, decoders=skip,
                            read_config=_read_once())
    if max_images is not None:
        ds = ds.take(max_images)
    for example in ds.as_numpy_iterator():
        yield example["name"].decode(), example[image_key], example[label_key]


def check_source(config) -> None:
    """The copy is made from the original source: a config whose source is already a copy
    (an experiment config's :fcan variant) is refused."""
    name = config.data.source.name
    if name.partition("/")[0] == "appearance_adapted":
        raise AppearanceTransferError(
            f"config.data.source.name={name!r} is already an adapted copy; give the config of "
            "the original source and the target :fcan trains on (e.g. configs/gta.py or "
            "configs/synthetic.py:fcan_ran, not their :fcan)")


def write_adapted_copy(config, output: str, max_images: int | None = None,
                       progress=None) -> dict:
    """Adapt config.data.source's images to config.data.target's appearance into `output`
    (images/, labels/, aan.json, target_grams.npz, losses.jsonl); returns the record."""
    import tensorflow_datasets as tfds
    from tqdm import tqdm

    from lsd_jax.data import pipeline

    tfds.disable_progress_bar()
    progress = progress or tqdm
    data, aan = config.data, config.aan
    objective = objective_from_config(aan)
    check_source(config)
    source_builder = pipeline.load_builder(data.source.name, data.data_dir,
                                           data.source.manual_dir,
                                           data.source.config_overrides.to_dict())
    target_builder = pipeline.load_builder(data.target.name, data.data_dir,
                                           data.target.manual_dir,
                                           data.target.config_overrides.to_dict())
    if source_builder.name == pipeline.OFFICIAL_CITYSCAPES:
        raise AppearanceTransferError("config.data.source: TFDS's own cityscapes builder has no "
                                      "names to write the copy under; use cityscapes_extracted")
    image_key, label_key, _ = pipeline.label_source(source_builder, data.class_set)
    target_image_key = pipeline.label_source(target_builder, data.class_set)[0]
    class_set = pipeline.stored_class_set(source_builder)

    apply_fn, variables, network = feature_network(aan)
    os.makedirs(os.path.join(output, "images"), exist_ok=True)
    os.makedirs(os.path.join(output, "labels"), exist_ok=True)
    record = _check_or_write_record(output, _settings_record(
        config, source_builder, target_builder, class_set, network))
    print(f"appearance adaptation of {source_builder.info.full_name}:{data.source.split} to "
          f"{target_builder.info.full_name}:{data.target.split} with a {network}", flush=True)
    grams = mean_target_grams(config, target_builder, target_image_key, apply_fn, variables,
                              output, progress)

    total = num_source = source_builder.info.splits[data.source.split].num_examples
    if max_images is not None:
        total = min(total, max_images)
    done = {name[:-4] for name in os.listdir(os.path.join(output, "images"))
            if name.endswith(".png")}
    adapt = jax.jit(adapt_images, static_argnums=(0, 5))
    bar = progress(total=total, initial=min(len(done), total), desc="adapting source images",
                   unit="image")

    def todo():
        for name, image_bytes, label_bytes in _source_examples(
                config, source_builder, image_key, label_key, max_images):
            if name in done:
                continue
            image = _decode_rgb(image_bytes)
            label = None
            if aan.resize is not None:
                image, label = _resized(image, _decode(label_bytes), aan.resize)
            yield name, image, label_bytes if label is None else _png(label)

    for batch in _equal_size_batches(todo(), aan.batch_size, lambda item: item[1].shape):
        names = [name for name, _, _ in batch]
        content = caffe_from_rgb(jnp.asarray(np.stack([image for _, image, _ in batch])))
        start = content if aan.start == "source" else jnp.stack(
            [white_noise(aan.seed, name, content.shape[1:3]) for name in names])
        images, before, after = adapt(apply_fn, variables, content, start, grams, objective)
        images = np.asarray(images)
        lines = []
        for i, (name, _, label_png) in enumerate(batch):
            # The label first: an image on disk means its pair is complete.
            _atomic_write(os.path.join(output, "labels", f"{name}.png"), label_png)
            _atomic_write(os.path.join(output, "images", f"{name}.png"),
                          _png(rgb_from_caffe(images[i])))
            lines.append(json.dumps({
                "name": name, "content_start": float(before[0][i]),
                "style_start": float(before[1][i]), "content": float(after[0][i]),
                "style": float(after[1][i])}))
        with open(os.path.join(output, LOSSES), "a") as f:
            f.write("".join(line + "\n" for line in lines))
        done.update(names)
        bar.update(len(batch))
    bar.close()
    complete = len(done) >= num_source
    record = {**record, "complete": complete, "num_images": len(done)}
    _write_json(os.path.join(output, RECORD), record)
    how = ("" if complete else
           f" (--max_images {max_images}: not complete; run without it to finish)")
    print(f"wrote {len(done)} adapted images to {output}{how}. Train on them with\n"
          f"  --config.data.source.name=appearance_adapted/{class_set} "
          f"--config.data.source.manual_dir={output}\n"
          "(the :fcan variant of each experiment config sets the name)", flush=True)
    return record


def define_flags() -> None:
    """The command's own flags (besides --config), on absl's global FLAGS."""
    from absl import flags

    flags.DEFINE_string("output", None, "Directory of the adapted copy (created; resumed "
                        "when it holds a copy made with the same settings).")
    flags.DEFINE_integer("max_images", None, "Adapt only the first N source images (in "
                         "the stored order); the copy is then not complete.", lower_bound=1)
    flags.mark_flag_as_required("output")


def _command() -> None:
    """`python -m lsd_jax.appearance_transfer`."""
    from lsd_jax.commands import run_config_command

    run_config_command(
        "lsd_jax.appearance_transfer", define_flags,
        lambda FLAGS: write_adapted_copy(FLAGS.config, FLAGS.output, FLAGS.max_images))


if __name__ == "__main__":
    _command()
