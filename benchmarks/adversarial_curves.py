#!/usr/bin/env python3
"""Plot the state of LSD's adversarial game from the summaries of one or more runs.

    python benchmarks/adversarial_curves.py --out docs/images/lsd_adversarial_curves.png \\
        sum=runs/probes/lsd_pre mean=runs/probes/lsd_pre_mean

Four panels against the step: D's accuracy on each of its four inputs (d/acc_*: real and
generated, source and target), F's adversarial term (f/adv), G's L1 reconstruction error
(g/l1, both domains summed) and the selection mIoU. One line style per run. Reads the event
files that `lsd_jax.main` writes (tensorboard, no tensorflow needed); also prints the values.
"""
import argparse
import collections
import glob
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402

D_INPUTS = ("source_real", "source_fake", "target_real", "target_fake")
PANELS = (("D's accuracy per input", [f"d/acc_{name}" for name in D_INPUTS]),
          ("F's adversarial term (f/adv, log scale)", ["f/adv"]),
          ("G's L1 error (g/l1, both domains)", ["g/l1"]),
          ("selection mIoU", ["selection/miou"]))


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar summary in the run's event files."""
    files = sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")))
    if not files:
        raise SystemExit(f"{workdir}: no event files (expected the workdir of a training run)")
    scalars = collections.defaultdict(list)
    for path in files:
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.HasField("tensor"):
                    array = tensor_util.make_ndarray(value.tensor)
                    if array.shape == () and array.dtype.kind == "f":
                        scalars[value.tag].append((event.step, float(array)))
                elif value.HasField("simple_value"):
                    scalars[value.tag].append((event.step, value.simple_value))
    return {tag: sorted(points) for tag, points in scalars.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=WORKDIR")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args()
    runs = {}
    for item in args.runs:
        label, equals, workdir = item.partition("=")
        if not equals:
            raise SystemExit(f"{item!r}: expected LABEL=WORKDIR")
        runs[label] = read_scalars(workdir)

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    styles = ("-", "--", ":", "-.")
    for ax, (title, tags) in zip(axes, PANELS):
        for (label, scalars), style in zip(runs.items(), styles):
            for tag in tags:
                if tag not in scalars:
                    continue
                steps, values = np.array(scalars[tag]).T
                name = tag.split("/acc_")[-1] if "/acc_" in tag else ""
                ax.plot(steps, values, style, marker="." if len(steps) < 10 else None,
                        label=f"{label} {name}".strip())
                print(f"{label:>8} {tag:<20} " + " ".join(
                    f"{int(s)}:{v:.4g}" for s, v in zip(steps, values)))
        if tags == ["f/adv"]:  # summed and averaged losses differ by the number of patches
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
