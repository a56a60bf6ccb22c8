#!/usr/bin/env python3
"""Time each CPU-tuned kernel of LSD's networks against its plain XLA form, on this backend.

The custom pools, the im2col fc6/fc7, the col2im and sub-pixel transposed convolutions were
written to be fast on XLA:CPU (docs/performance.md); `config.model.plain_kernels` swaps every
one for XLA's plain form (reduce_window, a VALID convolution, an input-dilated convolution).
This script finds every call of those kernels in one LSD iteration at the given size, with its
real shapes (by tracing the iteration with the kernels wrapped), and times each one's forward
and backward pass (gradients with respect to every array input) in both forms, jit-compiled,
with the largest difference between the forms' outputs as a check that they compute the same.

    python benchmarks/kernel_forms.py --height 512 --width 1024 --dtype bfloat16 --json out.jsonl

Needs no tensorflow: the batch is random in-memory arrays.
"""
import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_time  # noqa: E402  (benchmarks/step_time.py: the same config and batch)

from configs import default as default_config  # noqa: E402
from lsd_jax import methods  # noqa: E402
from lsd_jax.models import discriminator, layers, vgg_fcn  # noqa: E402

# (module, name) of every tuned kernel as the networks look it up, and its plain form with the
# same arguments.
KERNELS = {
    (vgg_fcn, "max_pool_ceil"): lambda x: layers.max_pool_ceil(x, plain=True),
    (discriminator, "max_pool_floor"): lambda x: layers.max_pool_floor(x, plain=True),
    (vgg_fcn, "conv_transpose_torch"):
        lambda x, k, s, p: layers.conv_transpose_torch(x, k, s, p, plain=True),
    (layers, "conv_transpose_torch"):
        lambda x, k, s, p, plain=False: layers.conv_transpose_torch(x, k, s, p, plain=True),
    (layers, "conv_valid_im2col"): layers._conv_valid,
}


def record_kernel_calls(trace):
    """Runs `trace()` with every tuned kernel wrapped; returns the distinct calls as
    (name, tuned function, plain function, array shapes/dtypes, static arguments)."""
    calls, originals = {}, {}

    def wrap(module, name, plain):
        tuned = getattr(module, name)
        originals[(module, name)] = tuned

        def recorder(*args, **kwargs):
            arrays = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args
                           if hasattr(a, "shape"))
            static = tuple(a for a in args if not hasattr(a, "shape"))
            key = (name, tuple((a.shape, str(a.dtype)) for a in arrays), static)
            calls.setdefault(key, (name, tuned, plain, arrays, static))
            return tuned(*args, **kwargs)
        setattr(module, name, recorder)

    try:
        for (module, name), plain in KERNELS.items():
            wrap(module, name, plain)
        trace()
    finally:
        for (module, name), tuned in originals.items():
            setattr(module, name, tuned)
    return list(calls.values())


def lsd_iteration_kernel_calls(height, width, batch=1, model_width=1.0, dtype="float32"):
    """The distinct tuned-kernel calls of one composed LSD iteration (see record_kernel_calls)."""
    config = default_config.apply_variant(default_config.get_config(), "lsd")
    config.model.width, config.model.dtype = model_width, dtype
    method = methods.build(config)
    states = jax.eval_shape(method.init, jax.random.key(0))
    sizes = {d: (height, width) for d in ("source", "target")}
    batch = step_time.make_batch(batch, sizes, config.num_classes)
    updates = methods.compile_method(method, donate=False)
    return record_kernel_calls(lambda: updates.step.lower(states, batch, jax.random.key(1)))


def forward_backward(fn, static):
    """jit of the kernel's output and the gradients of <output, cotangent> for every input."""
    def loss(arrays, cotangent):
        y = fn(*arrays, *static)
        return jnp.vdot(y.astype(jnp.float32), cotangent.astype(jnp.float32)), y
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def time_call(step, arrays, cotangent, iters, warmup):
    for _ in range(warmup):
        jax.block_until_ready(step(arrays, cotangent))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(step(arrays, cotangent))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--model-width", type=float, default=1.0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default=None, help="append one JSON line per kernel call")
    args = ap.parse_args()

    calls = lsd_iteration_kernel_calls(args.height, args.width, args.batch, args.model_width,
                                       args.dtype)

    rng = np.random.default_rng(0)
    device = jax.devices()[0]
    print(f"{device.device_kind}, {args.height}x{args.width}, batch {args.batch}, {args.dtype}, "
          f"jax {jax.__version__}: forward + backward per call, median of {args.iters}")
    print("| kernel | input shapes | static | tuned ms | plain ms | plain / tuned | max |diff| |")
    print("|---|---|---|---|---|---|---|")
    total = {"tuned": 0.0, "plain": 0.0}
    for name, tuned, plain, specs, static in calls:
        arrays = tuple(jnp.asarray(rng.standard_normal(s.shape), s.dtype) for s in specs)
        out = jax.eval_shape(lambda *a: tuned(*a, *static), *arrays)
        cotangent = jnp.asarray(rng.standard_normal(out.shape), out.dtype)
        ms, outputs = {}, {}
        for form, fn in (("tuned", tuned), ("plain", plain)):
            step = forward_backward(fn, static)
            (_, outputs[form]), _ = step(arrays, cotangent)
            ms[form] = 1e3 * time_call(step, arrays, cotangent, args.iters, args.warmup)
            total[form] += ms[form]
        diff = float(jnp.max(jnp.abs(outputs["tuned"].astype(jnp.float32)
                                     - outputs["plain"].astype(jnp.float32))))
        shapes = " ".join("x".join(map(str, s.shape)) for s in specs)
        print(f"| {name} | {shapes} | {static} | {ms['tuned']:.3f} | {ms['plain']:.3f} | "
              f"{ms['plain'] / ms['tuned']:.2f} | {diff:.2e} |", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"device": device.device_kind, "dtype": args.dtype,
                                    "size": [args.height, args.width], "batch": args.batch,
                                    "kernel": name, "shapes": shapes, "static": list(static),
                                    "tuned_ms": ms["tuned"], "plain_ms": ms["plain"],
                                    "max_abs_diff": diff}) + "\n")
    print(f"| all calls, once each | | | {total['tuned']:.3f} | {total['plain']:.3f} | "
          f"{total['plain'] / max(total['tuned'], 1e-9):.2f} | |")


if __name__ == "__main__":
    main()
