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

The run's config is kept next to the checkpoints (`<workdir>/config.json`); a run started on a
workdir written with a different network or label space is refused with the differing fields
(`check_compatible`), instead of failing inside orbax with an array-shape message.
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

CHECKPOINT_SUBDIR = "checkpoints"
CONFIG_FILE = "config.json"

# Config fields that decide the shape or meaning of what a checkpoint holds: a workdir written
# with other values cannot be resumed or evaluated with this config. Everything else (number of
# steps, learning rates, logging, data paths...) may change between runs on one workdir.
STRUCTURAL_FIELDS = ("method", "num_classes", "model.width", "data.class_set")


class IncompatibleWorkdirError(ValueError):
    """The workdir holds a run whose config differs in a structural field."""


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
    config the workdir was written with; logs the other differences."""
    saved = read_config(workdir)
    if saved is None:
        return
    structural = config_differences(saved, config, STRUCTURAL_FIELDS)
    if structural:
        lines = "\n".join(f"  {k}: workdir has {a!r}, this config has {b!r}"
                          for k, (a, b) in structural.items())
        raise IncompatibleWorkdirError(
            f"workdir {workdir} holds a run with an incompatible config ({config_path(workdir)}):"
            f"\n{lines}\nUse another --workdir, or set these fields back "
            f"(e.g. --config.{next(iter(structural))}=...).")
    others = config_differences(saved, config)
    if others:
        logging.info("Config differs from the one %s was started with (allowed): %s", workdir,
                     ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in others.items()))


# ----------------------------------------------------------------------------- manager

def make_manager(workdir: str, max_to_keep: int | None = 3, asynchronous: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """The run's CheckpointManager. Leftover temporary directories of an interrupted save are
    removed when it opens (they are never taken for checkpoints either way)."""
    if max_to_keep is not None and max_to_keep < 1:
        raise ValueError(f"checkpoint.max_to_keep={max_to_keep}: expected a positive number, or "
                         "None to keep every checkpoint")
    directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_SUBDIR)) \
        if "://" not in workdir else f"{workdir.rstrip('/')}/{CHECKPOINT_SUBDIR}"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=asynchronous, cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(directory, item_names=("state", "meta"), options=options)


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


def restore(manager: ocp.CheckpointManager, like_states, like_key: jax.Array,
            step: int | None = None) -> Restored | None:
    """The checkpoint of `step` (the latest when None), shaped and placed like `like_states`;
    None when the manager holds no checkpoint and no step was asked for."""
    steps = available_steps(manager)
    if step is None:
        if not steps:
            return None
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {manager.directory}; the "
                                f"checkpoints there are of steps {steps or 'none'}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(like_states, like_key))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    key_impl = jax.random.key_impl(like_key)
    base_key = jax.random.wrap_key_data(restored.state["base_key"], impl=key_impl)
    return Restored(step, restored.state["states"], base_key, dict(restored.meta))
