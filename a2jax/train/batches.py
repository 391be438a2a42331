"""Batches for train.py: encoded records (a2jax.data.encoded) or synthetic ones, each process
reading the rows of the global batch that its devices hold, assembled into global arrays on the
batch shardings. The global batch of a step is a function of the step alone (not of the number of
processes), so the data position of a checkpoint is its step.
"""

from __future__ import annotations

from typing import Any, Iterator

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from a2jax import families, sharding, video
from a2jax.configs import Config
from a2jax.data.encoded import encoded_dataset
from a2jax.errors import ConfigError

CLIP_TOKENS_PER_REFERENCE = 257


def record_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
  """Per-sample shapes of encoded records for the configured bucket (data.frames × height × width,
  data.synthetic_text_len text tokens, data.synthetic_refs references)."""
  data, t, family = cfg.data, cfg.transformer, families.of(cfg)
  f = video.latent_frames(data.frames)
  h, w = data.height // cfg.vae.scale_factor_spatial, data.width // cfg.vae.scale_factor_spatial
  z = t.out_channels
  if t.in_channels != family.in_channels(z):
    raise ConfigError(f"transformer.in_channels = {t.in_channels}, the {family.name} layout needs "
                      f"{family.in_channels(z)} for {z} latent channels: fix the config's family "
                      "or its transformer section")
  shapes = {"latents": (f, h, w, z), "condition": family.condition_shape(f, h, w, z),
            "text": (data.synthetic_text_len, t.text_dim)}
  if family.uses_clip:
    shapes["image"] = (CLIP_TOKENS_PER_REFERENCE * data.synthetic_refs, t.image_dim)
  return shapes


def synthetic_record(shapes: dict[str, tuple[int, ...]], num_refs: int, seed: int, index: int,
                     family: str = "a2") -> dict[str, np.ndarray]:
  """One random encoded record, a function of (seed, index): unit-normal latents, the family's
  condition over `num_refs` references (`synthetic_condition`), text zero past a random length,
  unit-normal CLIP tokens where the family has them."""
  rng = np.random.default_rng([seed, index])
  f = shapes["latents"][0]
  text = rng.standard_normal(shapes["text"], np.float32)
  text[rng.integers(1, shapes["text"][0] + 1):] = 0.0
  record = {"latents": rng.standard_normal(shapes["latents"], np.float32),
            "condition": families.FAMILIES[family].synthetic_condition(
                rng, num_refs, video.TEMPORAL_STRIDE * (f - 1) + 1, shapes["condition"]),
            "text": text}
  if "image" in shapes:
    record["image"] = rng.standard_normal(shapes["image"], np.float32)
  return record


def record_dataset(cfg: Config) -> grain.MapDataset:
  """The run's endless sequence of records, by global position: the same for any number of
  processes. Encoded: data.data_dir shuffled anew each epoch (data.seed), CFG dropout drawn per
  position; synthetic: `synthetic_record(…, data.seed, position)`."""
  data = cfg.data
  if data.source == "synthetic":
    shapes = record_shapes(cfg)
    return grain.MapDataset.range(1 << 62).map(
        lambda i: synthetic_record(shapes, data.synthetic_refs, data.seed, int(i), cfg.family))
  return encoded_dataset(data.data_dir, seed=data.seed, text_dropout=data.text_dropout,
                         ref_dropout=data.ref_dropout)


def host_row_indices(batch_size: int, mesh: Mesh) -> np.ndarray:
  """The rows of a global batch sharded by the "batch" rule that this process's devices hold,
  ascending. On a mesh whose batch axes span processes they need not be contiguous (process 0 of
  2 may hold rows 0–3 and 8–11), so they come from the sharding's addressable indices."""
  rows = NamedSharding(mesh, sharding.logical_to_spec(("batch",), (batch_size,), mesh))
  held = set()
  for index in rows.addressable_devices_indices_map((batch_size,)).values():
    held.update(range(*index[0].indices(batch_size)))
  return np.array(sorted(held))


def host_loader(cfg: Config, rows: np.ndarray, start_step: int = 0
                ) -> Iterator[dict[str, np.ndarray]]:
  """This process's batches {name: (len(rows), ...) float32} of steps start_step + 1, … : step s's
  global batch is the records at positions (s − 1)·B … s·B − 1 (B = train.batch_size), of which this
  process reads only `rows` (`host_row_indices`). The data position is the step, so a run resumes
  (or moves to another process count) at the batch it stopped at."""
  records = record_dataset(cfg)
  batch_size = cfg.train.batch_size

  def host_batch(step: int) -> dict[str, np.ndarray]:
    picked = [records[int(step) * batch_size + int(r)] for r in rows]
    return {k: np.stack([record[k] for record in picked]) for k in picked[0]}

  options = grain.ReadOptions(num_threads=cfg.data.num_threads,
                              prefetch_buffer_size=cfg.data.prefetch)
  return iter(grain.MapDataset.range(start_step, 1 << 62).map(host_batch).to_iter_dataset(options))


def global_batch(local: dict[str, np.ndarray], shardings: dict[str, Any], batch_size: int,
                 rows: np.ndarray) -> dict[str, jax.Array]:
  """This process's rows (`rows`: their global indices, ascending, as `host_row_indices` gives)
  → global arrays of `batch_size` rows on the batch shardings."""
  def array(sharding, value):
    value = np.asarray(value)
    # a device's block of global rows → their positions in this process's rows
    local_rows = lambda index: np.searchsorted(rows, np.arange(batch_size)[index[0]])
    return jax.make_array_from_callback((batch_size, *value.shape[1:]), sharding,
                                        lambda index: value[local_rows(index)])
  return {k: array(shardings[k], v) for k, v in local.items()}
