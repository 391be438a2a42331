"""orbax read/write of converted a2jax folders, straight onto shardings.

A converted folder holds `config.yaml` and one orbax checkpoint per component (`transformer/`,
`vae/`, `clip/`, `umt5/`). Components are written leaf group by leaf group with orbax's partial
save, so a 16B-parameter transformer is written without ever holding it whole in host memory.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Iterator
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
import yaml

from a2jax import configs
from a2jax.errors import CheckpointError

COMPONENTS = ("transformer", "vae", "clip", "umt5")
CONFIG_FILE = "config.yaml"


def _nest(path: tuple[str, ...], value: Any) -> dict[str, Any]:
  for part in reversed(path):
    value = {part: value}
  return value


def _merge(into: dict[str, Any], tree: dict[str, Any]) -> None:
  for k, v in tree.items():
    if isinstance(v, dict):
      _merge(into.setdefault(k, {}), v)
    else:
      into[k] = v


def save_params_streaming(path: str | os.PathLike, items: Iterable[tuple[tuple[str, ...], np.ndarray]],
                          flush_bytes: int = 1 << 30,
                          on_item: Callable[[tuple[str, ...], int], None] | None = None) -> None:
  """Writes (path, array) items as one orbax pytree checkpoint, holding ≤ `flush_bytes` at a time
  (plus the largest single item). `on_item(path, nbytes)` reports progress."""
  path = pathlib.Path(path).resolve()  # orbax needs absolute paths
  pending: dict[str, Any] = {}
  pending_bytes = 0
  wrote = False
  for leaf_path, array in items:
    _merge(pending, _nest(leaf_path, array))
    pending_bytes += array.nbytes
    if on_item:
      on_item(leaf_path, array.nbytes)
    if pending_bytes >= flush_bytes:
      ocp.partial.save(path, pending)
      pending, pending_bytes, wrote = {}, 0, True
  if pending or not wrote:
    ocp.partial.save(path, pending)
  ocp.partial.finalize(path)


def save_params(path: str | os.PathLike, params: Any) -> None:
  """Writes an in-memory params tree (numpy or jax arrays) as one orbax checkpoint."""
  ocp.save_pytree(pathlib.Path(path).resolve(), params)


def load_params(path: str | os.PathLike, abstract: Any, shardings: Any | None = None) -> Any:
  """Reads a params checkpoint into jax arrays of `abstract`'s shapes and dtypes, placed on
  `shardings` (a matching tree of NamedShardings) when given, each host reading only its shards."""
  path = _checkpoint_dir(path)
  if shardings is None:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  stored = ocp.pytree_metadata(path).metadata
  want = {jax.tree_util.keystr(p): tuple(a.shape)
          for p, a in jax.tree_util.tree_leaves_with_path(target)}
  have = {jax.tree_util.keystr(p): tuple(m.shape)
          for p, m in jax.tree_util.tree_leaves_with_path(stored)}
  problems = sorted(set(want) ^ set(have)) + sorted(
      f"{k} {have[k]} != {want[k]}" for k in set(want) & set(have) if have[k] != want[k])
  if problems:
    raise CheckpointError(f"{path} does not fit the config ({len(problems)} differences, first: "
                          f"{problems[0]}): load it with the config it was converted with")
  return ocp.load_pytree(path, target)


def _checkpoint_dir(path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path).resolve()  # orbax needs absolute paths
  if not (path / "orbax.checkpoint").exists() and not any(path.glob("*/_METADATA")):
    raise CheckpointError(f"{path} is not an a2jax params checkpoint: convert the weights first "
                          "(python -m convert_weights …)")
  return path


def _stored_metadata(path: pathlib.Path) -> dict[tuple[str, ...], Any]:
  try:
    stored = ocp.pytree_metadata(path).metadata
  except Exception as e:  # orbax raises many types for damaged folders
    raise CheckpointError(f"{path} has unreadable checkpoint metadata ({type(e).__name__}): "
                          "convert the weights again") from None
  return {tuple(str(k.key) for k in keypath): m
          for keypath, m in jax.tree_util.tree_leaves_with_path(stored)}


def stored_leaves(path: str | os.PathLike) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  """{leaf path: shape and dtype} of a params checkpoint, read from its metadata (no array data)."""
  return {leaf: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)
          for leaf, m in _stored_metadata(_checkpoint_dir(path)).items()}


def iter_params(path: str | os.PathLike, leaf_paths: Iterable[tuple[str, ...]] | None = None
                ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
  """Yields (leaf path, numpy array) one leaf at a time, in `leaf_paths` order (default: all), so
  host memory holds one leaf, not the checkpoint (orbax partial load of a one-leaf tree)."""
  path = _checkpoint_dir(path)
  stored = _stored_metadata(path)
  context = ocp.Context()
  context.pytree.loading.partial_load = True
  for leaf_path in (stored if leaf_paths is None else leaf_paths):
    if leaf_path not in stored:
      raise CheckpointError(f"{path} has no leaf {'/'.join(leaf_path)}: load it with the config it "
                            "was converted with")
    try:
      with context:  # the stored metadata as the abstract leaf: restored as numpy, on the host
        tree = ocp.load_pytree(path, _nest(leaf_path, stored[leaf_path]))
    except Exception as e:  # orbax / tensorstore raise many types for damaged data
      raise CheckpointError(f"{path}: leaf {'/'.join(leaf_path)} cannot be read "
                            f"({type(e).__name__}): convert the weights again") from None
    for part in leaf_path:
      tree = tree[part]
    yield leaf_path, np.asarray(tree)


def write_config(folder: str | os.PathLike, cfg: configs.Config) -> None:
  pathlib.Path(folder, CONFIG_FILE).write_text(yaml.safe_dump(configs.to_dict(cfg), sort_keys=False))


def read_config(folder: str | os.PathLike, overrides=()) -> configs.Config:
  path = pathlib.Path(folder, CONFIG_FILE)
  if not path.is_file():
    raise CheckpointError(f"{folder} has no {CONFIG_FILE}: it is not a converted a2jax folder")
  return configs.load(path, overrides)


def component_path(folder: str | os.PathLike, component: str) -> pathlib.Path:
  path = pathlib.Path(folder, component)
  if not path.is_dir():
    raise CheckpointError(f"{folder} has no {component}/ checkpoint: convert it with "
                          f"python -m convert_weights {component} --src … --dst {folder}")
  return path


def _model_module(component: str):
  import importlib
  modules = {"transformer": "transformer", "vae": "vae", "clip": "clip", "umt5": "umt5"}
  if component not in modules:
    raise CheckpointError(f"unknown component {component!r}: use one of {list(modules)}")
  return importlib.import_module(f"a2jax.models.{modules[component]}")


def load_component(folder: str | os.PathLike, component: str, cfg, mesh=None) -> Any:
  """One component's params from a converted folder, placed on the mesh's logical shardings (each
  host reads only its shards) or on the default device without a mesh."""
  import flax.linen as nn
  from a2jax import sharding
  boxed = _model_module(component).init_abstract_boxed(cfg)
  if mesh is None:
    abstract, shardings = nn.meta.unbox(boxed), None
  else:
    abstract, shardings = sharding.unboxed_shardings(boxed, mesh)
  return load_params(component_path(folder, component), abstract, shardings)
