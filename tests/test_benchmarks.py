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
from train_helpers import REPO_ROOT, subprocess_env

sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))

import first_layers  # noqa: E402
import kernel_forms  # noqa: E402
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


def test_gpu_kernels_are_tied_to_the_instruction_that_launched_them():
    what = {"custom-call.3": "bf16[1,64,96,3]  jit(step)/G/to_image/dot_general",
            "fusion.1": "f32[8]  jit(step)/D/add"}
    kernel = {"ph": "X", "name": "sm90_xmma_wgrad", "dur": 2000}
    events = [
        {**kernel, "args": {"correlation_id": "17", "scope_range_id": "5"}},
        {**kernel, "args": {"correlation_id": "18"}},  # the same kernel, launched again
        {"ph": "X", "name": "custom-call.3", "dur": 2500, "args": {"scope_range_id": "5"}},
        {"ph": "X", "name": "loop_kernel", "dur": 1000, "args": {"hlo_op": "fusion.1"}},
        {"ph": "X", "name": "other_kernel", "dur": 500, "args": {"correlation_id": "99"}},
        {"ph": "i", "name": "fusion.1", "args": {"correlation_id": "99"}},  # not a span
    ]
    assert step_time.top_ops(events, 4, what) == [
        ("sm90_xmma_wgrad", 4.0, "custom-call.3: " + what["custom-call.3"]),
        ("custom-call.3", 2.5, what["custom-call.3"]),
        ("loop_kernel", 1.0, "fusion.1: " + what["fusion.1"]),
        ("other_kernel", 0.5, "{'correlation_id': '99'}")]


@pytest.mark.parametrize("variant, images", [("lsd", 6), ("adaptsegnet", 6),
                                             ("source_only", 3)])
def test_images_per_second_count_the_images_a_method_reads(variant, images):
    config = default.apply_variant(default.get_config(), variant)
    assert step_time.images_per_iteration(methods.build(config), batch=3) == images


@pytest.mark.slow
def test_step_time_runs_and_profiles_a_tiny_iteration(tmp_path):
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
    out = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "first_layers.py"), "--height",
         "32", "--width", "64"], check=True, env=subprocess_env(), capture_output=True,
        text=True, timeout=600).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    assert rows[0] == [" layer ", " forward ", " d input ", " d kernel "]
    names = [name.strip() for name, *_ in rows[1:]]
    assert names[-3:] == ["G to_image 64->3 k8 s2 p100 (dilated)",
                          "G to_image, sub-pixel convolution",
                          "G to_image, sub-pixel matrix product"]
    assert len(names) == 9 and all(float(t) > 0 for _, *times in rows[1:] for t in times)


def test_first_layers_strided_im2col_is_the_strided_convolution():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 13, 18, 3)).astype(np.float32)
    k = rng.standard_normal((7, 7, 3, 5)).astype(np.float32)
    np.testing.assert_allclose(first_layers.padded_im2col(x, k, 2, 3),
                               first_layers.conv(x, k, 2, 3), rtol=1e-5, atol=1e-4)
