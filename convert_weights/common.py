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
  # The inverse of `layout` (a2jax array, one layer when stacked → one source tensor), for export;
  # None where the target cannot be written back.
  to_source: Callable[[np.ndarray], np.ndarray] | None = None


def torch_layout(leaf: str, ndim: int) -> tuple[Callable[[np.ndarray], np.ndarray],
                                                Callable[[tuple[int, ...]], tuple[int, ...]]]:
  """(torch → a2jax array map, a2jax shape → expected torch shape) for one leaf name and rank.

  Linear (out, in) → (in, out); ConvNd (out, in, *k) → (*k, in, out); everything else as is.
  """
  fwd, inv = _kernel_permutation(leaf, ndim)
  return (lambda a: np.transpose(a, fwd)), (lambda s: tuple(s[i] for i in inv))


def torch_unlayout(leaf: str, ndim: int) -> Callable[[np.ndarray], np.ndarray]:
  """The a2jax → torch array map of one leaf name and rank (the inverse of `torch_layout`)."""
  _, inv = _kernel_permutation(leaf, ndim)
  return lambda a: np.transpose(a, inv)


def _kernel_permutation(leaf: str, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(torch → a2jax axes, a2jax → torch axes): a2jax kernels are (*k, in, out), torch (out, in, *k)."""
  if leaf == "kernel" and ndim >= 2:
    fwd = tuple(range(2, ndim)) + (1, 0)
    return fwd, tuple(int(i) for i in np.argsort(fwd))
  return tuple(range(ndim)), tuple(range(ndim))


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
      targets.append(Target(path, sources, inverse(per_layer), layout, True,
                            torch_unlayout(name, len(per_layer))))
    else:
      layout, inverse = torch_layout(name, len(shape))
      full = f"{module}.{torch_name}" if module else torch_name
      targets.append(Target(path, (full,), inverse(shape), layout, False,
                            torch_unlayout(name, len(shape))))
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


# ---------------------------------------------------------------------------------------------
# Export: the same plan run backwards (a2jax leaves → reference tensors), streamed into safetensors.

Item = tuple[str, np.ndarray]


def export_items(targets: list[Target], read_leaf: Callable[[Path], np.ndarray],
                 dtype=None) -> Iterator[Item]:
  """Yields (reference name, tensor) in target order, one a2jax leaf read at a time (a stacked leaf
  yields one tensor per layer); cast to `dtype` when given, else kept as stored."""
  for t in targets:
    if t.to_source is None:
      raise ConversionError(f"{'/'.join(t.path)} has no export layout: give its Target a to_source")
    leaf = read_leaf(t.path)
    layers = leaf if t.stacked else [leaf]
    for name, layer in zip(t.sources, layers):
      tensor = t.to_source(layer)
      if tuple(tensor.shape) != t.source_shape:
        raise ConversionError(f"{name}: exported shape {tuple(tensor.shape)} ≠ {t.source_shape}")
      yield name, np.ascontiguousarray(tensor if dtype is None else tensor.astype(dtype))


def export_shapes(targets: list[Target], dtype_of_leaf: Callable[[Path], np.dtype]
                  ) -> list[tuple[str, tuple[int, ...], np.dtype]]:
  """(reference name, shape, dtype) of every tensor `export_items` yields, in the same order."""
  return [(name, t.source_shape, np.dtype(dtype_of_leaf(t.path))) for t in targets for name in t.sources]


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
  """Bytes of a size such as `5GB` (10⁹, as diffusers' max_shard_size), `500MiB` or `1000000`."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
  if not m:
    raise ConversionError(f"size {text!r} is not a size: write e.g. 5GB, 500MB, 2GiB")
  value = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "B").upper()])
  if value <= 0:
    raise ConversionError(f"size {text!r} must be positive")
  return value


_DTYPE_NAMES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}


def plan_shards(shapes: list[tuple[str, tuple[int, ...], np.dtype]], max_bytes: int
                ) -> list[list[tuple[str, tuple[int, ...], np.dtype]]]:
  """Groups tensors in order into shards of ≤ `max_bytes` (a bigger tensor gets a shard alone)."""
  shards, size = [[]], 0
  for entry in shapes:
    nbytes = int(np.prod(entry[1], dtype=np.int64)) * entry[2].itemsize
    if shards[-1] and size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += nbytes
  return shards


def _safetensors_header(entries: list[tuple[str, tuple[int, ...], np.dtype]]) -> bytes:
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, shape, dtype in entries:
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
  return struct.pack("<Q", len(raw)) + raw


def write_safetensors(folder: pathlib.Path, stem: str, shapes, items: Iterator[Item],
                      max_shard_bytes: int | None = None,
                      on_item: Callable[[str, int], None] | None = None) -> list[pathlib.Path]:
  """Streams `items` (in the order of `shapes`) into `stem.safetensors`, or, past
  `max_shard_bytes`, into `stem-0000i-of-0000n.safetensors` shards with `stem.safetensors.index.json`
  as diffusers / transformers write them. Headers come from `shapes`, so each tensor is written
  as it arrives and none is kept. Returns the files written."""
  shards = plan_shards(shapes, max_shard_bytes) if max_shard_bytes else [list(shapes)]
  names = ([f"{stem}.safetensors"] if len(shards) == 1 else
           [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  items = iter(items)
  for shard, filename in zip(shards, names):
    with open(folder / filename, "wb") as f:
      f.write(_safetensors_header(shard))
      for name, shape, dtype in shard:
        got, tensor = next(items)
        if got != name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
          raise ConversionError(f"export order broken: expected {name} {shape} {dtype}, got {got} "
                                f"{tuple(tensor.shape)} {tensor.dtype}")
        f.write(memoryview(tensor.reshape(-1).view(np.uint8)))
        if on_item:
          on_item(name, tensor.nbytes)
  if len(shards) > 1:
    total = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for _, s, d in shapes)
    weight_map = {name: filename for shard, filename in zip(shards, names) for name, _, _ in shard}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  return [folder / n for n in names]


def reference_config(cfg, a2jax_fields: Iterable[str], header: Mapping[str, Any]) -> dict[str, Any]:
  """The reference's `config.json` of an a2jax component config: its fields carry the reference's
  names; a2jax's own fields are dropped, `header` (class name, versions) is put first."""
  from a2jax import configs
  fields = configs.to_dict(cfg)
  unknown = set(a2jax_fields) - set(fields)
  if unknown:
    raise ConversionError(f"{type(cfg).__name__} has no fields {sorted(unknown)}")
  return {**header, **{k: v for k, v in fields.items() if k not in set(a2jax_fields)}}
