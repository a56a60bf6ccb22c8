"""Start the published self-training variants on datasets prepared the way a user prepares them.

    python benchmarks/published_start.py --workdir runs/published_start

writes a few files in each raw format (GTA5: 1914x1052 RGB and palette PNGs; SYNTHIA
RAND-CITYSCAPES: 1280x760 RGB and 16-bit three-channel label PNGs; Cityscapes: 2048x1024
leftImg8bit and gtFine labelIds PNGs, train and val), builds them with the project's
`python -m lsd_jax.data.prepare`, writes a Keras ResNet-101 file in the layout of Keras's
ImageNet file (random values: what is checked is the path, not the weights), writes the
source's rare-class statistics with `python -m lsd_jax.data.rare_class`, and runs
`python -m lsd_jax.main --config FILE:VARIANT` for each variant until it has trained,
checkpointed and evaluated. Every setting is the config file's, except those that fit the
run to these few files and this machine (printed with the table): the number of steps, the
target and selection splits (a handful of Cityscapes images instead of 2,975), and, unless
`--crop 512`, smaller crops than the published 512x512.

Prints one row per variant: the command's exit status, wall time, and what it wrote. Exits
non-zero if any variant fails. The random contents mean the mIoU figures say nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("configs/gta_deeplab.py:dacs", "configs/gta_deeplab.py:daformer",
            "configs/gta_deeplab.py:mic", "configs/synthia_deeplab.py:dacs",
            "configs/synthia_deeplab.py:daformer", "configs/synthia_deeplab.py:mic")
# (raw dataset, what `prepare` builds from it)
BUILDS = {"gta5": ["gta5/1280x720"], "synthia": ["synthia/16"],
          "cityscapes": ["cityscapes_extracted/1024x512", "cityscapes_extracted/full"]}
SOURCE_OF = {"gta_deeplab": "gta5", "synthia_deeplab": "synthia"}


def block_labels(rng, height, width, ids, block=64):
    """Blocks of `block` pixels, each one of `ids`: every class covers many pixels."""
    grid = rng.choice(np.asarray(ids), (-(-height // block), -(-width // block)))
    return grid.repeat(block, 0).repeat(block, 1)[:height, :width]


def block_image(rng, labels):
    palette = rng.integers(0, 256, (int(labels.max()) + 1, 3))
    noise = rng.integers(-20, 21, labels.shape + (3,))
    return np.clip(palette[labels] + noise, 0, 255).astype(np.uint8)


def save_png(path, array, mode=None, palette=None):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    if palette is not None:
        image.putpalette(palette)
    image.save(path)


def write_gta5(root, count, rng):
    """GTA5's layout: images/NNNNN.png (RGB) and labels/NNNNN.png (palette, the index = labelId)."""
    palette = rng.integers(0, 256, 768).astype(np.uint8).tolist()
    for i in range(1, count + 1):
        labels = block_labels(rng, 1052, 1914, range(34)).astype(np.uint8)
        save_png(os.path.join(root, "images", f"{i:05d}.png"), block_image(rng, labels))
        save_png(os.path.join(root, "labels", f"{i:05d}.png"), labels, "P", palette)


def write_synthia(root, count, rng):
    """RAND-CITYSCAPES: RGB/NNNNNNN.png, GT/LABELS/NNNNNNN.png (uint16 x 3, class id first)."""
    import tensorflow as tf
    for i in range(count):
        labels = block_labels(rng, 760, 1280, range(23))
        save_png(os.path.join(root, "RGB", f"{i:07d}.png"), block_image(rng, labels))
        gt = np.stack([labels, rng.integers(0, 65535, labels.shape),
                       np.zeros_like(labels)], -1).astype(np.uint16)
        path = os.path.join(root, "GT", "LABELS", f"{i:07d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(tf.io.encode_png(tf.constant(gt)).numpy())


def write_cityscapes(root, counts, rng):
    """leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png, gtFine/.../<name>_gtFine_labelIds.png."""
    for split, count in counts.items():
        for i in range(count):
            city = ("aachen", "bremen", "lindau")[i % 3]
            name = f"{city}_{i:06d}_000019"
            labels = block_labels(rng, 1024, 2048, range(34)).astype(np.uint8)
            save_png(os.path.join(root, "leftImg8bit", split, city, f"{name}_leftImg8bit.png"),
                     block_image(rng, labels))
            save_png(os.path.join(root, "gtFine", split, city, f"{name}_gtFine_labelIds.png"),
                     labels, "L")


def write_keras_resnet101(path):
    """keras.applications.ResNet101's layers and names, saved as Keras's legacy HDF5."""
    import keras
    keras.utils.set_random_seed(0)
    keras.applications.ResNet101(weights=None).save(path)


def run(command, log_path):
    """Runs `command` in the repository, its output to `log_path`; returns (status, seconds)."""
    start = time.time()
    with open(log_path, "w") as log:
        status = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    return status, time.time() - start


def last_lines(path, count=15):
    with open(path) as f:
        return "".join(f.readlines()[-count:])


def prepare_everything(workdir, sources, images, tfds_dir):
    """Raw files, the prepared datasets and the ImageNet-layout weights (their path)."""
    rng = np.random.default_rng(0)
    raw = os.path.join(workdir, "raw")
    writers = {"gta5": lambda root: write_gta5(root, images, rng),
               # The builder holds the last 100 out as its validation split.
               "synthia": lambda root: write_synthia(root, images + 100, rng),
               "cityscapes": lambda root: write_cityscapes(
                   root, {"train": images + 2, "val": 2}, rng)}
    for dataset in sorted(set(sources) | {"cityscapes"}):
        root = os.path.join(raw, dataset)
        if not os.path.isdir(root):
            writers[dataset](root)
        for name in BUILDS[dataset]:
            log = os.path.join(workdir, f"prepare_{name.replace('/', '_')}.log")
            status, seconds = run([sys.executable, "-m", "lsd_jax.data.prepare", name,
                                   "--manual_dir", root, "--data_dir", tfds_dir], log)
            print(f"prepare {name}: exit {status}, {seconds:.0f} s", flush=True)
            if status:
                sys.exit(f"preparing {name} failed; its log, {log}, ends:\n{last_lines(log)}")
    weights = os.path.join(workdir, "resnet101_weights_tf_dim_ordering_tf_kernels.h5")
    if not os.path.exists(weights):
        write_keras_resnet101(weights)
    return weights


def run_overrides(tfds_dir, images, steps, crop, weights):
    """The `--config.*` flags every run gets: these datasets, a handful of target images for
    adaptation (the rest for model selection), `steps` steps, `crop`-pixel crops, and
    ImageNet-layout weights for F (DACS's start, and what DAFormer's feature distance needs)."""
    return [f"--config.data.data_dir={tfds_dir}",
            f"--config.data.target.split=train[:{images}]",
            f"--config.data.selection.split=train[{images}:]",
            f"--config.train.num_steps={steps}",
            f"--config.data.source.crop=({crop}, {crop})",
            f"--config.data.target.crop=({crop}, {crop})",
            f"--config.init.resnet_weights={weights}"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated FILE:VARIANT (default: %(default)s)")
    parser.add_argument("--images", type=int, default=4,
                        help="source images and target training images written (plus 2 "
                             "target images for model selection, 2 for evaluation, and "
                             "SYNTHIA's 100 held out by its builder)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--crop", type=int, default=256,
                        help="square source and target crop (the published: 512)")
    args = parser.parse_args(argv)
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    variants = [v for v in args.variants.split(",") if v]
    source_of = {v: SOURCE_OF[os.path.basename(v.split(":")[0]).removesuffix(".py")]
                 for v in variants}
    tfds_dir = os.path.join(workdir, "tensorflow_datasets")
    weights = prepare_everything(workdir, set(source_of.values()), args.images, tfds_dir)

    common = run_overrides(tfds_dir, args.images, args.steps, args.crop, weights)
    print("overrides of every run:", " ".join(common), flush=True)
    rows = []
    for variant in variants:
        name = variant.replace("configs/", "").replace(".py:", "_")
        extra = []
        if variant.split(":")[1] in ("daformer", "mic"):
            statistics = os.path.join(workdir, f"rcs_{source_of[variant]}.json")
            if not os.path.exists(statistics):
                log = os.path.join(workdir, f"rcs_{name}.log")
                status, seconds = run([sys.executable, "-m", "lsd_jax.data.rare_class",
                                       "--config", variant, "--output", statistics,
                                       f"--config.data.data_dir={tfds_dir}"], log)
                print(f"rare-class statistics for {variant}: exit {status}, {seconds:.0f} s",
                      flush=True)
                if status:
                    sys.exit(f"the statistics failed; {log} ends:\n{last_lines(log)}")
            extra.append(f"--config.data.rcs.statistics={statistics}")
        run_dir = os.path.join(workdir, "runs", name)
        log = os.path.join(workdir, f"{name}.log")
        status, seconds = run([sys.executable, "-m", "lsd_jax.main", "--config", variant,
                               "--workdir", run_dir, *common, *extra], log)
        checkpoints = sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) if os.path.isdir(
            os.path.join(run_dir, "checkpoints")) else []
        results = f"results/eval_step_{args.steps}.json"
        wrote = f"checkpoints {checkpoints}" + (f", {results}" if os.path.exists(
            os.path.join(run_dir, results)) else "")
        rows.append((variant, status, seconds, wrote))
        print(f"{variant}: exit {status}, {seconds:.0f} s, {wrote}", flush=True)
        if status:
            print(last_lines(log), flush=True)
    print("\n| variant | exit | wall | wrote |\n|---|---:|---:|---|")
    for variant, status, seconds, wrote in rows:
        minutes, rest = divmod(round(seconds), 60)
        print(f"| `{variant}` | {status} | {minutes}m{rest:02d}s | {wrote} |")
    with open(os.path.join(workdir, "published_start.json"), "w") as f:
        json.dump({"overrides": common, "rows": rows}, f, indent=1)
    return 1 if any(status for _, status, _, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
