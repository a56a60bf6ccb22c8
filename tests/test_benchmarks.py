"""benchmarks/step_time.py runs end to end at a tiny size and its profile names real ops;
benchmarks/kernel_forms.py finds every tuned kernel of the iteration, and times the right pairs."""

import collections
import gzip
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default
from lsd_jax import methods
from train_helpers import REPO_ROOT, load_config_file, subprocess_env

sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))

import first_layers  # noqa: E402
import kernel_forms  # noqa: E402
import published_start  # noqa: E402
import step_time  # noqa: E402

HLO = """\
HloModule jit_step

%fused_computation.7 (param_0: f32[4,4]) -> f32[4,4] {
  %param_0 = f32[4,4]{1,0} parameter(0)
  ROOT %convolution.3 = f32[4,4]{1,0} convolution(%param_0, %param_0), window={size=1x1}
}

%fused_computation.8 (param_0.1: f32[4,4]) -> f32[4,4] {
  %param_0.1 = f32[4,4]{1,0} parameter(0)
  ROOT %add.1 = f32[4,4]{1,0} add(%param_0.1, %param_0.1), metadata={op_name="jit(step)/G/up1/add"}
}

ENTRY %main (p: f32[4,4]) -> f32[4,4] {
  %p = f32[4,4]{1,0} parameter(0)
  %ynn_fusion.7 = f32[4,4]{1,0} fusion(%p), kind=kCustom, calls=%fused_computation.7
  %loop_fusion.8 = f32[4,4]{1,0} fusion(%ynn_fusion.7), kind=kLoop, calls=%fused_computation.8
  ROOT %dot.2 = f32[4,4]{1,0} dot(%loop_fusion.8, %p), metadata={op_name="jit(step)/F/fc6/dot_general" stack_frame_id=3}
}
"""


def test_hlo_ops_are_described_by_their_jax_op_or_root():
    what = step_time.describe_hlo_ops([HLO])
    assert what["dot.2"] == "f32[4,4]{1,0}  jit(step)/F/fc6/dot_general"
    assert what["loop_fusion.8"] == "f32[4,4]{1,0}  jit(step)/G/up1/add"
    assert what["ynn_fusion.7"] == "f32[4,4]{1,0}  (convolution in fused_computation.7)"
    # The same name in two programs (separate updates) cannot be attributed to either.
    assert "dot.2" not in step_time.describe_hlo_ops([HLO, HLO])


# A GPU trace of jax.profiler (Perfetto JSON) as it lays out one profiled iteration, trimmed
# from one taken on an H200: host events (pid 701), kernels on a stream of the device (pid 1).
CONV = ("void convolve_common_engine_float_NHWC<float, float, 1024, 5, 5, 3, 3, 3, false, false, "
        "false, false, false>(int, int, int, float const*, float const*, int, float*, "
        "conv_kernel_common_params, unsigned long long, unsigned long, float, float, bool, "
        "float const*, float const*, bool, bool)")
GEMM = ("sm90_xmma_gemm_f32f32_tf32f32_f32_nt_n_tilesize128x128x32_warpgroupsize1x1x1_"
        "execute_segment_k_off_kernel__5x_cublas")
HOST, DEVICE = {"pid": 701, "tid": 1954928166}, {"pid": 1, "tid": 14}


def gpu_kernel(name, ts, dur, correlation_id, hlo_op, op_path):
    return {"ph": "X", **DEVICE, "ts": ts, "dur": dur, "name": name, "args": {
        "context_id": "$$1", "correlation_id": correlation_id, "hlo_module": "jit_run_iteration",
        "hlo_op": hlo_op, "kernel_details": "regs:64 static_shared:2304 dynamic_shared:0 "
        "grid:144,16,1 block:8,8,1 occ_pct:50", "name": op_path, "occupancy_min_grid_size": "132",
        "occupancy_suggested_block_size": "1024", "scope_range_id": "281474976711" + correlation_id,
        "tf_op": "XlaModule:", "theoretical_occupancy_pct": "50",
        "unique_hlo_op_id": "6055903887" + correlation_id}}


def command_buffer_kernel(name, ts, dur, correlation_id, command_buffer, node):
    return {"ph": "X", **DEVICE, "ts": ts, "dur": dur, "name": name, "args": {
        "context_id": "$$1", "correlation_id": correlation_id, "cuda_graph_id": "173",
        "cuda_graph_node_id": node, "hlo_module": "jit_run_iteration", "hlo_op": command_buffer,
        "kernel_details": "regs:16 static_shared:0 dynamic_shared:0 grid:1742976,1,1 "
        "block:128,1,1 occ_pct:100", "occupancy_min_grid_size": "264",
        "occupancy_suggested_block_size": "1024", "scope_range_id": "281474976710" + correlation_id,
        "tf_op": "XlaModule:", "theoretical_occupancy_pct": "100"}}


UP4, UP3 = (f"jit(run_iteration)/transpose(jvp(Generator))/{layer}/conv_general_dilated"
            for layer in ("up4", "up3"))
GPU_TRACE = [
    {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
    {"ph": "M", "pid": 701, "name": "process_name", "args": {"name": "/host:CPU"}},
    {"ph": "M", "pid": 1, "tid": 14, "name": "thread_name",
     "args": {"name": "Stream #14(MemcpyD2D,Compute,Memset)"}},
    # The host: runtime spans, a thunk's span named by its instruction, launch records.
    {"ph": "X", **HOST, "ts": 19355.1, "dur": 43560.9, "name": "PjitFunction(jit(run_iteration))"},
    {"ph": "X", **HOST, "ts": 22780.9, "dur": 949.9, "name": "command_buffer::execute", "args": {
        "_src": "external/xla+/xla/backends/gpu/runtime/command_buffer_thunk.cc", "device": "0",
        "num_commands": "16", "num_executions": "1"}},
    {"ph": "X", **HOST, "ts": 22798.5, "dur": 875.8, "name": "cuGraphLaunch (CudaGraph:173)",
     "args": {"context_id": "$$1", "correlation_id": "212", "cuda_graph_id": "173",
              "device_id": "0", "scope_range_id": "281474976710658"}},
    {"ph": "X", **HOST, "ts": 44841.9, "dur": 30.9, "name": "cudnn-conv.349"},
    {"ph": "X", **HOST, "ts": 44858.5, "dur": 12.2, "name": CONV, "args": {
        "context_id": "$$1", "correlation_id": "741", "device_id": "0",
        "scope_range_id": "281474976711235"}},
    {"ph": "X", **HOST, "ts": 45210.3, "dur": 22.2, "name": "Memset", "args": {
        "Memset_details": "kind:unknown num_bytes:4 async:1", "context_id": "$$1",
        "correlation_id": "752", "device_id": "0", "scope_range_id": "281474976711244"}},
    # The device: kernels that name their instruction, and kernels replayed from a command
    # buffer, which name the command buffer instead.
    command_buffer_kernel("loop_concatenate_fusion_3", 34335.5, 1048.2, "212", "command_buffer_544",
                          "734439407623"),
    command_buffer_kernel(GEMM, 117944.4, 573.1, "1293", "command_buffer_3245", "734439407909"),
    gpu_kernel(CONV, 60418.9, 3354.5, "741", "cudnn-conv.349", UP4),
    {"ph": "X", **DEVICE, "ts": 64460.1, "dur": 0.8, "name": "Memset 3", "args": {
        "Memset_details": "kind:device num_bytes:4 async:1", "context_id": "$$1",
        "correlation_id": "752", "hlo_module": "jit_run_iteration", "hlo_op": "cudnn-conv.344",
        "name": UP3, "scope_range_id": "281474976711244", "tf_op": "XlaModule:",
        "unique_hlo_op_id": "6055903887845"}},
    gpu_kernel(CONV, 64464.9, 1401.4, "753", "cudnn-conv.344", UP3),
]


def test_top_ops_names_the_instruction_each_gpu_kernel_ran_for():
    # Without the compiled HLO, the trace's own op path describes an instruction.
    assert step_time.top_ops(GPU_TRACE, 4, {}) == [
        (CONV, 4.8, f"cudnn-conv.349 (3.4 ms; +1 more): {UP4}"),
        ("loop_concatenate_fusion_3", 1.0, "command_buffer_544"),
        (GEMM, 0.6, "command_buffer_3245"),
        ("Memset 3", 0.0, f"cudnn-conv.344: {UP3}")]
    # With it, the instruction's description; a command buffer's kernel is tied to the fusion
    # it was compiled for by its name.
    what = {"cudnn-conv.349": "(f32[3,3,512,512]{3,2,1,0}, u8[0]{0})  " + UP4,
            "loop_concatenate_fusion.3": "f32[1,356,612,1024]{3,2,1,0}  "
                                         "jit(run_iteration)/Generator/to_image/concatenate"}
    assert step_time.top_ops(GPU_TRACE, 2, what) == [
        (CONV, 4.8, "cudnn-conv.349 (3.4 ms; +1 more): " + what["cudnn-conv.349"]),
        ("loop_concatenate_fusion_3", 1.0, "command_buffer_544 (kernel of "
         "loop_concatenate_fusion.3): " + what["loop_concatenate_fusion.3"])]


def test_top_ops_on_the_cpu_are_the_thunks_named_by_their_instruction():
    thunk = "external/xla/xla/backends/cpu/runtime/thunk_executor.cc"
    events = [
        {"ph": "X", "pid": 701, "tid": 3, "ts": 0.0, "dur": 9000.0, "name": "PjitFunction(step)"},
        {"ph": "X", "pid": 701, "tid": 3, "ts": 1.0, "dur": 8000.0,
         "name": "$stages.py:943 __call__"},
        {"ph": "X", "pid": 701, "tid": 3, "ts": 2.0, "dur": 7000.0,
         "name": "ThunkExecutor::Execute (wait for completion)"},
        {"ph": "X", "pid": 701, "tid": 4, "ts": 3.0, "dur": 2500.0, "name": "convolution.3",
         "args": {"_src": thunk, "device_ordinal": "0", "hlo_module": "jit_step",
                  "hlo_op": "convolution.3", "run_id": "2028382510"}},
        {"ph": "X", "pid": 701, "tid": 4, "ts": 2503.0, "dur": 0.3, "name": "end: convolution.3",
         "args": {"_src": thunk}},
        {"ph": "X", "pid": 701, "tid": 4, "ts": 2504.0, "dur": 1000.0, "name": "loop_fusion.8",
         "args": {"_src": thunk, "device_ordinal": "0", "hlo_module": "jit_step",
                  "hlo_op": "loop_fusion.8", "run_id": "2028382510"}},
    ]
    what = {"convolution.3": "f32[1,32,64,4]{3,2,1,0}  jit(step)/F/conv1_2/conv_general_dilated"}
    assert step_time.top_ops(events, 5, what) == [("convolution.3", 2.5, what["convolution.3"]),
                                                  ("loop_fusion.8", 1.0, "")]


def test_published_start_changes_only_what_fits_the_run_to_its_files():
    """benchmarks/published_start.py's overrides parse as `python -m lsd_jax.main` parses them,
    for every variant it starts, and leave the published batch, optimiser and schedule."""
    from absl import flags
    from ml_collections import config_flags

    overrides = published_start.run_overrides("tfds", 4, 2, 256, "r101.h5")
    for variant in published_start.VARIANTS:
        argv = ["main", "--config", os.path.join(REPO_ROOT, variant), *overrides]
        flag_values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv)
        flag_values(argv)
        config, published = flag_values.config, load_config_file(
            *os.path.basename(variant).split(".py:"))
        assert (config.data.data_dir, config.train.num_steps) == ("tfds", 2)
        assert (config.data.target.split, config.data.selection.split) == ("train[:4]",
                                                                           "train[4:]")
        assert config.data.source.crop == config.data.target.crop == (256, 256)
        assert config.init.resnet_weights == "r101.h5"
        published.data.data_dir, published.train.num_steps = "tfds", 2
        published.data.target.split, published.data.selection.split = "train[:4]", "train[4:]"
        published.data.source.crop = published.data.target.crop = (256, 256)
        published.init.resnet_weights = "r101.h5"
        assert config.to_dict() == published.to_dict(), variant  # nothing else changed


def test_a_config_files_variant_is_timed_as_published(capsys):
    """--config FILE:VARIANT: the file's variant (here DAFormer's recipe, whose feature distance
    asks for ImageNet weights that a timing never loads); a variant the file lacks is a
    one-line usage error naming it."""
    import argparse
    parser = argparse.ArgumentParser(prog="step_time.py")
    args = argparse.Namespace(config="configs/gta_deeplab.py:daformer", variant="lsd")
    config = step_time.config_from_flags(parser, args)
    assert config.method == "dacs" and config.dacs.feature_distance_weight == 0.005
    assert config.model.backbone == "deeplabv2_resnet101" and config.model.aspp_branches == 4
    assert "not loaded" in config.init.resnet_weights
    assert args.variant == "configs/gta_deeplab.py:daformer"  # what the rows name
    methods.build(config)  # the build's check is satisfied
    with pytest.raises(SystemExit):
        step_time.config_from_flags(parser, argparse.Namespace(
            config="configs/gta_deeplab.py:lsd", variant="lsd"))
    assert "--config configs/gta_deeplab.py:lsd" in capsys.readouterr().err


@pytest.mark.parametrize("variant, images", [("lsd", 6), ("adaptsegnet", 6),
                                             ("source_only", 3)])
def test_images_per_second_count_the_images_a_method_reads(variant, images):
    config = default.apply_variant(default.get_config(), variant)
    assert step_time.images_per_iteration(methods.build(config), batch=3) == images


@pytest.mark.slow
def test_step_time_runs_and_profiles_a_tiny_iteration(tmp_path):
    """About 40 s: a subprocess that compiles and profiles an iteration, as a user runs it."""
    out = tmp_path / "rows.jsonl"
    subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "step_time.py"), "--height", "32",
         "--width", "64", "--model-width", "0.0625", "--modes", "simultaneous", "--updates",
         "composed", "--iters", "1", "--warmup", "1", "--profile-top", "5", "--json", str(out),
         "--keep-trace", str(tmp_path / "trace")],
        check=True, env=subprocess_env(), cwd=tmp_path, capture_output=True, timeout=600)
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["mode"] == "simultaneous" and row["num_devices"] == 1
    assert row["median_s_per_iter"] > 0 and row["flops_per_iter"] > 1e6
    # Composed, XLA shares the forward passes of the three updates, so the compiled program
    # does less work than the updates as traced, which TFLOP/s counts.
    assert row["traced_flops_per_iter"] > row["flops_per_iter"]
    assert row["tflops_per_s"] == pytest.approx(
        row["traced_flops_per_iter"] / row["median_s_per_iter"] / 1e12)
    assert set(row["losses"]) == {"d/loss", "g/loss", "f/loss"}
    assert all(map(math.isfinite, row["losses"].values()))
    assert len(row["profile_top_ms"]) == 5, row.get("profile_error")
    assert any("FCN8s" in what or "Generator" in what or "Discriminator" in what
               for _, _, what in row["profile_top_ms"])
    assert row["trace"] == str(tmp_path / "trace.float32.simultaneous.composed.json.gz")
    with gzip.open(row["trace"]) as f:
        assert json.load(f)["traceEvents"]


@pytest.mark.slow
def test_step_time_runs_another_method_on_deeplab_with_two_sizes(tmp_path):
    out = tmp_path / "rows.jsonl"
    subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "step_time.py"), "--variant",
         "advent", "--backbone", "deeplabv2_resnet101", "--resnet-blocks", "1,1,1,1",
         "--model-width", "0.0625", "--height", "32", "--width", "64", "--source-height", "40",
         "--source-width", "72", "--modes", "simultaneous", "--updates", "separate", "--iters",
         "1", "--warmup", "0", "--json", str(out)],
        check=True, env=subprocess_env(), cwd=tmp_path, capture_output=True, timeout=600)
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert (row["method"], row["backbone"]) == ("advent", "deeplabv2_resnet101")
    assert row["source_size"] == [40, 72] and row["size"] == [32, 64]
    assert set(row["losses"]) == {"f/loss", "d/loss", "d_aux/loss"}, row["losses"]
    assert all(map(math.isfinite, row["losses"].values())) and row["median_s_per_iter"] > 0


@pytest.mark.slow  # compiles whole networks' gradients
def test_kernel_forms_finds_every_tuned_kernel_call_of_the_iteration_with_its_shapes():
    calls = kernel_forms.lsd_iteration_kernel_calls(64, 96, model_width=1 / 16)
    found = collections.Counter(name for name, *_ in calls)
    # F: five ceil pools, conv1_1 / fc6 / fc7 as im2col products, three head upsamplings;
    # G: six transposed convolutions; D: two floor pools (source and target share shapes).
    assert found == {"max_pool_ceil": 5, "conv_valid_im2col": 3, "conv_transpose_torch": 9,
                     "max_pool_floor": 2}
    conv1_1 = [specs for name, _, _, specs, _ in calls
               if name == "conv_valid_im2col" and specs[0].shape[-1] == 3]
    assert [[s.shape for s in specs] for specs in conv1_1] == [[(1, 264, 296, 3), (3, 3, 3, 4)]]
    # Each tuned form and the plain form it is timed against compute the same thing.
    rng = np.random.default_rng(0)
    for name, tuned, plain, specs, static in calls:
        arrays = [rng.standard_normal(s.shape).astype(np.float32) for s in specs]
        np.testing.assert_allclose(jax.jit(lambda *a: tuned(*a, *static))(*arrays),
                                   jax.jit(lambda *a: plain(*a, *static))(*arrays),
                                   rtol=1e-4, atol=1e-4, err_msg=f"{name} {static}")


@pytest.mark.slow
def test_first_layers_times_every_form_of_each_layer():
    """About 40 s: a subprocess that compiles every form of each layer, as a user runs it."""
    out = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "first_layers.py"), "--height",
         "32", "--width", "64"], check=True, env=subprocess_env(), capture_output=True,
        text=True, timeout=600).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    assert rows[0] == [" layer ", " forward ", " d input ", " d kernel "]
    names = [name.strip() for name, *_ in rows[1:]]
    assert names[6:9] == ["G to_image 64->3 k8 s2 p100 (dilated)",
                          "G to_image, sub-pixel convolution",
                          "G to_image, sub-pixel matrix product"]
    assert names[-2:] == ["G up5 128->64 k5 s2 p2, sub-pixel convolution",
                          "G up5 128->64 k5 s2 p2, sub-pixel matrix product"]
    assert len(names) == 17 and all(float(t) > 0 for _, *times in rows[1:] for t in times)


def test_first_layers_reads_gs_layers_off_the_networks():
    shapes = first_layers.g_layer_inputs(64, 128)
    assert list(shapes) == ["up1", "up2", "up3", "up4", "up5", "to_image"]
    # to_image gives back the image's size: G reconstructs F's input.
    x_shape, kernel, s, p = shapes["to_image"]
    assert ((x_shape[1] - 1) * s + kernel[0] - 2 * p,
            (x_shape[2] - 1) * s + kernel[1] - 2 * p) == (64, 128)
    assert shapes["up1"][0] == (1, 3, 5, 4096) and shapes["up4"][1] == (5, 5, 512, 128)


def test_first_layers_strided_im2col_is_the_strided_convolution():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 13, 18, 3)).astype(np.float32)
    k = rng.standard_normal((7, 7, 3, 5)).astype(np.float32)
    np.testing.assert_allclose(first_layers.padded_im2col(x, k, 2, 3),
                               first_layers.conv(x, k, 2, 3), rtol=1e-5, atol=1e-4)
