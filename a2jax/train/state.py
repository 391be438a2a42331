"""Training state (step, float32 master params, optimizer state, optional EMA) and its shardings.

Parameters are sharded by their logical axes (`a2jax.sharding.LOGICAL_RULES`); every optimizer-state
leaf that mirrors a parameter (Adam's mu and nu) gets that parameter's sharding, scalars (counts) are
replicated. The state is created directly on its shardings (`jit(..., out_shardings=…)`), so a
full-size state never exists on one device.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from a2jax import sharding
from a2jax.configs import TransformerConfig
from a2jax.models.transformer import init_abstract_boxed, init_params


class TrainState(flax.struct.PyTreeNode):
  """step: int32 () optimizer steps taken; params: master parameters (param_dtype, float32 for
  training); opt_state: the optax state; ema_params: exponential moving average of params, or None."""

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None


def create_state(params: Any, tx: optax.GradientTransformation, ema: bool) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params) if ema else None)


def param_shardings(cfg: TransformerConfig, mesh: Mesh) -> tuple[Any, Any]:
  """(abstract params, NamedShardings) of the transformer on `mesh` by the logical rules."""
  return sharding.unboxed_shardings(init_abstract_boxed(cfg), mesh)


def _match_params(abstract_tree: Any, abstract_params: Any, shardings: Any, mesh: Mesh) -> Any:
  """Shardings of a tree whose subtrees may mirror the params (optax states): a leaf whose path ends
  with a parameter's path and has its shape takes that parameter's sharding; others are replicated."""
  by_path = {tuple(path): (leaf.shape, s) for (path, leaf), s in zip(
      jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(shardings))}
  depth = max(map(len, by_path), default=0)
  replicated = NamedSharding(mesh, PartitionSpec())

  def one(path, leaf):
    for start in range(max(len(path) - depth, 0), len(path)):
      shape, s = by_path.get(tuple(path[start:]), (None, None))
      if shape == leaf.shape:
        return s
    return replicated
  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def abstract_state(cfg: TransformerConfig, tx: optax.GradientTransformation, mesh: Mesh,
                   ema: bool) -> tuple[TrainState, TrainState]:
  """(abstract TrainState of ShapeDtypeStructs, matching tree of NamedShardings) without memory."""
  params, p_shardings = param_shardings(cfg, mesh)
  state = jax.eval_shape(lambda p: create_state(p, tx, ema), params)
  shardings = TrainState(
      step=NamedSharding(mesh, PartitionSpec()), params=p_shardings,
      opt_state=_match_params(state.opt_state, params, p_shardings, mesh),
      ema_params=p_shardings if ema else None)
  return state, shardings


def init_state(cfg: TransformerConfig, tx: optax.GradientTransformation, mesh: Mesh, ema: bool,
               key: jax.Array | None = None, params: Any | None = None) -> TrainState:
  """A fresh state on its shardings: from `params` (already placed, e.g. loaded from a converted
  folder; donated) or else random parameters drawn with `key`."""
  _, shardings = abstract_state(cfg, tx, mesh, ema)
  if params is None:
    params = init_params(cfg, key, mesh)
  return jax.jit(lambda p: create_state(p, tx, ema), out_shardings=shardings,
                 donate_argnums=0)(params)
