"""Encoded training records: what the DiT-only training step reads.

One record per clip, every array float32, the same shapes for every record of a dataset (one
training bucket: frames × height × width and number of references, one model family):
  "latents"   (f, h, w, z_dim)       normalised VAE latents of the target video (x0)
  "condition" A2: (f, h, w, 4 + z_dim) mask (4 ch) ‖ normalised condition latents;
              V3 R2V: (4, h, w, z_dim) the normalised reference latents, zero latents after them
  "text"      (T, text_dim)          umT5 states, zero past the prompt
  "image"     (I, image_dim)         CLIP tokens of the N references, I = 257·N (A2 only)

A dataset is a folder of ArrayRecord shards plus `spec.json` (shapes, dtypes, shard files and
their record counts, free-form metadata). A record is the raw bytes of its arrays in the spec's
order: the spec alone says how to cut them, so reading is one `np.frombuffer` per array.
Reading goes through grain: per-host sharding, seeded shuffling (a new order each epoch),
classifier-free-guidance dropout, batching, and a checkpointable iterator.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
from typing import Any, Iterable, Iterator, Mapping

import grain
import numpy as np
from array_record.python import array_record_module

from a2jax.errors import InputError

FEATURES = ("latents", "condition", "text", "image")   # the order of a record's bytes
REQUIRED = ("latents", "condition", "text")            # "image" only where the family has CLIP
SPEC_FILE = "spec.json"
FORMAT = "a2jax.encoded/1"
# group_size 1: every record is its own chunk, so random access reads only that record;
# zstd shrinks the zero text padding.
WRITER_OPTIONS = "group_size:1,zstd:1"


def shard_name(index: int, count: int) -> str:
  return f"encoded-{index:05d}-of-{count:05d}.array_record"


def _features_of(record: Mapping[str, Any], where: str) -> dict[str, dict[str, Any]]:
  missing = [k for k in REQUIRED if k not in record]
  extra = sorted(set(record) - set(FEATURES))
  if missing or extra:
    raise InputError(f"{where}: keys {sorted(record)}; an encoded record has exactly {list(REQUIRED)} and, "
                     f"for A2, 'image' (missing {missing}, unexpected {extra})")
  return {k: {"shape": list(np.shape(record[k])), "dtype": "float32"} for k in FEATURES
          if k in record}


def pack(record: Mapping[str, Any], features: Mapping[str, Any], where: str = "record") -> bytes:
  """The record's arrays as float32 bytes in FEATURES order; keys and shapes must match
  `features`."""
  got = _features_of(record, where)
  if got != dict(features):
    bad = [k for k in FEATURES if got.get(k) != features.get(k)]
    shape = lambda spec: spec["shape"] if spec else "absent"
    raise InputError(
        f"{where}: " + ", ".join(f"{k} {shape(got.get(k))} ≠ {shape(features.get(k))}" for k in bad)
        + "; every record of a dataset has the same shapes: write one dataset per bucket / "
        "reference count")
  return b"".join(np.ascontiguousarray(record[k], np.float32).tobytes() for k in got)


def unpack(data: bytes, features: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Inverse of `pack`: {name: float32 array} (read-only views of `data`)."""
  out, offset = {}, 0
  for k in (k for k in FEATURES if k in features):
    shape = tuple(features[k]["shape"])
    n = int(np.prod(shape))
    out[k] = np.frombuffer(data, np.float32, count=n, offset=offset).reshape(shape)
    offset += 4 * n
  if offset != len(data):
    raise InputError(f"an encoded record has {len(data)} bytes, its spec says {offset}: the shard "
                     "and spec.json come from different writes; re-encode the dataset")
  return out


class ShardWriter:
  """Writes one ArrayRecord shard atomically: to `<path>.tmp`, renamed on `close()`. Every record
  must have the shapes of `features` ({name: {"shape": [...], "dtype": "float32"}})."""

  def __init__(self, path: str | os.PathLike, features: Mapping[str, Any]):
    self.path = pathlib.Path(path)
    self.features = dict(features)
    self.count = 0
    self._tmp = self.path.with_name(self.path.name + ".tmp")
    self._writer = array_record_module.ArrayRecordWriter(str(self._tmp), WRITER_OPTIONS)

  def write(self, record: Mapping[str, Any]) -> None:
    self._writer.write(pack(record, self.features, f"record {self.count} of {self.path.name}"))
    self.count += 1

  def close(self) -> None:
    self._writer.close()
    os.replace(self._tmp, self.path)

  def abort(self) -> None:
    self._writer.close()
    self._tmp.unlink(missing_ok=True)


def write_spec(out_dir: str | os.PathLike, shards: list[tuple[str, int]],
               features: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> dict:
  """Writes `spec.json` (atomically) for shards [(file name, record count)] already in `out_dir`."""
  spec = {"format": FORMAT, "num_records": sum(n for _, n in shards),
          "shards": [{"file": f, "num_records": n} for f, n in shards],
          "features": dict(features), "metadata": dict(metadata or {})}
  path = pathlib.Path(out_dir) / SPEC_FILE
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(spec, indent=1))
  os.replace(tmp, path)
  return spec


def write_encoded(records: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike,
                  num_shards: int = 1, metadata: Mapping[str, Any] | None = None) -> dict:
  """Writes records round-robin into `num_shards` ArrayRecord files plus `spec.json`; returns the spec.

  Records stream through (only one is held at a time). Shards are renamed into place when all
  records are written, and `spec.json` last: a folder with a spec is complete.
  """
  out = pathlib.Path(out_dir)
  if (out / SPEC_FILE).exists():
    raise InputError(f"{out} already holds an encoded dataset: write to a new folder or delete it")
  if num_shards <= 0:
    raise InputError(f"num_shards = {num_shards} must be positive")
  records = iter(records)
  first = next(records, None)
  if first is None:
    raise InputError(f"no records to write into {out}")
  features = _features_of(first, "record 0")
  out.mkdir(parents=True, exist_ok=True)
  writers = [ShardWriter(out / shard_name(i, num_shards), features) for i in range(num_shards)]
  try:
    for i, record in enumerate(itertools.chain([first], records)):
      writers[i % num_shards].write(record)
  except BaseException:
    for w in writers:
      w.abort()
    raise
  for w in writers:
    w.close()
  return write_spec(out, [(w.path.name, w.count) for w in writers], writers[0].features, metadata)


def read_spec(data_dir: str | os.PathLike) -> dict:
  """The dataset's `spec.json`, checked against the shard files beside it."""
  path = pathlib.Path(data_dir) / SPEC_FILE
  if not path.is_file():
    raise InputError(f"{data_dir} has no {SPEC_FILE}: it is not a (complete) encoded dataset; "
                     "write one with a2jax.data.encoded.write_encoded or python -m a2jax.data.encode")
  spec = json.loads(path.read_text())
  if spec.get("format") != FORMAT:
    raise InputError(f"{path}: format {spec.get('format')!r}, expected {FORMAT!r}")
  missing = [s["file"] for s in spec["shards"] if not (path.parent / s["file"]).is_file()]
  if missing:
    raise InputError(f"{data_dir}: shard files {missing} named in {SPEC_FILE} are missing")
  return spec


class EncodedSource(grain.sources.RandomAccessDataSource):
  """Random access to the decoded records of an encoded dataset ({name: float32 array})."""

  def __init__(self, data_dir: str | os.PathLike):
    self.spec = read_spec(data_dir)
    paths = [str(pathlib.Path(data_dir) / s["file"]) for s in self.spec["shards"]]
    self._source = grain.sources.ArrayRecordDataSource(paths)
    if len(self._source) != self.spec["num_records"]:
      raise InputError(f"{data_dir}: shards hold {len(self._source)} records, {SPEC_FILE} says "
                       f"{self.spec['num_records']}: re-encode the dataset")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return unpack(self._source[index], self.spec["features"])


def shard_for_host(ds: grain.MapDataset, shard_index: int, shard_count: int) -> grain.MapDataset:
  """Host `shard_index` of `shard_count` takes every shard_count-th record. The tail that does not
  divide evenly is dropped so every host sees the same number of records per epoch (no host runs
  out of batches before the others)."""
  if not 0 <= shard_index < shard_count:
    raise InputError(f"shard_index {shard_index} must be in [0, shard_count = {shard_count})")
  n = len(ds) - len(ds) % shard_count
  if n == 0:
    raise InputError(f"{len(ds)} records cannot be split over {shard_count} hosts")
  return ds[:n][shard_index::shard_count]


def element_rng(seed: int, shard_index: int, index: int) -> np.random.Generator:
  """The random generator of element `index` of host `shard_index`: a function of these numbers
  only, so a restored iterator draws exactly what the interrupted one would have drawn."""
  return np.random.default_rng([seed, shard_index, index])


def cfg_dropout_flags(rng: np.random.Generator, text_dropout: float,
                      ref_dropout: float) -> tuple[bool, bool]:
  """(drop the text, drop the references): two independent draws, the first two of `rng`."""
  u = rng.random(2)
  return bool(u[0] < text_dropout), bool(u[1] < ref_dropout)


def check_probabilities(**probabilities: float) -> None:
  for name, p in probabilities.items():
    if not 0.0 <= p <= 1.0:
      raise InputError(f"{name} = {p} must be a probability in [0, 1]")


def encoded_dataset(data_dir: str | os.PathLike, *, seed: int, shard_index: int = 0,
                    shard_count: int = 1, text_dropout: float = 0.0, ref_dropout: float = 0.0,
                    num_epochs: int | None = None, shuffle: bool = True) -> grain.MapDataset:
  """Unbatched records of this host: sharded, shuffled anew each epoch, repeated, CFG dropout.

  Dropout sets "text" to zeros (the unconditional prompt of training) with probability
  `text_dropout`, and the references' conditioning to zeros with probability `ref_dropout`,
  independently, from a generator seeded by (seed, shard_index, position): A2's "image" (the CLIP
  tokens; its condition video stays, as in its sampler's unconditional branch), or, in a record
  without CLIP tokens (V3 R2V), the reference latent frames "condition" (its sampler's third
  branch: all-zero reference frames).
  """
  check_probabilities(text_dropout=text_dropout, ref_dropout=ref_dropout)
  ds = shard_for_host(grain.MapDataset.source(EncodedSource(data_dir)), shard_index, shard_count)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)

  def dropout(index: int, record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = element_rng(seed, shard_index, index)
    drop_text, drop_refs = cfg_dropout_flags(rng, text_dropout, ref_dropout)
    record = dict(record)
    if drop_text:
      record["text"] = np.zeros_like(record["text"])
    if drop_refs:
      refs = "image" if "image" in record else "condition"
      record[refs] = np.zeros_like(record[refs])
    return record

  return ds.map_with_index(dropout)


def encoded_loader(data_dir: str | os.PathLike, *, batch_size: int, seed: int, shard_index: int = 0,
                   shard_count: int = 1, text_dropout: float = 0.0, ref_dropout: float = 0.0,
                   num_epochs: int | None = None, num_threads: int = 4,
                   prefetch: int = 4) -> Iterator[dict[str, np.ndarray]]:
  """A grain iterator of this host's batches: {name: (batch_size, ...) float32 numpy array}.

  `batch_size` is per host. Batches never straddle a dropped remainder: the last partial batch of
  a finite run is dropped. The iterator has `get_state()` / `set_state(state)` (a small dict) for
  checkpoints: restored, it continues with exactly the batch that would have come next.
  """
  if batch_size <= 0:
    raise InputError(f"batch_size = {batch_size} must be positive")
  ds = encoded_dataset(data_dir, seed=seed, shard_index=shard_index, shard_count=shard_count,
                       text_dropout=text_dropout, ref_dropout=ref_dropout, num_epochs=num_epochs)
  ds = ds.batch(batch_size, drop_remainder=True)
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(options))
