"""One mesh, one table of logical-axis rules, and the shardings derived from them.

Model code names axes logically (`embed`, `heads`, `tokens`, …) and never names a mesh axis; this
module maps the names onto the mesh ("data", "fsdp", "context", "tensor"). A mesh axis that does not
divide a dimension is dropped for that dimension (the array is then replicated along it), and
`check_replication` fails a run where that leaves too many parameter bytes replicated.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from a2jax.configs import MeshConfig
from a2jax.errors import ShardingError

MESH_AXES = ("data", "fsdp", "context", "tensor")

# logical name -> mesh axes, in order of preference. Parameters and activations use distinct names
# for the embedding dimension: parameters shard it over fsdp (ZeRO-3), activations keep it whole.
LOGICAL_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # parameters
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("kv", ()),
    ("layers", ()),
    ("conv_in", ()),
    ("conv_out", ("fsdp",)),
    ("norm", ()),
    # activations
    ("batch", ("data", "fsdp")),
    ("tokens", ("context",)),
    ("frames", ()),
    ("height", ("context",)),
    ("width", ()),
    ("context_tokens", ()),
    ("act_embed", ()),
    ("act_heads", ("tensor",)),
    ("act_mlp", ("tensor",)),
    ("act_kv", ()),
    ("channels", ()),
    # attention inside Ulysses context parallelism: all tokens local, heads split over context and
    # tensor (the re-shard tokens <-> heads is one all-to-all)
    ("attn_tokens", ()),
    ("attn_heads", ("context", "tensor")),
)
_RULES = dict(LOGICAL_RULES)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ("data", "fsdp", "context", "tensor") mesh; a size of −1 takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [cfg.data, cfg.fsdp, cfg.context, cfg.tensor]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ShardingError(f"mesh {dict(zip(MESH_AXES, sizes))}: {len(devices)} devices are not "
                          f"divisible by {known}; change the mesh sizes")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ShardingError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                        f"{len(devices)} are present; make the product of the sizes match")
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # CPU and simulated devices have no physical topology to follow
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _axis_sizes(mesh) -> dict[str, int]:
  return dict(mesh.shape)


def logical_to_spec(logical: Sequence[str | None] | None, shape: Sequence[int],
                    mesh) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec, dropping mesh axes that do not divide a dimension
  or that an earlier dimension already uses."""
  if logical is None:
    return PartitionSpec()
  if len(logical) != len(shape):
    raise ShardingError(f"logical axes {tuple(logical)} do not match the array rank {len(shape)}")
  sizes = _axis_sizes(mesh)
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in _RULES:
      raise ShardingError(f"logical axis {name!r} has no rule: add it to sharding.LOGICAL_RULES")
    chosen, size = [], 1
    for axis in _RULES[name]:
      if axis in used or axis not in sizes or sizes[axis] == 1:
        continue
      if dim % (size * sizes[axis]) == 0:
        chosen.append(axis)
        size *= sizes[axis]
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*spec)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names on the current mesh (`jax.set_mesh`); a no-op without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, x.shape, mesh))


def logical_specs(boxed_tree: Any) -> Any:
  """Logical PartitionSpecs of a tree of `nn.LogicallyPartitioned` leaves (from init / eval_shape)."""
  return nn.get_partition_spec(boxed_tree)


def tree_shardings(abstract_tree: Any, logical_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for `abstract_tree` (arrays or ShapeDtypeStructs) from its logical specs."""
  def one(leaf, logical):
    return NamedSharding(mesh, logical_to_spec(tuple(logical), leaf.shape, mesh))
  return jax.tree.map(one, abstract_tree, logical_tree,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def unboxed_shardings(boxed_abstract: Any, mesh: Mesh) -> tuple[Any, Any]:
  """(abstract params, shardings) of an `eval_shape(model.init, …)` result with logical boxes."""
  abstract = nn.meta.unbox(boxed_abstract)
  return abstract, tree_shardings(abstract, logical_specs(boxed_abstract), mesh)


def missing_logical_names(boxed_tree: Any) -> list[str]:
  """Paths of parameters that carry no logical partitioning (every parameter must carry one)."""
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  return [jax.tree_util.keystr(p) for p, leaf in leaves
          if not isinstance(leaf, nn.LogicallyPartitioned)]


def replicated_fraction(abstract_tree: Any, shardings: Any) -> float:
  """Share of parameter bytes that are fully replicated (every mesh axis of size > 1 unused)."""
  total = replicated = 0
  for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    total += nbytes
    if all(axis is None for axis in sharding.spec):
      replicated += nbytes
  return replicated / max(total, 1)


def check_replication(abstract_tree: Any, shardings: Any, mesh: Mesh,
                      max_fraction: float = 0.02) -> float:
  """Raises ShardingError when more than `max_fraction` of parameter bytes stay replicated on a mesh
  that has parameter-sharding axes (fsdp or tensor) of size > 1. Returns the fraction."""
  fraction = replicated_fraction(abstract_tree, shardings)
  sizes = _axis_sizes(mesh)
  if (sizes.get("fsdp", 1) > 1 or sizes.get("tensor", 1) > 1) and fraction > max_fraction:
    raise ShardingError(
        f"{fraction:.1%} of parameter bytes are replicated on mesh {sizes} (limit "
        f"{max_fraction:.0%}): dimensions do not divide by the fsdp/tensor sizes, change the mesh")
  return fraction


def put(tree: Any, shardings: Any) -> Any:
  """Places host arrays on their shardings."""
  return jax.tree.map(jax.device_put, tree, shardings)
