"""The training loop: build or restore the states, iterate, log, checkpoint, evaluate.

    train_and_evaluate(config, workdir)   train (resuming from the workdir's latest checkpoint),
                                          evaluating on `data.selection` every train.eval_every

It knows no method: it runs `config.method`'s compiled iteration (lsd_jax/methods) on a dict of
named network states. Beside it: `preflight` (the checks before a run), `programs` (what a config
compiles to, the initial states), `reporting` (console, summaries, evaluation, `--mode eval`)
and `summary` (`--mode summary`).

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
import logging
import math
import time
from typing import Any, Iterator

import jax
from clu import periodic_actions

from lsd_jax import checkpoint, distributed, methods, preflight, reporting
from lsd_jax.data import classes
from lsd_jax.errors import Interrupted, UserError
from lsd_jax.evaluate import format_percent
from lsd_jax.programs import (Programs, abstract_states, base_key, build_programs,
                              check_programs, initial_states)


class NonFiniteLossError(UserError, FloatingPointError):
    """A loss term became NaN or inf; the run stops, keeping the last good checkpoint."""


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
    eval_fields = preflight.evaluated_sets(config, evaluate_at_end)
    preflight.check_config(config)
    preflight.check_training_sizes(config.data, methods.needs_one_size(config))
    preflight.check_selection_is_not_eval(config.data)
    checkpoint.check_workdir(workdir)
    checkpoint.check_compatible(workdir, config)
    if not checkpoint.saved_steps(workdir):  # a fresh start reads config.init's weights
        preflight.check_weight_files(config, workdir)
    programs = programs or build_programs(config)  # compiles nothing yet
    check_programs(programs, config)
    preflight.check_batch_sizes(config, programs.mesh, eval_fields)
    preflight.check_datasets(config.data, ("source", "target") + eval_fields)
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
    writer = reporting.make_writer(workdir)
    if start == 0:
        writer.write_hparams({k: (str(v) if isinstance(v, (list, dict)) or v is None else v)
                              for k, v in checkpoint.flatten_config(config).items()})
        if evaluate_at_end and config.train.eval_start and num_steps > 0:
            reporting.report(config, workdir, programs, writer, 0, states["f"].variables())
    stop = distributed.StopSignals(manager.reached_preemption)
    with stop:
        try:
            if start == num_steps == 0:
                result = _zero_steps(config, workdir, programs, saver, stop, writer, states, key)
            else:
                result = _train_loop(config, workdir, programs, saver, stop, writer, states, key,
                                     start, num_steps)
            if evaluate_at_end and result.stopped_by is None:
                result = dataclasses.replace(result, eval_summary=reporting.report(
                    config, workdir, programs, writer, result.step,
                    result.states["f"].variables()))
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

    batches = pipeline.train_batches(config.data, programs.mesh, start_step=start,
                                     one_size=methods.needs_one_size(config))
    if programs.method.reads_target:
        return batches
    # A method that reads no target images: dropping them here keeps one pipeline for all.
    return ({k: v for k, v in b.items() if k.startswith("source_")} for b in batches)


def _evaluate_averages(config, programs: Programs, writer, step: int, states) -> dict:
    """The moving averages of F (a mean teacher: `Method.averages_of_f`) on the selection set:
    their mIoU and pixel accuracy, the accuracy of the pseudo-labels they give. A diagnostic
    of self-training, written beside F's results; training never reads it."""
    results = {}
    for name in programs.method.averages_of_f:
        summary = reporting.run_evaluation(config, programs, states[name].variables(),
                                           "selection")
        results[f"{name}_miou"] = summary["miou"]
        results[f"{name}_pixel_accuracy"] = summary["pixel_accuracy"]
        writer.write_scalars(step, {f"selection/{name}_{k}": math.nan if v is None else v
                                    for k, v in (("miou", summary["miou"]), (
                                        "pixel_accuracy", summary["pixel_accuracy"]))})
        logging.info("step %d: the %s's selection mIoU %s %%, pixel accuracy %s %% (the "
                     "accuracy of its pseudo-labels; a diagnostic, training never reads it)",
                     step, name, format_percent(summary["miou"]),
                     format_percent(summary["pixel_accuracy"]))
    return results


def _evaluate_selection(config, workdir: str, programs: Programs, writer, step: int, states,
                        selection: list[dict]) -> None:
    """F, and its moving averages, on the selection set at `step`: appended to `selection`
    (the run's history of it) and written to results/selection/step_<step>.json."""
    pictures = reporting.EvalPictures(config.eval.num_images)
    summary = reporting.run_evaluation(config, programs, states["f"].variables(), "selection",
                                       pictures)
    reporting.log_evaluation(writer, step, "selection", summary, pictures,
                             classes.class_colors(config.data.class_set))
    selection.append({"step": step, "miou": summary["miou"]})
    reporting.write_selection(workdir, step, summary, selection)
    logging.info("step %d: selection mIoU %s %% on %s:%s", step,
                 format_percent(summary["miou"]), summary["dataset"], summary["split"])
    selection[-1].update(_evaluate_averages(config, programs, writer, step, states))


def _zero_steps(config, workdir: str, programs: Programs, saver: checkpoint.Saver,
                stop: distributed.StopSignals, writer, states, key) -> TrainResult:
    """train.num_steps=0: nothing is trained. F as it starts (config.init's weights) is saved
    as the checkpoint of step 0 and evaluated on the selection set as a last step would be:
    how an F made elsewhere (init.f_workdir, init.f_file) is measured on another target, e.g.
    `python -m lsd_jax.benchmark --variants pretrain --config.train.num_steps=0 --target ...`."""
    if saver.last_good is None:
        with stop.deferred():
            saver.save(0, states, key)
    selection: list[dict] = []
    if config.train.eval_every > 0:
        _evaluate_selection(config, workdir, programs, writer, 0, states, selection)
        flush_summaries(writer, stop)
    return TrainResult(0, states, selection, None)


def _train_loop(config, workdir, programs: Programs, saver: checkpoint.Saver,
                stop: distributed.StopSignals, writer, states, key, start: int,
                num_steps: int) -> TrainResult:
    method = programs.method
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
        states, metrics = programs.compiled.step(states, batch, step_key)
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
        bad = reporting.first_nonfinite(host)
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
            means = reporting.mean_metrics(unlogged)
            writer.write_scalars(done, {**means, **method.learning_rates(done)})
            logging.info("%s", reporting.console_line(done, num_steps, means, method.console_terms, rate))
            unlogged, last_log_time, last_log_step = [], now, done
        if image_due:
            reporting.write_train_pictures(writer, done, config, programs, states, batch)
        if save_due:
            with stop.deferred():
                saver.save(done, states, key)
        if eval_due:
            with progress.timed("eval"):
                _evaluate_selection(config, workdir, programs, writer, done, states, selection)
        flush_summaries(writer, stop)
        if preempted:
            with stop.deferred():
                saver.finish()
            logging.info("Stopped by SIGTERM after step %d of %d. The checkpoint is %s; run the "
                         "same command again to resume from it.", done, num_steps,
                         saver.describe(saver.last_good))
            return TrainResult(done, states, selection, None, stopped_by="SIGTERM")
    return TrainResult(max(start, num_steps), states, selection, None)
