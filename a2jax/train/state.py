"""Training state (step, float32 master params, optimizer state, optional EMA) and its shardings.

With LoRA (`train.lora`), `params` are the float32 adapters (a2jax/train/lora.py), the only
trained, optimised and checkpointed parameters, and `frozen` holds the base transformer in its
param dtype: carried through the step unchanged, never checkpointed (re-read on resume).

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
from a2jax.configs import LoRAConfig, TransformerConfig
from a2jax.train import lora as train_lora
from a2jax.models.transformer import init_abstract_boxed, init_params


class TrainState(flax.struct.PyTreeNode):
  """step: int32 () optimizer steps taken; params: trained parameters (the transformer's master
  params in param_dtype, float32 for training; or the LoRA adapters); opt_state: the optax state;
  ema_params: exponential moving average of params, or None; frozen: the LoRA run's base
  transformer params (not trained, not checkpointed), or None."""

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None
  frozen: Any = None


def create_state(params: Any, tx: optax.GradientTransformation, ema: bool,
                 frozen: Any = None) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params) if ema else None, frozen=frozen)


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
                   ema: bool, lora: LoRAConfig | None = None) -> tuple[TrainState, TrainState]:
  """(abstract TrainState of ShapeDtypeStructs, matching tree of NamedShardings) without memory;
  with `lora`, params are the adapters and frozen the base."""
  base, base_shardings = param_shardings(cfg, mesh)
  if lora is None:
    params, p_shardings, frozen, f_shardings = base, base_shardings, None, None
  else:
    params, p_shardings = train_lora.abstract_lora(cfg, lora, mesh)
    frozen, f_shardings = base, base_shardings
  state = jax.eval_shape(lambda p, f: create_state(p, tx, ema, f), params, frozen)
  shardings = TrainState(
      step=NamedSharding(mesh, PartitionSpec()), params=p_shardings,
      opt_state=_match_params(state.opt_state, params, p_shardings, mesh),
      ema_params=p_shardings if ema else None, frozen=f_shardings)
  return state, shardings


def init_state(cfg: TransformerConfig, tx: optax.GradientTransformation, mesh: Mesh, ema: bool,
               key: jax.Array | None = None, params: Any | None = None,
               lora: LoRAConfig | None = None) -> TrainState:
  """A fresh state on its shardings: from `params` (already placed, e.g. loaded from a converted
  folder; donated) or else random parameters drawn with `key`. With `lora`, those are the frozen
  base and the adapters start from fold_in(key, 1) (a random, b zero)."""
  _, shardings = abstract_state(cfg, tx, mesh, ema, lora)
  if params is None:
    params = init_params(cfg, key, mesh)
  if lora is None:
    return jax.jit(lambda p: create_state(p, tx, ema), out_shardings=shardings,
                   donate_argnums=0)(params)
  adapters = train_lora.init(cfg, lora, jax.random.fold_in(key, 1), mesh)
  return jax.jit(lambda a, p: create_state(a, tx, ema, p), out_shardings=shardings,
                 donate_argnums=(0, 1))(adapters, params)
