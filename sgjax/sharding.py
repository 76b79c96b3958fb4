"""The mesh and the logical-axis rules: the only place that knows how arrays map onto devices.

The same code runs on one CPU device and on a pod: a 1-device mesh is just a mesh of shape
(1, 1, 1). Params carry logical axis names (see sgjax.models.dit); `rules` map those names onto
mesh axes. All axes are `Auto` (the compiler propagates shardings from the jit boundary), chosen
on purpose: jax >= 0.10's `make_mesh` would otherwise default to Explicit axes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sgjax import errors

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis. FSDP shards the model width; heads and MLP hidden go to `tensor`.
LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", None),
    ("patch", None),
    ("kv", None),
)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Sizes of the (data, fsdp, tensor) axes; one axis may be -1 (the rest of the devices)."""
  sizes = {a: int(mesh_config[a]) for a in AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise errors.UserError("mesh", f"at most one axis may be -1, got {free}")
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if num_devices % fixed:
    raise errors.UserError(f"mesh = {sizes}", f"the fixed axis sizes (product {fixed}) must "
                           f"divide the device count {num_devices}")
  if free:
    sizes[free[0]] = num_devices // fixed
  if int(np.prod(list(sizes.values()))) != num_devices:
    raise errors.UserError(f"mesh = {sizes}", f"product must equal the device count {num_devices}")
  return sizes


def data_parallel_size(mesh_config: Mapping[str, int], num_devices: int) -> int:
  """How many ways a batch is split: mesh.data * mesh.fsdp on `num_devices` devices."""
  shape = mesh_shape(mesh_config, num_devices)
  return int(np.prod([shape[a] for a in BATCH_AXES]))


def check_config(config, num_devices: int | None = None) -> None:
  """The `mesh` section (each axis size: its declaration): given the device count, that the
  sizes fit the devices."""
  if num_devices is not None:
    mesh_shape(config.mesh, num_devices)


def num_slices(devices) -> int:
  """TPU slices the devices span (multi-slice pods); 1 on CPU, GPU and a single slice."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def build_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh laid out along the physical topology.

  Across several TPU slices the data axis spans the slices (their link is the slow data-center
  network, and data parallelism only all-reduces gradients over it once per step); fsdp and
  tensor stay inside a slice, on ICI.
  """
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  sizes = tuple(shape[a] for a in AXES)
  slices = num_slices(devices)
  if slices == 1:
    return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
  if shape["data"] % slices:
    raise errors.UserError(f"mesh.data = {shape['data']}", f"must be a multiple of the {slices} "
                           "slices (the data axis spans the slices over DCN)")
  ici = (shape["data"] // slices, shape["fsdp"], shape["tensor"])
  grid = mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices,
                                              allow_split_physical_axes=True)
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def process_batch_rows(mesh: Mesh, global_batch: int) -> np.ndarray:
  """Rows of every global batch that this process's devices hold, ascending.

  `jax.make_array_from_process_local_data` places a process's local rows onto these global
  rows in this order, so the data pipeline reads exactly them. With JAX's usual device order
  they form one block (process p of P: rows [p*B/P, (p+1)*B/P)); a pod mesh laid out along the
  physical topology may interleave hosts, which this handles the same way.
  """
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  rows = {r for index in index_map.values() for r in range(*index[0].indices(global_batch))}
  return np.array(sorted(rows), np.int64)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree of (possibly boxed) abstract values with logical axis names.

  Leaves without names (optimizer counters, unannotated arrays) are replicated.
  """
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def logical_specs(abstract_tree: Any) -> Any:
  """Mesh-axis PartitionSpecs of a tree of boxed values (the rules applied, no mesh needed)."""
  specs = nn.get_partition_spec(abstract_tree)
  return jax.tree.map(lambda s: nn.logical_to_mesh_axes(s, LOGICAL_RULES), specs,
                      is_leaf=lambda x: isinstance(x, P))


def constrain(tree: Any, specs: Any) -> Any:
  """`with_sharding_constraint` against the mesh set by `jax.set_mesh`; a no-op without one.

  Used on the gradients: pinned to the parameters' FSDP shards, XLA reduces each weight
  gradient with a reduce-scatter onto the shard the optimizer updates, instead of an
  all-reduce at full shape followed by a slice (docs/scaling.md, "Where the gradients are
  reduced").
  """
  if jax.sharding.get_abstract_mesh().empty:
    return tree
  return jax.tree.map(jax.lax.with_sharding_constraint, tree, specs)


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pins an activation's leading (batch) axis to the data-parallel axes, the rest replicated;
  a no-op without a mesh set (see `constrain`)."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))
