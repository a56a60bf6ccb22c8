"""Data parallelism over a device mesh: the batch is split over the "data" axis, states replicated.

This is what `pmap` used to do, written the current way: `jax.jit` over a `jax.sharding.Mesh`,
which works the same on one device, on all devices of a host and across the hosts of a pod.
"""

import jax
import numpy as np
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

    Every process must pass the same values (e.g. states built from the same seed). With
    several processes each array goes through host memory (device_put cannot target devices of
    other processes); typed PRNG keys keep their type.
    """
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))
    return jax.tree.map(put, tree)


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


class BatchChecked:
    """A jitted data-parallel function whose batch argument is checked against the mesh before
    jit sees it, so that an indivisible batch gets `check_batch_divisible`'s message rather than
    a sharding error. Calls, `.lower(...)` and other attributes go to the jitted function."""

    def __init__(self, jitted, batch_index: int, mesh: Mesh):
        self._jitted, self._batch_index, self._mesh = jitted, batch_index, mesh

    def _check(self, args):
        leaves = jax.tree.leaves(args[self._batch_index]) if len(args) > self._batch_index else []
        if leaves and getattr(leaves[0], "ndim", 0):
            check_batch_divisible(leaves[0].shape[0], self._mesh)

    def __call__(self, *args):
        self._check(args)
        return self._jitted(*args)

    def lower(self, *args):
        self._check(args)
        return self._jitted.lower(*args)

    def __getattr__(self, name):
        return getattr(self._jitted, name)
