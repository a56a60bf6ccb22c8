"""Importing TensorFlow without its C++ start-up notices on the console.

TensorFlow's native libraries write a few INFO lines to the process's stderr when they load,
before any logging is configured, so neither `TF_CPP_MIN_LOG_LEVEL` (TensorFlow 2.21) nor
absl's verbosity reaches them: a note that oneDNN kernels are on (printed once per library
that loads them), another about CPU instructions, and absl's warning that logs precede its
initialisation. The commands import tensorflow_datasets through this module once, early, with
the process's stderr captured; every captured line but those notices is written back. Later
INFO lines of TensorFlow's C++ side (e.g. that a TFRecord reader's buffer size is set) obey
`TF_CPP_MIN_LOG_LEVEL`, which is set to 1 (warnings and errors) unless the user set it.
"""
from __future__ import annotations

import io
import os
import re
import sys
import tempfile
from types import ModuleType

STARTUP_NOTICES = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|oneDNN custom operations are on"
    r"|cpu_feature_guard\.cc.*This TensorFlow binary is optimized"
    r"|^To enable the following instructions: .* rebuild TensorFlow")


def drop_startup_notices(text: str) -> str:
    """`text` without the lines that are TensorFlow's start-up notices."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if not STARTUP_NOTICES.search(line))


def import_tensorflow_datasets() -> ModuleType:
    """`import tensorflow, tensorflow_datasets`, without the start-up notices; returns the
    latter."""
    if "tensorflow_datasets" in sys.modules:
        return sys.modules["tensorflow_datasets"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, io.UnsupportedOperation):  # stderr is not a file (e.g. captured)
        return _import_both()
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), fd)
        try:
            tfds = _import_both()
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            captured.seek(0)
            sys.stderr.write(drop_startup_notices(captured.read().decode(errors="replace")))
            sys.stderr.flush()
    return tfds


def _import_both() -> ModuleType:
    # tensorflow_datasets loads tensorflow lazily, on first use: load it now.
    import tensorflow  # noqa: F401
    import tensorflow_datasets
    return tensorflow_datasets
