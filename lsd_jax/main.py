"""The program: train, evaluate or summarise LSD as a config says.

    python -m lsd_jax.main --config configs/gta.py --workdir runs/gta
    python -m lsd_jax.main --config configs/gta.py --workdir runs/gta --mode eval
    python -m lsd_jax.main --config configs/synthetic.py --workdir runs/demo
    python -m lsd_jax.main --config configs/gta.py --mode summary

Any config field can be set on the command line (`--config.data.batch_size=8`); a field that
does not exist is an error. The same command runs on every host of a TPU pod or every process
of a GPU cluster: the multi-process runtime is started first (automatically on TPU pods and
under SLURM, or from --coordinator_address/--num_processes/--process_id).

Modes:
  train           train (resuming from the workdir's latest checkpoint), evaluating on
                  config.data.selection every train.eval_every steps
  train_and_eval  the same, then evaluate the final state on config.data.eval (the default)
  eval            restore the latest checkpoint (or --config.eval.step) and evaluate it on
                  config.data.eval; results in <workdir>/results/
  summary         parameter overviews and output shapes of F, G and D (no data, no compute)

Errors a user can act on (a flag or config field that does not exist or cannot work, a missing
dataset or checkpoint, an unusable workdir, a NaN loss, a failed checkpoint save) are printed as
one line, `lsd_jax: <what was wrong, what is expected>`, without a traceback. Exit status: 0 done
(also after SIGTERM, with a checkpoint saved to resume from), 1 such an error, 2 a command-line
error, 130 stopped by Ctrl-C.
"""
from __future__ import annotations

import logging as std_logging
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lsd_jax.errors import Interrupted, UsageError, UserError

MODES = ("train", "train_and_eval", "eval", "summary")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py), "
                                "optionally with an argument: configs/gta.py:source_only.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, summaries and results go here.")
flags.DEFINE_enum("mode", "train_and_eval", MODES, "What to do (see the module docstring).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for multi-process runs not detected automatically.")
flags.DEFINE_integer("num_processes", None, "Total number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.mark_flags_as_required(["config"])


def run(config, workdir: str | None, mode: str) -> int:
    """Everything after flag parsing; returns the exit status."""
    try:
        return _run(config, workdir, mode)
    except UserError as error:
        print(f"lsd_jax: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:  # before training started: nothing to save or close
        print("lsd_jax: interrupted (Ctrl-C)", file=sys.stderr)
        return Interrupted.exit_code


def _run(config, workdir: str | None, mode: str) -> int:
    if mode not in MODES:
        raise UsageError(f"--mode={mode}: expected one of {MODES}")
    if mode == "summary":
        from lsd_jax import preflight
        from lsd_jax.summary import model_summary

        preflight.check_config(config)  # a bad field as one line, as training would say it
        print(model_summary(config))
        return 0
    if not workdir:
        raise UsageError(f"--workdir is required for --mode {mode}")

    from lsd_jax.tf_quiet import import_tensorflow_datasets

    tfds = import_tensorflow_datasets()  # first, before the modules below import tensorflow

    import jax

    from lsd_jax import distributed, reporting, train

    # Datasets generated on first use announce themselves in one line instead.
    tfds.disable_progress_bar()
    distributed.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                       FLAGS.process_id)
    if mode == "eval":
        summary = reporting.evaluate_checkpoint(config, workdir)
    else:
        summary = train.train_and_evaluate(config, workdir,
                                           evaluate_at_end=mode == "train_and_eval").eval_summary
    if summary is not None and jax.process_index() == 0:
        print(where_results_are(workdir, summary))
    return 0


def where_results_are(workdir: str, summary: dict) -> str:
    """The last lines of a run: its result and where to look at it."""
    import os

    from lsd_jax import evaluate, reporting

    results = os.path.join(workdir, reporting.RESULTS_SUBDIR, f"eval_step_{summary['step']}.md")
    start = reporting.read_start_evaluation(workdir) if summary["step"] else None
    started = ("" if start is None else
               f" (F as it started, step 0: {evaluate.format_percent(start['miou'])} %)")
    return (f"mIoU {evaluate.format_percent(summary['miou'])} % on {summary['dataset']}:"
            f"{summary['split']} at step {summary['step']}{started}.\n"
            f"  per-class table: {results}\n"
            f"  curves and pictures: tensorboard --logdir {workdir}")


# ----------------------------------------------------------------------------- flags

def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every error as one line and exit status 2.

    absl reports its own flag errors over several lines, and lets through as tracebacks what
    ml_collections raises while loading the config file or applying `--config.*` overrides
    (an unknown field, an error in get_config, a missing file).
    """
    try:
        remaining = FLAGS(argv)
        FLAGS.config.get("method")  # a config file that failed to load raises on first use
        return remaining
    except flags.Error as error:
        message = _flag_error_message(str(error))
    except (AttributeError, KeyError) as error:  # ml_collections: a field that does not exist
        message = _unknown_field_message(error, argv)
    except (OSError, ValueError, TypeError) as error:
        message = f"--config: cannot load the config file: {_last_line(str(error))}"
    print(f"lsd_jax: {message}", file=sys.stderr)
    sys.exit(UsageError.exit_code)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else text


def _flag_error_message(message: str) -> str:
    """absl's message, with the traceback ml_collections folds into it for an error raised by
    the config file ("Error whilst parsing config file: Traceback ...") cut to the error."""
    message = message.removeprefix("flag ")
    head, marker, trace = message.partition("Error whilst parsing config file:")
    if marker:
        error = _last_line(trace)
        message = head + re.sub(r"^[\w.]+(Error|Exception): ", "", error)
    return " ".join(message.split())


def _unknown_field_message(error: Exception, argv: list[str]) -> str:
    """ml_collections raises AttributeError(KeyError("'name'\\nDid you mean ...?")) for an
    override of a field that does not exist: name the flag, the field and the suggestion."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    name, _, suggestion = text.partition("\n")
    name = name.strip().strip("'\"")
    pattern = re.compile(rf"-{{1,2}}config(\.\w+)*\.{re.escape(name)}(\.|=|$)")
    flag = next((arg.split("=")[0] for arg in argv[1:] if pattern.match(arg)), "--config")
    return f"{flag}: the config has no field {name!r}" + (
        f". {suggestion.strip()}" if suggestion.strip() else "")


# ----------------------------------------------------------------------------- console

# Libraries that report every file they open or write at INFO level; their warnings still show.
QUIET_LIBRARIES = ("/orbax/", "/tensorflow_datasets/", "/etils/", "/jax/_src/", "/clu/",
                   "/matplotlib/")


class _QuietLibraries(std_logging.Filter):
    """Keeps the console readable: the progress lines, not the libraries' INFO chatter, nor
    what they report at length of something this program reports itself in one line."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        library = any(part in record.pathname for part in QUIET_LIBRARIES)
        if not library:
            return True
        if record.levelno < std_logging.WARNING:
            return False
        # A failed background checkpoint save: orbax logs it with a traceback from each of its
        # threads; the training loop stops on it with one line (checkpoint.Saver).
        if "/orbax/" in record.pathname and record.exc_info:
            return False
        # config_overrides build a custom TFDS builder config on purpose (docs/data.md).
        return not str(record.msg).startswith("Using custom data configuration")


def main(argv):
    if len(argv) > 1:
        print(f"lsd_jax: unexpected arguments {argv[1:]} (flags are --name=value)",
              file=sys.stderr)
        return UsageError.exit_code
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    return run(FLAGS.config, FLAGS.workdir, FLAGS.mode)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
