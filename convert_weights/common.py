"""What every component converter shares: lazy readers, the structural name map, strict key checks,
and the streaming, atomic writer behind the CLI.

A converter turns a flat `{name: array}` state dict in the reference's own names into a2jax params.
It is planned first (`Target`s: which source keys, which layout change, which a2jax leaf), checked
completely (every key used exactly once, every shape right) before a byte is read, then executed
one target at a time so that the CLI's peak memory stays near the largest stacked parameter.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np

from a2jax.errors import ConversionError

# ---------------------------------------------------------------------------------------------
# Lazy state dicts.


class LazyStateDict(Mapping):
  """A read-only `{name: np.ndarray}` whose values are loaded on access; shapes known up front."""

  def __init__(self, shapes: dict[str, tuple[int, ...]], loader: Callable[[str], np.ndarray]):
    self._shapes = shapes
    self._loader = loader

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in self._shapes:
      raise KeyError(key)
    return self._loader(key)

  def __iter__(self):
    return iter(self._shapes)

  def __len__(self):
    return len(self._shapes)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._shapes[key]

  def renamed(self, rename: Callable[[str], str]) -> "LazyStateDict":
    """The same tensors under new names (no data is read)."""
    new_to_old = {}
    for old in self._shapes:
      new = rename(old)
      if new in new_to_old:
        raise ConversionError(f"keys {new_to_old[new]!r} and {old!r} both map to {new!r}")
      new_to_old[new] = old
    return LazyStateDict({n: self._shapes[o] for n, o in new_to_old.items()},
                         lambda n: self._loader(new_to_old[n]))


def as_lazy(state_dict: Mapping[str, Any]) -> LazyStateDict:
  """Wraps an in-memory mapping (numpy, torch or jax values) as a LazyStateDict."""
  if isinstance(state_dict, LazyStateDict):
    return state_dict
  return LazyStateDict({k: tuple(v.shape) for k, v in state_dict.items()},
                       lambda k: to_numpy(state_dict[k]))


def to_numpy(value: Any) -> np.ndarray:
  """numpy view of a numpy / jax / torch tensor; torch bfloat16 goes through ml_dtypes."""
  if isinstance(value, np.ndarray):
    return value
  if type(value).__module__.startswith("torch"):
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      return value.view(dtype=_torch_int16()).numpy().view(ml_dtypes.bfloat16)
    return value.numpy()
  return np.asarray(value)


def _torch_int16():
  import torch  # only reached for torch inputs (tests, .pth files)
  return torch.int16


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def _read_safetensors_header(path: pathlib.Path) -> tuple[int, dict[str, Any]]:
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ConversionError(f"{path} is truncated (no safetensors header): re-download or re-save it")
    (n,) = struct.unpack("<Q", head)
    if 8 + n > size:
      raise ConversionError(f"{path} is truncated (header of {n} bytes, file of {size}): re-download it")
    try:
      header = json.loads(f.read(n))
    except ValueError:
      raise ConversionError(f"{path} has a corrupt safetensors header: re-download it") from None
  header.pop("__metadata__", None)
  for name, info in header.items():
    end = info["data_offsets"][1]
    if 8 + n + end > size:
      raise ConversionError(f"{path} is truncated: tensor {name!r} ends at byte {8 + n + end}, the "
                            f"file has {size}; re-download or re-save it")
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
  return 8 + n, header


def read_safetensors(paths: Iterable[pathlib.Path]) -> LazyStateDict:
  """Memory-maps safetensors files (no torch): values are read only when accessed."""
  shapes, where = {}, {}
  for path in paths:
    path = pathlib.Path(path)
    start, header = _read_safetensors_header(path)
    for name, info in header.items():
      if name in shapes:
        raise ConversionError(f"tensor {name!r} appears in two files ({where[name][0]} and {path})")
      shapes[name] = tuple(info["shape"])
      where[name] = (path, start, info)

  def load(name: str) -> np.ndarray:
    path, start, info = where[name]
    begin, end = info["data_offsets"]
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
    return np.array(data.view(dtype).reshape(info["shape"]))

  return LazyStateDict(shapes, load)


def read_torch(path: pathlib.Path) -> LazyStateDict:
  """Reads a `.pth` / `.bin` file through torch (the `convert` extra), memory-mapped when possible."""
  try:
    import torch
  except ImportError:
    raise ConversionError(f"{path} is a torch file: install the converter extra, "
                          "pip install -e '.[convert]'") from None
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except Exception as e:  # torch raises many types for bad files
    raise ConversionError(f"{path} cannot be read by torch ({type(e).__name__}): re-download it") from None
  if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
    sd = sd["state_dict"]
  if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
    sd = sd["model"]
  return as_lazy(sd)


def read_state_dict(src: str | os.PathLike, prefer: str | None = None) -> LazyStateDict:
  """A state dict from a folder (sharded safetensors with `*.index.json`, or single files) or a file.

  `prefer` picks the index/file stem in a folder that holds several (e.g. `diffusion_pytorch_model`).
  """
  src = pathlib.Path(src)
  if not src.exists():
    raise ConversionError(f"{src} does not exist: pass the release folder or a weights file")
  if src.is_file():
    if src.suffix == ".safetensors":
      return read_safetensors([src])
    if src.suffix in (".pth", ".pt", ".bin", ".ckpt"):
      return read_torch(src)
    if src.name.endswith(".index.json"):
      return _read_index(src)
    raise ConversionError(f"{src}: unknown weights format (use .safetensors, an .index.json, .pth or .bin)")
  indexes = sorted(src.glob("*.safetensors.index.json"))
  if prefer:
    indexes = [p for p in indexes if p.name.startswith(prefer)] or indexes
  if indexes:
    return _read_index(indexes[0])
  files = sorted(src.glob("*.safetensors"))
  if prefer:
    files = [p for p in files if p.name.startswith(prefer)] or files
  if files:
    return read_safetensors(files)
  torch_files = sorted([*src.glob("*.pth"), *src.glob("*.bin")])
  if len(torch_files) == 1:
    return read_torch(torch_files[0])
  raise ConversionError(f"{src} holds no *.safetensors, *.index.json or single .pth/.bin file")


def _read_index(index: pathlib.Path) -> LazyStateDict:
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
  except (ValueError, KeyError):
    raise ConversionError(f"{index} is not a safetensors index (no 'weight_map'): re-download it") from None
  files = sorted({index.parent / f for f in weight_map.values()})
  missing = [str(f) for f in files if not f.is_file()]
  if missing:
    raise ConversionError(f"{index} names shard {missing[0]} which is missing: download every shard")
  sd = read_safetensors(files)
  absent = sorted(set(weight_map) - set(sd))
  if absent:
    raise ConversionError(f"{index} lists {absent[0]!r} but no shard holds it: re-download the shards")
  return sd


# ---------------------------------------------------------------------------------------------
# Planning: which source tensors make which a2jax leaf.

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Target:
  """One a2jax leaf: made by `layout` from the stacked or single source tensors `sources`."""

  path: Path
  sources: tuple[str, ...]
  source_shape: tuple[int, ...]   # expected shape of each source tensor
  layout: Callable[[np.ndarray], np.ndarray]
  stacked: bool                   # sources are layers stacked along a new leading axis


def torch_layout(leaf: str, ndim: int) -> tuple[Callable[[np.ndarray], np.ndarray],
                                                Callable[[tuple[int, ...]], tuple[int, ...]]]:
  """(torch → a2jax array map, a2jax shape → expected torch shape) for one leaf name and rank.

  Linear (out, in) → (in, out); ConvNd (out, in, *k) → (*k, in, out); everything else as is.
  """
  if leaf == "kernel" and ndim >= 2:
    # a2jax (*k, in, out) <- torch (out, in, *k)
    fwd = tuple(range(2, ndim)) + (1, 0)
    inv = tuple(np.argsort(fwd))
    return (lambda a: np.transpose(a, fwd)), (lambda s: tuple(s[i] for i in inv))
  return (lambda a: a), (lambda s: tuple(s))


_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def structural_targets(abstract_params: Mapping[str, Any], *, stacked_prefixes: Mapping[str, str],
                       module_renames: Mapping[str, str] = {}) -> list[Target]:
  """Targets for every leaf of `abstract_params`, named structurally after the reference.

  A leaf `a/b/kernel` comes from `a.b.weight`; under a stacked prefix (`blocks` → `blocks.{i}`) the
  leading axis is the layer and the sources are one per layer. `module_renames` maps a2jax module
  paths (dotted) to reference names for the few that cannot be spelled the same (`ffn.net_0` →
  `ffn.net.0.proj`).
  """
  targets = []
  for keypath, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
    path = tuple(str(k.key) for k in keypath)
    *modules, name = path
    torch_name = _LEAF_TO_TORCH.get(name, name)
    module = ".".join(modules)
    for a2, ref in module_renames.items():  # longest matching prefix wins: table sorted below
      if module == a2 or module.startswith(a2 + "."):
        module = ref + module[len(a2):]
        break
    shape = tuple(leaf.shape)
    stack_fmt = None
    for prefix, fmt in stacked_prefixes.items():
      if module == prefix or module.startswith(prefix + "."):
        stack_fmt = fmt + module[len(prefix):]
        break
    if stack_fmt is not None:
      layers, per_layer = shape[0], shape[1:]
      layout, inverse = torch_layout(name, len(per_layer))
      sources = tuple(f"{stack_fmt.format(i=i)}.{torch_name}" for i in range(layers))
      targets.append(Target(path, sources, inverse(per_layer), layout, True))
    else:
      layout, inverse = torch_layout(name, len(shape))
      full = f"{module}.{torch_name}" if module else torch_name
      targets.append(Target(path, (full,), inverse(shape), layout, False))
  return targets


def sorted_renames(table: Mapping[str, str]) -> dict[str, str]:
  """A rename table ordered longest prefix first, for `structural_targets`."""
  return dict(sorted(table.items(), key=lambda kv: -len(kv[0])))


def regex_renamer(rules: Iterable[tuple[str, str]]) -> Callable[[str], str]:
  """A key renamer from (pattern, replacement) rules; the first full match wins, else unchanged."""
  compiled = [(re.compile(p), r) for p, r in rules]

  def rename(key: str) -> str:
    for pattern, replacement in compiled:
      if pattern.fullmatch(key):
        return pattern.sub(replacement, key)
    return key
  return rename


def check_plan(targets: list[Target], state_dict: LazyStateDict, ignored: Iterable[str] = (),
               component: str = "model") -> None:
  """Raises one ConversionError listing every missing, unexpected and mis-shaped key."""
  ignored_patterns = [re.compile(p) for p in ignored]
  wanted: dict[str, tuple[int, ...]] = {}
  for t in targets:
    for s in t.sources:
      wanted[s] = t.source_shape
  present = set(state_dict)
  missing = sorted(set(wanted) - present)
  unexpected = sorted(k for k in present - set(wanted)
                      if not any(p.fullmatch(k) for p in ignored_patterns))
  misshaped = sorted(f"{k} {state_dict.shape(k)} (expected {wanted[k]})"
                     for k in set(wanted) & present if tuple(state_dict.shape(k)) != wanted[k])
  problems = []
  for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
    if items:
      shown = ", ".join(items[:8]) + (f", … ({len(items)} in all)" if len(items) > 8 else "")
      problems.append(f"{label}: {shown}")
  if problems:
    raise ConversionError(f"{component} weights do not match the config — " + "; ".join(problems)
                          + ". Check that the config matches the checkpoint.")


def execute(targets: list[Target], state_dict: LazyStateDict, dtype) -> Iterator[tuple[Path, np.ndarray]]:
  """Yields (a2jax path, array in `dtype`) one target at a time."""
  dtype = np.dtype(dtype)
  for t in targets:
    if t.stacked:
      out = None
      for i, key in enumerate(t.sources):
        layer = t.layout(state_dict[key]).astype(dtype)
        if out is None:
          out = np.empty((len(t.sources),) + layer.shape, dtype)
        out[i] = layer
      yield t.path, out
    else:
      yield t.path, np.ascontiguousarray(t.layout(state_dict[t.sources[0]]).astype(dtype))


def nest(items: Iterable[tuple[Path, np.ndarray]]) -> dict[str, Any]:
  """Nested params dict from (path, array) pairs."""
  tree: dict[str, Any] = {}
  for path, value in items:
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return tree


# ---------------------------------------------------------------------------------------------
# Writing: atomic output folders.


def prepare_output(dst: str | os.PathLike, force: bool) -> tuple[pathlib.Path, pathlib.Path]:
  """(final, temporary) folders; refuses an existing `dst` unless `force`."""
  dst = pathlib.Path(dst).resolve()
  if dst.exists() and not force:
    raise ConversionError(f"{dst} already exists: pass --force to overwrite it, or choose another --dst")
  tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.parent.mkdir(parents=True, exist_ok=True)
  return dst, tmp


def commit_output(tmp: pathlib.Path, dst: pathlib.Path) -> None:
  """Moves the finished temporary folder to `dst` (replacing it when --force was given)."""
  if dst.exists():
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old)
  else:
    tmp.rename(dst)


def convert_in_memory(plan, state_dict: Mapping[str, Any], cfg, dtype=None) -> dict[str, Any]:
  """`from_torch` of every component: plan (strict checks), then build the whole params tree."""
  from a2jax.models.layers import dtype_of
  targets, lazy = plan(as_lazy(state_dict), cfg)
  return nest(execute(targets, lazy, dtype or dtype_of(cfg.param_dtype)))
