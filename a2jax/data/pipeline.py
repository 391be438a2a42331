"""grain pipeline over the built triplets (`a2jax.data.triplets`): decoded, bucketed training examples.

source (`builder.as_data_source()[split]`) → this host's records (`encoded.shard_for_host`) →
seeded shuffle, a new order each epoch → repeat → [keep clips with `num_references` references] →
decode. Decoding element i draws from a generator seeded by (seed, host, i): the CFG dropout flags,
then the first frame. A restored iterator therefore continues exactly where it stopped.

One example:
  "video"      float32 (F, H, W, 3) in [−1, 1]: F frames at `frame_stride` from a random start,
               each center-cropped to the bucket's aspect ratio and resized to H×W
  "references" float32 (N, H, W, 3) in [−1, 1]: the VAE branch, as sampling builds it for the
               model family (`family.reference_pixels`: A2 `conditioning.reference_pixels`, from
               which `conditioning.condition_video` makes the condition video; V3 R2V
               `conditioning_v3.reference_pixels`, each encoded alone)
  "clip"       float32 (N, c, c, 3): the CLIP branch (512² white squares, CLIP-preprocessed);
               A2 only
  "caption", "name": str;  "start": int (the first frame)
  "drop_text", "drop_refs": bool, classifier-free-guidance dropout: the consumer replaces the text
               states / the reference conditioning by zeros (as `encoded_loader` does), since dropping
               pixels or the caption string would not give the zero context the model trains on.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator

import grain
import numpy as np

from a2jax import families, preprocess, video as video_io
from a2jax.data import encoded, triplets
from a2jax.errors import InputError

log = logging.getLogger(__name__)


def _text(value: Any) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def decode_example(record: dict[str, Any], rng: np.random.Generator, *, frames: int, height: int,
                   width: int, frame_stride: int, text_dropout: float, ref_dropout: float,
                   clip_processor: preprocess.ClipImageProcessor,
                   family: str = "a2") -> dict[str, Any]:
  """A stored triplet record → one training example of `family` (see the module docstring)."""
  model_family = families.FAMILIES[family]
  drop_text, drop_refs = encoded.cfg_dropout_flags(rng, text_dropout, ref_dropout)
  span = (frames - 1) * frame_stride + 1
  num_frames = int(record["num_frames"])
  name = _text(record["name"])
  if num_frames < span:
    raise InputError(f"{name}: {num_frames} frames, the bucket needs {span}")
  start = int(rng.integers(0, num_frames - span + 1))
  clip_frames = video_io.read_frames(record["video"], range(start, start + span, frame_stride))
  video = preprocess.to_vae_pixels(
      np.stack([preprocess.crop_background(f, height, width) for f in clip_frames]))
  images = [triplets.decode_image(b) for b in record["references"]["image"]]
  roles = [_text(r) for r in record["references"]["role"]]
  background = images[-1] if roles[-1] == "background" else None   # the builder puts it last
  subjects = images[:-1] if background is not None else images
  example = {
      "video": video,
      "references": model_family.reference_pixels(subjects, background, height, width),
      "caption": _text(record["caption"]), "name": name, "start": start,
      "drop_text": drop_text, "drop_refs": drop_refs}
  if model_family.uses_clip:
    example["clip"] = preprocess.clip_reference_pixels(images, clip_processor)
  return example


def triplet_dataset(data_dir: str | os.PathLike, *, frames: int, height: int, width: int,
                    seed: int, split: str = "train", frame_stride: int = 1, shard_index: int = 0,
                    shard_count: int = 1, num_references: int | None = None,
                    text_dropout: float = 0.0, ref_dropout: float = 0.0,
                    num_epochs: int | None = None, shuffle: bool = True,
                    clip_processor: preprocess.ClipImageProcessor | None = None,
                    family: str = "a2") -> grain.MapDataset:
  """Unbatched examples of this host (elements of skipped clips are None; iteration skips them).

  `num_references`: keep only clips with that many references (a batch needs one count); how many
  are kept and skipped is logged from the dataset's metadata. `clip_processor`: the release's
  settings by default, or `ClipImageProcessor.from_folder(<converted>/image_processor)`.
  `shuffle=False` keeps the stored order (offline encoding). `family`: the model family the
  references are fitted for (a2jax/families.py).
  """
  builder = triplets.open_dataset(data_dir)
  meta = builder.info.metadata
  if split not in builder.info.splits:
    raise InputError(f"split {split!r} not in {data_dir}: it has {list(builder.info.splits)}")
  span = (frames - 1) * frame_stride + 1
  if span > meta["min_frames"]:
    raise InputError(f"{frames} frames at stride {frame_stride} need {span}-frame clips; {data_dir} "
                     f"was built with min_frames = {meta['min_frames']}: rebuild it with "
                     f"--min-frames {span}, or use fewer frames / a smaller stride")
  encoded.check_probabilities(text_dropout=text_dropout, ref_dropout=ref_dropout)
  video_io.latent_frames(frames)
  ds = grain.MapDataset.source(builder.as_data_source()[split])
  ds = encoded.shard_for_host(ds, shard_index, shard_count)
  ds = (ds.shuffle(seed=seed) if shuffle else ds).repeat(num_epochs)
  if num_references is not None:
    families.FAMILIES[family].check_reference_count(num_references, frames)
    counts = {int(k): v for k, v in meta["num_references"][split].items()}
    kept = counts.get(num_references, 0)
    if not kept:
      raise InputError(f"{data_dir} [{split}] has no clip with {num_references} references "
                       f"(counts: {counts})")
    if kept < sum(counts.values()):
      log.warning("%s [%s]: using the %d of %d clips with %d references (reference counts: %s)",
                  data_dir, split, kept, sum(counts.values()), num_references, counts)
    ds = ds.filter(lambda r: len(r["references"]["role"]) == num_references)
  processor = clip_processor or preprocess.ClipImageProcessor()

  def decode(index: int, record: dict[str, Any]) -> dict[str, Any]:
    return decode_example(record, encoded.element_rng(seed, shard_index, index), frames=frames,
                          height=height, width=width, frame_stride=frame_stride,
                          text_dropout=text_dropout, ref_dropout=ref_dropout,
                          clip_processor=processor, family=family)

  return ds.map_with_index(decode)


def triplet_loader(data_dir: str | os.PathLike, *, batch_size: int, num_threads: int = 4,
                   prefetch: int = 4, **kwargs) -> Iterator[dict[str, np.ndarray]]:
  """A grain iterator of this host's batches (leading batch axis; needs `num_references` when
  batch_size > 1), with `get_state()` / `set_state()`. kwargs: those of `triplet_dataset`."""
  if batch_size <= 0:
    raise InputError(f"batch_size = {batch_size} must be positive")
  if batch_size > 1 and kwargs.get("num_references") is None:
    raise InputError("batches of several clips need one reference count: pass num_references")
  ds = triplet_dataset(data_dir, **kwargs)
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(options).batch(batch_size, drop_remainder=True))
