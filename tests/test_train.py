"""The training loop's failure handling and helpers (the loop itself: test_checkpoint, test_main)."""
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clu import metric_writers

from lsd_jax import checkpoint, distributed, errors, parallel, preflight, reporting, train
from lsd_jax.methods import source_only
from lsd_jax.programs import build_programs, initial_states
from train_helpers import (REPO_ROOT, free_port, load_config_file, subprocess_env, tiny_config,
                           tiny_programs)


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_naming_step_and_term_and_keeps_the_last_good_checkpoint(
        tmp_path):
    """About 30 s: compiles and trains the tiny LSD config to the bad step."""
    programs = tiny_programs()
    calls = []

    def poisoned_step(states, batch, key):  # the real update; its 3rd loss report is NaN
        states, metrics = programs.compiled.step(states, batch, key)
        calls.append(1)
        if len(calls) == 3:
            metrics = {**metrics, "g/l1": metrics["g/l1"] * jnp.nan}
        return states, metrics

    poisoned = dataclasses.replace(
        programs, compiled=programs.compiled._replace(step=poisoned_step))
    config = tiny_config(str(tmp_path / "tfds"))
    config.train.num_steps = 6
    with pytest.raises(train.NonFiniteLossError,
                       match=r"'g/l1' is nan at step 3 .* last good checkpoint is step 2"):
        train.train_and_evaluate(config, str(tmp_path / "run"), programs=poisoned,
                                 evaluate_at_end=False)
    manager = checkpoint.make_manager(str(tmp_path / "run"), read_only=True)
    assert checkpoint.available_steps(manager) == [2]
    manager.close()


def test_first_nonfinite_finds_the_earliest_step():
    history = [(1, {"a": np.float32(1)}), (2, {"a": np.float32(np.inf), "b": np.float32(1)}),
               (3, {"b": np.float32(np.nan)})]
    assert reporting.first_nonfinite(history) == (2, "a", float("inf"))
    assert reporting.first_nonfinite(history[:1]) is None


def test_a_missing_dataset_says_how_to_build_it(tmp_path):
    config = tiny_config(str(tmp_path / "tfds"))
    config.data.source.name = "gta5/1280x720_jpeg"
    config.data.source.config_overrides = {}
    with pytest.raises(preflight.DatasetMissingError) as error:
        preflight.check_datasets(config.data, ("source",))
    message = str(error.value)
    assert "config.data.source" in message
    assert (f"tfds build gta5 --imports lsd_jax.data.datasets --manual_dir <extracted files> "
            f"--config 1280x720_jpeg --data_dir {tmp_path / 'tfds'}") in message


def test_model_selection_on_the_target_evaluation_set_is_refused():
    config = load_config_file("synthetic")
    config.data.selection.name = config.data.eval.name
    config.data.selection.split = config.data.eval.split
    with pytest.raises(ValueError, match="never use the target evaluation set"):
        preflight.check_selection_is_not_eval(config.data)


@pytest.mark.parametrize("field, value, message", [
    ("train.num_steps", -1, r"config.train.num_steps=-1: expected a non-negative integer"),
    ("train.log_every", 0, r"config.train.log_every=0: expected a positive integer"),
    ("num_classes", 16, r"num_classes=16 but config.data.class_set='cityscapes19' has 19"),
    ("eval.confusion_method", "histogram", r"confusion_method='histogram'"),
])
def test_bad_config_values_name_the_field(field, value, message):
    config = load_config_file("synthetic")
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(ValueError, match=message):
        preflight.check_config(config)


@pytest.mark.parametrize("changes, message", [
    ({"source.crop": (40, 128), "target.crop": (40, 128)},
     r"^config.data.source.crop=\(40, 128\): .*height=40 must be a positive multiple of 32"),
    ({"source.crop": (64, 128), "target.crop": (32, 128)},
     r"^config.data.source.crop=\(64, 128\) but config.data.target.crop=\(32, 128\)"),
    ({"source.crop": None}, r"^config.data.source: set crop or resize"),
    ({"source.crop": (64, 128, 3)}, r"^config.data.source.crop=\(64, 128, 3\): expected"),
])
def test_training_sizes_are_checked_up_front_naming_the_field(changes, message):
    data = load_config_file("synthetic").data
    for field, value in changes.items():
        domain, name = field.split(".")
        data[domain][name] = value
    with pytest.raises(errors.ConfigError, match=message):
        preflight.check_training_sizes(data)


@pytest.mark.parametrize("variant", ["adaptsegnet", "adda", "source_only"])
def test_methods_without_g_take_each_domain_at_its_own_size(variant):
    """Only LSD needs one size, a multiple of 32 (G's concatenations); the others pass each
    domain through S alone, as the published 1280x720 source / 1024x512 target settings do."""
    data = load_config_file("synthetic", variant).data
    data.source.crop, data.target.crop = (720, 1280), (512, 1024)
    preflight.check_training_sizes(data, one_size=False)
    with pytest.raises(errors.ConfigError, match="height=720 must be a positive multiple of 32"):
        preflight.check_training_sizes(data, one_size=True)


@pytest.mark.slow
def test_a_method_without_g_trains_on_two_sizes(tmp_path):
    config = tiny_config(str(tmp_path / "tfds"), "adaptsegnet")
    config.data.source.crop = (40, 72)  # neither a multiple of 32 nor the target's size
    config.train.num_steps = 2
    train.train_and_evaluate(config, str(tmp_path / "run"), programs=tiny_programs("adaptsegnet"))
    assert checkpoint.saved_steps(str(tmp_path / "run")) == [2]
    lsd = tiny_config(str(tmp_path / "tfds"))
    lsd.data.source.crop = (40, 72)
    with pytest.raises(errors.ConfigError, match=r"config.data.source.crop=\(40, 72\)"):
        train.train_and_evaluate(lsd, str(tmp_path / "lsd"), programs=tiny_programs())


def test_batch_sizes_must_divide_over_the_devices():
    config = load_config_file("synthetic")
    mesh = parallel.make_mesh(2)
    config.data.batch_size = 3
    with pytest.raises(errors.ConfigError, match=r"^config.data.batch_size=3: each batch is split "
                                                 r"over 2 devices .* multiple of 2$"):
        preflight.check_batch_sizes(config, mesh, ())
    config.data.batch_size = 4
    config.data.eval.batch_size = 5
    preflight.check_batch_sizes(config, mesh, ("selection",))
    with pytest.raises(errors.ConfigError, match=r"^config.data.eval.batch_size=5: "):
        preflight.check_batch_sizes(config, mesh, ("selection", "eval"))


def test_sigterm_on_one_process_means_stop_at_the_next_step():
    before = signal.getsignal(signal.SIGTERM)
    with distributed.StopSignals() as stop:
        assert not stop.preempted(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.preempted(2)
    assert signal.getsignal(signal.SIGTERM) is before


class SlowSummaries(metric_writers.MetricWriter):
    """A writer whose writes take a while and which records what happened in which order."""

    def __init__(self):
        self.events = []

    def write_scalars(self, step, scalars):
        time.sleep(0.5)
        self.events.append(f"wrote {step}")

    def flush(self):
        self.events.append("flushed")

    def close(self):
        self.events.append("closed")

    write_summaries = write_images = write_videos = write_audios = write_texts = None
    write_histograms = write_hparams = None


def test_ctrl_c_during_a_summary_flush_lets_the_write_finish_first():
    # The asynchronous writer's flush joins its thread; Python 3.11's Thread.join interrupted by
    # Ctrl-C marks the still-running thread as finished, so the writer was closed under the
    # write (a WriteSummary traceback at every unlucky Ctrl-C).
    slow = SlowSummaries()
    writer = metric_writers.AsyncWriter(slow)
    with distributed.StopSignals() as stop:
        writer.write_scalars(1, {"x": 1.0})
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            train.flush_summaries(writer, stop)
        assert slow.events == ["wrote 1", "flushed"]
        writer.close()
    assert slow.events == ["wrote 1", "flushed", "flushed", "closed"]


PREEMPTED_WORKER = """
import sys, time
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from lsd_jax import checkpoint
from lsd_jax.distributed import StopSignals, initialize_distributed

address, process_id, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
initialize_distributed(address, 2, process_id, initialization_timeout=30)
manager = checkpoint.make_manager(workdir)
with StopSignals(manager.reached_preemption) as stop:
    print("READY", flush=True)
    for step in range(1, 100_000):
        time.sleep(0.01)  # a training step
        if stop.preempted(step):
            print(f"STOP {step}", flush=True)
            break
manager.close()
"""


@pytest.mark.slow
def test_sigterm_on_one_of_two_processes_stops_both_at_one_step(tmp_path):
    """SLURM or Cloud TPU may signal any process first: JAX's preemption sync, through
    orbax's reached_preemption, makes every process stop (and save) at the same step."""
    worker = tmp_path / "worker.py"
    worker.write_text(PREEMPTED_WORKER)
    address = f"127.0.0.1:{free_port()}"
    processes = [subprocess.Popen([sys.executable, str(worker), address, str(i),
                                   str(tmp_path / "run")], env=subprocess_env(), cwd=REPO_ROOT,
                                  text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for i in range(2)]
    outputs = []
    kill_all = threading.Timer(120, lambda: [p.kill() for p in processes])  # if READY never comes
    kill_all.start()
    try:
        for process in processes:
            for line in process.stdout:  # (gloo prints its connections there too)
                if line.strip() == "READY":
                    break
        processes[1].send_signal(signal.SIGTERM)
        for process in processes:
            stdout, stderr = process.communicate(timeout=60)
            assert process.returncode == 0, stderr[-3000:]
            outputs.append([line for line in stdout.splitlines() if line.startswith("STOP")])
    finally:
        kill_all.cancel()
        for process in processes:  # never leave a process waiting for its peer
            if process.poll() is None:
                process.kill()
                process.wait()
    assert len(outputs[0]) == 1 and outputs[0] == outputs[1], outputs


@pytest.mark.parametrize("name, variant", [("default", "")] + [
    (name, variant) for name in ("synthetic", "gta", "synthia")
    for variant in ("lsd", "source_only", "target_only")] + [("synthetic", "pretrain")])
def test_every_config_and_variant_is_valid(name, variant):
    config = load_config_file(name, variant)
    preflight.check_config(config)
    preflight.check_selection_is_not_eval(config.data)
    if variant:
        assert config.method == ("lsd" if variant == "lsd" else "source_only")
    if variant == "target_only":
        assert config.data.source.name == config.data.target.name
    with pytest.raises(AttributeError, match="Did you mean"):
        config.optim.f_llr = 1.0  # locked: a misspelled field is an error


def test_the_synthetic_demo_is_dacs_from_the_shipped_f_on_the_effects_only_target_and_short():
    """`--config configs/synthetic.py` (no argument) is the 5-minute demo: `:dacs` with the
    effects-only shift on every set read from the target (not on the source), from the F
    shipped in configs/demo (the file its README's checksum names), 500 iterations, F
    evaluated as it starts and at the end; the benchmark's `:dacs` keeps the default target."""
    import hashlib

    demo, dacs = load_config_file("synthetic"), load_config_file("synthetic", "dacs")
    preflight.check_config(demo)
    preflight.check_selection_is_not_eval(demo.data)
    assert demo.method == "dacs"
    shift = {"palette": "game", "texture": 0.4, "lighting": 0.9, "noise": 20.0, "blur": 1.5}
    for field in ("target", "selection", "eval"):
        assert demo.data[field].config_overrides.to_dict() == shift
        assert not dacs.data[field].config_overrides
    assert not demo.data.source.config_overrides
    assert (demo.train.num_steps, demo.optim.lr_decay_steps) == (500, 375)
    assert demo.train.eval_start and demo.train.eval_every == 0
    assert demo.checkpoint.every == 500
    shipped = os.path.join(REPO_ROOT, "configs", "demo", "pretrained_f.npz")
    assert os.path.samefile(demo.init.f_file, shipped)
    with open(shipped, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(REPO_ROOT, "configs", "demo", "README.md")) as f:
        assert f"sha256 {digest}" in f.read()
    differing = {k for k, v in checkpoint.flatten_config(demo).items()
                 if checkpoint.flatten_config(dacs).get(k) != v}
    assert {k.split(".")[0] for k in differing} <= {"data", "train", "optim", "checkpoint",
                                                     "init"}


@pytest.mark.parametrize("name", ["gta_deeplab", "synthia_deeplab"])
@pytest.mark.parametrize("variant", ["adaptsegnet_multi", "adaptsegnet", "adaptsegnet_ls",
                                     "advent", "minent", "source_only", "target_only"])
def test_the_published_deeplab_settings_are_valid(name, variant):
    config = load_config_file(name, variant)
    preflight.check_config(config)
    preflight.check_selection_is_not_eval(config.data)
    preflight.check_training_sizes(config.data, one_size=False)
    source_size = (720, 1280) if name == "gta_deeplab" else (760, 1280)
    if variant == "target_only":  # the oracle trains on the target's own training images
        assert config.data.source.name == config.data.target.name
    else:
        assert config.data.source.resize == source_size and config.data.source.crop is None
    assert config.data.target.crop == (512, 1024) and not config.data.source.flip
    assert (config.model.backbone, config.data.batch_size) == ("deeplabv2_resnet101", 1)
    expected_steps = {"adaptsegnet": 150_000, "source_only": 150_000,
                      "advent": 120_000 if name == "gta_deeplab" else 90_000}[config.method]
    assert config.train.num_steps == expected_steps
    if config.method == "source_only":
        assert config.source_only.optimizer == "output_space_sgd"


def test_source_only_can_train_with_the_output_space_references_sgd():
    """S's SGD of AdaptSegNet / ADVENT: coupled weight decay, classifiers at 10x, poly."""
    config = load_config_file("gta_deeplab", "source_only")
    tx, rates = source_only.optimizer_and_rates(config)
    assert rates(0) == pytest.approx({"lr/f": 2.5e-4, "lr/f_classifier": 2.5e-3})
    assert rates(125_000)["lr/f"] == pytest.approx(2.5e-4 * 0.5 ** 0.9)
    params = {"layer1_0": {"kernel": jnp.full(3, 2.0)},
              "classifier": {"conv0": {"kernel": jnp.full(3, 2.0)}}}
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["layer1_0"]["kernel"], -2.5e-4 * (1 + 5e-4 * 2.0))
    np.testing.assert_allclose(updates["classifier"]["conv0"]["kernel"],
                               -2.5e-3 * (1 + 5e-4 * 2.0))
    # With the references' rates, their loss: the cross-entropy's mean (LSD's sum overflows).
    assert config.loss.reduction == "sum" and source_only.loss_reduction(config) == "mean"
    config.source_only.optimizer = "lsd_adam"
    assert source_only.loss_reduction(config) == "sum"
    config.source_only.optimizer = "sgd"
    with pytest.raises(ValueError, match=r"config.source_only.optimizer: expected one of"):
        source_only.optimizer_and_rates(config)


def test_the_published_deeplab_settings_refuse_lsd():
    with pytest.raises(ValueError, match="LSD's G needs the FCN-8s backbone"):
        load_config_file("gta_deeplab", "lsd")


def test_the_oracle_trains_on_the_target_as_later_overrides_leave_it():
    """target_only's training set follows data.target when it is changed after the config
    file's get_config (as --config.data.target.* flags do); the source's flip stays."""
    config = load_config_file("synthetic", "target_only")
    config.data.target.split, config.data.target.crop = "train[:12]", (32, 64)
    assert config.data.source.split == "train[:12]" and config.data.source.crop == (32, 64)
    assert config.data.source.name == "synthetic_scenes/target"
    assert config.data.source.flip and not config.data.target.flip


def test_programs_built_for_other_method_weights_are_refused(tmp_path):
    config = tiny_config(str(tmp_path / "tfds"), "adaptsegnet")
    config.adaptsegnet.adv_weight = 0.01
    with pytest.raises(ValueError, match="built for another config"):
        train.train_and_evaluate(config, str(tmp_path / "run"),
                                 programs=tiny_programs("adaptsegnet"))
    assert not (tmp_path / "run").exists()


def test_console_line_is_readable():
    line = reporting.console_line(150, 300, {"f/seg": 1234.5, "d/loss": 2.25, "x": 1},
                                  ("f/seg", "f/adv", "d/loss"), 2.0)
    assert line == "step 150/300  f/seg 1234  d/loss 2.25  2.00 steps/s  ETA 1m15s"


# ----------------------------------------------------------------------------- init.f_workdir

def save_states(workdir, states, step):
    manager = checkpoint.make_manager(str(workdir), asynchronous=False)
    checkpoint.save(manager, step, states, jax.random.key(0))
    manager.close()


def states_with_f(programs, f_state):
    return {**programs.init(jax.random.key(9)), "f": f_state}


def test_a_run_starts_from_the_f_of_another_runs_checkpoint(tmp_path):
    """An LSD run starting from a source-only run's checkpoint (a different method, so other
    networks and optimizer states) takes that F's parameters and nothing else."""
    pretrained = tiny_programs("source_only").init(jax.random.key(7))["f"]
    pretrained = pretrained.replace(params=jax.tree.map(lambda p: p + 0.5, pretrained.params))
    save_states(tmp_path / "pre", tiny_programs("source_only").init(jax.random.key(8)), 10)
    save_states(tmp_path / "pre", states_with_f(tiny_programs("source_only"), pretrained), 20)

    config = tiny_config(str(tmp_path / "tfds"))
    config.init.f_workdir = str(tmp_path / "pre")
    programs = tiny_programs()
    fresh = initial_states(tiny_config(str(tmp_path / "tfds")), programs)
    started = initial_states(config, programs)
    for got, expected in zip(jax.tree.leaves(started["f"].params), jax.tree.leaves(pretrained.params)):
        np.testing.assert_array_equal(got, expected)
    for name in ("g", "d"):  # untouched: as a fresh start makes them
        for got, expected in zip(jax.tree.leaves(started[name].params),
                                 jax.tree.leaves(fresh[name].params)):
            np.testing.assert_array_equal(got, expected)
    for got, expected in zip(jax.tree.leaves(started["f"].opt_state),  # fresh optimizer state
                             jax.tree.leaves(fresh["f"].opt_state)):
        np.testing.assert_array_equal(got, expected)

    config.init.f_step = 10  # an earlier checkpoint when asked for
    earlier = initial_states(config, programs)
    assert not np.array_equal(jax.tree.leaves(earlier["f"].params)[0],
                              jax.tree.leaves(started["f"].params)[0])


def test_starting_f_without_imagenet_weights_is_said_in_one_line(tmp_path, caplog):
    """A warning on a real source (the published results start from ImageNet weights), a note
    on the embedded benchmark, nothing once F's weights come from anywhere."""
    programs = tiny_programs()
    config = tiny_config(str(tmp_path / "tfds"))
    config.data.source.name = "gta5/1280x720"
    with caplog.at_level("INFO"):
        initial_states(config, programs)
    said = [r for r in caplog.records if "F starts from random initialisation" in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING"]
    assert "config.init.vgg16_weights" in said[0].getMessage()
    assert "\n" not in said[0].getMessage()

    caplog.clear()
    with caplog.at_level("INFO"):
        initial_states(tiny_config(str(tmp_path / "tfds")), programs)
    said = [r for r in caplog.records if "F starts from random initialisation" in r.getMessage()]
    assert [r.levelname for r in said] == ["INFO"]

    save_states(tmp_path / "pre", programs.init(jax.random.key(8)), 10)
    config.init.f_workdir = str(tmp_path / "pre")
    caplog.clear()
    with caplog.at_level("INFO"):
        initial_states(config, programs)
    assert not any("random initialisation" in r.getMessage() for r in caplog.records)


def test_a_multi_level_run_starts_from_a_source_only_f_and_keeps_its_fresh_aux_head(tmp_path):
    pretrained = tiny_programs("source_only").init(jax.random.key(7))
    pretrained["f"] = pretrained["f"].replace(
        params=jax.tree.map(lambda p: p + 0.5, pretrained["f"].params))
    save_states(tmp_path / "pre", pretrained, 10)
    config = tiny_config(str(tmp_path / "tfds"), "adaptsegnet_multi")
    config.init.f_workdir = str(tmp_path / "pre")
    programs = tiny_programs("adaptsegnet_multi")
    started = initial_states(config, programs)["f"].params
    fresh = initial_states(tiny_config(str(tmp_path / "tfds"), "adaptsegnet_multi"),
                           programs)["f"].params
    assert set(started) == set(pretrained["f"].params) | {"score_aux"}
    for name, saved in pretrained["f"].params.items():
        jax.tree.map(np.testing.assert_array_equal, started[name], saved)
    jax.tree.map(np.testing.assert_array_equal, started["score_aux"], fresh["score_aux"])


def test_a_pretrained_f_of_another_network_is_refused_naming_the_tensor(tmp_path):
    wide = tiny_config(str(tmp_path / "tfds"), "source_only")
    wide.model.width = 1 / 8
    save_states(tmp_path / "pre", build_programs(wide).init(jax.random.key(0)), 5)
    config = tiny_config(str(tmp_path / "tfds"))
    config.init.f_workdir = str(tmp_path / "pre")
    with pytest.raises(errors.ConfigError,
                       match=r"F of step 5 in .*pre': \['params'\]\['conv1_1'\]\['bias'\] has "
                             r"shape \(8,\), this run's F \(4,\); expected a run of the same "
                             r"network"):
        initial_states(config, tiny_programs())


@pytest.mark.slow  # trains two steps and evaluates twice with the tiny LSD programs
def test_an_exported_f_starts_a_run_that_evaluates_it_before_its_first_step(tmp_path, capsys):
    """`python -m lsd_jax.export` writes F of a run's checkpoint to one .npz and prints its
    sha256; a run started from that file (config.init.f_file) has that F exactly, as one
    started from the workdir (config.init.f_workdir). With train.eval_start, F as it started is
    evaluated on data.eval before the first step (results/eval_step_0), and the run's last
    line gives that figure beside the trained F's."""
    import hashlib

    from lsd_jax import export, main
    from lsd_jax.evaluate import format_percent

    programs = tiny_programs()
    pretrained = tiny_programs("source_only").init(jax.random.key(7))  # not the run's own key
    # Score layers away from their zero start, so that F predicts more than one class.
    pretrained["f"] = pretrained["f"].replace(params={
        name: (jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape),
                            layer) if name.startswith("score") else layer)
        for name, layer in pretrained["f"].params.items()})
    save_states(tmp_path / "pre", pretrained, 20)
    f_file = tmp_path / "f.npz"
    assert export.main(["--workdir", str(tmp_path / "pre"), "--output", str(f_file)]) == 0
    printed = capsys.readouterr().out
    assert "F of step 20" in printed
    assert f"sha256 {hashlib.sha256(f_file.read_bytes()).hexdigest()}" in printed

    config = tiny_config(str(tmp_path / "tfds"))
    config.init.f_file = str(f_file)
    from_file = initial_states(config, programs)["f"]
    from_workdir = tiny_config(str(tmp_path / "tfds"))
    from_workdir.init.f_workdir = str(tmp_path / "pre")
    expected = initial_states(from_workdir, programs)["f"]
    jax.tree.map(np.testing.assert_array_equal, from_file.variables(), expected.variables())
    jax.tree.map(np.testing.assert_array_equal, from_file.params, pretrained["f"].params)
    fresh = initial_states(tiny_config(str(tmp_path / "tfds")), programs)["f"]
    assert not np.array_equal(from_file.params["conv1_1"]["kernel"],
                              fresh.params["conv1_1"]["kernel"])

    config.train.eval_start = True
    config.train.num_steps = 2
    run = str(tmp_path / "run")
    result = train.train_and_evaluate(config, run, programs=programs)
    start = reporting.read_start_evaluation(run)
    direct = reporting.run_evaluation(config, programs, from_file.variables(), "eval")
    assert start["step"] == 0 and start["miou"] == direct["miou"]
    assert result.eval_summary["step"] == 2 and result.eval_summary["miou"] != start["miou"]
    line = main.where_results_are(run, result.eval_summary).splitlines()[0]
    assert line.endswith(f"at step 2 (F as it started, step 0: "
                         f"{format_percent(start['miou'])} %).")


@pytest.mark.slow  # evaluates four times with the tiny source-only programs
def test_a_run_of_zero_steps_saves_and_evaluates_f_as_it_starts(tmp_path):
    """train.num_steps=0 measures an F made elsewhere: nothing is trained, F from
    config.init is saved as the checkpoint of step 0 and evaluated on the selection and
    evaluation sets, with figures equal to evaluating that F directly. Run again, it keeps the
    checkpoint and gives the same figures."""
    programs = tiny_programs("source_only")
    pretrained = programs.init(jax.random.key(7))
    pretrained["f"] = pretrained["f"].replace(params={  # predicts more than one class
        name: (jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape),
                            layer) if name.startswith("score") else layer)
        for name, layer in pretrained["f"].params.items()})
    save_states(tmp_path / "pre", pretrained, 20)
    config = tiny_config(str(tmp_path / "tfds"), "source_only")
    config.init.f_workdir = str(tmp_path / "pre")
    config.train.num_steps, config.train.eval_every = 0, 1
    config.train.eval_start = True  # the step-0 evaluation is the run's own, made once

    run = str(tmp_path / "run")
    result = train.train_and_evaluate(config, run, programs=programs)
    f_variables = pretrained["f"].variables()
    assert result.step == 0 and result.eval_summary["step"] == 0
    assert result.eval_summary["miou"] == reporting.run_evaluation(
        config, programs, f_variables, "eval")["miou"]
    assert [h["step"] for h in result.selection] == [0]
    assert result.selection[0]["miou"] == reporting.run_evaluation(
        config, programs, f_variables, "selection")["miou"]
    assert os.path.exists(os.path.join(run, "results", "selection", "step_0.json"))
    assert checkpoint.saved_steps(run) == [0]
    step, saved = checkpoint.read_network(run, "f")
    assert step == 0
    for part in ("params", "frozen"):
        jax.tree.map(np.testing.assert_array_equal, saved[part], f_variables[part])

    again = train.train_and_evaluate(config, run, programs=programs)
    assert checkpoint.saved_steps(run) == [0]
    assert again.eval_summary["miou"] == result.eval_summary["miou"]


@pytest.mark.parametrize("contents, message", [
    (b"not a zip", r"f.npz: not a network file of `python -m lsd_jax.export`"),
    (None, r"f.npz: expected arrays named params/..."),
])
def test_a_file_that_is_not_an_exported_network_is_named(tmp_path, contents, message):
    path = tmp_path / "f.npz"
    if contents is None:
        np.savez(path, weights=np.zeros(3))
    else:
        path.write_bytes(contents)
    config = tiny_config(str(tmp_path / "tfds"))
    config.init.f_file = str(path)
    with pytest.raises(errors.UserError, match=message):
        initial_states(config, tiny_programs())


@pytest.mark.parametrize("argv, message", [
    (["--workdir", "{tmp}/none", "--output", "{tmp}/f.npz"], r"--workdir '.*none': no such"),
    (["--workdir", "{tmp}", "--output", "{tmp}/f.pth"], r"--output '.*f.pth': expected a file "
                                                         r"name ending in .npz"),
    (["--workdir", "{tmp}", "--output", "{tmp}/no/f.npz"], r"--output .*: no folder"),
    (["--workdir", "{tmp}", "--output", "{tmp}/f.npz"], r"holds no checkpoint"),
])
def test_export_errors_are_one_line(tmp_path, capsys, argv, message):
    from lsd_jax import export

    assert export.main([a.format(tmp=tmp_path) for a in argv]) != 0
    error = capsys.readouterr().err
    assert error.startswith("lsd_jax.export: ") and error.count("\n") == 1
    assert re.search(message, error), error
    assert not (tmp_path / "f.npz").exists()


@pytest.mark.parametrize("init, message", [
    ({"f_workdir": "{tmp}/none"}, r"f_workdir='.*none': no checkpoint there"),
    ({"f_file": "{tmp}/none.npz"}, r"config.init.f_file='.*none.npz': no such file"),
    ({"f_workdir": "{tmp}/run"}, r"is this run's own workdir"),
    ({"f_workdir": "{tmp}/pre", "f_step": 3}, r"f_step=3: '.*pre' has checkpoints of steps \[5\]"),
])
def test_a_missing_pretrained_run_is_refused_before_anything_is_written(tmp_path, init, message):
    save_states(tmp_path / "pre", tiny_programs("source_only").init(jax.random.key(0)), 5)
    config = tiny_config(str(tmp_path / "tfds"))
    for field, value in init.items():
        config.init[field] = value.format(tmp=tmp_path) if isinstance(value, str) else value
    with pytest.raises(errors.ConfigError, match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"), programs=tiny_programs())
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("init, message", [
    ({"torch_f": "f.pth", "f_workdir": "runs/pre"},
     r"config.init.torch_f and config.init.f_workdir both give F's weights: set one"),
    ({"f_step": 4}, r"config.init.f_step=4 is set without config.init.f_workdir"),
    ({"f_workdir": "runs/pre", "f_file": "f.npz"},
     r"config.init.f_workdir and config.init.f_file both give F's weights: set one"),
])
def test_conflicting_initialisations_are_refused(tmp_path, init, message):
    config = tiny_config(str(tmp_path / "tfds"))
    for field, value in init.items():
        config.init[field] = value
    with pytest.raises(errors.ConfigError, match=message):
        preflight.check_config(config)
