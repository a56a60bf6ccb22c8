"""The data settings (`config.data`), in a module that imports neither TensorFlow nor JAX.

Experiment configs import this on every machine, including accelerator hosts that run the
benchmarks without TensorFlow installed; the pipeline (`lsd_jax.data.pipeline`) that reads
these settings imports it from here.

Fields that may be None are typed placeholders, so that they can still be set from the command
line (`--config.data.data_dir=/data/tfds`, `--config.data.source.crop='(512, 1024)'`).
"""
from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def default_data_config() -> ml_collections.ConfigDict:
    """Data settings, embedded by the experiment configs as `config.data`.

    The defaults read the embedded synthetic benchmark (built on first use, no download).
    """
    c = ml_collections.ConfigDict()
    c.data_dir = placeholder(str)  # TFDS data dir; None = TFDS's default (~/tensorflow_datasets)
    c.class_set = "cityscapes19"  # label space of the models: "cityscapes19" or "synthia16"
    c.batch_size = 2            # global batch per domain (source and target each); / processes
    c.seed = 1337               # shuffling, crops and flips; the same seed gives the same batches
    c.shuffle_buffer = 256      # examples (encoded bytes) in each domain's shuffle buffer
    c.prefetch = 2              # batches prepared ahead of the training step
    c.num_parallel_calls = -1   # decode/augment threads per domain; -1 = tf.data AUTOTUNE
    c.data_axis = "data"        # mesh axis the batch dimension is sharded over
    # Compute the float views (F's and G/D's) on the accelerators from uint8 images: 4x less
    # host->device traffic and the cheapest host pipeline (the float views cost the host more
    # than decoding, see docs/performance.md). The batches handed to the steps are the same.
    c.views_on_device = True
    # DAFormer's rare-class sampling of the source (lsd_jax/data/rare_class.py); it reads the
    # file `python -m lsd_jax.data.rare_class --config ... --output FILE` wrote for the source.
    c.rcs = ml_collections.ConfigDict(dict(
        enabled=False,
        statistics=placeholder(str),
        temperature=0.01,    # P(c) = softmax((1 - f_c) / T)
        min_pixels=3000,     # an image is drawn for c if it holds more pixels of c than this
        min_crop_ratio=0.5,  # a crop is kept once it holds min_pixels x this of c ...
        crop_tries=10,       # ... among this many random windows (else the last one)
    ))
    c.source = domain_config(name="synthetic_scenes/source", split="train", flip=True)
    c.target = domain_config(name="synthetic_scenes/target", split="train", flip=False)
    # The labelled set results are reported on: the target's validation set
    # (docs/methods.md, section 6).
    c.eval = _eval_config(name="synthetic_scenes/target", split="validation")
    # The labelled set the periodic evaluation during training runs on, for model selection.
    # Never the target evaluation set (docs/methods.md, section 6): source validation by default;
    # experiment configs may use a held-out labelled slice of target *train* (and leave it out
    # of data.target).
    c.selection = _eval_config(name="synthetic_scenes/source", split="validation")
    return c


def _eval_config(name: str, split: str) -> ml_collections.ConfigDict:
    e = ml_collections.ConfigDict()
    e.name = name               # TFDS name[/config] of a labelled set
    e.split = split             # every example is seen exactly once per evaluation
    e.scale = (128, 256)        # (H, W) F sees at evaluation (training scale; docs/methods.md 6)
    e.label_size = placeholder(tuple)  # (H, W) to resize labels to (nearest); None = as stored
    e.batch_size = 8            # global eval batch; the last one is padded and masked
    e.manual_dir = placeholder(str)  # as source.manual_dir
    e.config_overrides = ml_collections.ConfigDict()  # as source.config_overrides
    return e


def domain_config(name: str, split: str, flip: bool) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.name = name             # TFDS name[/config], e.g. "gta5/1280x720", "cityscapes_extracted"
    d.split = split           # TFDS split (slicing allowed, e.g. "train[:-500]")
    d.resize = placeholder(tuple)  # (H, W) to resize every image to first (labels nearest)
    d.crop = placeholder(tuple)    # (H, W) random crop after resizing; None = the whole image
    d.flip = flip             # random horizontal flip
    d.manual_dir = placeholder(str)  # extracted files to build the dataset from if not built yet
    # Builder-config fields to override, e.g. {"noise": 20.0} for synthetic_scenes: a new config
    # named after the overrides is built, so different shifts never share a cache directory.
    d.config_overrides = ml_collections.ConfigDict()
    return d
