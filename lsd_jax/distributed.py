"""Starting JAX's multi-process runtime: one process per host (TPU pods) or per GPU (SLURM),
and what SIGTERM (preemption) and SIGINT (Ctrl-C) mean to a training run, on one process or many.

`initialize_distributed` must run before anything touches a JAX device.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Callable

import jax

from lsd_jax.errors import Interrupted, UsageError

# The message jax.distributed.initialize() raises when it was given no coordinator address and
# recognised no cluster (Cloud TPU, SLURM, Open MPI, Kubernetes...): a plain single-process run.
_NO_CLUSTER_MESSAGE = "coordinator_address should be defined"


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           initialization_timeout: int = 300) -> bool:
    """Start jax.distributed if this run spans several processes; returns whether it did.

    - Any of the three arguments given: they are passed on, and JAX fills in the rest from the
      cluster environment it recognises (e.g. SLURM gives the process id), or fails loudly.
    - None given: JAX looks for a cluster environment itself (Cloud TPU pod metadata, SLURM
      variables, Open MPI, JAX_COORDINATOR_ADDRESS). If it finds none, this is a single-process
      run and nothing happens (returns False).
    - Already initialised: nothing happens (returns True).

    Args:
      coordinator_address: "host:port" of process 0, reachable from every process.
      num_processes: total number of processes.
      process_id: this process's index in [0, num_processes).
      initialization_timeout: seconds to wait for all processes to connect.
    """
    if jax.distributed.is_initialized():
        return True
    if num_processes is not None and num_processes < 1:
        raise UsageError(f"--num_processes={num_processes}: expected a positive number")
    if process_id is not None and num_processes is not None and \
            not 0 <= process_id < num_processes:
        raise UsageError(f"--process_id={process_id}: expected a value in "
                         f"[0, {num_processes})")
    if coordinator_address is not None and ":" not in coordinator_address:
        raise UsageError(f"--coordinator_address={coordinator_address!r}: expected 'host:port'")

    configured = any(v is not None for v in (coordinator_address, num_processes, process_id))
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id,
                                   initialization_timeout=initialization_timeout)
    except ValueError as error:
        # Only "no cluster found and nothing configured" means single process; anything else
        # (a cluster found but misconfigured) must not silently start N independent runs.
        if configured or _NO_CLUSTER_MESSAGE not in str(error):
            raise
        logging.debug("No multi-process configuration found: running as a single process.")
        return False
    logging.info("jax.distributed started: process %d of %d, coordinator %s",
                 jax.process_index(), jax.process_count(),
                 coordinator_address or "auto-detected")
    return True


class StopSignals:
    """SIGTERM and SIGINT during training, turned into decisions at step boundaries.

    SIGTERM is how SLURM and Cloud TPU announce a preemption: the run saves a checkpoint at the
    next step boundary and stops (`preempted(step)`). With several processes that must be the
    same step on all of them, since saving is collective: JAX's preemption sync manager, started
    by jax.distributed, catches SIGTERM on any process and `reached_preemption(step)` (orbax's
    `CheckpointManager.reached_preemption`) turns true on every process at one agreed step. A
    Python handler for SIGTERM would replace JAX's, so none is installed then; a single process
    records SIGTERM itself.

    SIGINT (Ctrl-C) stops the run at once (KeyboardInterrupt), except inside `deferred()`
    blocks, where it takes effect when the block ends. Checkpoint saves and the closing of the
    checkpoint manager run in such blocks: orbax interrupted between starting its background
    write and registering it leaves a thread that keeps the process from ever exiting. So do
    the flushes of the summary writer, which join its thread: Python 3.11's Thread.join,
    interrupted, marks a thread that is still running as finished, and the writer would then be
    closed under a write in progress (a WriteSummary error in the log). A second
    Ctrl-C inside such a block abandons the save: the process exits at once with status 130, and
    the half-written checkpoint is ignored (and removed by the next run).

    A context manager: the handlers are installed on entry (from the main thread only: Python
    allows no other) and the previous ones restored on exit.
    """

    def __init__(self, reached_preemption: Callable[[int], bool] = lambda step: False):
        self._reached_preemption = reached_preemption
        self._terminated = False  # SIGTERM received by this (single) process
        self._interrupt_pending = False
        self._activities: list[str] = []  # what the open deferred() blocks wait for, outermost first
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
            if not jax.distributed.is_initialized():
                self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def preempted(self, step: int) -> bool:
        """Whether to save and stop after `step`; call it at every step, on every process."""
        reached = self._reached_preemption(step)  # called every step, as JAX's protocol needs
        return reached or self._terminated

    @contextlib.contextmanager
    def deferred(self, activity: str = "the checkpoint save"):
        """A block that Ctrl-C does not cut short (see the class docstring); `activity` names
        what it waits for in the message a Ctrl-C inside it prints."""
        self._activities.append(activity)
        try:
            yield
        finally:
            self._activities.pop()
        if not self._activities and self._interrupt_pending:
            self._interrupt_pending = False
            raise KeyboardInterrupt

    def _on_sigterm(self, signum, frame) -> None:
        if not self._terminated:
            logging.warning("SIGTERM: saving a checkpoint after this step, then stopping")
        self._terminated = True

    def _on_sigint(self, signum, frame) -> None:
        if not self._activities:
            raise KeyboardInterrupt
        if self._interrupt_pending:
            logging.warning("Second Ctrl-C: abandoning %s in progress", self._activities[0])
            os._exit(Interrupted.exit_code)
        self._interrupt_pending = True
        logging.warning("Ctrl-C: stopping once %s in progress is complete (Ctrl-C again to "
                        "abandon it)", self._activities[0])
