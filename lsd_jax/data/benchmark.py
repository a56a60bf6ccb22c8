"""Input-pipeline throughput (a benchmark, not a test): images per second per CPU core.

    python -m lsd_jax.data.benchmark [--num_files 24] [--threads 1] [--workdir /tmp/lsd_bench]

Writes GTA5-like 1914x1052 PNG pairs (a procedural scene upscaled, with photographic noise so
that PNG decoding costs what it costs on real frames), builds the `gta5` configs `full`,
`1280x720` and `1280x720_jpeg` from them, and times one domain's stream as training runs it:
decode -> (resize to 1280x720) -> random 1024x512 crop -> flip -> both model views, batch 1.
The tf.data thread pool is limited to --threads so that the number is per core.
"""
from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags
from PIL import Image

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_files", 24, "GTA5-like pairs to write.")
flags.DEFINE_integer("threads", 1, "tf.data threads (cores) to measure with.")
flags.DEFINE_integer("num_images", 96, "Images to time per setting (after a warm-up).")
flags.DEFINE_string("workdir", "/tmp/lsd_bench", "Where the fake dataset and TFDS data go.")


def write_fake_gta5(root: str, count: int) -> None:
    from lsd_jax.data import classes, scenes

    os.makedirs(f"{root}/images", exist_ok=True)
    os.makedirs(f"{root}/labels", exist_ok=True)
    inverse = {v: k for k, v in classes.CITYSCAPES_LABELID_TO_TRAINID_PAIRS.items()}
    for i in range(count):
        path = f"{root}/images/{i:05d}.png"
        if os.path.exists(path):
            continue
        image, label = scenes.render_scene((99, 0, i), 263, 479, scenes.TARGET_APPEARANCE)
        image = np.asarray(Image.fromarray(image).resize((1914, 1052), Image.BILINEAR))
        noise = np.random.default_rng(i).normal(0, 6, image.shape)
        image = np.clip(image + noise, 0, 255).astype(np.uint8)
        ids = np.vectorize(lambda t: inverse.get(int(t), 0))(label).astype(np.uint8)
        ids = np.asarray(Image.fromarray(ids).resize((1914, 1052), Image.NEAREST))
        Image.fromarray(image).save(path)
        label_png = Image.fromarray(ids, mode="P")
        label_png.putpalette([v for i in range(256) for v in (i, i, i)])
        label_png.save(f"{root}/labels/{i:05d}.png")


def time_stream(config, domain, threads: int, num_images: int) -> float:
    import tensorflow as tf

    from lsd_jax.data import pipeline

    ds = pipeline.domain_stream(config, domain, 0, process_index=0, process_count=1)
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    it = ds.with_options(options).prefetch(4).as_numpy_iterator()
    for _ in range(8):  # warm-up: file opening, shuffle buffer fill, graph tracing
        next(it)
    start = time.perf_counter()
    for _ in range(num_images):
        next(it)
    return num_images / (time.perf_counter() - start)


def main(argv):
    del argv
    import tensorflow_datasets as tfds

    import lsd_jax.data.datasets  # noqa: F401
    from lsd_jax.data import config as data_config

    tfds.disable_progress_bar()
    manual = f"{FLAGS.workdir}/gta5_fake"
    write_fake_gta5(manual, FLAGS.num_files)
    config = data_config.default_data_config()
    config.data_dir = f"{FLAGS.workdir}/tfds"
    config.batch_size = 1
    config.shuffle_buffer = 8
    config.num_parallel_calls = FLAGS.threads
    settings = [("gta5/full", (720, 1280)), ("gta5/1280x720", None),
                ("gta5/1280x720_jpeg", None)]
    print(f"threads={FLAGS.threads} cpu_count={os.cpu_count()}")
    for name, resize in settings:
        domain = data_config.domain_config(name, "train", flip=True)
        domain.resize, domain.crop, domain.manual_dir = resize, (512, 1024), manual
        rate = time_stream(config, domain, FLAGS.threads, FLAGS.num_images)
        print(f"{name:22s} resize={resize} crop=(512, 1024): {rate:6.1f} images/s "
              f"({rate / FLAGS.threads:.1f} per core)")


if __name__ == "__main__":
    app.run(main)
