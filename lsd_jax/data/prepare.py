"""Build a dataset once: `tfds build` plus the builders' own options.

    python -m lsd_jax.data.prepare gta5/1280x720 --manual_dir /data/gta5 \
        [--data_dir ~/tensorflow_datasets] [--skip_bad_files]

`tfds build gta5 --imports lsd_jax.data.datasets --manual_dir ...` works as well; this entry point
adds --skip_bad_files (leave out pairs with a missing or unreadable file, listed in the build
report, instead of stopping at the first one) and prints the build report at the end.
"""
from __future__ import annotations

import json

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("manual_dir", None, "Extracted dataset files (see docs/data.md).")
flags.DEFINE_string("data_dir", None, "TFDS data dir; default ~/tensorflow_datasets.")
flags.DEFINE_bool("skip_bad_files", False,
                  "Leave out and report pairs with a missing or unreadable file.")


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: python -m lsd_jax.data.prepare NAME[/CONFIG] --manual_dir DIR")
    import tensorflow_datasets as tfds

    import lsd_jax.data.datasets  # noqa: F401  (registers the builders)

    name = argv[1]
    kwargs = {} if name.startswith("synthetic_scenes") else {
        "skip_bad_files": FLAGS.skip_bad_files}
    builder = tfds.builder(name, data_dir=FLAGS.data_dir, **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=FLAGS.manual_dir))
    print(f"{builder.info.full_name}: {builder.info.splits}")
    if builder.info.metadata:
        print(json.dumps(dict(builder.info.metadata), indent=1)[:5000])


if __name__ == "__main__":
    app.run(main)
