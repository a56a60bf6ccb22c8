"""Checkpoints: exact resume, interrupted saves, incompatible workdirs."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from lsd_jax import checkpoint, train
from train_helpers import REPO_ROOT, tiny_config, tiny_programs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_resume_continues_exactly(data_dir, tmp_path):
    """4 steps straight through == 2 steps, stop, resume to 4 (same seed, CPU)."""
    programs = tiny_programs()
    config = tiny_config(data_dir)
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
               zip(leaves(half.states.f.params), leaves(straight.states.f.params)))

    # The checkpoints hold what a resume needs: states, the step, the base key, the data position.
    manager = checkpoint.make_manager(str(tmp_path / "resumed"), read_only=True)
    assert checkpoint.available_steps(manager) == [2, 4]
    restored = checkpoint.restore(manager, train.abstract_states(config, programs),
                                  train.base_key(config))
    manager.close()
    assert restored.step == 4 and restored.meta["data_batches_consumed"] == 4
    assert (jax.random.key_data(restored.base_key) ==
            jax.random.key_data(train.base_key(config))).all()
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


def test_incompatible_workdir_says_what_differs(tmp_path):
    config = tiny_config(str(tmp_path / "tfds"))
    checkpoint.write_config(str(tmp_path), config)
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
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["width"] == 1 / 16


def test_restoring_a_missing_step_names_the_steps_there(tmp_path):
    manager = checkpoint.make_manager(str(tmp_path), asynchronous=False)
    checkpoint.save(manager, 3, {"w": jax.numpy.ones(2)}, jax.random.key(0))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 5 .*steps \[3\]"):
        checkpoint.restore(manager, {"w": jax.numpy.ones(2)}, jax.random.key(0), step=5)
    manager.close()
