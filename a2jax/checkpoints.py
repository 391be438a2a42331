"""orbax read/write of converted a2jax folders, straight onto shardings.

A converted folder holds `config.yaml` and one orbax checkpoint per component (`transformer/`,
`vae/`, `clip/`, `umt5/`). Components are written leaf group by leaf group with orbax's partial
save, so a 16B-parameter transformer is written without ever holding it whole in host memory.
A checkpoint that cannot be read (cut short, damaged, or with a parameter this a2jax does not know)
ends as one CheckpointError that names it and the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
from collections.abc import Iterable, Iterator
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
import yaml
from orbax.checkpoint._src import asyncio_utils as orbax_asyncio

from a2jax import configs
from a2jax.errors import CheckpointError

COMPONENTS = ("transformer", "vae", "clip", "umt5")
CONFIG_FILE = "config.yaml"
# What every params checkpoint holds (orbax's layout, for `save_params` and the streamed partial
# save alike: the tree under `state/`, in an OCDBT database): one missing means a cut-short copy.
_CHECKPOINT_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt")


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
  check_leaves(path, abstract)
  if shardings is None:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  with _reading(path, "its parameter data cannot be read"):
    return ocp.load_pytree(path, target)


def _checkpoint_dir(path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path).resolve()  # orbax needs absolute paths
  if not (path / "orbax.checkpoint").exists() and not any(path.glob("*/_METADATA")):
    raise CheckpointError(f"{path} is not an a2jax params checkpoint: convert the weights first "
                          "(python -m convert_weights …)")
  missing = [name for name in _CHECKPOINT_FILES if not (path / name).is_file()]
  if missing:
    raise _damaged(path, f"{missing[0]} is missing")
  return path


def _damaged(path: pathlib.Path, what: str) -> CheckpointError:
  return CheckpointError(f"{path} is damaged ({what}): copy the folder again, or convert it again "
                         "with python -m convert_weights release --src RELEASE --dst FOLDER --force")


_ORBAX_DIR = str(pathlib.Path(orbax_asyncio.__file__).parents[1]) + os.sep  # …/orbax/checkpoint/


class _OrbaxRecords(logging.Filter):
  """Drops orbax's log records: during a read they describe a failure that `_reading` reports."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.pathname.startswith(_ORBAX_DIR)


def _close(loop: asyncio.AbstractEventLoop) -> None:
  """Closes an event loop of orbax's once nothing it ran can still call back into it: the tasks
  left on it are cancelled (tensorstore cancels their reads) and run until they have ended and
  the callbacks already due have run (those that take the errors of reads which failed late)."""
  leftovers = asyncio.all_tasks(loop)
  for task in leftovers:
    task.cancel()
  loop.run_until_complete(_ended(leftovers))
  # A read that ended on a tensorstore thread just before its task was cancelled still delivers
  # its result, now wanted by nobody, with call_soon_threadsafe, which a closed loop refuses
  # ("RuntimeError: Event loop is closed" through the unraisable hook): that delivery is dropped.
  loop.call_soon_threadsafe = _dropped
  loop.close()


async def _ended(tasks: Iterable[asyncio.Task]) -> None:
  await asyncio.gather(*tasks, return_exceptions=True)


def _dropped(*args, **kwargs) -> None:
  """call_soon_threadsafe of a closed loop of orbax's (`_close`)."""


def _run_event_loop(loop: asyncio.AbstractEventLoop) -> None:
  """orbax's background event loop (asyncio_utils._run_event_loop), closed with `_close`."""
  try:
    loop.run_forever()
  finally:
    _close(loop)


def _run_sync_via_new_loop(coro):
  """orbax's foreground event loop (asyncio_utils._run_sync_via_new_loop), closed with `_close`."""
  loop = asyncio.new_event_loop()
  try:
    asyncio.set_event_loop(loop)
    return loop.run_until_complete(coro)
  finally:
    asyncio.set_event_loop(None)
    _close(loop)


@contextlib.contextmanager
def _reading(path: pathlib.Path, what: str) -> Iterator[None]:
  """Runs orbax reads of the checkpoint `path`: any failure of theirs ends as one CheckpointError
  naming `path` and `what`, and nothing else reaches the terminal.

  orbax runs each read on event loops of its own (nested ones inside), the leaves' tensorstore
  reads gathered as tasks. When one read fails (a cut-short data file) the gather fails at once
  and orbax closes the loop with the other reads still in flight: each later calls back into the
  closed loop ("RuntimeError: Event loop is closed", through the unraisable hook) and leaves a task
  that reports when collected ("Task exception was never retrieved"). So during the read orbax's
  two loop runners (orbax-checkpoint 0.12.8's asyncio_utils) are swapped for the same ones closing
  their loop with `_close`. orbax also logs some failures as warnings, the tensorstore spec
  included, before it raises or returns None: those records are dropped, the failure is
  reported here instead."""
  records = _OrbaxRecords()
  absl_logger = logging.getLogger("absl")
  runners = {"_run_event_loop": _run_event_loop, "_run_sync_via_new_loop": _run_sync_via_new_loop}
  originals = {name: getattr(orbax_asyncio, name) for name in runners}
  absl_logger.addFilter(records)
  for name, runner in runners.items():
    setattr(orbax_asyncio, name, runner)
  try:
    yield
  except Exception as e:
    if _device_error(e):
      raise
    raise _damaged(path, what) from e
  finally:
    for name, runner in originals.items():
      setattr(orbax_asyncio, name, runner)
    absl_logger.removeFilter(records)


def _device_error(e: BaseException | None) -> bool:
  """Whether a failed read failed on the device (out of memory placing the arrays), not on the
  files (orbax wraps the device's error in its own)."""
  while e is not None:
    if isinstance(e, jax.errors.JaxRuntimeError):
      return True
    e = e.__cause__ or e.__context__
  return False


def _stored_metadata(path: pathlib.Path) -> dict[tuple[str, ...], Any]:
  what = "its parameter metadata cannot be read"
  with _reading(path, what):
    stored = ocp.metadata(path).metadata
  if stored is None:  # orbax logs the unreadable tree (dropped by _reading) and returns None
    raise _damaged(path, what)
  return {tuple(str(k.key) for k in keypath): m
          for keypath, m in jax.tree_util.tree_leaves_with_path(stored)}


def check_leaves(path: str | os.PathLike, abstract: Any) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  """{leaf path: shape and dtype} of a params checkpoint, read from its metadata (no array data),
  after checking that its leaves are exactly `abstract`'s (a tree of arrays or
  ShapeDtypeStructs), same paths and shapes."""
  path = _checkpoint_dir(path)
  stored = {leaf: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)
            for leaf, m in _stored_metadata(path).items()}
  want = {tuple(str(k.key) for k in keypath): tuple(a.shape)
          for keypath, a in jax.tree_util.tree_leaves_with_path(abstract)}
  problems = [f"{'/'.join(p)} missing" for p in sorted(set(want) - set(stored))] + [
      f"{'/'.join(p)} {stored[p].shape} ≠ {want[p]}" for p in sorted(set(want) & set(stored))
      if stored[p].shape != want[p]]
  if problems:
    raise CheckpointError(f"{path} does not fit the config ({len(problems)} differences, first: "
                          f"{problems[0]}): load it with the config it was converted with")
  unknown = sorted(set(stored) - set(want))
  if unknown:
    raise CheckpointError(f"{path} holds {'/'.join(unknown[0])}, a parameter this a2jax does not "
                          "know: it was written by a newer a2jax; upgrade a2jax, or convert the "
                          "weights again with this one")
  return stored


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
    # the stored metadata as the abstract leaf: restored as numpy, on the host
    with _reading(path, f"its leaf {'/'.join(leaf_path)} cannot be read"), context:
      tree = ocp.load_pytree(path, _nest(leaf_path, stored[leaf_path]))
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
