#!/usr/bin/env python3
"""Time one training iteration of lsd_jax (LSD, or any method and backbone), and the PyTorch
LSD peer beside it.

For every combination of the chosen update modes (alternating / simultaneous) and compilations
(composed: the whole iteration as one XLA program; separate: three compiled updates), prints a
row with the compile time, the median time per iteration after warm-up, images/s, FLOPs per
iteration from XLA's cost analysis, MFU against the device's peak and peak device memory, and
writes the same as JSON lines.

FLOPs: TFLOP/s and MFU count the FLOPs of the three updates as traced (XLA's cost analysis of
the unoptimised programs), the same number on every backend and for both compilations. The
compiled program's own count is reported beside it ("XLA GFLOP"), but it is not comparable
across backends: on a GPU it leaves out the convolutions XLA hands to cuDNN (at 1024x512 on
an H200 it counts 318 of the 13,551 GFLOP), and composed it is lower by the forward passes
XLA shares between updates. Needs no tensorflow: the batch is random in-memory arrays.

    python benchmarks/step_time.py --height 128 --width 256 --batch 1           # CPU, small
    python benchmarks/step_time.py --height 512 --width 1024 --dtype bfloat16 \
        --peer --peer-script PATH/torch_lsd_step.py --peer-args="--amp bf16"

Per iteration: --batch source and --batch target images (the paper: 1 + 1), so images/s counts
2 x batch per iteration, as the peer does (batch for a method that reads no target images,
e.g. source_only). --peer runs a PyTorch LSD step script (--peer-script; it is not part of
lsd_jax: an eager implementation of the same iteration that takes the same size flags and
prints its time per iteration) once per update mode, at the same size, in the same run (LSD
only).

Other methods: --variant names one of configs/default.py's variants (adaptsegnet_multi, advent,
adda, fcan_ran, source_only, ...), --backbone one of config.model.backbone's values, and
--source-height/--source-width give the source its own size where the method allows it (the
published AdaptSegNet / ADVENT settings: 720x1280 source, 512x1024 target):

    python benchmarks/step_time.py --variant advent --backbone deeplabv2_resnet101 \
        --source-height 720 --source-width 1280 --height 512 --width 1024 --modes simultaneous
"""
import argparse
import collections
import glob
import gzip
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from configs import default as default_config  # noqa: E402
from lsd_jax import benchmark, methods, parallel  # noqa: E402
from lsd_jax.methods import self_training  # noqa: E402
from lsd_jax.models import VGG_MEAN_BGR, layers  # noqa: E402

# Dense peak FLOP/s per device (no sparsity), by jax's device_kind substring and compute dtype.
# Source: NVIDIA H100 and H200 Tensor Core GPU datasheets (SXM): BF16 989.4 TFLOP/s, TF32
# 494.7 TFLOP/s, FP32 (no tensor cores) 66.9 TFLOP/s; A100 datasheet: BF16 312, TF32 156, FP32
# 19.5. TPU: Google Cloud TPU system architecture pages (bf16 per chip: v4 275, v5e 197, v5p 459).
PEAK_FLOPS = {
    "H200": {"bfloat16": 989.4e12, "tf32": 494.7e12, "float32": 66.9e12},
    "H100": {"bfloat16": 989.4e12, "tf32": 494.7e12, "float32": 66.9e12},
    "A100": {"bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12},
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12},
    "TPU v5e": {"bfloat16": 197e12},
    "TPU v5p": {"bfloat16": 459e12},
}


def peak_flops(device, dtype: str, precision: str):
    """The device's dense peak for this dtype, or None when unknown (e.g. a CPU)."""
    kind = device.device_kind
    for name, peaks in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            if dtype == "bfloat16":
                return peaks.get("bfloat16")
            # float32 on NVIDIA: JAX's default precision runs convolutions in TF32.
            return peaks.get("float32" if precision == "highest" else "tf32")
    return None


def make_batch(batch, sizes, classes, seed=0):
    """Random in-memory images and labels, preprocessed as the pipeline does; sizes = {domain:
    (height, width)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for domain, (height, width) in sizes.items():
        x01 = rng.random((batch, height, width, 3), np.float32)
        out[f"{domain}_image01"] = x01
        out[f"{domain}_image"] = x01 * 255.0 - np.asarray(VGG_MEAN_BGR, np.float32)
    height, width = sizes["source"]
    out["source_label"] = rng.integers(0, classes, (batch, height, width), dtype=np.int32)
    return out


def cost(compiled):
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


def memory_estimate(compiled):
    """XLA's static estimate of the program's device memory (arguments + outputs + temps,
    minus donated aliases), available on every backend."""
    try:
        m = compiled.memory_analysis()
        return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None


def peak_device_memory():
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def block(tree):
    return jax.block_until_ready(tree)


def images_per_iteration(method, batch: int) -> int:
    """The images one iteration reads: batch source images, and as many target images where
    the method reads them."""
    return batch * (2 if method.reads_target else 1)


def bench_one(config, mesh, mode, updates_kind, states0, batch, args):
    config.update_mode = mode
    method = methods.build(config)
    images_per_iter = images_per_iteration(method, args.batch)
    updates = methods.compile_method(method, donate=True, mesh=mesh)
    key = parallel.replicate(jax.random.key(1), mesh)
    states = jax.tree.map(lambda x: x.copy(), states0)  # the composed step donates its states
    t0 = time.perf_counter()
    if updates_kind == "composed":
        lowered = updates.step.lower(states, batch, key)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        flops, mem = cost(compiled), memory_estimate(compiled)
        traced_flops = cost(lowered)  # before optimisation: backend-independent
        run, programs = compiled, [compiled]
    else:
        lowered = {name: update.lower(states, batch, key)
                   for name, update in updates.updates.items()}
        separate = {name: program.compile() for name, program in lowered.items()}
        compile_s = time.perf_counter() - t0
        programs = list(separate.values())
        flops = sum(cost(c) for c in programs)
        traced_flops = sum(cost(program) for program in lowered.values())
        mems = [memory_estimate(c) for c in programs]
        mem = None if None in mems else max(mems)
        run = lambda s, b, k: methods.run_iteration(separate, mode, s, b, k)  # noqa: E731
    row = {"updates": updates_kind, "mode": mode, "compile_s": compile_s,
           "flops_per_iter": flops, "traced_flops_per_iter": traced_flops,
           "xla_memory_estimate_gib": None if mem is None else mem / 2**30}
    if args.compile_only:
        return row
    times = []
    for i in range(args.warmup + args.iters):
        k = jax.random.fold_in(key, i)
        t = time.perf_counter()
        states, metrics = run(states, batch, k)
        block((states, metrics))
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    peak = peak_flops(jax.devices()[0], args.dtype, args.matmul_precision)
    mem = peak_device_memory()
    row.update(median_s_per_iter=med, min_s=min(times), max_s=max(times),
               images_per_s=images_per_iter / med, tflops_per_s=traced_flops / med / 1e12,
               mfu=None if peak is None else traced_flops / med / (peak * mesh.size),
               peak_mem_gib=None if mem is None else mem / 2**30,
               losses={name: float(value) for name, value in metrics.items()
                       if name.endswith("/loss")})
    if args.profile_top:
        k = jax.random.fold_in(key, args.warmup + args.iters)
        try:
            keep = args.keep_trace and (f"{args.keep_trace}.{args.dtype}.{mode}."
                                        f"{updates_kind}.json.gz")
            row["profile_top_ms"] = profile_top_ops(lambda: block(run(states, batch, k)),
                                                    args.profile_top,
                                                    [c.as_text() for c in programs], keep)
            if keep:
                row["trace"] = keep
        except Exception as e:  # noqa: BLE001 - a failed trace must not lose the timings
            row["profile_error"] = f"{type(e).__name__}: {e}"
    return row


_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def describe_hlo_ops(hlo_texts):
    """{instruction name: "result shape  jax op path"} from compiled HLO text, to say what a
    profiled fusion computes (e.g. ".../transpose(jvp(FCN8s))/conv1_2/conv_general_dilated").
    A fusion without an op_name takes the first one inside the computation it calls, or that
    computation's root op (XLA's own rewrites, e.g. some kernel gradients, carry none). Names
    found in several programs (separate updates) are ambiguous and left undescribed."""
    out, seen = {}, collections.Counter()
    for text in hlo_texts:
        inner, computation, described = {}, None, {}
        for line in text.splitlines():
            if not line.startswith((" ", "\t")) and line.rstrip().endswith("{"):
                computation = line.lstrip("%").split(" ", 1)[0]
                continue
            match = _HLO_INSTRUCTION.match(line)
            if not match:
                continue
            name, shape, opcode = match.groups()
            op_name = _OP_NAME.search(line)
            if op_name and computation not in inner:
                inner[computation] = op_name.group(1)
            if line.lstrip().startswith("ROOT"):
                inner.setdefault(computation, f"({opcode} in {computation})")
            described[name] = (shape, op_name.group(1) if op_name else None,
                               _CALLS.search(line))
        for name, (shape, op_name, called) in described.items():
            if op_name is None and called:
                op_name = inner.get(called.group(1))
            out[name] = f"{shape}  {op_name or ''}".rstrip()
            seen[name] += 1
    return {name: what for name, what in out.items() if seen[name] == 1}


def profile_top_ops(run_once, top, hlo_texts=(), keep_trace=None):
    """Runs one iteration under jax.profiler and returns its `top` most expensive ops as
    (name, milliseconds, what it computes): XLA fusions/thunks on the CPU, kernels on a GPU.
    keep_trace: a path to copy the trace to (Perfetto JSON, gzipped), for a closer look."""
    trace_dir = tempfile.mkdtemp(prefix="lsd_profile_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        run_once()
    [path] = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if keep_trace:
        shutil.copy(path, keep_trace)
    with gzip.open(path) as f:
        trace = json.load(f)
    shutil.rmtree(trace_dir, ignore_errors=True)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return top_ops(events, top, describe_hlo_ops(hlo_texts))


# XLA names a fusion's GPU kernel after the fusion, with these characters as "_".
_NOT_IN_KERNEL_NAMES = re.compile(r"[.\-]")


def top_ops(events, top, what):
    """The `top` most expensive ops of a profiled iteration as (name, ms, what it computes),
    summed by name: XLA's thunks on the CPU, named by their HLO instruction, or kernels on a GPU,
    each described by the instruction it ran for. `what` maps instruction names to descriptions
    (describe_hlo_ops); where it has none, the jax op path from the trace stands in. A kernel
    that ran for several instructions names the one it took most time in and counts the rest."""
    # A kernel replayed from a command buffer (a CUDA graph) names the command buffer in
    # `hlo_op`, and no op path; its own name, that of the fusion it was compiled for, is the
    # closest link left (identical fusions share the first one's kernel).
    kernel_of = {_NOT_IN_KERNEL_NAMES.sub("_", op): op for op in what}
    total, per_op, op_path = collections.Counter(), collections.defaultdict(collections.Counter), {}
    for e in events:
        args = e.get("args") or {}
        # Only the ops' own events name their instruction: XLA's thunks on the CPU; kernels,
        # memsets and copies on a GPU, which also give the jax op path in `name`. The others time
        # the runtime around them (Python, PjRt, thunk spans) or are a kernel's host-side launch
        # record: named after the kernel but without its instruction, and a second count of it.
        if e.get("ph") != "X" or "hlo_op" not in args:
            continue
        fusion = kernel_of.get(e["name"]) if "cuda_graph_id" in args else None
        ms = e.get("dur", 0) / 1e3
        total[e["name"]] += ms
        per_op[e["name"]][args["hlo_op"], fusion] += ms
        op_path.setdefault(args["hlo_op"], args.get("name"))

    def describe(name):
        (op, fusion), ms = per_op[name].most_common(1)[0]
        label = "" if op == name else f"{op} (kernel of {fusion})" if fusion else op
        if len(per_op[name]) > 1:
            label += f" ({ms:.1f} ms; +{len(per_op[name]) - 1} more)"
        return ": ".join(filter(None, (label, what.get(fusion or op) or op_path[op])))
    return [(name, round(ms, 1), describe(name)) for name, ms in total.most_common(top)]


def run_peer(mode, args):
    cmd = [sys.executable, args.peer_script, "--height", str(args.height), "--width",
           str(args.width), "--batch", str(args.batch), "--iters", str(args.iters), "--warmup",
           str(args.warmup), "--mode", mode, *args.peer_args.split()]
    if args.peer_device:
        cmd += ["--device", args.peer_device]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return {"peer_error": out.stderr[-2000:], "command": " ".join(cmd)}
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
    return {**json.loads(line), "command": " ".join(cmd), "wall_s": time.perf_counter() - t}


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def config_from_flags(ap, args):
    """--config FILE[:VARIANT] when given (its variant is then what the rows name), else
    configs/default.py's --variant."""
    if not args.config:
        return default_config.apply_variant(default_config.get_config(), args.variant)
    path, _, variant = args.config.partition(":")
    try:
        module = benchmark.load_config_module(path)
        config = module.get_config(variant) if variant else module.get_config()
    except (benchmark.BenchmarkError, ValueError) as error:
        ap.error(f"--config {args.config}: {benchmark.one_line(error)}")
    args.variant = args.config
    if config.method == "dacs" and config.dacs.feature_distance_weight > 0 and \
            not self_training.has_imagenet_weights(config.init):
        # Nothing is loaded here: F and its frozen ImageNet copy start from random weights,
        # which costs the same arithmetic. The build only asks that weights be named.
        config.init.resnet_weights = "(not loaded: random weights for timing)"
    return config


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="lsd", help="a variant of configs/default.py")
    ap.add_argument("--config", default=None, metavar="FILE[:VARIANT]",
                    help="a config file's variant instead, e.g. configs/gta_deeplab.py:daformer "
                         "(sizes and batch still from the flags below)")
    ap.add_argument("--backbone", default=None, help="config.model.backbone (default: the "
                    "variant's, FCN-8s)")
    ap.add_argument("--resnet-blocks", default=None, help="config.model.resnet_blocks, e.g. "
                    "1,1,1,1 for a tiny DeepLab ResNet")
    ap.add_argument("--height", type=int, default=128, help="target (and source) height")
    ap.add_argument("--width", type=int, default=256, help="target (and source) width")
    ap.add_argument("--source-height", type=int, default=None, help="default: --height")
    ap.add_argument("--source-width", type=int, default=None, help="default: --width")
    ap.add_argument("--batch", type=int, default=1, help="source (= target) images per iteration")
    ap.add_argument("--model-width", type=float, default=1.0, help="config.model.width")
    ap.add_argument("--dtype", choices=sorted(methods.base.DTYPES), default="float32")
    ap.add_argument("--matmul-precision", choices=["default", "high", "highest"],
                    default="default", help="jax_default_matmul_precision (GPU: default = TF32)")
    ap.add_argument("--modes", default="alternating,simultaneous")
    ap.add_argument("--updates", default="composed,separate")
    ap.add_argument("--plain-kernels", action="store_true",
                    help="config.model.plain_kernels: XLA's plain pools, fc6/fc7 and transposed "
                    "convolutions instead of the CPU-tuned forms")
    ap.add_argument("--phase-matmul-channels", type=int, default=None, metavar="N",
                    help="on an accelerator, compute a sub-pixel phase convolution with at most "
                    "N outputs as a matrix product (layers.NARROW_PHASE_CHANNELS; default: the "
                    "model's)")
    ap.add_argument("--remat-f", action="store_true")
    ap.add_argument("--remat-g", action="store_true")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--num-devices", type=int, default=None, help="mesh size (default: all)")
    ap.add_argument("--compile-only", action="store_true",
                    help="only compile: compile time, FLOPs and XLA's memory estimate")
    ap.add_argument("--profile-top", type=int, default=0, metavar="N",
                    help="profile one more iteration and report its N most expensive ops")
    ap.add_argument("--keep-trace", default=None, metavar="PREFIX",
                    help="with --profile-top: keep each profiled trace as "
                    "PREFIX.DTYPE.MODE.UPDATES.json.gz (Perfetto JSON)")
    ap.add_argument("--peer", action="store_true", help="also run the PyTorch peer")
    ap.add_argument("--peer-script", default=None, metavar="PATH",
                    help="the PyTorch peer's script (needed with --peer)")
    ap.add_argument("--peer-args", default="", help='e.g. "--tf32" or "--amp bf16"')
    ap.add_argument("--peer-device", default=None)
    ap.add_argument("--json", default=None, help="append one JSON line per row to this file")
    args = ap.parse_args()
    if args.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)

    config = config_from_flags(ap, args)
    if args.backbone:
        config.model.backbone = args.backbone
    if args.resnet_blocks:
        config.model.resnet_blocks = tuple(int(b) for b in args.resnet_blocks.split(","))
    if args.peer and not (args.peer_script and os.path.isfile(args.peer_script)):
        ap.error(f"--peer: --peer-script must name the PyTorch peer's script, got "
                 f"{args.peer_script!r}")
    if args.peer and config.method != "lsd":
        ap.error(f"--peer: the PyTorch peer runs LSD, not --variant {args.variant}")
    sizes = {"source": (args.source_height or args.height, args.source_width or args.width),
             "target": (args.height, args.width)}
    if sizes["source"] != sizes["target"] and methods.needs_one_size(config):
        ap.error(f"--variant {args.variant}: both domains must have one size")
    config.model.width = args.model_width
    config.model.dtype = args.dtype
    config.model.plain_kernels = args.plain_kernels
    config.model.remat_f = args.remat_f
    config.model.remat_g = args.remat_g
    if args.phase_matmul_channels is not None:  # read when the networks are traced
        layers.NARROW_PHASE_CHANNELS = args.phase_matmul_channels
    mesh = parallel.make_mesh(args.num_devices)
    parallel.check_batch_divisible(args.batch, mesh)
    method = methods.build(config)
    states0 = parallel.replicate(method.init(jax.random.key(0)), mesh)
    if not method.reads_target:  # as the training loop hands such a method its batches
        sizes.pop("target")
    batch = jax.device_put(make_batch(args.batch, sizes, config.num_classes),
                           parallel.batch_sharded(mesh))
    device = jax.devices()[0]
    common = {"date": time.strftime("%Y-%m-%d"), "device": device.device_kind,
              "platform": device.platform, "num_devices": mesh.size, "host": platform.node(),
              "cpu_count": os.cpu_count(), "jax": jax.__version__, "variant": args.variant,
              "method": config.method, "backbone": config.model.backbone,
              "resnet_blocks": list(config.model.resnet_blocks),
              "size": [args.height, args.width],
              "source_size": [args.source_height or args.height, args.source_width or args.width],
              "batch": args.batch, "model_width": args.model_width, "dtype": args.dtype,
              "matmul_precision": args.matmul_precision, "remat_f": args.remat_f,
              "remat_g": args.remat_g, "plain_kernels": args.plain_kernels,
              "phase_matmul_channels": layers.NARROW_PHASE_CHANNELS,
              "command": " ".join(sys.argv)}
    rows = []
    for mode in args.modes.split(","):
        peer = run_peer(mode, args) if args.peer and not args.compile_only else None
        for kind in args.updates.split(","):
            row = {**common, **bench_one(config, mesh, mode, kind, states0, batch, args)}
            if peer is not None:
                row["peer"] = peer
                if "median_s_per_iter" in peer:
                    row["speedup_vs_peer"] = peer["median_s_per_iter"] / row["median_s_per_iter"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")

    print(f"\n{device.device_kind} x{mesh.size}, {args.variant} ({config.method}) on "
          f"{config.model.backbone}, source {common['source_size'][0]}x{common['source_size'][1]}, target "
          f"{args.height}x{args.width}, batch {args.batch}+"
          f"{args.batch}, width {args.model_width}, {args.dtype}, precision "
          f"{args.matmul_precision}, {'plain' if args.plain_kernels else 'tuned'} kernels (phase "
          f"convolutions of <= {layers.NARROW_PHASE_CHANNELS} outputs as matrix products off the "
          f"CPU), jax {jax.__version__}")
    print("| mode | updates | compile s | s/iter | images/s | GFLOP/iter | XLA GFLOP | TFLOP/s | MFU | "
          "peak mem GiB | XLA mem est. GiB | peer s/iter | peer peak GiB | speedup |")
    print("|---" * 14 + "|")
    for r in rows:
        p = r.get("peer") or {}
        print(f"| {r['mode']} | {r['updates']} | {r['compile_s']:.1f} | "
              f"{fmt(r.get('median_s_per_iter'), '.3f')} | {fmt(r.get('images_per_s'), '.2f')} | "
              f"{r['traced_flops_per_iter'] / 1e9:.1f} | {r['flops_per_iter'] / 1e9:.1f} | "
              f"{fmt(r.get('tflops_per_s'), '.3f')} | "
              f"{fmt(r.get('mfu'), '.1%')} | {fmt(r.get('peak_mem_gib'), '.2f')} | "
              f"{fmt(r.get('xla_memory_estimate_gib'), '.2f')} | "
              f"{fmt(p.get('median_s_per_iter'), '.3f')} | {fmt(p.get('peak_mem_gib'), '.2f')} | "
              f"{fmt(r.get('speedup_vs_peer'), '.2f')}x |")
    for r in rows:
        if r.get("profile_top_ms"):
            print(f"\nmost expensive ops, {r['mode']} {r['updates']} (ms in one iteration):")
            for name, ms, what in r["profile_top_ms"]:
                print(f"  {ms:9.1f}  {name:28s} {what}")


if __name__ == "__main__":
    main()
