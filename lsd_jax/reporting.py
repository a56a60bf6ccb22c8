"""What a run reports: the console line and scalars, pictures, evaluations and their results.

    evaluate_checkpoint(config, workdir)  restore a checkpoint, evaluate on `data.eval` (the
                                          target's validation set), write the results

Model selection never looks at the target evaluation set (docs/methods.md, section 6): the
periodic evaluation during training runs on `data.selection`, and `data.eval` is only used for
reporting (`--mode eval`, and once at the end of `--mode train_and_eval`).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
from typing import Callable

import jax
import numpy as np
from clu import metric_writers

from lsd_jax import checkpoint, evaluate, preflight, visualize
from lsd_jax.data import classes
from lsd_jax.evaluate import format_percent
from lsd_jax.programs import Programs, abstract_states, base_key, build_programs, check_programs


RESULTS_SUBDIR = "results"


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


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def console_line(step: int, num_steps: int, means: dict, terms: tuple[str, ...],
                 steps_per_sec: float) -> str:
    terms = "  ".join(f"{t} {means[t]:.4g}" for t in terms if t in means)
    eta = (num_steps - step) / steps_per_sec if steps_per_sec > 0 else float("nan")
    return (f"step {step:>{len(str(num_steps))}}/{num_steps}  {terms}  "
            f"{steps_per_sec:.2f} steps/s  ETA {format_duration(eta)}")


def make_writer(workdir: str) -> metric_writers.MetricWriter:
    """TensorBoard summaries from process 0 only; the console line is written separately (the
    default writer's logging of every scalar would bury it)."""
    if jax.process_index() != 0:
        return metric_writers.MultiWriter([])
    return metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(workdir)])


def host_array(array) -> np.ndarray:
    """A global array (possibly spanning processes) as numpy, on every process."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)


def write_train_pictures(writer, step: int, config, programs: Programs, states, batch) -> None:
    """Source and target inputs, G's reconstructions of each, predictions, source labels."""
    out = programs.pictures(states, batch)
    colors = classes.class_colors(config.data.class_set)
    n = config.eval.num_images
    images = {}
    for domain in ("source", "target"):
        if f"{domain}_prediction" not in out:
            continue
        recon = out.get(f"{domain}_reconstruction")
        images[f"train/{domain}"] = visualize.summary_grid(
            host_array(batch[f"{domain}_image"])[:n], None if recon is None else host_array(recon)[:n],
            host_array(out[f"{domain}_prediction"])[:n],
            host_array(batch["source_label"])[:n] if domain == "source" else None, colors)
    writer.write_images(step, images)


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


class EvalPictures:
    """on_predictions callback keeping the first batch's rows for the summaries."""

    def __init__(self, num_images: int):
        self.num_images, self.rows = num_images, None

    def __call__(self, batch, predicted):
        if self.rows is None and self.num_images:
            n = self.num_images
            self.rows = (host_array(batch["image"])[:n], host_array(predicted)[:n],
                         host_array(batch["label"])[:n])


def log_evaluation(writer, step: int, prefix: str, summary: dict, pictures: EvalPictures,
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


def write_selection(workdir: str, step: int, summary: dict, history: list[dict]) -> None:
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


def report(config, workdir: str, programs: Programs, writer, step: int, f_variables) -> dict:
    """Evaluate on data.eval; write results/eval_step_<step>.{json,md} (process 0)."""
    pictures = EvalPictures(config.eval.num_images)
    colors = classes.class_colors(config.data.class_set)
    png_dir = os.path.join(workdir, RESULTS_SUBDIR, f"predictions_step_{step}")
    counter = [0]

    def on_predictions(batch, predicted):
        pictures(batch, predicted)
        if config.eval.write_pngs:
            predicted, mask = host_array(predicted), host_array(batch["mask"])
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


def read_start_evaluation(workdir: str) -> dict | None:
    """The evaluation of F as the run started (`config.train.eval_start`), or None when the
    run made none."""
    path = os.path.join(workdir, RESULTS_SUBDIR, "eval_step_0.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def evaluate_checkpoint(config, workdir: str, step: int | None = None, *,
                        programs: Programs | None = None) -> dict:
    """Restore the checkpoint of `step` (config.eval.step, else the latest) and evaluate it on
    data.eval; the results go to <workdir>/results/eval_step_<step>.{json,md}."""
    step = config.eval.step if step is None else step
    preflight.check_config(config)
    checkpoint.check_workdir(workdir)  # the results are written there
    _check_checkpoint_exists(workdir, step)  # before check_compatible's notes of what differs
    checkpoint.check_compatible(workdir, config)
    programs = programs or build_programs(config)  # compiles nothing yet
    check_programs(programs, config)
    preflight.check_batch_sizes(config, programs.mesh, ("eval",))
    preflight.check_datasets(config.data, ("eval",))
    manager = checkpoint.make_manager(workdir, None, asynchronous=False, read_only=True)
    try:
        restored = checkpoint.restore(manager, abstract_states(config, programs),
                                      base_key(config), step)
    finally:
        manager.close()
    writer = make_writer(workdir)
    try:
        return report(config, workdir, programs, writer, restored.step,
                       restored.states["f"].variables())
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
