"""Offline encoding: built triplets → encoded records, so that training runs the DiT alone.

```bash
python -m a2jax.data.encode --src DATA_DIR --checkpoint CONVERTED --dst OUT \
    [--split train] [--num-references N] [--records-per-shard 64] [--batch-size 1] \
    [--target-posterior mean|sample] [--distributed] [data.frames=81 data.seed=0 mesh.fsdp=8 …]
```
`DATA_DIR`: a dataset built by `python -m a2jax.data.triplets`. `CONVERTED`: an a2jax folder with
`vae/`, `umt5/`, `tokenizer/`, `config.yaml` and, for A2, `clip/` and `image_processor/`, whose
`data` section (overridable with key=value) gives the bucket: frames, height, width, frame stride.
Per clip (the grain pipeline's decoding, in stored order, no dropout), as the folder's model
family conditions its sampler (a2jax/families.py):
  latents    = normalise(VAE posterior mean (or a sample) of the clip)
  condition  = A2: mask ‖ normalise(VAE posterior of the condition video) (`a2jax.conditioning`);
               V3 R2V: normalise(VAE posterior of each reference alone), zero latents up to 4
               (`a2jax.conditioning_v3`); the posterior chosen by `sampling.condition_posterior`
               as in sampling
  text       = umT5 states of the caption, zero past its length
  image      = CLIP tokens of the references (A2 only)
`data.seed` seeds each clip's first frame and the posterior samples. One dataset holds one
reference count (a batch needs one shape): `--num-references`, by default the most common count
of the split; clips with another count are counted and reported. `data.num_threads` threads decode.

The models run on the mesh of `config.mesh` with their parameters' logical shardings and the batch
on the data/fsdp axes. Output shard k holds the records at stored positions [k·R, (k+1)·R): it is
written to a temporary file and renamed, so after an interruption the same command skips the
shards already written and finishes the rest (`encode.json` in OUT records the settings; a resume
with different ones is refused). `spec.json` is written last. On several hosts every process runs
the same command and loop (the models are sharded over all of them; processes join as in train.py,
docs/multi-host.md "Multi-host") and process 0 writes; `--distributed` makes a process that finds no others
stop with an error instead of encoding alone. The libraries' log records (absl, grain, JAX, …) are
appended to OUT/encode.log (OUT/encode.process_<i>.log for process i of several).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import itertools
import json
import math
import pathlib
from typing import Any, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from array_record.python import array_record_module
from jax.experimental import multihost_utils

from a2jax import checkpoints, distributed, families, preprocess, sharding, text
from a2jax.configs import Config
from a2jax.data import encoded, pipeline, triplets
from a2jax import logs
from a2jax.errors import InputError
from a2jax.runner import run_main
from a2jax.models import clip as clip_model
from a2jax.models.vae import WanVAE, normalize_latents
from a2jax.video import latent_frames

TOKENIZER_DIR = "tokenizer"
IMAGE_PROCESSOR_DIR = "image_processor"
RUN_FILE = "encode.json"
POSTERIORS = ("mean", "sample")


def features(cfg: Config, num_refs: int) -> dict[str, dict[str, Any]]:
  """The encoded records' shapes for the bucket of `cfg.data`, `num_refs` references and the
  config's model family."""
  d, v, family = cfg.data, cfg.vae, families.of(cfg)
  f = latent_frames(d.frames)
  h, w = d.height // v.scale_factor_spatial, d.width // v.scale_factor_spatial
  shapes = {"latents": [f, h, w, v.z_dim], "condition": list(family.condition_shape(f, h, w, v.z_dim)),
            "text": [cfg.umt5.max_length, cfg.umt5.d_model]}
  if family.uses_clip:
    shapes["image"] = [num_refs * clip_model.num_tokens(cfg.clip), cfg.clip.hidden_size]
  return {k: {"shape": s, "dtype": "float32"} for k, s in shapes.items()}


def _posterior(mean: jax.Array, logvar: jax.Array, keys: jax.Array | None) -> jax.Array:
  if keys is None:
    return mean
  noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(keys)
  return mean + jnp.exp(0.5 * logvar) * noise


@functools.partial(jax.jit, static_argnames=("cfg", "num_refs", "target_sample", "cond_sample"))
def encode_visual(vae_params, clip_params, video, ref_videos, clip_pixels, keys, *, cfg: Config,
                  num_refs: int, target_sample: bool, cond_sample: bool):
  """video (B, F, H, W, 3) in [−1, 1]; ref_videos: what the family VAE-encodes of the references
  (A2: the condition videos (B, F, H, W, 3); V3 R2V: one-frame videos (B, N, 1, H, W, 3)), in
  [−1, 1]; clip_pixels (B, N, c, c, 3) or None; keys (B,) → (latents (B, f, h, w, z), condition
  (`features`), image (B, S·N, D) or None), float32."""
  family = families.of(cfg)
  vae = WanVAE(cfg.vae)
  encode = lambda v: vae.apply({"params": vae_params}, v, method=vae.encode)
  b = video.shape[0]
  refs = ref_videos.reshape(-1, *ref_videos.shape[-4:])
  if refs.shape[1:] == video.shape[1:]:  # A2: one VAE call for the clips and condition videos
    mean, logvar = encode(jnp.concatenate([video, refs]))
    (x_mean, ref_mean), (x_logvar, ref_logvar) = ((a[:b], a[b:]) for a in (mean, logvar))
  else:
    (x_mean, x_logvar), (ref_mean, ref_logvar) = encode(video), encode(refs)
  ref_mean, ref_logvar = (a.reshape(b, -1, *a.shape[-3:]) for a in (ref_mean, ref_logvar))
  target_keys, cond_keys = (jax.vmap(lambda k: jax.random.split(k))(keys).transpose(1, 0, 2)
                            if target_sample or cond_sample else (None, None))
  x0 = _posterior(x_mean, x_logvar, target_keys if target_sample else None)
  cond = _posterior(ref_mean, ref_logvar, cond_keys if cond_sample else None)
  latents = normalize_latents(x0, cfg.vae).astype(jnp.float32)
  condition = family.condition(normalize_latents(cond, cfg.vae), num_refs, cfg.data.frames)
  image = (None if clip_pixels is None else
           clip_model.encode_references(clip_params, cfg.clip, clip_pixels).astype(jnp.float32))
  return latents, condition, image


@dataclasses.dataclass
class Encoder:
  """The encoders of a converted folder (VAE, umT5 and, for A2, CLIP) on one mesh; `__call__`
  encodes a batch of examples."""

  cfg: Config
  params: dict[str, Any]
  tokenizer: Any
  clip_processor: preprocess.ClipImageProcessor | None
  mesh: jax.sharding.Mesh
  target_posterior: str = "mean"
  _programs: dict[Any, Any] = dataclasses.field(default_factory=dict, init=False, repr=False)

  @classmethod
  def from_folder(cls, folder: str | pathlib.Path, overrides: Sequence[str] = (),
                  **kwargs) -> "Encoder":
    folder = pathlib.Path(folder)
    cfg = checkpoints.read_config(folder, overrides)
    families.require_references(cfg, str(folder))
    family = families.of(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    params = {name: checkpoints.load_component(folder, name, getattr(cfg, name), mesh)
              for name in family.components if name != "transformer"}
    processor = (preprocess.ClipImageProcessor.from_folder(folder / IMAGE_PROCESSOR_DIR)
                 if family.uses_clip else None)
    return cls(cfg, params, text.load_tokenizer(folder / TOKENIZER_DIR), processor, mesh, **kwargs)

  def _place(self, x: np.ndarray | None) -> jax.Array | None:
    if x is None:
      return None
    spec = sharding.logical_to_spec(("batch",) + (None,) * (x.ndim - 1), x.shape, self.mesh)
    return jax.device_put(x, jax.sharding.NamedSharding(self.mesh, spec))

  def _run(self, name: str, jitted, params: tuple, inputs: tuple, **static):
    """jitted(*params, *inputs, **static), compiled once per (name, input shapes) (the params are
    the encoder's own); several processes meet after each compile (`distributed.compile_together`)."""
    key = (name, tuple(sorted(static.items())),
           tuple(None if x is None else (x.shape, str(x.dtype)) for x in inputs))
    if key not in self._programs:
      self._programs[key] = distributed.compile_together(jitted, *params, *inputs, name=name,
                                                         **static)
    return self._programs[key](*params, *inputs)

  def __call__(self, examples: list[dict[str, Any]], positions: Sequence[int]) -> list[dict]:
    """Examples of `pipeline.decode_example` (one reference count) at stored `positions` →
    encoded records. `positions` seed the posterior samples, so a resumed run draws the same."""
    cfg, family = self.cfg, families.of(self.cfg)
    num_refs = len(examples[0]["references"])
    video = np.stack([e["video"] for e in examples])
    ref_videos = np.stack([family.vae_input(e["references"], cfg.data.frames) for e in examples])
    clip_pixels = np.stack([e["clip"] for e in examples]) if family.uses_clip else None
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(cfg.data.seed), i))(
        jnp.asarray(positions, jnp.uint32))
    ids, mask = text.tokenize(self.tokenizer, [e["caption"] for e in examples], cfg.umt5.max_length)
    with jax.set_mesh(self.mesh):
      text_states = self._run("umt5", text.encode_ids, (self.params["umt5"],), (ids, mask),
                              cfg=cfg.umt5)
      latents, condition, image = self._run(
          "vae and clip", encode_visual, (self.params["vae"], self.params.get("clip")),
          (self._place(video), self._place(ref_videos), self._place(clip_pixels), keys), cfg=cfg,
          num_refs=num_refs, target_sample=self.target_posterior == "sample",
          cond_sample=cfg.sampling.condition_posterior == "sample")
    out = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True), np.float32)
           for k, v in (("latents", latents), ("condition", condition),
                        ("text", text_states), ("image", image)) if v is not None}
    return [{k: v[i] for k, v in out.items()} for i in range(len(examples))]


def _shard_count(path: pathlib.Path) -> int:
  reader = array_record_module.ArrayRecordReader(str(path))
  n = reader.num_records()
  reader.close()
  return n


def _check_run(dst: pathlib.Path, settings: dict[str, Any], write: bool) -> None:
  path = dst / RUN_FILE
  if path.is_file():
    before = json.loads(path.read_text())
    if before != settings:
      changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
      raise InputError(f"{dst} was started with other settings ({', '.join(changed)} differ): "
                       "resume with the same command, or encode into a new --dst")
  elif write:
    dst.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def encode_dataset(src: str | pathlib.Path, encoder: Encoder, dst: str | pathlib.Path, *,
                   split: str = "train", num_references: int | None = None,
                   records_per_shard: int = 64, batch_size: int = 1, progress: bool = True) -> dict:
  """Encodes every clip of `split` with `num_references` references into `dst`; returns the spec.
  Shards already in `dst` (from an interrupted run with the same settings) are kept."""
  cfg, dst = encoder.cfg, pathlib.Path(dst)
  if records_per_shard <= 0 or batch_size <= 0:
    raise InputError(f"records_per_shard = {records_per_shard} and batch_size = {batch_size} must "
                     "be positive")
  if encoder.target_posterior not in POSTERIORS:
    raise InputError(f"target posterior {encoder.target_posterior!r}: use one of {POSTERIORS}")
  if (dst / encoded.SPEC_FILE).exists():
    raise InputError(f"{dst} already holds a complete encoded dataset: use a new --dst")
  meta = triplets.open_dataset(src).info.metadata
  counts = collections.Counter({int(k): v for k, v in meta["num_references"].get(split, {}).items()})
  if num_references is None:
    if not counts:
      raise InputError(f"{src} has no clips in split {split!r}")
    num_references = counts.most_common(1)[0][0]
  kept, total = counts.get(num_references, 0), sum(counts.values())
  writer = jax.process_index() == 0
  if writer:
    print(f"encoding {kept} of {total} clips of {src} [{split}] (those with {num_references} "
          f"references; reference counts {dict(sorted(counts.items()))}) into {dst}")
  d = cfg.data
  ds = pipeline.triplet_dataset(
      src, frames=d.frames, height=d.height, width=d.width, frame_stride=d.frame_stride,
      seed=cfg.data.seed, split=split, num_references=num_references, num_epochs=1,
      shuffle=False, clip_processor=encoder.clip_processor, family=cfg.family)
  settings = {"src": str(pathlib.Path(src).resolve()), "split": split,
              "num_references": num_references, "records_per_shard": records_per_shard,
              "frames": d.frames, "height": d.height, "width": d.width,
              "frame_stride": d.frame_stride, "seed": cfg.data.seed,
              "target_posterior": encoder.target_posterior,
              "condition_posterior": cfg.sampling.condition_posterior,
              "features": features(cfg, num_references)}
  # every process checks an earlier run's settings before process 0 (re)writes them
  _check_run(dst, settings, write=False)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("a2jax.data.encode: settings checked")
  _check_run(dst, settings, write=writer)
  num_shards = math.ceil(len(ds) / records_per_shard)
  names = [encoded.shard_name(k, num_shards) for k in range(num_shards)]
  done = {k for k in range(num_shards) if (dst / names[k]).is_file()}
  shard_records = {k: _shard_count(dst / names[k]) for k in done}
  bar = tqdm.tqdm(total=kept, initial=sum(shard_records.values()), unit="clip",
                  disable=not (progress and writer))
  options = grain.ReadOptions(num_threads=d.num_threads, prefetch_buffer_size=2 * batch_size)
  for k in sorted(set(range(num_shards)) - done):
    lo, hi = k * records_per_shard, min((k + 1) * records_per_shard, len(ds))
    # (position, example) of this shard's kept clips; None marks a clip of another count.
    items = ds[lo:hi].map_with_index(lambda i, e, lo=lo: (lo + i, e)).to_iter_dataset(options)
    shard = encoded.ShardWriter(dst / names[k], settings["features"]) if writer else None
    try:
      batch: list[tuple[int, dict]] = []
      for item in itertools.chain(items, [None]):   # None: the end, flush the last batch
        if item is not None:
          batch.append(item)
        if batch and (len(batch) == batch_size or item is None):
          # A short last batch is padded with its last clip: one compiled shape for the whole run.
          padded = batch + [batch[-1]] * (batch_size - len(batch))
          records = encoder([e for _, e in padded], [p for p, _ in padded])[:len(batch)]
          if shard is not None:
            for record in records:
              shard.write(record)
          bar.update(len(batch))
          batch = []
    except BaseException:
      if shard is not None:
        shard.abort()
      raise
    if shard is not None:
      shard.close()
      shard_records[k] = shard.count
  bar.close()
  if not writer:
    return {}
  spec = encoded.write_spec(dst, [(names[k], shard_records[k]) for k in range(num_shards)],
                            settings["features"], metadata={**settings, "features": None})
  print(f"{spec['num_records']} records in {num_shards} shards: {dst}")
  return spec


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      description="Built triplets → encoded records (VAE latents, condition, umT5 text, CLIP "
                  "tokens) for DiT-only training. Resumable: rerun the same command.")
  parser.add_argument("--src", required=True, help="dataset folder of python -m a2jax.data.triplets")
  parser.add_argument("--checkpoint", required=True, help="converted a2jax folder (vae, clip, umt5)")
  parser.add_argument("--dst", required=True, help="output folder of encoded records")
  parser.add_argument("--split", default="train")
  parser.add_argument("--num-references", type=int, default=None,
                      help="encode the clips with this many references (default: the most common)")
  parser.add_argument("--records-per-shard", type=int, default=64)
  parser.add_argument("--batch-size", type=int, default=1, help="clips per encoder call")
  parser.add_argument("--target-posterior", choices=POSTERIORS, default="mean",
                      help="the clip's latents: the VAE posterior mean (default) or a sample")
  parser.add_argument("--distributed", action="store_true",
                      help="one of several processes (run the same command on every host): "
                           "refuse to run alone when no multi-process setting is found")
  parser.add_argument("overrides", nargs="*",
                      help="config key=value (data.frames=81, data.seed=0, mesh.fsdp=8, "
                           "distributed.coordinator_address=host:port …)")
  args = parser.parse_args(argv)
  distributed.initialize(checkpoints.read_config(args.checkpoint, args.overrides).distributed)
  if args.distributed and jax.process_count() == 1:
    raise InputError("--distributed, but no other process was found: set distributed.* (or "
                     "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) on every "
                     "process, or run on a TPU pod slice, SLURM or Open MPI")
  with logs.to_file(logs.process_file(args.dst, "encode")):
    encoder = Encoder.from_folder(args.checkpoint, args.overrides,
                                  target_posterior=args.target_posterior)
    encode_dataset(args.src, encoder, args.dst, split=args.split,
                   num_references=args.num_references, records_per_shard=args.records_per_shard,
                   batch_size=args.batch_size)


if __name__ == "__main__":
  raise SystemExit(run_main(main))
