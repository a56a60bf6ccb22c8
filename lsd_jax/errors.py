"""The errors a user can act on: a bad config value, a missing dataset or checkpoint, a workdir
that cannot be used, a run that had to stop.

Each says what was wrong and what is expected, in a message complete without a traceback; the
program (`lsd_jax.main`) prints it as one line, `lsd_jax: <message>`, and exits with the
error's `exit_code`. Any other exception is a bug and keeps its traceback.

Each error also derives from the built-in exception a caller would expect (ValueError for a
config value, FileNotFoundError for something missing), so library callers can catch either.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix or act on; the message says what and how."""

    exit_code = 1


class UsageError(UserError, ValueError):
    """A command line that cannot work: a flag missing, unknown or with a bad value."""

    exit_code = 2  # the usual status of a command-line usage error


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the field (`config.x.y`)."""


class WorkdirError(UserError, OSError):
    """The workdir cannot hold this run (not writable, not a directory)."""


class Interrupted(UserError):
    """The run was stopped by Ctrl-C (SIGINT) after closing its checkpoints cleanly."""

    exit_code = 130  # what a shell reports for a process ended by SIGINT (128 + 2)
