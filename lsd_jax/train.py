"""The training program: build or restore the states, iterate, log, checkpoint, evaluate.

    train_and_evaluate(config, workdir)   train (resuming from the workdir's latest checkpoint),
                                          evaluating on `data.selection` every train.eval_every
    evaluate_checkpoint(config, workdir)  restore a checkpoint, evaluate on `data.eval` (the
                                          target's validation set), write the results
    model_summary(config)                 parameter overviews and output shapes, no compute

Step keys: the run has one base key (from `config.seed`, saved in every checkpoint); iteration
`step` uses `jax.random.fold_in(base_key, step)`. Together with the data stream restarting at
the number of batches consumed, a resumed run continues exactly as an uninterrupted one.

Model selection never looks at the target evaluation set (docs/methods.md, section 6): the
periodic evaluation during training runs on `data.selection` (source validation, or a held-out
labelled slice of target train), and `data.eval` is only used for reporting (`--mode eval`, and
once at the end of `--mode train_and_eval`).

Everything that can be checked before training is checked before anything is written to the
workdir (config values named by field, training sizes, batch sizes against the devices, the
workdir, the datasets); the errors a user can act on are `lsd_jax.errors.UserError`s.

Stopping: a NaN/inf loss or a failed checkpoint save stops the run with the last good
checkpoint named; SIGTERM (preemption) saves a checkpoint at the next step boundary and returns
(`TrainResult.stopped_by`); Ctrl-C stops at once, after the save in flight is complete
(`lsd_jax.errors.Interrupted`). See `lsd_jax.distributed.StopSignals`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions

from lsd_jax import checkpoint, distributed, evaluate, parallel, steps, visualize
from lsd_jax.data import classes
from lsd_jax.errors import ConfigError, Interrupted, UserError
from lsd_jax.evaluate import format_percent
from lsd_jax.models import check_training_size

RESULTS_SUBDIR = "results"

# The terms shown on the console line (every term goes to TensorBoard).
CONSOLE_TERMS = {"lsd": ("f/seg", "f/adv", "g/l1", "g/adv", "d/loss"),
                 "source_only": ("f/seg",)}


class NonFiniteLossError(UserError, FloatingPointError):
    """A loss term became NaN or inf; the run stops, keeping the last good checkpoint."""


class DatasetMissingError(UserError, FileNotFoundError):
    """A dataset the config names is not prepared."""


# ----------------------------------------------------------------------------- config checks

def check_config(config: ml_collections.ConfigDict) -> None:
    """Everything about the config alone that could stop a run later (after minutes of data
    generation or compiling), as a ConfigError naming the field."""
    def positive(field, value, allow_zero=False):
        if not isinstance(value, int) or value < (0 if allow_zero else 1):
            raise ConfigError(f"config.{field}={value!r}: expected a "
                              f"{'non-negative' if allow_zero else 'positive'} integer")

    try:  # the networks' builder checks method, update_mode, model.dtype, loss.reduction...
        steps.build_networks(config)
    except ValueError as error:
        raise ConfigError(str(error)) from None

    positive("train.num_steps", config.train.num_steps)
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
    f_sources = [f"init.{name}" for name in ("torch_f", "f_workdir") if config.init[name]]
    if len(f_sources) > 1:
        raise ConfigError(f"config.{f_sources[0]} and config.{f_sources[1]} both give F's "
                          "weights: set one")
    if config.init.f_step is not None and not config.init.f_workdir:
        raise ConfigError(f"config.init.f_step={config.init.f_step} is set without "
                          "config.init.f_workdir (the run whose checkpoint it names)")
    for name in ("torch_g", "torch_d"):
        if config.init[name] and not uses_gd(config):
            raise ConfigError(f"config.init.{name} is set but config.method={config.method!r} "
                              f"has no {name[-1].upper()}")


def check_training_sizes(data) -> None:
    """The training images' size (crop, else resize) of both domains: one size, that G can
    work with (multiples of 32). The input pipeline checks this too, but only once the first
    batch is read, after compiling."""
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
            check_training_size(*size)
        except ValueError as error:
            raise ConfigError(f"config.data.{domain}.{field}={size}: {error}") from None
        sizes[domain] = (field, size)
    (source_field, source), (target_field, target) = sizes["source"], sizes["target"]
    if source != target:
        raise ConfigError(f"config.data.source.{source_field}={source} but config.data.target."
                          f"{target_field}={target}: both domains' training images must have "
                          "one size")


def check_weight_files(config, workdir: str) -> None:
    """The files of pretrained weights and the run config.init names exist (read when a run
    starts fresh), and that run is not this one."""
    for name in ("vgg16_weights", "torch_f", "torch_g", "torch_d"):
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
    an error that says which command prepares it."""
    from lsd_jax.data import pipeline

    for field in which:
        domain = data[field]
        try:
            pipeline.load_builder(domain.name, data.data_dir, domain.manual_dir,
                                  domain.config_overrides.to_dict())
        except FileNotFoundError as error:
            raise DatasetMissingError(
                f"config.data.{field}: {error} With the TFDS command line: "
                f"`{tfds_build_command(domain.name, data.data_dir)}`.") from None
        except ValueError as error:  # e.g. config_overrides naming no builder-config field
            raise ConfigError(f"config.data.{field}: {error}") from None


def evaluated_sets(config, evaluate_at_end: bool) -> tuple[str, ...]:
    """The `config.data` fields of the labelled sets a training run evaluates."""
    return ((("selection",) if config.train.eval_every else ())
            + (("eval",) if evaluate_at_end else ()))


# ----------------------------------------------------------------------------- programs

@dataclasses.dataclass(frozen=True)
class Programs:
    """Everything compiled for a config: built once and reusable across runs of one process
    (tests resume a run in the same process without compiling again)."""

    config_fingerprint: str
    nets: steps.Networks
    updates: steps.Updates
    mesh: jax.sharding.Mesh
    init: Callable      # key -> fresh TrainStates (compiled once, not once per run)
    predict: Callable   # (F variables, images) -> class scores
    pictures: Callable  # (F variables, G params or None, batch) -> predictions, reconstructions


def _programs_fingerprint(config) -> str:
    """The fields the compiled programs depend on."""
    flat = checkpoint.flatten_config(config)
    used = {k: v for k, v in flat.items() if k.split(".")[0] in
            ("method", "num_classes", "model", "update_mode", "loss", "optim")}
    return repr(sorted(used.items()))


def build_programs(config, mesh: jax.sharding.Mesh | None = None) -> Programs:
    mesh = parallel.make_mesh() if mesh is None else mesh
    nets = steps.build_networks(config)
    updates = steps.make_updates(nets, config.update_mode, donate=True, mesh=mesh)

    @jax.jit
    def predict(f_variables, image):
        return nets.f.apply(f_variables, image, train=False)[0]

    @jax.jit
    def pictures(f_variables, g_params, batch):
        out = {}
        for domain in ("source", "target"):
            if f"{domain}_image" not in batch:  # the baseline's batches have no target
                continue
            score, *features = nets.f.apply(f_variables, batch[f"{domain}_image"], train=False)
            out[f"{domain}_prediction"] = jnp.argmax(score, axis=-1)
            if g_params is not None:
                out[f"{domain}_reconstruction"] = nets.g.apply(
                    {"params": g_params}, *features, train=False)
        return out

    init = jax.jit(lambda key: steps.init_states(nets, key, with_gd=uses_gd(config)))
    return Programs(_programs_fingerprint(config), nets, updates, mesh, init, predict, pictures)


def _check_programs(programs: Programs, config) -> None:
    if programs.config_fingerprint != _programs_fingerprint(config):
        raise ValueError("the programs passed in were built for another config (model, loss, "
                         "optimiser or method differ); build them with build_programs(config)")


# ----------------------------------------------------------------------------- states

def uses_gd(config) -> bool:
    return config.method == "lsd"


def base_key(config) -> jax.Array:
    return jax.random.key(config.seed)


def _import_weights(config, states: steps.TrainStates) -> steps.TrainStates:
    """Pretrained weights named in config.init, into fresh states (optimizer states are zeros
    either way, so they stay valid)."""
    from lsd_jax import weights

    init = config.init
    f = states.f
    f_vars = {"params": f.params, "frozen": f.frozen}
    if init.vgg16_weights:
        f_vars = weights.import_keras_vgg16(init.vgg16_weights, f_vars)
        logging.info("F's backbone: ImageNet VGG16 weights from %s", init.vgg16_weights)
    if init.torch_f:
        f_vars = weights.import_torch_fcn8s(init.torch_f, f_vars)
        logging.info("F: PyTorch LSD-seg weights from %s", init.torch_f)
    if init.f_workdir:
        step, saved = checkpoint.read_network(init.f_workdir, "f", init.f_step)
        f_vars = _same_structure(saved, f_vars, f"F of step {step} in {init.f_workdir!r}")
        logging.info("F: from the checkpoint of step %d in %s", step, init.f_workdir)
    states = states.replace(f=f.replace(params=f_vars["params"], frozen=f_vars["frozen"]))
    for name, path, importer in (("g", init.torch_g, weights.import_torch_generator),
                                 ("d", init.torch_d, weights.import_torch_discriminator)):
        if not path:
            continue
        if not uses_gd(config):
            raise ConfigError(f"config.init.torch_{name} is set but config.method="
                              f"{config.method!r} has no {name.upper()}")
        state = getattr(states, name)
        params = importer(path, {"params": state.params})["params"]
        states = states.replace(**{name: state.replace(params=params)})
        logging.info("%s: PyTorch LSD-seg weights from %s", name.upper(), path)
    return states


def _same_structure(saved: dict, like: dict, source: str) -> dict:
    """`saved` as arrays shaped, typed and nested like `like`, or a ConfigError naming the
    first difference (another width, class count or network)."""
    keystr = jax.tree_util.keystr
    saved_leaves = dict(jax.tree_util.tree_leaves_with_path(saved))
    like_leaves = dict(jax.tree_util.tree_leaves_with_path(like))
    expected = "expected a run of the same network (model.width, num_classes)"
    unmatched = sorted(set(saved_leaves) ^ set(like_leaves), key=keystr)
    if unmatched:
        which = "only the saved F" if unmatched[0] in saved_leaves else "only this run's F"
        raise ConfigError(f"{source}: {keystr(unmatched[0])} is in {which}; {expected}")
    for path, leaf in like_leaves.items():
        if saved_leaves[path].shape != leaf.shape:
            raise ConfigError(f"{source}: {keystr(path)} has shape {saved_leaves[path].shape}, "
                              f"this run's F {leaf.shape}; {expected}")
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(saved_leaves[path], leaf.dtype), like)


def initial_states(config, programs: Programs) -> steps.TrainStates:
    """Fresh states (with config.init's weights), replicated over the mesh."""
    init_key = jax.random.fold_in(base_key(config), -1 % 2**31)  # apart from the step keys
    states = _import_weights(config, programs.init(init_key))
    return parallel.replicate(states, programs.mesh)


def abstract_states(config, programs: Programs):
    """Shapes, dtypes and (replicated) shardings of the states, computing nothing."""
    shapes = jax.eval_shape(programs.init, jax.random.key(0))
    sharding = parallel.replicated(programs.mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        shapes)


# ----------------------------------------------------------------------------- metrics

def first_nonfinite(history: list[tuple[int, dict]]) -> tuple[int, str, float] | None:
    """(step, term, value) of the first NaN/inf among host metrics, in step order."""
    for step, metrics in history:
        for term, value in sorted(metrics.items()):
            if not np.all(np.isfinite(value)):
                return step, term, float(np.asarray(value).ravel()[0])
    return None


def mean_metrics(history: list[tuple[int, dict]]) -> dict[str, float]:
    keys = history[0][1].keys()
    return {k: float(np.mean([m[k] for _, m in history])) for k in keys}


def learning_rates(config, programs: Programs, step: int) -> dict[str, float]:
    f_lr = float(programs.nets.f_learning_rate(step))
    rates = {"lr/f": f_lr, "lr/f_bias": f_lr * config.optim.f_bias_lr_mult}
    if uses_gd(config):
        rates["lr/g_d"] = config.optim.gd_lr
    return rates


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def console_line(step: int, num_steps: int, means: dict, method: str, steps_per_sec: float
                 ) -> str:
    terms = "  ".join(f"{t} {means[t]:.4g}" for t in CONSOLE_TERMS[method] if t in means)
    eta = (num_steps - step) / steps_per_sec if steps_per_sec > 0 else float("nan")
    return (f"step {step:>{len(str(num_steps))}}/{num_steps}  {terms}  "
            f"{steps_per_sec:.2f} steps/s  ETA {format_duration(eta)}")


def make_writer(workdir: str) -> metric_writers.MetricWriter:
    """TensorBoard summaries from process 0 only; the console line is written separately (the
    default writer's logging of every scalar would bury it)."""
    if jax.process_index() != 0:
        return metric_writers.MultiWriter([])
    return metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(workdir)])


# ----------------------------------------------------------------------------- pictures

def _host(array) -> np.ndarray:
    """A global array (possibly spanning processes) as numpy, on every process."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)


def write_train_pictures(writer, step: int, config, programs: Programs, states, batch) -> None:
    """Source and target inputs, G's reconstructions of each, predictions, source labels."""
    g_params = states.g.params if uses_gd(config) else None
    out = programs.pictures(states.f.variables(), g_params, batch)
    colors = classes.class_colors(config.data.class_set)
    n = config.eval.num_images
    images = {}
    for domain in ("source", "target"):
        if f"{domain}_prediction" not in out:
            continue
        recon = out.get(f"{domain}_reconstruction")
        images[f"train/{domain}"] = visualize.summary_grid(
            _host(batch[f"{domain}_image"])[:n], None if recon is None else _host(recon)[:n],
            _host(out[f"{domain}_prediction"])[:n],
            _host(batch["source_label"])[:n] if domain == "source" else None, colors)
    writer.write_images(step, images)


# ----------------------------------------------------------------------------- evaluation

def class_subsets(config) -> dict[str, list[int]]:
    """Extra mIoUs to report: the SYNTHIA 13-class score of a 16-class model
    (docs/methods.md, section 6)."""
    if config.data.class_set == "synthia16":
        return {"13 classes": [classes.SYNTHIA_16.index(c) for c in classes.SYNTHIA_13]}
    return {}


def _with_eval_set(data, field: str):
    """The data config with `data.<field>` as the set `pipeline.eval_batches` reads."""
    data = data.copy_and_resolve_references()
    data.unlock()
    data.eval = data[field]
    return data


def run_evaluation(config, programs: Programs, f_variables, field: str,
                   on_predictions: Callable | None = None) -> dict:
    """Evaluate F on `config.data.<field>` ("eval" or "selection"): the `summarize` dict."""
    from lsd_jax.data import pipeline

    data = _with_eval_set(config.data, field)
    batches = pipeline.eval_batches(data, programs.mesh)
    confusion = evaluate.evaluate(functools.partial(programs.predict, f_variables), batches,
                                  config.num_classes, method=config.eval.confusion_method,
                                  on_predictions=on_predictions)
    return evaluate.summarize(confusion, classes.class_names(config.data.class_set),
                              class_subsets(config),
                              metadata={"dataset": data.eval.name, "split": data.eval.split,
                                        "scale": list(data.eval.scale)})


class _EvalPictures:
    """on_predictions callback keeping the first batch's rows for the summaries."""

    def __init__(self, num_images: int):
        self.num_images, self.rows = num_images, None

    def __call__(self, batch, predicted):
        if self.rows is None and self.num_images:
            n = self.num_images
            self.rows = (_host(batch["image"])[:n], _host(predicted)[:n],
                         _host(batch["label"])[:n])


def log_evaluation(writer, step: int, prefix: str, summary: dict, pictures: _EvalPictures,
                   colors) -> None:
    scalars = {f"{prefix}/miou": summary["miou"] if summary["miou"] is not None else math.nan}
    for name, subset in summary["subsets"].items():
        scalars[f"{prefix}/miou_{name.replace(' ', '_')}"] = subset["miou"]
    for name, iou in summary["per_class_iou"].items():
        scalars[f"{prefix}/iou/{name.replace(' ', '_')}"] = math.nan if iou is None else iou
    writer.write_scalars(step, scalars)
    if pictures.rows is not None:
        image, predicted, label = pictures.rows
        writer.write_images(step, {f"{prefix}/prediction_vs_label": visualize.summary_grid(
            image, None, predicted, label, colors)})


# ----------------------------------------------------------------------------- training

@dataclasses.dataclass(frozen=True)
class TrainResult:
    step: int
    states: Any
    selection: list  # [{"step", "miou"}] of the periodic evaluations of this run
    eval_summary: dict | None
    stopped_by: str | None = None  # "SIGTERM": saved at `step` and stopped before the end


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def train_and_evaluate(config, workdir: str, *, programs: Programs | None = None,
                       evaluate_at_end: bool = True) -> TrainResult:
    """Train from scratch or resume from the workdir's latest checkpoint, to train.num_steps.

    evaluate_at_end: also evaluate the final state on `data.eval` and write the results (what
    `--mode train_and_eval` does).

    SIGTERM: returns after saving the checkpoint of the step it stopped at (no final
    evaluation); Ctrl-C: raises Interrupted once the save in flight is complete.
    """
    eval_fields = evaluated_sets(config, evaluate_at_end)
    check_config(config)
    check_training_sizes(config.data)
    check_selection_is_not_eval(config.data)
    checkpoint.check_workdir(workdir)
    checkpoint.check_compatible(workdir, config)
    if not checkpoint.saved_steps(workdir):  # a fresh start reads config.init's weights
        check_weight_files(config, workdir)
    programs = programs or build_programs(config)  # compiles nothing yet
    _check_programs(programs, config)
    check_batch_sizes(config, programs.mesh, eval_fields)
    check_datasets(config.data, ("source", "target") + eval_fields)
    # Only now, with everything checked that can be, is anything written to the workdir.
    checkpoint.write_config(workdir, config)

    manager = checkpoint.make_manager(workdir, config.checkpoint.max_to_keep,
                                      config.checkpoint.asynchronous)
    saver = checkpoint.Saver(manager)
    key, start = base_key(config), 0
    if saver.last_good is not None:  # resume: nothing to initialise
        restored = checkpoint.restore(manager, abstract_states(config, programs), key)
        states, key, start = restored.states, restored.base_key, restored.step
        logging.info("Resuming from the checkpoint of step %d in %s", start, workdir)
    else:
        states = initial_states(config, programs)
    num_steps = config.train.num_steps
    writer = make_writer(workdir)
    if start == 0:
        writer.write_hparams({k: (str(v) if isinstance(v, (list, dict)) or v is None else v)
                              for k, v in checkpoint.flatten_config(config).items()})
    stop = distributed.StopSignals(manager.reached_preemption)
    with stop:
        try:
            result = _train_loop(config, workdir, programs, saver, stop, writer, states, key,
                                 start, num_steps)
            if evaluate_at_end and result.stopped_by is None:
                result = dataclasses.replace(result, eval_summary=_report(
                    config, workdir, programs, writer, result.step,
                    result.states.f.variables()))
        except KeyboardInterrupt:
            result = None
        except BaseException:
            _close_after_error(saver, writer, stop)
            raise
        interrupted = _close(saver, writer, stop) or result is None
    if interrupted:
        raise Interrupted(f"interrupted (Ctrl-C); the last good checkpoint is "
                          f"{saver.describe(saver.last_good)}")
    return result


def flush_summaries(writer, stop: distributed.StopSignals) -> None:
    """writer.flush(), which Ctrl-C does not cut short: the asynchronous writer's flush joins its
    thread, and an interrupted join would let the writer be closed under a write in progress
    (see StopSignals)."""
    with stop.deferred("the summary write"):
        writer.flush()


def _close(saver: checkpoint.Saver, writer, stop: distributed.StopSignals) -> bool:
    """Completes the save in flight (SaveFailedError if it fails) and closes the checkpoint
    manager and the writer, which Ctrl-C does not cut short; returns whether Ctrl-C came."""
    try:
        with stop.deferred("the checkpoint save and the summary write"):
            try:
                saver.close()
            finally:
                writer.flush()
                writer.close()
    except KeyboardInterrupt:
        return True
    return False


def _close_after_error(saver: checkpoint.Saver, writer, stop: distributed.StopSignals) -> None:
    """`_close` while another error stops the run: that error stays the one reported."""
    try:
        _close(saver, writer, stop)
    except checkpoint.SaveFailedError as error:
        logging.error("%s", error)


def _train_batches(config, programs: Programs, start: int) -> Iterator[dict]:
    from lsd_jax.data import pipeline

    batches = pipeline.train_batches(config.data, programs.mesh, start_step=start)
    if uses_gd(config):
        return batches
    # The baseline reads no target images; dropping them here keeps one pipeline for both.
    return ({k: v for k, v in b.items() if k.startswith("source_")} for b in batches)


def _train_loop(config, workdir, programs: Programs, saver: checkpoint.Saver,
                stop: distributed.StopSignals, writer, states, key, start: int,
                num_steps: int) -> TrainResult:
    updates, method = programs.updates, config.method
    colors = classes.class_colors(config.data.class_set)
    progress = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                               every_steps=config.train.log_every,
                                               every_secs=None)
    batches = _train_batches(config, programs, start)
    unchecked: list[tuple[int, dict]] = []  # device metrics not yet checked for NaN/inf
    unlogged: list[tuple[int, dict]] = []   # checked host metrics since the last log
    selection: list[dict] = []
    last_log_time, last_log_step = time.perf_counter(), start
    for step in range(start, num_steps):
        batch = next(batches)
        step_key = jax.random.fold_in(key, step)
        if uses_gd(config):
            states, metrics = updates.step(states, batch, step_key)
        else:
            f_state, metrics = updates.source_only_update(states.f, batch, step_key)
            states, metrics = states.replace(f=f_state), {f"f/{k}": v for k, v in metrics.items()}
        done = step + 1
        unchecked.append((done, metrics))
        progress(done)
        saver.poll()  # a background save that failed stops the run now, not at the next save
        preempted = stop.preempted(done)

        log_due = _due(done, config.train.log_every, num_steps)
        save_due = preempted or _due(done, config.checkpoint.every, num_steps)
        eval_due = (not preempted and config.train.eval_every > 0
                    and _due(done, config.train.eval_every, num_steps))
        image_due = (not preempted and config.train.image_every > 0
                     and done % config.train.image_every == 0)
        if not (log_due or save_due or eval_due or image_due):
            continue
        # Everything below may make the run's state permanent or public: check it first.
        host = jax.device_get(unchecked)
        unchecked = []
        bad = first_nonfinite(host)
        if bad is not None:
            bad_step, term, value = bad
            raise NonFiniteLossError(
                f"loss term {term!r} is {value} at step {bad_step} (the update that produced "
                f"step {bad_step}'s state); stopping. The last good checkpoint is "
                f"{saver.describe(saver.latest())}. Lower the learning rates, or check the data "
                "and the initial weights.")
        unlogged += host
        if log_due:
            now = time.perf_counter()
            rate = (done - last_log_step) / max(now - last_log_time, 1e-9)
            means = mean_metrics(unlogged)
            writer.write_scalars(done, {**means, **learning_rates(config, programs, done)})
            logging.info("%s", console_line(done, num_steps, means, method, rate))
            unlogged, last_log_time, last_log_step = [], now, done
        if image_due:
            write_train_pictures(writer, done, config, programs, states, batch)
        if save_due:
            with stop.deferred():
                saver.save(done, states, key)
        if eval_due:
            with progress.timed("eval"):
                pictures = _EvalPictures(config.eval.num_images)
                summary = run_evaluation(config, programs, states.f.variables(), "selection",
                                         pictures)
            log_evaluation(writer, done, "selection", summary, pictures, colors)
            selection.append({"step": done, "miou": summary["miou"]})
            _write_selection(workdir, done, summary, selection)
            logging.info("step %d: selection mIoU %s %% on %s:%s", done,
                         format_percent(summary["miou"]), summary["dataset"], summary["split"])
        flush_summaries(writer, stop)
        if preempted:
            with stop.deferred():
                saver.finish()
            logging.info("Stopped by SIGTERM after step %d of %d. The checkpoint is %s; run the "
                         "same command again to resume from it.", done, num_steps,
                         saver.describe(saver.last_good))
            return TrainResult(done, states, selection, None, stopped_by="SIGTERM")
    return TrainResult(max(start, num_steps), states, selection, None)


def _write_selection(workdir: str, step: int, summary: dict, history: list[dict]) -> None:
    """Per-step results on the selection set, and the best step so far (process 0)."""
    if jax.process_index() != 0:
        return
    directory = os.path.join(workdir, RESULTS_SUBDIR, "selection")
    evaluate.write_results(directory, summary, f"step_{step}",
                           f"Model selection set, step {step}")
    scored = [h for h in history if h["miou"] is not None]
    if scored:
        best = max(scored, key=lambda h: h["miou"])
        logging.info("best selection mIoU so far: %s %% at step %d (this run)",
                     format_percent(best["miou"]), best["step"])


# ----------------------------------------------------------------------------- eval mode

def _report(config, workdir: str, programs: Programs, writer, step: int, f_variables) -> dict:
    """Evaluate on data.eval; write results/eval_step_<step>.{json,md} (process 0)."""
    pictures = _EvalPictures(config.eval.num_images)
    colors = classes.class_colors(config.data.class_set)
    png_dir = os.path.join(workdir, RESULTS_SUBDIR, f"predictions_step_{step}")
    counter = [0]

    def on_predictions(batch, predicted):
        pictures(batch, predicted)
        if config.eval.write_pngs:
            predicted, mask = _host(predicted), _host(batch["mask"])
            names = [f"{counter[0] + i:05d}" for i in range(len(predicted))]
            counter[0] += len(predicted)
            if jax.process_index() == 0:
                evaluate.write_prediction_pngs(png_dir, predicted[mask],
                                               [n for n, m in zip(names, mask) if m], colors)

    summary = run_evaluation(config, programs, f_variables, "eval", on_predictions)
    summary = {"step": step, "method": config.method, **summary}
    log_evaluation(writer, step, "eval", summary, pictures, colors)
    if jax.process_index() == 0:
        json_path, md_path = evaluate.write_results(
            os.path.join(workdir, RESULTS_SUBDIR), summary, f"eval_step_{step}",
            f"{summary['dataset']} ({summary['split']}), step {step}, {config.method}")
        logging.info("Results written to %s and %s", json_path, md_path)
    extra = "".join(f", {name} {format_percent(s['miou'])} %" for name, s in summary["subsets"].items())
    logging.info("step %d: mIoU %s %% on %s:%s (%d classes)%s", step, format_percent(summary["miou"]),
                 summary["dataset"], summary["split"], summary["num_classes_in_miou"], extra)
    return summary


def evaluate_checkpoint(config, workdir: str, step: int | None = None, *,
                        programs: Programs | None = None) -> dict:
    """Restore the checkpoint of `step` (config.eval.step, else the latest) and evaluate it on
    data.eval; the results go to <workdir>/results/eval_step_<step>.{json,md}."""
    step = config.eval.step if step is None else step
    check_config(config)
    checkpoint.check_workdir(workdir)  # the results are written there
    checkpoint.check_compatible(workdir, config)
    _check_checkpoint_exists(workdir, step)
    programs = programs or build_programs(config)  # compiles nothing yet
    _check_programs(programs, config)
    check_batch_sizes(config, programs.mesh, ("eval",))
    check_datasets(config.data, ("eval",))
    manager = checkpoint.make_manager(workdir, None, asynchronous=False, read_only=True)
    try:
        restored = checkpoint.restore(manager, abstract_states(config, programs),
                                      base_key(config), step)
    finally:
        manager.close()
    writer = make_writer(workdir)
    try:
        return _report(config, workdir, programs, writer, restored.step,
                       restored.states.f.variables())
    finally:
        writer.flush()
        writer.close()


def _check_checkpoint_exists(workdir: str, step: int | None) -> None:
    """The checkpoint to evaluate is there (before any data is read or generated)."""
    available = checkpoint.saved_steps(workdir)
    directory = checkpoint.checkpoint_directory(workdir)
    if not available:
        raise checkpoint.CheckpointMissingError(
            f"no checkpoint in {directory}: train first (--mode train), or point --workdir at "
            "a run")
    if step is not None and step not in available:
        raise checkpoint.CheckpointMissingError(
            f"no checkpoint of step {step} in {directory} (config.eval.step); the checkpoints "
            f"there are of steps {available}")


# ----------------------------------------------------------------------------- summary mode

def training_size(config) -> tuple[int, int]:
    domain = config.data.source
    size = domain.crop if domain.crop is not None else domain.resize
    if size is None:
        raise ConfigError("config.data.source: set `crop` or `resize` (H, W) to give the "
                          "training size")
    return tuple(size)


def model_summary(config) -> str:
    """F's, G's and D's parameter overviews (totals in full) and output shapes at the config's
    training size and batch, from shapes alone (jax.eval_shape): no data, no compute."""
    nets = steps.build_networks(config)
    height, width = training_size(config)
    batch = config.data.batch_size
    states = jax.eval_shape(lambda k: steps.init_states(nets, k, with_gd=True), jax.random.key(0))
    image = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32)
    f_out = jax.eval_shape(lambda v, x: nets.f.apply(v, x, train=False), states.f.variables(),
                           image)
    g_out = jax.eval_shape(lambda p, *feats: nets.g.apply({"params": p}, *feats, train=False),
                           states.g.params, *f_out[1:])
    d_out = jax.eval_shape(lambda p, x: nets.d.apply({"params": p}, x, train=False),
                           states.d.params, image)

    def count(tree):
        return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))

    def shapes(names, outputs):
        return "\n".join(f"  {n:<8} {tuple(o.shape)} {o.dtype}" for n, o in zip(names, outputs))

    f_trainable, f_frozen = count(states.f.params), count(states.f.frozen)
    sections = [
        f"Config: method={config.method}, num_classes={config.num_classes}, "
        f"model.width={config.model.width}, model.dtype={config.model.dtype}, "
        f"input {batch}x{height}x{width}x3 (data.batch_size x data.source crop/resize)",
        "F + C (FCN8s): trainable parameters",
        parameter_overview.get_parameter_overview(states.f.params, include_stats=False),
        "F + C (FCN8s): frozen bilinear upsampling kernels (never trained)",
        parameter_overview.get_parameter_overview(states.f.frozen, include_stats=False),
        f"F total: {f_trainable + f_frozen:,} parameters ({f_trainable:,} trainable + "
        f"{f_frozen:,} frozen)",
        "F outputs:\n" + shapes(("score", "fc7", "pool4", "pool3"), f_out),
        "G (Generator)",
        parameter_overview.get_parameter_overview(states.g.params, include_stats=False),
        f"G total: {count(states.g.params):,} parameters",
        "G output (from F's fc7, pool4, pool3):\n" + shapes(("image",), [g_out]),
        "D (Discriminator)",
        parameter_overview.get_parameter_overview(states.d.params, include_stats=False),
        f"D total: {count(states.d.params):,} parameters",
        "D outputs (for an image of the input size):\n" + shapes(("out_s", "out_c"), d_out),
    ]
    if config.method == "source_only":
        sections.append("(method source_only trains F + C only; G and D are listed for "
                        "reference)")
    return "\n\n".join(sections)
