"""The shape every offline command shares (`python -m lsd_jax.size_constraints`,
`python -m lsd_jax.appearance_transfer`): an experiment config plus the command's own flags,
and bad input answered with one line naming it and a non-zero exit code, no traceback."""
from __future__ import annotations

import sys
from typing import Callable


def define_command_flags(define_flags: Callable[[], None]) -> None:
    """`--config` (an experiment config file, locked) and the command's own flags, on absl's
    global FLAGS."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py), "
                                    "optionally with an argument.", lock_config=True)
    define_flags()
    flags.mark_flag_as_required("config")


def run_config_command(name: str, define_flags: Callable[[], None],
                       body: Callable[[object], None]) -> None:
    """Define `--config` and the command's flags (`define_flags()`), parse, run `body(FLAGS)`.

    Flags are defined only when the command runs, so that importing its module (as training
    does) defines none. Exit codes: 2 for bad flags or config, 1 for an error the body raises
    (a UserError, OSError or ValueError, printed as one line), 0 otherwise.
    """
    from absl import app, flags, logging

    from lsd_jax.errors import UserError
    from lsd_jax.tf_quiet import import_tensorflow_datasets

    define_command_flags(define_flags)

    def parse(argv):
        try:
            remaining = flags.FLAGS(argv)
            flags.FLAGS.config.get("data")  # a config file that failed to load raises here
            return remaining
        except flags.Error as error:
            # An error raised by the config file comes with its traceback: keep its last line.
            head, marker, trace = str(error).partition("Error whilst parsing config file:")
            lines = [line.strip() for line in trace.splitlines() if line.strip()]
            message = " ".join((head + (lines[-1] if marker and lines else "")).split())
        except (AttributeError, KeyError) as error:  # ml_collections: an unknown field
            while error.args and isinstance(error.args[0], BaseException):
                error = error.args[0]
            field = str(error.args[0] if error.args else error).split("\n")[0].strip("'\" ")
            message = f"--config: the config has no field {field!r}"
        except (OSError, ValueError, TypeError) as error:
            message = f"--config: cannot load the config file: {error}"
        print(f"{name}: {message}", file=sys.stderr)
        sys.exit(2)

    def main(argv):
        # What the libraries log at INFO (files read, a dataset generated) stays quiet; the
        # command prints its own progress. A custom builder config is what overrides ask for.
        logging.set_verbosity(logging.WARNING)
        logging.get_absl_handler().addFilter(lambda record: not str(record.msg).startswith(
            "Using custom data configuration"))
        if len(argv) > 1:
            print(f"{name}: unexpected arguments {argv[1:]}", file=sys.stderr)
            return 2
        import_tensorflow_datasets()  # before the body imports it, without its start-up notices
        try:
            body(flags.FLAGS)
        except (UserError, OSError, ValueError) as error:
            print(f"{name}: {error}", file=sys.stderr)
            return 1
        return 0

    app.run(main, flags_parser=parse)
