"""The program end to end: `python -m lsd_jax.main` trains, checkpoints, summarises, evaluates."""
import glob
import json
import os
import subprocess
import sys

import pytest

from train_helpers import REPO_ROOT, TINY_SCENES


def run_main(*args, env=None, timeout=600):
    """python -m lsd_jax.main with one CPU device (conftest's 8 would not divide the batch)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           **(env or {})}
    return subprocess.run([sys.executable, "-m", "lsd_jax.main", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def tiny_flags(data_dir):
    scenes = json.dumps(TINY_SCENES)
    flags = [f"--config.data.data_dir={data_dir}", "--config.data.shuffle_buffer=16",
             "--config.data.source.crop=(32, 64)", "--config.data.target.crop=(32, 64)",
             "--config.data.target.split=train[:12]", "--config.data.selection.split=train[12:]",
             "--config.data.eval.scale=(32, 64)", "--config.data.selection.scale=(32, 64)",
             "--config.data.eval.batch_size=4", "--config.data.selection.batch_size=4",
             "--config.train.num_steps=4", "--config.train.log_every=2",
             "--config.train.image_every=4", "--config.train.eval_every=4",
             "--config.checkpoint.every=2", "--config.eval.num_images=2"]
    return flags + [f"--config.data.{d}.config_overrides={scenes}"
                    for d in ("source", "target", "eval", "selection")]


def event_tags(workdir):
    """{tag: [values]} of every scalar, and the set of image tags, in the TensorBoard files."""
    import tensorflow as tf

    scalars, images = {}, set()
    for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor)
                if tensor.ndim == 0:
                    scalars.setdefault(value.tag, []).append(float(tensor))
                else:
                    images.add(value.tag)
    return scalars, images


def test_train_then_eval_end_to_end(tmp_path):
    workdir, data_dir = str(tmp_path / "run"), str(tmp_path / "tfds")
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache")}  # eval reuses F's compile
    trained = run_main("--config", "configs/synthetic.py", "--workdir", workdir, "--mode=train",
                       *tiny_flags(data_dir), env=cache)
    assert trained.returncode == 0, trained.stderr[-4000:]
    log = trained.stderr
    assert "step 2/4" in log and "step 4/4" in log and "steps/s" in log and "ETA" in log
    assert "selection mIoU" in log

    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["model"]["width"] == 1 / 16 and saved["train"]["num_steps"] == 4

    scalars, images = event_tags(workdir)
    for tag in ("f/seg", "f/adv", "f/aux", "f/grad_norm", "g/l1", "g/adv", "g/grad_norm",
                "d/loss", "d/source_real", "d/grad_norm", "lr/f", "lr/f_bias", "lr/g_d",
                "steps_per_sec", "selection/miou", "selection/iou/road"):
        assert tag in scalars, f"{tag} missing from the summaries: {sorted(scalars)}"
    assert all(v > 0 for v in scalars["f/seg"]) and len(scalars["f/seg"]) == 2
    assert 0 <= scalars["selection/miou"][0] <= 1
    assert {"train/source", "train/target", "selection/prediction_vs_label"} <= images

    evaluated = run_main("--config", "configs/synthetic.py", "--workdir", workdir,
                         "--mode", "eval", *tiny_flags(data_dir), env=cache)
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    results = json.load(open(os.path.join(workdir, "results", "eval_step_4.json")))
    assert results["step"] == 4 and results["split"] == "validation"
    assert results["dataset"] == "synthetic_scenes/target"
    assert 0 <= results["miou"] <= 1 and len(results["per_class_iou"]) == 19
    assert 0 < results["num_pixels"] <= TINY_SCENES["num_validation"] * 64 * 128
    table = open(os.path.join(workdir, "results", "eval_step_4.md")).read()
    assert "| road |" in table and "**mIoU (" in table
    assert "eval/miou" in event_tags(workdir)[0]


def test_summary_mode_prints_counts_and_shapes_without_data():
    result = run_main("--config", "configs/default.py", "--mode", "summary",
                      "--config.data.source.crop=(320, 640)", "--config.data.batch_size=1",
                      # accepted as the launch scripts pass them (summary starts no runtime)
                      "--coordinator_address=127.0.0.1:1234", "--num_processes=1",
                      "--process_id=0", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "F total: 134,456,985 parameters (134,353,017 trainable + 103,968 frozen)" in out
    assert "G total: 64,221,187 parameters" in out
    assert "D total: 1,361,047 parameters" in out
    assert "score    (1, 320, 640, 19)" in out and "fc7      (1, 11, 21, 4096)" in out
    assert "image    (1, 320, 640, 3)" in out and "out_s    (1, 40, 80, 4)" in out


@pytest.mark.parametrize("flag, message", [
    ("--config.model.widht=0.5", 'Did you mean "width"'),
    ("--config=configs/synthetic.py:oracle", "expected one of ('lsd', 'source_only'"),
])
def test_unknown_fields_and_variants_are_errors(flag, message):
    args = ["--config", "configs/synthetic.py", "--mode", "summary", flag]
    if flag.startswith("--config="):
        args = [flag, "--mode", "summary"]
    result = run_main(*args, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr


def test_configs_load_without_tensorflow():
    code = ("import sys; sys.modules['tensorflow'] = None; "
            "sys.modules['tensorflow_datasets'] = None\n"
            "from train_helpers import load_config_file\n"
            "for name in ('default', 'synthetic', 'gta', 'synthia'):\n"
            "    load_config_file(name)\n"
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=os.path.join(REPO_ROOT, "tests"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
