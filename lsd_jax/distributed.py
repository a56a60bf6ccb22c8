"""Starting JAX's multi-process runtime: one process per host (TPU pods) or per GPU (SLURM).

Must run before anything touches a JAX device.
"""
from __future__ import annotations

import logging

import jax

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
        raise ValueError(f"num_processes={num_processes}: expected a positive number")
    if process_id is not None and num_processes is not None and \
            not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id}: expected a value in [0, {num_processes})")
    if coordinator_address is not None and ":" not in coordinator_address:
        raise ValueError(f"coordinator_address={coordinator_address!r}: expected 'host:port'")

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
        logging.info("No multi-process configuration found: running as a single process.")
        return False
    logging.info("jax.distributed started: process %d of %d, coordinator %s",
                 jax.process_index(), jax.process_count(),
                 coordinator_address or "auto-detected")
    return True
