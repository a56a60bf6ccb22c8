"""Everything about a run that can be checked before it starts, as errors that name the field.

Each check runs before anything is written to the workdir, and before minutes of data
generation or compiling: config values (including the method's own, checked by its builder),
training sizes, batch sizes against the devices, weight files, and the datasets.
"""
from __future__ import annotations

import os

import jax
import ml_collections

from lsd_jax import checkpoint, evaluate, methods, parallel
from lsd_jax.data import classes, rare_class
from lsd_jax.errors import ConfigError, UserError
from lsd_jax.models import check_training_size


class DatasetMissingError(UserError, FileNotFoundError):
    """A dataset the config names is not prepared."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """Everything about the config alone that could stop a run later (after minutes of data
    generation or compiling), as a ConfigError naming the field."""
    def positive(field, value, allow_zero=False):
        if not isinstance(value, int) or value < (0 if allow_zero else 1):
            raise ConfigError(f"config.{field}={value!r}: expected a "
                              f"{'non-negative' if allow_zero else 'positive'} integer")

    try:  # the method's builder checks its own fields (update_mode, model.dtype, loss...)
        method = methods.build(config)
    except ValueError as error:
        raise ConfigError(str(error)) from None

    # Zero steps: F as it starts, saved and evaluated (train._zero_steps).
    positive("train.num_steps", config.train.num_steps, allow_zero=True)
    positive("train.log_every", config.train.log_every)
    positive("checkpoint.every", config.checkpoint.every)
    for field in ("image_every", "eval_every"):
        positive(f"train.{field}", config.train[field], allow_zero=True)
    expected_classes = len(classes.class_set(config.data.class_set))
    if config.num_classes != expected_classes:
        raise ConfigError(f"config.num_classes={config.num_classes} but config.data.class_set="
                          f"{config.data.class_set!r} has {expected_classes} classes; set both "
                          "to match")
    if config.eval.confusion_method not in evaluate.CONFUSION_METHODS:
        raise ConfigError(f"config.eval.confusion_method={config.eval.confusion_method!r}: "
                          f"expected one of {evaluate.CONFUSION_METHODS}")
    check_keras_weights_backbone(config)
    rare_class.check_enabled(config.data.rcs)
    f_sources = [f"init.{name}" for name in methods.base.F_SOURCES
                 if config.init[name]]
    if len(f_sources) > 1:
        raise ConfigError(f"config.{f_sources[0]} and config.{f_sources[1]} both give F's "
                          "weights: set one")
    if config.init.f_step is not None and not config.init.f_workdir:
        raise ConfigError(f"config.init.f_step={config.init.f_step} is set without "
                          "config.init.f_workdir (the run whose checkpoint it names)")
    for name in ("torch_g", "torch_d"):
        if config.init[name] and name[-1] not in method.networks:
            raise ConfigError(f"config.init.{name} is set but config.method={config.method!r} "
                              f"has no {name[-1].upper()}")


# The backbones each Keras ImageNet weights field of config.init fits.
KERAS_WEIGHTS_BACKBONES = {"vgg16_weights": ("fcn8s_vgg16", "deeplabv2_vgg16"),
                           "resnet_weights": ("deeplabv2_resnet101",)}


def check_keras_weights_backbone(config) -> None:
    """config.init's ImageNet weights fit config.model.backbone."""
    backbone = config.model.backbone
    for field, backbones in KERAS_WEIGHTS_BACKBONES.items():
        if config.init[field] and backbone not in backbones:
            raise ConfigError(f"config.init.{field}={config.init[field]!r} holds weights for "
                              f"the backbones {backbones}, but config.model.backbone="
                              f"{backbone!r}")


def check_training_sizes(data, one_size: bool = True) -> None:
    """The training images' size (crop, else resize) of each domain: fixed, and with
    `one_size` (LSD, `methods.needs_one_size`) one size for both domains that G can work with
    (multiples of 32). The input pipeline checks this too, but only once the first batch is
    read, after compiling."""
    sizes = {}
    for domain in ("source", "target"):
        d = data[domain]
        field = "crop" if d.crop is not None else "resize"
        size = d[field]
        if size is None:
            raise ConfigError(f"config.data.{domain}: set crop or resize to (height, width); "
                              "training images of varying size cannot be batched")
        size = tuple(size)
        if len(size) != 2 or not all(isinstance(v, int) for v in size):
            raise ConfigError(f"config.data.{domain}.{field}={size!r}: expected (height, width) "
                              "in pixels")
        if d.crop is not None and d.resize is not None and (
                size[0] > d.resize[0] or size[1] > d.resize[1]):
            raise ConfigError(f"config.data.{domain}.crop={size} is larger than "
                              f"config.data.{domain}.resize={tuple(d.resize)}")
        try:
            if one_size:
                check_training_size(*size)
            elif min(size) < 1:
                raise ValueError("expected a positive height and width")
        except ValueError as error:
            raise ConfigError(f"config.data.{domain}.{field}={size}: {error}") from None
        sizes[domain] = (field, size)
    (source_field, source), (target_field, target) = sizes["source"], sizes["target"]
    if one_size and source != target:
        raise ConfigError(f"config.data.source.{source_field}={source} but config.data.target."
                          f"{target_field}={target}: both domains' training images must have "
                          "one size")


def check_weight_files(config, workdir: str) -> None:
    """The files of pretrained weights and the run config.init names exist (read when a run
    starts fresh), and that run is not this one."""
    for name in ("vgg16_weights", "resnet_weights", "torch_f", "torch_g", "torch_d", "f_file"):
        path = config.init[name]
        if path and "://" not in path and not os.path.exists(path):
            raise ConfigError(f"config.init.{name}={path!r}: no such file")
    f_workdir = config.init.f_workdir
    if f_workdir and "://" not in f_workdir:
        if os.path.abspath(f_workdir) == os.path.abspath(workdir):
            raise ConfigError(f"config.init.f_workdir={f_workdir!r} is this run's own workdir: "
                              "expected another run's (to resume this one, leave it unset)")
        steps_there = checkpoint.saved_steps(f_workdir) if os.path.isdir(f_workdir) else []
        if not steps_there:
            raise ConfigError(f"config.init.f_workdir={f_workdir!r}: no checkpoint there "
                              "(expected the workdir of a run that has saved one)")
        if config.init.f_step is not None and config.init.f_step not in steps_there:
            raise ConfigError(f"config.init.f_step={config.init.f_step}: {f_workdir!r} has "
                              f"checkpoints of steps {steps_there}")


def check_batch_sizes(config, mesh: jax.sharding.Mesh, eval_fields: tuple[str, ...]) -> None:
    """Every batch is split over the devices of the mesh's data axis: the training batch and
    the batches of the sets evaluated (`config.data.<field>`) must divide over them."""
    devices = mesh.shape[parallel.DATA_AXIS]
    where = "jax.device_count()" if devices == jax.device_count() else "the mesh's data axis"
    sizes = {"data.batch_size": config.data.batch_size}
    sizes.update({f"data.{field}.batch_size": config.data[field].batch_size
                  for field in eval_fields})
    for field, size in sizes.items():
        if not isinstance(size, int) or size < 1 or size % devices:
            raise ConfigError(f"config.{field}={size!r}: each batch is split over {devices} "
                              f"devices ({where}), so it must be a positive multiple of "
                              f"{devices}")


def check_selection_is_not_eval(data) -> None:
    """Model selection on the target evaluation set: what docs/methods.md, section 6 rules out."""
    if (data.selection.name, data.selection.split) == (data.eval.name, data.eval.split):
        raise ConfigError(
            f"config.data.selection is the evaluation set ({data.eval.name}, split "
            f"{data.eval.split!r}): model selection must never use the target evaluation set. "
            "Select on source validation or a held-out labelled slice of target train.")


def tfds_build_command(name: str, data_dir: str | None) -> str:
    builder, _, builder_config = name.partition("/")
    return (f"tfds build {builder} --imports lsd_jax.data.datasets --manual_dir <extracted files>"
            + (f" --config {builder_config}" if builder_config else "")
            + (f" --data_dir {data_dir}" if data_dir else ""))


def check_datasets(data, which: tuple[str, ...]) -> None:
    """Every named dataset is prepared (the synthetic scenes are generated when missing), or
    an error that says which command prepares it; with rare-class sampling, the source's
    statistics file describes it."""
    from lsd_jax.data import pipeline, rare_class

    for field in which:
        domain = data[field]
        try:
            builder = pipeline.load_builder(domain.name, data.data_dir, domain.manual_dir,
                                            domain.config_overrides.to_dict())
        except FileNotFoundError as error:
            raise DatasetMissingError(
                f"config.data.{field}: {error} With the TFDS command line: "
                f"`{tfds_build_command(domain.name, data.data_dir)}`.") from None
        except ValueError as error:  # e.g. config_overrides naming no builder-config field
            raise ConfigError(f"config.data.{field}: {error}") from None
        if field == "source" and data.rcs.enabled:
            rare_class.source_statistics(data, builder)


def evaluated_sets(config, evaluate_at_end: bool) -> tuple[str, ...]:
    """The `config.data` fields of the labelled sets a training run evaluates."""
    return ((("selection",) if config.train.eval_every else ())
            + (("eval",) if evaluate_at_end else ()))


def training_size(config) -> tuple[int, int]:
    domain = config.data.source
    size = domain.crop if domain.crop is not None else domain.resize
    if size is None:
        raise ConfigError("config.data.source: set `crop` or `resize` (H, W) to give the "
                          "training size")
    return tuple(size)
