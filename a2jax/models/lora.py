"""Low-rank adapters (LoRA) on the A2 blocks: the tree form, its initialisation, sharding and merge.

A LoRA tree mirrors `params["blocks"]` down to the Dense modules it targets:
    {"blocks": {"attn1": {"to_q": {"lora_a": (L, in, r), "lora_b": (L, r, out)}, …}, …}}
with L layers, rank r and the Flax kernel layout (kernel (L, in, out)), so the update of layer l is
a[l] @ b[l] (in, out). A torch `lora_down` / `lora_A` weight (r, in) is a[l].T and `lora_up` /
`lora_B` (out, r) is b[l].T. The merged kernel is W + scale · a @ b with scale = alpha / rank
(times a strength for LoRA files). No torch here: reading and writing files is convert_weights.lora.

`LoadedLoRA` is a LoRA file in this form (made by `convert_weights.lora.read_lora`), with per-layer
scales and the plain parameter deltas some files carry (`.diff`, `.diff_b`, `diff_m`);
`apply_loaded` adds it to the transformer parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from a2jax import configs, sharding

# config name ("module.projection") -> its path inside params["blocks"]: every Dense of an A2 block.
TARGET_MODULES: dict[str, tuple[str, str]] = {
    name: tuple(name.split(".")) for name in configs.LORA_TARGETS}
# The attention projections (self, text cross-attention and image branch); not the feed-forward.
DEFAULT_TARGETS: tuple[str, ...] = tuple(n for n in TARGET_MODULES if not n.startswith("ffn."))


def init_lora(abstract_params: Any, targets: Sequence[str], rank: int, key: jax.Array,
              dtype=jnp.float32) -> dict[str, Any]:
  """A fresh LoRA tree for the transformer params `abstract_params` (arrays or ShapeDtypeStructs,
  unboxed): per target a (L, in, r) drawn like PEFT's kaiming-uniform (U(±1/√in)), b (L, r, out)
  zeros, so the merged model starts equal to the base. Targets whose module the params lack
  (the image branch of a text-only config) are skipped."""
  blocks = abstract_params["blocks"]
  present = [n for n in targets if TARGET_MODULES[n][1] in blocks.get(TARGET_MODULES[n][0], {})]
  keys = jax.random.split(key, max(len(present), 1))
  tree: dict[str, Any] = {}
  for name, k in zip(present, keys):
    module, proj = TARGET_MODULES[name]
    layers, d_in, d_out = blocks[module][proj]["kernel"].shape
    bound = 1.0 / d_in**0.5
    tree.setdefault(module, {})[proj] = {
        "lora_a": jax.random.uniform(k, (layers, d_in, rank), dtype, -bound, bound),
        "lora_b": jnp.zeros((layers, rank, d_out), dtype),
    }
  return {"blocks": tree}


def lora_logical_axes(base_logical: Any, lora_tree: Any) -> Any:
  """Logical PartitionSpecs of a LoRA tree from its kernels' (layers, in, out) logical axes
  (`sharding.logical_specs` of the boxed transformer params): a gets (layers, in, None), b
  (layers, None, out), so each factor is sharded like the kernel dimension it shares."""
  def one(path, _):
    *module, factor = (p.key for p in path)
    node = base_logical
    for part in module:
      node = node[part]
    layers, axis_in, axis_out = tuple(node["kernel"])
    return (PartitionSpec(layers, axis_in, None) if factor == "lora_a"
            else PartitionSpec(layers, None, axis_out))
  return jax.tree_util.tree_map_with_path(one, lora_tree)


def lora_shardings(boxed_abstract: Any, lora_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings of `lora_tree` (arrays or ShapeDtypeStructs) on `mesh`, from the boxed abstract
  transformer params (`transformer.init_abstract_boxed`) and the rules of a2jax.sharding."""
  logical = lora_logical_axes(sharding.logical_specs(boxed_abstract), lora_tree)
  return sharding.tree_shardings(lora_tree, logical, mesh)


def merge(params: Any, lora: Any, scale: Any) -> Any:
  """`params` with each kernel that `lora` targets replaced by
  (kernel.astype(f32) + scale · einsum("lir,lro->lio", a, b)).astype(kernel.dtype).

  scale: a number, or a tree mirroring `lora` down to the module ({"blocks": {"attn1": {"to_q": s}}})
  whose leaves are numbers or (L,) per-layer scales. Pure and jit-able; the leaves it does not touch
  are passed through as the same objects."""
  out = dict(params)
  blocks = dict(params["blocks"])
  for module, projections in lora["blocks"].items():
    blocks[module] = dict(blocks[module])
    for proj, factors in projections.items():
      s = scale if not isinstance(scale, dict) else scale["blocks"][module][proj]
      s = jnp.asarray(s, jnp.float32)
      s = s[:, None, None] if s.ndim == 1 else s
      delta = jnp.einsum("lir,lro->lio", factors["lora_a"].astype(jnp.float32),
                         factors["lora_b"].astype(jnp.float32))
      dense = dict(blocks[module][proj])
      kernel = dense["kernel"]
      dense["kernel"] = (kernel.astype(jnp.float32) + s * delta).astype(kernel.dtype)
      blocks[module][proj] = dense
  out["blocks"] = blocks
  return out


def add_deltas(params: Any, deltas: Any) -> Any:
  """`params` with `deltas` (a partial tree of the same structure, each leaf of its param's shape)
  added in float32 and cast back; leaves without a delta pass through as the same objects."""
  if not isinstance(deltas, dict):
    return (params.astype(jnp.float32) + deltas.astype(jnp.float32)).astype(params.dtype)
  out = dict(params)
  for name, delta in deltas.items():
    out[name] = add_deltas(params[name], delta)
  return out


@dataclasses.dataclass(frozen=True)
class LoadedLoRA:
  """A LoRA file in a2jax form, its strength applied.

  factors: a LoRA tree (numpy float32) over the modules the file covers; layers it does not cover
    hold zeros. scales: mirrors `factors` down to the module, each an (L,) float32 array of
    alpha / rank · strength (0 where a layer is not covered). deltas: a partial params tree of
    additive deltas (norm weights, biases, modulation: `.diff`, `.diff_b`, `diff_m`), strength
    applied, each of its param's full shape (stacked (L, …) under "blocks"). notes: one line each
    (the format, what the file covers, what it cannot apply)."""

  source: str
  format: str
  factors: dict[str, Any]
  scales: dict[str, Any]
  deltas: dict[str, Any]
  notes: tuple[str, ...]


def apply_loaded(params: Any, loaded: LoadedLoRA) -> Any:
  """params + the LoRA (merged into the kernels) + its deltas. Pure and jit-able on the arrays."""
  params = merge(params, loaded.factors, loaded.scales) if loaded.factors["blocks"] else params
  return add_deltas(params, loaded.deltas)


def apply_all(params: Any, loras: Sequence[LoadedLoRA]) -> Any:
  """Merges each LoRA in turn: one jitted `apply_loaded` over just the leaves it changes, whose
  outputs keep the input shardings (on a mesh no parameter is gathered on one device or the host,
  and untouched leaves are the same objects, not copies)."""
  for loaded in loras:
    paths = [("blocks", m, p, "kernel") for m, projs in loaded.factors["blocks"].items() for p in projs]
    paths += [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(loaded.deltas)]
    touched = _graft({}, [(path, _lookup(params, path)) for path in paths])
    out_shardings = jax.tree.map(lambda x: x.sharding if isinstance(x, jax.Array) else None, touched)
    apply = jax.jit(lambda p, f, s, d: apply_loaded(p, dataclasses.replace(
        loaded, factors=f, scales=s, deltas=d)),
        out_shardings=None if None in jax.tree.leaves(out_shardings, is_leaf=lambda x: x is None)
        else out_shardings)
    merged = apply(touched, loaded.factors, loaded.scales, loaded.deltas)
    params = _graft(params, [(path, _lookup(merged, path)) for path in paths])
  return params


def _lookup(tree: Any, path: Sequence[str]) -> Any:
  for part in path:
    tree = tree[part]
  return tree


def _graft(tree: dict, items: Sequence[tuple[tuple[str, ...], Any]]) -> dict:
  """A copy of the nested dict `tree` (untouched subtrees shared) with each path set to its value."""
  out = dict(tree)
  for path, value in items:
    node = out
    for part in path[:-1]:
      node[part] = node = dict(node.get(part, {}))
    node[path[-1]] = value
  return out
