"""Checkpoints: exact resume, interrupted and failed saves, Ctrl-C, incompatible workdirs."""
import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from lsd_jax import checkpoint, errors, train
from lsd_jax.programs import abstract_states, base_key
from train_helpers import REPO_ROOT, tiny_config, tiny_programs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.mark.slow
@pytest.mark.parametrize("variant, backbone", [("lsd", "fcn8s_vgg16"),
                                               ("adaptsegnet_multi", "fcn8s_vgg16"),
                                               ("adaptsegnet_multi", "deeplabv2_resnet101"),
                                               ("adda", "fcn8s_vgg16"),
                                               ("dacs_mic", "fcn8s_vgg16")])
def test_resume_continues_exactly(data_dir, tmp_path, variant, backbone):
    """4 steps straight through == 2 steps, stop, resume to 4 (same seed, CPU): every network's
    state, whatever the method's networks are (DeepLab's BatchNorm statistics included,
    ADDA's fixed source network, which has no optimizer state, and DACS's mean teacher, whose
    moving average is counted by its own state)."""
    programs = tiny_programs(variant, backbone)
    config = tiny_config(data_dir, variant, backbone)
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"), programs=programs,
                                        evaluate_at_end=False)

    config.train.num_steps = 2
    half = train.train_and_evaluate(config, str(tmp_path / "resumed"), programs=programs,
                                    evaluate_at_end=False)
    assert half.step == 2
    config.train.num_steps = 4
    resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"), programs=programs,
                                       evaluate_at_end=False)
    assert straight.step == resumed.step == 4
    for a, b in zip(leaves(straight.states), leaves(resumed.states), strict=True):
        np.testing.assert_array_equal(a, b)
    # And the parameters did change: the comparison is not between two untouched states.
    assert any(not np.array_equal(a, b) for a, b in
               zip(leaves(half.states["f"].params), leaves(straight.states["f"].params)))
    if "teacher" in straight.states:  # the average moved on and counted its updates
        assert int(straight.states["teacher"].opt_state.count) == 4
        assert any(not np.array_equal(a, b) for a, b in zip(
            leaves(half.states["teacher"].params), leaves(straight.states["teacher"].params)))
    if backbone != "fcn8s_vgg16":  # the statistics are saved, restored and moved on
        assert any(not np.array_equal(a, b) for a, b in zip(
            leaves(half.states["f"].batch_stats), leaves(straight.states["f"].batch_stats)))

    # The checkpoints hold what a resume needs: states, the step, the base key, the data position.
    manager = checkpoint.make_manager(str(tmp_path / "resumed"), read_only=True)
    assert checkpoint.available_steps(manager) == [2, 4]
    restored = checkpoint.restore(manager, abstract_states(config, programs),
                                  base_key(config))
    manager.close()
    assert restored.step == 4 and restored.meta["data_batches_consumed"] == 4
    assert (jax.random.key_data(restored.base_key) ==
            jax.random.key_data(base_key(config))).all()
    for a, b in zip(leaves(restored.states), leaves(straight.states), strict=True):
        np.testing.assert_array_equal(a, b)


KILLED_MID_SAVE = """
import os, sys
import jax, jax.numpy as jnp
from lsd_jax import checkpoint
workdir = sys.argv[1]
key = jax.random.key(0)
manager = checkpoint.make_manager(workdir, max_to_keep=None)
checkpoint.save(manager, 1, {"w": jnp.full((4_000_000,), 1.0)}, key)
manager.wait_until_finished()
checkpoint.save(manager, 2, {"w": jnp.full((4_000_000,), 2.0)}, key)
os._exit(0)  # killed while step 2 is written in the background
"""


@pytest.mark.slow
def test_a_save_interrupted_at_any_moment_leaves_a_restorable_workdir(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED_MID_SAVE))
    subprocess.run([sys.executable, str(script), str(tmp_path / "run")], check=True,
                   cwd=REPO_ROOT, capture_output=True, timeout=120)
    # Whatever the kill left behind (a temporary directory, or the finished step 2), the
    # latest complete checkpoint restores, with its own values.
    manager = checkpoint.make_manager(str(tmp_path / "run"))
    like = {"w": jax.numpy.zeros((4_000_000,))}
    restored = checkpoint.restore(manager, like, jax.random.key(0))
    manager.close()
    assert restored.step in (1, 2)
    assert np.all(np.asarray(restored.states["w"]) == restored.step)
    # A half-written checkpoint of a later step is never taken for the latest.
    steps_dir = tmp_path / "run" / "checkpoints"
    partial = steps_dir / "7.orbax-checkpoint-tmp"
    partial.mkdir()
    (partial / "state").mkdir()
    (partial / "state" / "manifest.ocdbt").write_bytes(b"\0" * 10)
    manager = checkpoint.make_manager(str(tmp_path / "run"))
    assert checkpoint.available_steps(manager)[-1] == restored.step
    manager.close()


def save_a_checkpoint(workdir, step=2):
    manager = checkpoint.make_manager(str(workdir), asynchronous=False)
    checkpoint.save(manager, step, {"w": jax.numpy.ones(2)}, jax.random.key(0))
    manager.close()


def test_incompatible_workdir_says_what_differs(tmp_path):
    config = tiny_config(str(tmp_path / "tfds"))
    checkpoint.write_config(str(tmp_path), config)
    save_a_checkpoint(tmp_path)
    config.model.width = 1 / 8
    config.num_classes = 16
    config.data.class_set = "synthia16"
    config.train.num_steps = 99  # allowed to change
    with pytest.raises(checkpoint.IncompatibleWorkdirError) as error:
        checkpoint.check_compatible(str(tmp_path), config)
    message = str(error.value)
    assert "model.width: workdir has 0.0625, this config has 0.125" in message
    assert "num_classes: workdir has 19, this config has 16" in message
    assert "data.class_set" in message and "train.num_steps" not in message
    assert "\n" not in message
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["width"] == 1 / 16


def test_states_of_another_layout_are_a_clear_error(tmp_path):
    """A checkpoint whose states are not this config's (here: another network set) is refused
    with the step and the workdir named, not with orbax's traceback."""
    save_a_checkpoint(tmp_path / "run")
    manager = checkpoint.make_manager(str(tmp_path / "run"), read_only=True)
    with pytest.raises(checkpoint.IncompatibleWorkdirError,
                       match=r"the checkpoint of step 2 in .*run/checkpoints holds other states "
                             r"than this config's"):
        checkpoint.restore(manager, {"w": jax.numpy.ones(2), "d": jax.numpy.ones(3)},
                           jax.random.key(0))
    manager.close()


def test_structural_fields_the_workdir_predates_are_not_compared(tmp_path):
    config = tiny_config(str(tmp_path / "tfds"), "adda")
    checkpoint.write_config(str(tmp_path), config)
    save_a_checkpoint(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["adversarial"]  # as written before the framework existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    checkpoint.check_compatible(str(tmp_path), config)
    saved["adversarial"] = {"tied": True}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(checkpoint.IncompatibleWorkdirError,
                       match="adversarial.tied: workdir has True, this config has False"):
        checkpoint.check_compatible(str(tmp_path), config)


def test_a_workdir_without_checkpoint_is_fresh(tmp_path):
    """A start that stopped before its first checkpoint left config.json: the corrected
    command is not refused, and its config replaces the old one."""
    config = tiny_config(str(tmp_path / "tfds"))
    checkpoint.write_config(str(tmp_path), config)
    config.model.width = 1 / 8
    checkpoint.check_compatible(str(tmp_path), config)
    checkpoint.write_config(str(tmp_path), config)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["width"] == 1 / 8


def test_an_unusable_workdir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(errors.WorkdirError, match=r"file/run: .*file is not a directory"):
        checkpoint.check_workdir(str(tmp_path / "file" / "run"))
    # A read-only file system (root may write anywhere else, so the check is simulated).
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(errors.WorkdirError, match=rf"{tmp_path}/new/run: its parent {tmp_path} "
                                                  "is not writable"):
        checkpoint.check_workdir(str(tmp_path / "new" / "run"))
    assert sorted(os.listdir(tmp_path)) == ["file"]


def counting_steps(programs):
    """The programs with a step function that counts its calls."""
    calls = []

    def step(states, batch, key):
        calls.append(1)
        return programs.compiled.step(states, batch, key)
    return dataclasses.replace(programs, compiled=programs.compiled._replace(step=step)), calls


@pytest.mark.slow
@pytest.mark.parametrize("asynchronous", [True, False])
def test_a_failed_save_stops_the_run_at_once_naming_the_last_good_checkpoint(
        data_dir, tmp_path, monkeypatch, asynchronous):
    """The disk is full when step 4's checkpoint is written (in the background when
    asynchronous): the run stops at the next step boundary at the latest, not at a later
    save, and step 2's checkpoint stays the last good one."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler
    handler = json_checkpoint_handler.JsonCheckpointHandler
    write_meta = handler._save_fn

    async def disk_full_at_step_4(self, item, directory):
        if item.get("step") == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await write_meta(self, item, directory)

    monkeypatch.setattr(handler, "_save_fn", disk_full_at_step_4)
    programs, calls = counting_steps(tiny_programs())
    config = tiny_config(data_dir)
    config.train.num_steps = 10
    config.checkpoint.asynchronous = asynchronous
    workdir = str(tmp_path / "run")
    with pytest.raises(checkpoint.SaveFailedError, match=(
            r"^saving the checkpoint of step 4 failed: \[Errno 28\] No space left on device\. "
            rf"The last good checkpoint is step 2 in {workdir}/checkpoints;")):
        train.train_and_evaluate(config, workdir, programs=programs, evaluate_at_end=False)
    # Synchronous: at the save itself; in the background: before the next save (step 6).
    assert len(calls) == 4 if not asynchronous else len(calls) <= 6
    assert checkpoint.saved_steps(workdir) == [2]


@pytest.mark.slow
def test_ctrl_c_as_a_save_begins_completes_that_save_and_stops(data_dir, tmp_path, monkeypatch):
    start_save = checkpoint.save

    def save_with_ctrl_c(manager, step, *args, **kwargs):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # lands as the save of step 4 begins
        return start_save(manager, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", save_with_ctrl_c)
    programs, calls = counting_steps(tiny_programs())
    # Python's KeyboardInterrupt handler, or SIG_IGN in a process started in the background
    handler_before = signal.getsignal(signal.SIGINT)
    config = tiny_config(data_dir)
    config.train.num_steps = 10
    workdir = str(tmp_path / "run")
    with pytest.raises(errors.Interrupted, match=(
            rf"^interrupted \(Ctrl-C\); the last good checkpoint is step 4 in {workdir}/")):
        train.train_and_evaluate(config, workdir, programs=programs, evaluate_at_end=False)
    assert len(calls) == 4
    assert checkpoint.saved_steps(workdir) == [2, 4]
    assert signal.getsignal(signal.SIGINT) is handler_before  # the run's own one is removed


def test_restoring_a_missing_step_names_the_steps_there(tmp_path):
    manager = checkpoint.make_manager(str(tmp_path), asynchronous=False)
    checkpoint.save(manager, 3, {"w": jax.numpy.ones(2)}, jax.random.key(0))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 5 .*steps \[3\]"):
        checkpoint.restore(manager, {"w": jax.numpy.ones(2)}, jax.random.key(0), step=5)
    manager.close()
