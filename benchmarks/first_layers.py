#!/usr/bin/env python3
"""Time the 3-channel convolutions of LSD's networks alone, forward and each gradient apart.

A GPU profile of the 1024x512 iteration spends most of its time in one implicit-GEMM forward
kernel that the profiler does not tie to a layer; the layers whose shapes suit tensor cores
worst are the ones with 3 input or output channels: F's conv1_1 (3 -> 64, 3x3, padding 100),
D's stem (3 -> 128, 4x4, stride 2, padding 2; its input gradient has 3 output channels),
G's last layer (64 -> 3) and the DeepLab backbone's conv1 (3 -> 64, 7x7, stride 2). This
times each alone, at the iteration's shapes, as d(output), d(input) and d(kernel) programs;
G's last layer in each form the model can take. Also G's strided transposed convolutions
up2-up5 (many channels, but their kernel gradients are a GPU profile's largest item), each as
the sub-pixel phase convolution and as its matrix product.

    python benchmarks/first_layers.py --height 512 --width 1024 --dtype bfloat16
"""
import argparse
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lsd_jax.models import FCN8s, Generator, layers  # noqa: E402


def conv(x, kernel, stride, padding):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def padded_valid(x, kernel, stride, padding):
    """The padding as its own op, then a VALID convolution."""
    return conv(layers.pad_spatial(x, padding), kernel, stride, 0)


def padded_im2col(x, kernel, stride, padding):
    """The padding as its own op, then one matrix product over the k x k patches taken every
    `stride` pixels (F's conv1_1 in the model; for a strided layer, a candidate form)."""
    return layers.conv_valid_im2col(layers.pad_spatial(x, padding), kernel, stride)


def sub_pixel(phase_matmul):
    """G's to_image as the model computes it (conv_transpose_torch), its phase convolution
    as XLA's convolution or as a matrix product."""
    return lambda x, kernel, stride, padding: layers.conv_transpose_torch(
        x, kernel, stride, padding, phase_matmul=phase_matmul)


def g_layer_inputs(height, width):
    """{name: (input shape, kernel shape, stride, padding)} of G's transposed convolutions
    (up1-up5, to_image) at the full widths, for height x width images: read off the networks
    themselves, traced abstractly (no arrays are made)."""
    shapes = {}

    def record(call, args, kwargs, context):
        module = context.module
        if isinstance(module, layers.ConvTranspose) and context.method_name == "__call__":
            x_shape, k = args[0].shape, module.kernel_size
            shapes[module.name] = (x_shape, (k, k, x_shape[-1], module.features),
                                   module.stride, module.padding)
        return call(*args, **kwargs)

    image = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
    fcn = FCN8s()
    fcn_vars = jax.eval_shape(lambda x: fcn.init(jax.random.key(0), x, train=False), image)
    _, fc7, pool4, pool3 = jax.eval_shape(
        lambda v, x: fcn.apply(v, x, train=False), fcn_vars, image)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda *features: Generator().init(jax.random.key(0), *features,
                                                          train=False), fc7, pool4, pool3)
    return shapes


def timed(fn, *args, iters=10):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    h, w, dt = args.height, args.width, jnp.dtype(args.dtype)
    g_layers = g_layer_inputs(h, w)
    probes = {  # name: (function, input shape, kernel shape, stride, padding)
        "F conv1_1 3->64 k3 p100": (conv, (1, h, w, 3), (3, 3, 3, 64), 1, 100),
        "F conv1_1, pad then VALID": (padded_valid, (1, h, w, 3), (3, 3, 3, 64), 1, 100),
        "F conv1_1, pad then im2col": (padded_im2col, (1, h, w, 3), (3, 3, 3, 64), 1, 100),
        "D stem 3->128 k4 s2 p2": (conv, (1, h, w, 3), (4, 4, 3, 128), 2, 2),
        "DeepLab conv1 3->64 k7 s2 p3": (conv, (1, h, w, 3), (7, 7, 3, 64), 2, 3),
        "DeepLab conv1, pad then strided im2col": (
            padded_im2col, (1, h, w, 3), (7, 7, 3, 64), 2, 3),
        "G to_image 64->3 k8 s2 p100 (dilated)": (
            layers.conv_transpose_dilated, *g_layers["to_image"]),
        "G to_image, sub-pixel convolution": (sub_pixel(False), *g_layers["to_image"]),
        "G to_image, sub-pixel matrix product": (sub_pixel(True), *g_layers["to_image"]),
    }
    for layer in ("up2", "up3", "up4", "up5"):  # up1 has stride 1: col2im, no phases
        x_shape, k_shape, s, p = g_layers[layer]
        name = f"G {layer} {k_shape[2]}->{k_shape[3]} k{k_shape[0]} s{s} p{p}"
        probes[f"{name}, sub-pixel convolution"] = (sub_pixel(False), x_shape, k_shape, s, p)
        probes[f"{name}, sub-pixel matrix product"] = (sub_pixel(True), x_shape, k_shape, s, p)
    rng = np.random.default_rng(0)
    print(f"{jax.devices()[0].device_kind}, {args.dtype}, ms per call (median of 10)")
    print("| layer | forward | d input | d kernel |")
    print("|---|---|---|---|")
    for name, (fn, x_shape, k_shape, s, p) in probes.items():
        x = jnp.asarray(rng.standard_normal(x_shape), dt)
        k = jnp.asarray(rng.standard_normal(k_shape), dt)
        y = jax.eval_shape(lambda a, b: fn(a, b, s, p), x, k)
        g = jnp.asarray(rng.standard_normal(y.shape), dt)
        forward = jax.jit(lambda a, b: fn(a, b, s, p))
        vjp = lambda a, b, c: jax.vjp(lambda a_, b_: fn(a_, b_, s, p), a, b)[1](c)  # noqa: E731
        d_input = jax.jit(lambda a, b, c: vjp(a, b, c)[0])
        d_kernel = jax.jit(lambda a, b, c: vjp(a, b, c)[1])
        print(f"| {name} | {timed(forward, x, k):.3f} | {timed(d_input, x, k, g):.3f} | "
              f"{timed(d_kernel, x, k, g):.3f} |", flush=True)


if __name__ == "__main__":
    main()
