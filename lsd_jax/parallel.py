"""Data parallelism over a device mesh: the batch is split over the "data" axis, states replicated.

This is what `pmap` used to do, written the current way: `jax.jit` over a `jax.sharding.Mesh`,
which works the same on one device, on all devices of a host and across the hosts of a pod.
"""

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None, devices=None) -> Mesh:
    """A one-axis mesh over all (or the first `num_devices`) devices of every process.

    Axis types are Auto: GSPMD propagates the shardings through the update functions.
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices: expected 1..{len(devices)} (the devices available), "
                             f"got {num_devices}")
        devices = devices[:num_devices]
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data axis, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
    devices = mesh.shape[DATA_AXIS]
    if global_batch % devices:
        raise ValueError(f"batch size {global_batch} cannot be split over the {devices} devices of "
                         f"the mesh's '{DATA_AXIS}' axis: use a batch size divisible by {devices}, "
                         "or fewer devices")


def replicate(tree, mesh: Mesh):
    """Places every array of `tree` on all devices of the mesh (e.g. freshly built states).

    Every process must pass the same values (e.g. states built from the same seed).
    """
    return jax.device_put(tree, replicated(mesh))


def global_batch(local_batch, mesh: Mesh):
    """One global batch from each process's own slice (its rows, in process order).

    With one process this is the whole batch, split over the local devices. The global batch
    size is the sum of the processes' slices and must be divisible by the mesh's data axis.
    """
    sharding = batch_sharded(mesh)
    leaves = jax.tree.leaves(local_batch)
    if leaves:
        check_batch_divisible(leaves[0].shape[0] * jax.process_count(), mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                        local_batch)
