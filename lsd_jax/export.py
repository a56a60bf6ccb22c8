"""One network of a finished run as a single file, for another run to start from.

    python -m lsd_jax.export --workdir runs/pretrain --output f.npz [--network f] [--step N]

writes the network's variables (parameters, frozen values, BatchNorm statistics; no optimizer
state) of the run's latest checkpoint, or of `--step`, as a NumPy .npz (one array per variable,
named by its path: `weights.save_network_file`) and prints its sha256. A run starts F from it
with `--config.init.f_file=f.npz`, as from a workdir with `config.init.f_workdir`, but from one
small file that can be shipped: the demo's pre-trained F (configs/demo/README.md) is one.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from lsd_jax.errors import UsageError, UserError


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line) instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(message)


def argument_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m lsd_jax.export", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the run whose checkpoint to read")
    parser.add_argument("--output", required=True, help="the .npz file to write")
    parser.add_argument("--network", default="f", help="which network (default: f)")
    parser.add_argument("--step", type=int, default=None,
                        help="the checkpoint's step (default: the latest)")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    options = argument_parser().parse_args(argv)
    if not options.output.endswith(".npz"):
        raise UsageError(f"--output {options.output!r}: expected a file name ending in .npz")
    return options


def export(workdir: str, network: str, output: str, step: int | None = None) -> tuple[int, str]:
    """Write `network` of the checkpoint of `step` in `workdir` to `output`; returns (step,
    the file's sha256)."""
    from lsd_jax import checkpoint, weights

    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise UsageError(f"--output {output!r}: no folder {folder!r} to write it in")
    if not os.path.isdir(workdir):
        raise UsageError(f"--workdir {workdir!r}: no such folder (expected a run's workdir)")
    step, variables = checkpoint.read_network(workdir, network, step)
    return step, weights.save_network_file(variables, output)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
        step, digest = export(options.workdir, options.network, options.output, options.step)
    except UserError as error:
        print(f"lsd_jax.export: {error}", file=sys.stderr)
        return error.exit_code
    print(f"{options.network.upper()} of step {step} in {options.workdir} -> {options.output}"
          f"\n  sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
