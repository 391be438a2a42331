"""Batches for train.py: encoded records (a2jax.data.encoded) or synthetic ones, per host, then
assembled into global arrays on the batch shardings.

Both sources are grain iterators with `get_state()` / `set_state()`, checkpointed with the run.
"""

from __future__ import annotations

from typing import Any, Iterator

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from a2jax import conditioning, sharding
from a2jax.configs import Config
from a2jax.data.encoded import encoded_loader
from a2jax.errors import ConfigError

CLIP_TOKENS_PER_REFERENCE = 257


def record_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
  """Per-sample shapes of encoded records for the configured bucket (data.frames × height × width,
  data.synthetic_text_len text tokens, data.synthetic_refs references)."""
  data, t = cfg.data, cfg.transformer
  f = conditioning.latent_frames(data.frames)
  h, w = data.height // cfg.vae.scale_factor_spatial, data.width // cfg.vae.scale_factor_spatial
  z = t.out_channels
  if t.in_channels != 2 * z + conditioning.MASK_CHANNELS:
    raise ConfigError(f"transformer.in_channels = {t.in_channels} is not latents ‖ mask ‖ condition "
                      f"= {2 * z + conditioning.MASK_CHANNELS} channels: the A2 layout needs it")
  return {"latents": (f, h, w, z), "condition": (f, h, w, conditioning.MASK_CHANNELS + z),
          "text": (data.synthetic_text_len, t.text_dim),
          "image": (CLIP_TOKENS_PER_REFERENCE * data.synthetic_refs, t.image_dim)}


def synthetic_record(shapes: dict[str, tuple[int, ...]], num_refs: int, seed: int,
                     index: int) -> dict[str, np.ndarray]:
  """One random encoded record, a function of (seed, index): unit-normal latents, the E2V mask
  over `num_refs` latent frames ‖ unit-normal condition latents, text zero past a random length."""
  rng = np.random.default_rng([seed, index])
  f, h, w, z = shapes["latents"]
  mask = conditioning.latent_mask(num_refs, 4 * (f - 1) + 1, h, w)
  text = rng.standard_normal(shapes["text"], np.float32)
  text[rng.integers(1, shapes["text"][0] + 1):] = 0.0
  return {"latents": rng.standard_normal((f, h, w, z), np.float32),
          "condition": np.concatenate([mask, rng.standard_normal((f, h, w, z), np.float32)], -1),
          "text": text, "image": rng.standard_normal(shapes["image"], np.float32)}


def synthetic_loader(cfg: Config, *, batch_size: int, shard_index: int = 0) -> Iterator[Any]:
  """An endless grain iterator of this host's synthetic batches (records seeded by data.seed and
  the host index)."""
  shapes = record_shapes(cfg)
  seed = [cfg.data.seed, shard_index]
  ds = grain.MapDataset.range(1 << 40).map(
      lambda i: synthetic_record(shapes, cfg.data.synthetic_refs, seed, int(i)))
  return iter(ds.batch(batch_size, drop_remainder=True).to_iter_dataset())


def host_rows(batch_size: int, mesh: Mesh) -> tuple[int, int]:
  """(shard_index, shard_count) of this host's rows of a global batch sharded by the "batch" rule:
  the rows its devices hold are block `shard_index` of `shard_count` equal blocks. Hosts whose
  devices hold the same rows (batch not split over them) get the same block, hence read the same
  records."""
  rows = NamedSharding(mesh, sharding.logical_to_spec(("batch",), (batch_size,), mesh))
  held = sorted({index[0].indices(batch_size)[:2]
                 for index in rows.addressable_devices_indices_map((batch_size,)).values()})
  start, stop = held[0][0], held[-1][1]
  if sum(b - a for a, b in held) != stop - start or batch_size % (stop - start) or start % (stop - start):
    raise ConfigError(f"this host's devices hold rows {held} of the batch of {batch_size}: not one "
                      "aligned block; order the mesh so each host's devices are contiguous in batch")
  return start // (stop - start), batch_size // (stop - start)


def host_loader(cfg: Config, mesh: Mesh) -> Iterator[Any]:
  """This host's iterator of {name: (rows, ...) float32} batches: the rows of the global batch
  (train.batch_size) that its devices hold (see `host_rows`)."""
  index, count = host_rows(cfg.train.batch_size, mesh)
  rows = cfg.train.batch_size // count
  if cfg.data.source == "synthetic":
    return synthetic_loader(cfg, batch_size=rows, shard_index=index)
  data = cfg.data
  return encoded_loader(data.data_dir, batch_size=rows, seed=data.seed, shard_index=index,
                        shard_count=count, text_dropout=data.text_dropout,
                        ref_dropout=data.ref_dropout, num_threads=data.num_threads,
                        prefetch=data.prefetch)


def global_batch(local: dict[str, np.ndarray], shardings: dict[str, Any],
                 batch_size: int) -> dict[str, jax.Array]:
  """This host's rows → global arrays of `batch_size` rows on the batch shardings."""
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v),
                                                    (batch_size, *np.shape(v)[1:]))
          for k, v in local.items()}
