"""The program end to end: `python -m lsd_jax.main` trains, checkpoints, summarises, evaluates,
stops on signals, and reports the errors a user meets in one line."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest

from train_helpers import REPO_ROOT, TINY_SCENES, load_config_file, xla_flags

pytestmark = pytest.mark.slow  # every test runs `python -m lsd_jax.main` in a subprocess


def run_main(*args, env=None, timeout=600):
    """python -m lsd_jax.main with one CPU device (conftest's 8 would not divide the batch)."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), **(env or {})}
    return subprocess.run([sys.executable, "-m", "lsd_jax.main", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def tiny_flags(data_dir, **changes):
    """Flags of a tiny run on the synthetic scenes; `changes` replace fields, e.g.
    tiny_flags(d, **{"train.num_steps": 10})."""
    fields = {"data.data_dir": data_dir, "data.shuffle_buffer": 16,
              "data.source.crop": "(32, 64)", "data.target.crop": "(32, 64)",
              "data.target.split": "train[:12]", "data.selection.split": "train[12:]",
              "data.eval.scale": "(32, 64)", "data.selection.scale": "(32, 64)",
              "data.eval.batch_size": 4, "data.selection.batch_size": 4,
              "train.num_steps": 4, "train.log_every": 2, "train.image_every": 4,
              "train.eval_every": 4, "checkpoint.every": 2, "eval.num_images": 2}
    fields.update({f"data.{d}.config_overrides": json.dumps(TINY_SCENES)
                   for d in ("source", "target", "eval", "selection")})
    fields.update(changes)
    return [f"--config.{field}={value}" for field, value in fields.items()]


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
    """About 60 s: `python -m lsd_jax.main` trains (data generation and compilation
    included), then evaluates, each in its own process, as a user runs them."""
    workdir, data_dir = str(tmp_path / "run"), str(tmp_path / "tfds")
    trained = run_main("--config", "configs/synthetic.py:lsd", "--workdir", workdir, "--mode=train",
                       *tiny_flags(data_dir), env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert trained.returncode == 0, trained.stderr[-4000:]
    log = trained.stderr
    assert "step 2/4" in log and "step 4/4" in log and "steps/s" in log and "ETA" in log
    assert "selection mIoU" in log
    # The console a user sees: the datasets generated on first use announced in one line each,
    # without TFDS's download talk, its warnings about datasets not built yet, progress bars,
    # or tf.data's warning about abandoned caches.
    assert re.search(r"Generating synthetic_scenes/target_\w+ \(16 \+ 6 scenes\) in ", log)
    for noise in ("Downloading and preparing", "has no dataset_info.json", "Generating splits",
                  "did not fully read the dataset being cached", "Traceback"):
        assert noise not in log + trained.stdout, noise

    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["model"]["width"] == 1 / 16 and saved["train"]["num_steps"] == 4

    scalars, images = event_tags(workdir)
    for tag in ("f/seg", "f/adv", "f/aux", "f/grad_norm", "g/l1", "g/adv", "g/grad_norm",
                "d/loss", "d/source_real", "d/acc_target_fake", "d/grad_norm", "lr/f",
                "lr/f_bias", "lr/g_d", "steps_per_sec", "selection/miou", "selection/iou/road"):
        assert tag in scalars, f"{tag} missing from the summaries: {sorted(scalars)}"
    assert all(v > 0 for v in scalars["f/seg"]) and len(scalars["f/seg"]) == 2
    assert 0 <= scalars["selection/miou"][0] <= 1
    assert {"train/source", "train/target", "selection/prediction_vs_label"} <= images

    evaluated = run_main("--config", "configs/synthetic.py:lsd", "--workdir", workdir,
                         "--mode", "eval", *tiny_flags(data_dir))
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    results = json.load(open(os.path.join(workdir, "results", "eval_step_4.json")))
    assert results["step"] == 4 and results["split"] == "validation"
    assert results["dataset"] == "synthetic_scenes/target"
    assert 0 <= results["miou"] <= 1 and len(results["per_class_iou"]) == 19
    assert 0 < results["num_pixels"] <= TINY_SCENES["num_validation"] * 64 * 128
    table = open(os.path.join(workdir, "results", "eval_step_4.md")).read()
    assert "| road |" in table and "**mIoU (" in table
    assert "eval/miou" in event_tags(workdir)[0]
    # The last lines say what came out and where to look.
    assert f"per-class table: {os.path.join(workdir, 'results', 'eval_step_4.md')}" in \
        evaluated.stdout and f"tensorboard --logdir {workdir}" in evaluated.stdout


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


# ----------------------------------------------------------------------------- errors

def assert_one_line_error(result, message, exit_code=1):
    """The run failed with exactly one line of its own, `lsd_jax: <message>...`, and no
    library's INFO line (absl's `I<mmdd> ...`) before it."""
    assert result.returncode == exit_code, result.stderr[-3000:]
    ours = [line for line in result.stderr.splitlines() if line.startswith("lsd_jax: ")]
    assert len(ours) == 1 and ours[0].startswith(f"lsd_jax: {message}"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    before = result.stderr.split(ours[0])[0]
    assert not re.search(r"^I\d{4} ", before, re.M), before[-3000:]


@pytest.mark.parametrize("flags, message", [
    (["--config=configs/synthetic.py", "--config.optim.f_llr=1"],
     "--config.optim.f_llr: the config has no field 'f_llr'. "
     'Did you mean "f_lr" instead of "f_llr"?'),
    (["--config=configs/synthetic.py:foo"],
     "--config=configs/synthetic.py:foo: config argument 'foo': expected one of ('lsd', "),
    (["--config=configs/missing.py"],
     "--config: cannot load the config file: [Errno 2] No such file or directory: "
     "'configs/missing.py'"),
    (["--config=configs/synthetic.py", "--mode=evaluate"],
     "--mode=evaluate: value should be one of <train|train_and_eval|"),
])
def test_command_line_errors_are_one_line(tmp_path, flags, message):
    result = run_main(*flags, "--workdir", str(tmp_path / "run"), timeout=120)
    assert_one_line_error(result, message, exit_code=2)
    assert not (tmp_path / "run").exists()


def two_devices():
    return {"XLA_FLAGS": xla_flags(2)}


@pytest.mark.parametrize("changes, env, message", [
    ({"data.source.crop": "(40, 64)", "data.target.crop": "(40, 64)"}, None,
     "config.data.source.crop=(40, 64): training image size 40x64 is not usable: height=40 "
     "must be a positive multiple of 32"),
    ({"data.batch_size": 3}, two_devices(),
     "config.data.batch_size=3: each batch is split over 2 devices (jax.device_count()), so it "
     "must be a positive multiple of 2"),
    ({"update_mode": "together"}, None,
     "config.update_mode: expected one of ('alternating', 'simultaneous'), got 'together'"),
    ({"train.num_steps": -1}, None, "config.train.num_steps=-1: expected a non-negative integer"),
])
def test_config_errors_are_one_line_and_come_before_anything_is_written(
        tmp_path, changes, env, message):
    workdir = tmp_path / "run"
    result = run_main("--config", "configs/synthetic.py:lsd", "--workdir", str(workdir),
                      *tiny_flags(str(tmp_path / "tfds"), **changes), env=env, timeout=120)
    assert_one_line_error(result, message)
    assert not workdir.exists() and not (tmp_path / "tfds").exists()


def test_eval_without_the_checkpoint_asked_for_is_one_line(tmp_path):
    from lsd_jax import checkpoint
    import jax

    workdir = tmp_path / "run"
    flags = ["--config", "configs/synthetic.py:lsd", "--workdir", str(workdir), "--mode=eval",
             *tiny_flags(str(tmp_path / "tfds"))]
    result = run_main(*flags, timeout=120)
    assert_one_line_error(result, f"no checkpoint in {workdir}/checkpoints: train first")

    checkpoint.write_config(str(workdir), load_config_file("synthetic", "lsd"))
    manager = checkpoint.make_manager(str(workdir), asynchronous=False)
    checkpoint.save(manager, 2, {"w": jax.numpy.ones(2)}, jax.random.key(0))
    manager.close()
    result = run_main(*flags, "--config.eval.step=123", timeout=120)
    assert_one_line_error(result, f"no checkpoint of step 123 in {workdir}/checkpoints "
                                  "(config.eval.step); the checkpoints there are of steps [2]")
    assert not (tmp_path / "tfds").exists()  # refused before any dataset was generated


def test_a_workdir_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    workdir = tmp_path / "file" / "run"
    result = run_main("--config", "configs/synthetic.py:lsd", "--workdir", str(workdir),
                      *tiny_flags(str(tmp_path / "tfds")), timeout=120)
    assert_one_line_error(result, f"--workdir {workdir}: {tmp_path}/file is not a directory")


# ----------------------------------------------------------------------------- signals

@pytest.fixture(scope="module")
def signal_runs(tmp_path_factory):
    """A data dir shared by the signal tests (generated once for all)."""
    return str(tmp_path_factory.mktemp("signals") / "tfds")


def start_training(workdir, data_dir):
    """A long run, logging every step, in the background."""
    flags = tiny_flags(data_dir, **{"train.num_steps": 100_000, "train.log_every": 1,
                                    "train.eval_every": 0, "train.image_every": 0})
    return subprocess.Popen(
        [sys.executable, "-m", "lsd_jax.main", "--config", "configs/synthetic.py:lsd", "--workdir",
         workdir, "--mode=train", *flags], cwd=REPO_ROOT, text=True,
        env={**os.environ, "XLA_FLAGS": xla_flags(1)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def read_until(process, text, timeout=600):
    """The process's stderr up to the first line holding `text` (killed if it takes longer)."""
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    lines = []
    try:
        for line in process.stderr:
            lines.append(line)
            if text in line:
                return "".join(lines)
    finally:
        timer.cancel()
    raise AssertionError(f"{text!r} never came:\n" + "".join(lines[-40:]))


def finish(process, timeout=120):
    """(exit status, rest of stderr); a process that does not exit in time fails the test."""
    try:
        _, rest = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, rest = process.communicate()
        raise AssertionError(f"still running {timeout} s after the signal:\n{rest[-3000:]}")
    return process.returncode, rest


def test_sigterm_saves_at_the_next_step_and_the_run_resumes_from_there(tmp_path, signal_runs):
    """About 35 s: a training process, stopped by a signal, and a second that resumes."""
    data_dir = signal_runs
    workdir = str(tmp_path / "run")
    process = start_training(workdir, data_dir)
    read_until(process, " 3/100000 ")
    process.send_signal(signal.SIGTERM)
    status, log = finish(process)
    assert status == 0, log[-3000:]
    stopped = re.search(r"Stopped by SIGTERM after step (\d+) of 100000\. The checkpoint is step "
                        rf"(\d+) in {workdir}/checkpoints; run the same command again", log)
    assert stopped and stopped[1] == stopped[2], log[-3000:]
    step = int(stopped[1])
    assert str(step) in os.listdir(os.path.join(workdir, "checkpoints"))

    resumed = run_main("--config", "configs/synthetic.py:lsd", "--workdir", workdir, "--mode=train",
                       *tiny_flags(data_dir, **{"train.num_steps": step + 1,
                                                "train.log_every": 1, "train.eval_every": 0,
                                                "train.image_every": 0}))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from the checkpoint of step {step} in {workdir}" in resumed.stderr
    assert f"step {step + 1}/{step + 1}" in resumed.stderr


def test_ctrl_c_stops_at_once_and_names_the_last_good_checkpoint(tmp_path, signal_runs):
    """About 20 s: a training process, interrupted."""
    data_dir = signal_runs
    workdir = str(tmp_path / "run")
    process = start_training(workdir, data_dir)
    read_until(process, " 3/100000 ")
    process.send_signal(signal.SIGINT)
    status, log = finish(process, timeout=60)
    assert status == 130, log[-3000:]
    last = re.search(r"^lsd_jax: interrupted \(Ctrl-C\); the last good checkpoint is step (\d+) "
                     rf"in {workdir}/checkpoints$", log, re.MULTILINE)
    assert last, log[-3000:]
    assert last[1] in os.listdir(os.path.join(workdir, "checkpoints"))
    assert "Traceback" not in log, log[-3000:]
