"""Build a dataset once: `tfds build` plus the builders' own options.

    python -m lsd_jax.data.prepare gta5/1280x720 --manual_dir /data/gta5 \
        [--data_dir ~/tensorflow_datasets] [--skip_bad_files]

`tfds build gta5 --imports lsd_jax.data.datasets --manual_dir ...` works as well; this entry point
adds --skip_bad_files (leave out pairs with a missing or unreadable file, listed in the build
report, instead of stopping at the first one) and prints the build report at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("manual_dir", None, "Extracted dataset files (see docs/data.md).")
flags.DEFINE_string("data_dir", None, "TFDS data dir; default ~/tensorflow_datasets.")
flags.DEFINE_bool("skip_bad_files", False,
                  "Leave out and report pairs with a missing or unreadable file.")

# The datasets this package registers with TFDS (lsd_jax.data.datasets).
DATASETS = ("gta5", "synthia", "cityscapes_extracted", "synthetic_scenes", "appearance_adapted")


class PrepareError(Exception):
    """Bad input, reported in one line."""


def builder_class(tfds, name: str):
    """The builder class of `name` ("dataset/config"), or PrepareError naming what exists."""
    base, _, config = name.partition("/")
    if base not in DATASETS:
        raise PrepareError(f"unknown dataset {base!r}: expected one of {', '.join(DATASETS)}, "
                           "with a config, e.g. gta5/1280x720")
    cls = tfds.builder_cls(base)
    configs = list(getattr(cls, "builder_configs", None) or {})
    if config and config not in configs:
        raise PrepareError(f"{base} has no config {config!r}: expected one of "
                           f"{', '.join(configs)}")
    return cls


def check_manual_dir(cls, name: str, manual_dir: str | None) -> None:
    """A dataset built from downloaded files needs them, before anything is created."""
    if not getattr(cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        return
    if not manual_dir:
        raise PrepareError(f"{name} is built from its downloaded files: give --manual_dir, the "
                           "directory they were extracted to (docs/data.md has the layout)")
    if not os.path.isdir(os.path.expanduser(manual_dir)):
        raise PrepareError(f"--manual_dir {manual_dir}: not a directory")


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def prepare(name: str, data_dir: str | None, manual_dir: str | None, skip_bad_files: bool):
    """Builds `name`; on failure removes the directories this build created and raises
    PrepareError with the builder's reason."""
    from lsd_jax.tf_quiet import import_tensorflow_datasets

    tfds = import_tensorflow_datasets()
    import lsd_jax.data.datasets  # noqa: F401  (registers the builders)

    cls = builder_class(tfds, name)
    check_manual_dir(cls, name, manual_dir)
    root = os.path.expanduser(data_dir or os.path.join("~", "tensorflow_datasets"))
    new_paths = [path for path in (os.path.join(root, cls.name), os.path.join(root, "downloads"),
                                   root) if not os.path.exists(path)]
    kwargs = {} if cls.name == "synthetic_scenes" else {"skip_bad_files": skip_bad_files}
    print(f"Building {name}" + (f" from {manual_dir}" if manual_dir else "") + f" in {root} ...",
          flush=True)
    try:
        builder = tfds.builder(name, data_dir=data_dir, **kwargs)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except (ValueError, OSError, AssertionError) as error:  # layout, bad files, TFDS's checks
        for path in new_paths:
            shutil.rmtree(path, ignore_errors=True)
        reason = first_line(error).rstrip(":")
        reason = reason if reason.startswith(cls.name) else f"{name}: {reason}"
        raise PrepareError(f"{reason} (docs/data.md has the layout)") from None
    return builder


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: python -m lsd_jax.data.prepare NAME[/CONFIG] --manual_dir DIR")
    logging.set_verbosity(logging.WARNING)  # TFDS's INFO notes; the build shows its progress
    try:
        builder = prepare(argv[1], FLAGS.data_dir, FLAGS.manual_dir, FLAGS.skip_bad_files)
    except PrepareError as error:
        print(f"lsd_jax.data.prepare: {error}", file=sys.stderr)
        return 2
    print(f"{builder.info.full_name}: {builder.info.splits}")
    if builder.info.metadata:
        print(json.dumps(dict(builder.info.metadata), indent=1)[:5000])
    return 0


if __name__ == "__main__":
    app.run(main)
