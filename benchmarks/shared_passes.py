#!/usr/bin/env python3
"""Which forward passes XLA shares between a method's updates in the composed iteration.

Several updates of one iteration evaluate S on the same images: AdaptSegNet's and ADVENT's D
updates each compute S's maps of the source and target batches (`adaptsegnet.d_update`), which
S's own update has computed too. Compiled as one program (`compile_method(...).step`), XLA may
compute such a pass once. This prints, for every convolution of the compiled iteration (by
output shape and window), how often the iteration runs it against how often S's update alone
runs it, and the two programs' FLOPs (XLA's cost analysis): a convolution of S's that the
iteration runs more often than S's update is a pass the other updates recompute.

    python benchmarks/shared_passes.py --variant adaptsegnet_multi --mode simultaneous
    python benchmarks/shared_passes.py --variant adaptsegnet_multi --mode alternating

The default size is small (ResNet-101 with one block per stage, 64x128, 1 + 1 images): which
passes XLA shares does not depend on the size. Needs no tensorflow.
"""
import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import default  # noqa: E402
from lsd_jax import methods  # noqa: E402

WINDOW = re.compile(r"window=\{([^}]*)\}")


def compiled_iteration(method, update_names, batch):
    updates = {name: method.updates[name] for name in update_names}
    states = jax.eval_shape(lambda: method.init(jax.random.key(0)))
    step = jax.jit(lambda s, b, k: methods.run_iteration(updates, method.mode, s, b, k))
    return step.lower(states, batch, jax.random.key(1)).compile()


def convolutions(compiled) -> collections.Counter:
    """{(output shape, window): how many convolutions of the program have them}."""
    counts = collections.Counter()
    for line in compiled.as_text().splitlines():
        if "convolution(" in line:
            window = WINDOW.search(line)
            counts[(line.split("=", 1)[1].split("{")[0].strip(),
                    window.group(1) if window else "")] += 1
    return counts


def flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="adaptsegnet_multi")
    ap.add_argument("--backbone", default="deeplabv2_resnet101")
    ap.add_argument("--resnet-blocks", default="1,1,1,1")
    ap.add_argument("--mode", default="simultaneous", choices=methods.base.UPDATE_MODES)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    args = ap.parse_args(argv)
    config = default.apply_variant(default.get_config(), args.variant)
    config.model.backbone = args.backbone
    config.model.resnet_blocks = tuple(int(b) for b in args.resnet_blocks.split(","))
    config.update_mode = args.mode
    method = methods.build(config)
    image = jax.ShapeDtypeStruct((1, args.height, args.width, 3), jnp.float32)
    batch = {"source_image": image, "target_image": image,
             "source_label": jax.ShapeDtypeStruct((1, args.height, args.width), jnp.int32)}
    whole = compiled_iteration(method, list(method.updates), batch)
    first = list(method.updates)[0]
    alone = compiled_iteration(method, [first], batch)
    print(f"{args.variant}, {args.backbone} {args.resnet_blocks}, {args.mode}, "
          f"{args.height}x{args.width}: the iteration {flops(whole) / 1e9:.2f} GFLOP, "
          f"{first!r}'s update alone {flops(alone) / 1e9:.2f} GFLOP")
    print(f"convolutions the iteration runs more often than {first!r}'s update alone "
          "(output shape, window: iteration / alone):")
    in_whole, in_alone = convolutions(whole), convolutions(alone)
    for key in sorted(in_whole):
        if in_whole[key] != in_alone[key]:
            print(f"  {key[0]:24s} {key[1]:50s} {in_whole[key]:3d} / {in_alone[key]}")


if __name__ == "__main__":
    main()
