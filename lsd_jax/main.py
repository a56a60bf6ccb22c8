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
"""
from __future__ import annotations

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

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
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    if mode == "summary":
        from lsd_jax import train
        print(train.model_summary(config))
        return 0
    if not workdir:
        raise app.UsageError(f"--workdir is required for --mode {mode}")

    from lsd_jax import checkpoint, distributed, train

    distributed.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                       FLAGS.process_id)
    try:
        if mode == "eval":
            train.evaluate_checkpoint(config, workdir)
        else:
            train.train_and_evaluate(config, workdir, evaluate_at_end=mode == "train_and_eval")
    except (train.NonFiniteLossError, train.DatasetMissingError,
            checkpoint.IncompatibleWorkdirError) as error:
        logging.error("%s", error)
        print(f"lsd_jax: {error}", file=sys.stderr)
        return 1
    return 0


# Libraries that report every file they open or write at INFO level; their warnings still show.
QUIET_LIBRARIES = ("/orbax/", "/tensorflow_datasets/", "/etils/", "/jax/_src/", "/clu/")


class _QuietLibraries(std_logging.Filter):
    """Keeps the console readable: the progress lines, not the libraries' INFO chatter."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or not any(
            part in record.pathname for part in QUIET_LIBRARIES)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    return run(FLAGS.config, FLAGS.workdir, FLAGS.mode)


if __name__ == "__main__":
    app.run(main)
