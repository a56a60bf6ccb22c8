"""Checkpoints of a training run: orbax CheckpointManager over `<workdir>/checkpoints`.

One checkpoint per saved step holds two items:
  state  the three train states (parameters, frozen variables, optimizer states) and the run's
         base RNG key (as raw key data), saved with `StandardSave` from every process;
  meta   JSON: the step, and what restores the data stream's position (the number of batches
         consumed, which with `data.seed` determines the stream exactly: the pipeline skips that
         many batches when it restarts, see `lsd_jax.data.pipeline.train_batches`).

Saving is asynchronous: `save` returns once the arrays are copied off the devices and the write
continues in the background; `close` (or `wait`) waits for it. Orbax writes every checkpoint
into a temporary directory and renames it when complete, so a run killed at any moment, even in
the middle of a save, leaves the previous checkpoints restorable: a half-written one is never
reported as the latest, and is removed when the next manager opens the directory.

A failed save (disk full, lost permissions) surfaces in orbax's background thread; `Saver`
collects each save's outcome as soon as its write has ended, so the run stops at the next step
boundary naming the step that failed and the last good checkpoint, instead of orbax raising it
at some later save.

The run's config is kept next to the checkpoints (`<workdir>/config.json`); a run started on a
workdir whose checkpoints were written with a different network or label space is refused with
the differing fields (`check_compatible`), instead of failing inside orbax with an array-shape
message. A workdir without a checkpoint (e.g. a start refused or stopped before its first save)
is fresh: its config.json is simply replaced.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping

import jax
import ml_collections
import orbax.checkpoint as ocp

from lsd_jax.errors import UserError, WorkdirError

CHECKPOINT_SUBDIR = "checkpoints"
CONFIG_FILE = "config.json"

# Config fields that decide the shape or meaning of what a checkpoint holds: a workdir written
# with other values cannot be resumed or evaluated with this config. Everything else (number of
# steps, learning rates, logging, data paths...) may change between runs on one workdir.
# A field the workdir's config.json lacks (written before the field existed) is not compared.
STRUCTURAL_FIELDS = ("method", "num_classes", "model.width", "data.class_set", "model.backbone",
                     "model.resnet_blocks", "adaptsegnet.multi_level", "advent.multi_level",
                     "advent.kind", "adversarial.tied", "adversarial.d_input",
                     "adversarial.discriminator", "adversarial.d_hidden",
                     "source_only.optimizer")


class IncompatibleWorkdirError(UserError, ValueError):
    """The workdir holds checkpoints of a run whose config differs in a structural field."""


class CheckpointMissingError(UserError, FileNotFoundError):
    """No checkpoint (or none of the step asked for) to restore."""


class SaveFailedError(UserError):
    """A checkpoint could not be written; the message names the step and the last good one."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """What a checkpoint gives back."""

    step: int
    states: Any
    base_key: jax.Array  # a typed PRNG key
    meta: dict


# ----------------------------------------------------------------------------- config files

def flatten_config(config: ml_collections.ConfigDict | Mapping) -> dict[str, Any]:
    """{"model.width": 0.0625, ...}: dotted paths to JSON-ready leaves (tuples as lists)."""
    tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    flat = {}

    def visit(prefix, node):
        if isinstance(node, Mapping):
            for key, value in node.items():
                visit(f"{prefix}{key}.", value)
            if not node and prefix:
                flat[prefix[:-1]] = {}
        else:
            flat[prefix[:-1]] = list(node) if isinstance(node, tuple) else node
    visit("", tree)
    return flat


def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Keeps the run's config in the workdir (process 0 only; the file is small)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    path = config_path(workdir)
    with open(path + ".tmp", "w") as f:
        json.dump(config.to_dict(), f, indent=1, sort_keys=True, default=repr)
        f.write("\n")
    os.replace(path + ".tmp", path)  # atomic: a killed run never leaves half a file


def read_config(workdir: str) -> dict | None:
    path = config_path(workdir)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def config_differences(saved: Mapping, config: ml_collections.ConfigDict,
                       fields: tuple[str, ...] | None = None) -> dict[str, tuple[Any, Any]]:
    """{field: (saved value, this config's value)} for the fields that differ."""
    old, new = flatten_config(saved), flatten_config(config)
    keys = sorted(set(old) | set(new)) if fields is None else fields
    missing = object()
    diffs = {}
    for key in keys:
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            diffs[key] = (None if a is missing else a, None if b is missing else b)
    return diffs


def check_compatible(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Raises IncompatibleWorkdirError naming every structural field that differs from the
    config the workdir's checkpoints were written with; logs the other differences. Without a
    checkpoint there is nothing to be incompatible with: the workdir counts as fresh."""
    saved = read_config(workdir)
    if saved is None or not saved_steps(workdir):
        return
    recorded = flatten_config(saved)
    structural = config_differences(saved, config,
                                    tuple(f for f in STRUCTURAL_FIELDS if f in recorded))
    if structural:
        fields = "; ".join(f"{k}: workdir has {a!r}, this config has {b!r}"
                           for k, (a, b) in structural.items())
        raise IncompatibleWorkdirError(
            f"workdir {workdir} holds checkpoints of a run with an incompatible config "
            f"({config_path(workdir)}): {fields}. Use another --workdir, or set these fields "
            f"back (e.g. --config.{next(iter(structural))}=...).")
    others = config_differences(saved, config)
    if others:
        logging.info("Config differs from the one %s was started with (allowed): %s", workdir,
                     ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in others.items()))


# ----------------------------------------------------------------------------- workdir

def check_workdir(workdir: str) -> None:
    """Raises WorkdirError unless the workdir is, or can be created as, a writable directory.

    Checked without writing anything, so that a start refused for this or any later reason
    leaves the workdir as it was. (Object stores, `gs://...`, only tell by writing.)
    """
    if "://" in workdir:
        return
    target = os.path.abspath(workdir)
    existing = target
    while not os.path.exists(existing):  # the nearest part of the path that exists
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise WorkdirError(f"--workdir {workdir}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "it" if existing == target else f"its parent {existing}"
        raise WorkdirError(f"--workdir {workdir}: {what} is not writable (a read-only file "
                           "system, or no permission); choose another --workdir")


def checkpoint_directory(workdir: str) -> str:
    return (os.path.abspath(os.path.join(workdir, CHECKPOINT_SUBDIR)) if "://" not in workdir
            else f"{workdir.rstrip('/')}/{CHECKPOINT_SUBDIR}")


def saved_steps(workdir: str) -> list[int]:
    """The steps of the workdir's complete checkpoints, creating nothing."""
    manager = make_manager(workdir, None, asynchronous=False, read_only=True)
    try:
        return available_steps(manager)
    finally:
        manager.close()


# ----------------------------------------------------------------------------- manager

def make_manager(workdir: str, max_to_keep: int | None = 3, asynchronous: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """The run's CheckpointManager. Leftover temporary directories of an interrupted save are
    removed when it opens (they are never taken for checkpoints either way).

    read_only: for restoring; creates, cleans up and saves nothing. (Orbax's own read_only
    option is not used: it only adds warnings to the console, and nothing here saves with
    such a manager.)
    """
    if max_to_keep is not None and max_to_keep < 1:
        raise ValueError(f"checkpoint.max_to_keep={max_to_keep}: expected a positive number, or "
                         "None to keep every checkpoint")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep, create=not read_only,
        enable_async_checkpointing=asynchronous and not read_only,
        cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(checkpoint_directory(workdir), item_names=("state", "meta"),
                                 options=options)


def _state_tree(states, base_key: jax.Array) -> dict:
    return {"states": states, "base_key": jax.random.key_data(base_key)}


def save(manager: ocp.CheckpointManager, step: int, states, base_key: jax.Array,
         meta: Mapping[str, Any] | None = None) -> bool:
    """Starts an asynchronous save of `step` (every process calls this); returns whether it
    saved (a step already saved is not saved again)."""
    if step in manager.all_steps():
        return False
    meta = {"step": int(step), "data_batches_consumed": int(step), **dict(meta or {})}
    return manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_state_tree(states, base_key)),
        meta=ocp.args.JsonSave(meta)), force=True)


def available_steps(manager: ocp.CheckpointManager) -> list[int]:
    return sorted(manager.all_steps())


def _chosen_step(manager: ocp.CheckpointManager, step: int | None) -> int | None:
    """`step` if the manager holds it (CheckpointMissingError if not), else the latest step;
    None when the manager holds no checkpoint and no step was asked for."""
    steps = available_steps(manager)
    if step is None:
        return steps[-1] if steps else None
    if step not in steps:
        raise CheckpointMissingError(f"no checkpoint of step {step} in {manager.directory}; "
                                     f"the checkpoints there are of steps {steps or 'none'}")
    return step


def restore(manager: ocp.CheckpointManager, like_states, like_key: jax.Array,
            step: int | None = None) -> Restored | None:
    """The checkpoint of `step` (the latest when None), shaped and placed like `like_states`;
    None when the manager holds no checkpoint and no step was asked for."""
    step = _chosen_step(manager, step)
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(like_states, like_key))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except ValueError as error:  # orbax: the saved tree is not the one asked for
        first = str(error).strip().splitlines()
        raise IncompatibleWorkdirError(
            f"the checkpoint of step {step} in {manager.directory} holds other states than this "
            "config's (another method, network or setting that shapes them); use another "
            f"--workdir, or the config it was written with. orbax: {' '.join(first[:3])}"
        ) from error
    key_impl = jax.random.key_impl(like_key)
    base_key = jax.random.wrap_key_data(restored.state["base_key"], impl=key_impl)
    return Restored(step, restored.state["states"], base_key, dict(restored.meta))


def read_network(workdir: str, name: str, step: int | None = None) -> tuple[int, dict]:
    """One network's variables ({"params", "frozen", "batch_stats"}) from a run's checkpoint
    of `step` (the latest when None), whatever that run's method and optimizers were; returns
    (step, variables). For starting a run from a finished one (`config.init.f_workdir`).

    The whole checkpoint is read into host memory as saved (no target structure is needed),
    then everything but the network is dropped.
    """
    manager = make_manager(workdir, None, asynchronous=False, read_only=True)
    try:
        step = _chosen_step(manager, step)
        if step is None:
            raise CheckpointMissingError(f"{workdir!r} holds no checkpoint (expected the workdir "
                                         "of a run that has saved one)")
        saved = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore())).state["states"]
    finally:
        manager.close()
    if name not in saved:
        raise CheckpointMissingError(f"the checkpoint of step {step} in {workdir!r} has no "
                                     f"network {name!r} (it has {sorted(saved)})")
    network = saved[name]
    return step, {"params": network["params"], "frozen": network.get("frozen") or {},
                  "batch_stats": network.get("batch_stats") or {}}


# ----------------------------------------------------------------------------- saving

def _error_text(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


class Saver:
    """The run's saves through `manager`, each one's outcome collected as soon as it is known.

    An asynchronous save returns once the arrays are copied off the devices; if the background
    write then fails (disk full, lost permission), orbax only raises it at the next save,
    maybe thousands of steps later. `poll()`, called at every step boundary, costs nothing
    while the write goes on and collects the outcome once it has ended, so that a failed save
    stops the run at once with SaveFailedError: the step that failed, the error, and the last
    good checkpoint (which stays restorable: orbax never renames a half-written one into place).
    """

    def __init__(self, manager: ocp.CheckpointManager):
        self.manager = manager
        self.in_flight: int | None = None  # the step being written in the background
        steps = available_steps(manager)
        self.last_good: int | None = steps[-1] if steps else None

    def save(self, step: int, states, base_key: jax.Array) -> None:
        """Starts saving `step` (every process calls this); a step already saved is skipped."""
        self.finish()  # orbax would wait for the previous save anyway; its outcome comes first
        try:
            started = save(self.manager, step, states, base_key)
        except Exception as error:  # a synchronous save, or the start of an asynchronous one
            raise self._failure(step, error) from error
        if started:
            self.in_flight = step
            self.poll()  # a synchronous save has ended already

    def poll(self) -> None:
        """Raises SaveFailedError if the save in flight has ended and failed."""
        if self.in_flight is not None and not self.manager.is_saving_in_progress():
            self.finish()

    def finish(self) -> None:
        """Waits for the save in flight; raises SaveFailedError if it failed."""
        if self.in_flight is None:
            return
        step, self.in_flight = self.in_flight, None
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            raise self._failure(step, error) from error
        self.last_good = step

    def close(self) -> None:
        """Finishes the save in flight (raising if it failed) and closes the manager."""
        try:
            self.finish()
        finally:
            self.manager.close()

    def latest(self) -> int | None:
        """The newest checkpoint once the save in flight (of a state already checked) ends."""
        return self.in_flight if self.in_flight is not None else self.last_good

    def describe(self, step: int | None) -> str:
        return (f"step {step} in {self.manager.directory}" if step is not None
                else "none: no checkpoint was saved before")

    def _failure(self, step: int, error: BaseException) -> SaveFailedError:
        return SaveFailedError(
            f"saving the checkpoint of step {step} failed: {_error_text(error)}. The last good "
            f"checkpoint is {self.describe(self.last_good)}; free space or fix the permissions "
            "there, then run the same command again to resume from it.")
