"""The embedded default: a small A2 model trained on this CPU, sampled on combinations it never saw.

    python -m a2jax.demo [--out out/demo] [--retrain] [--vae-steps N] [key=value …]
                                                        (make demo, make demo RETRAIN=1)

Every stage runs the library's own code paths (configs/demo.yaml gives the model):
1. data     the synthetic_elements/demo dataset (a2jax.data.synthetic): training clips of one
            element moving over a background, and held-out clips whose element / background
            combinations never occur in training.
2. model    a converted-folder layout under OUT/model: the WanVAE trained here on the clips'
            frames (its video path the inflated image path: `inflate`), its latent mean / std
            measured on the clips; umT5 and CLIP random and frozen; a word-level tokenizer of the
            captions' vocabulary; the CLIP processor.
3. encode   the training clips → encoded records (a2jax.data.encode.Encoder: VAE latents,
            condition latents + mask, umT5 states, CLIP tokens), as for the release.
4. dit      `python train.py OUT/model/config.yaml …`: the A2 transformer trained on the records
            (flow matching, AdamW, EMA), its EMA parameters copied to OUT/model/transformer.
5. sample   `A2Pipeline.from_folder(OUT/model)` on held-out clips: two as mp4 + PNG strips
            (references, then frames), and the synthetic fidelity scores (a2jax.eval.fidelity) of
            the trained model, of an untrained transformer with the same VAE, and of the truth
            passed through the VAE.
A stage whose output exists is reused; --retrain starts again after the data. `--vae-steps 2
train.steps=2 train.warmup_steps=1 sampling.steps=1` runs every stage at a token size: a check of
the setup (its time is mostly compiling), not a useful model.
The terminal shows the demo's lines and progress bars; the libraries' log records (TFDS, orbax,
grain, JAX, absl) go to OUT/demo.log and train.py's to OUT/runs/dit/train.log.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from PIL import Image, ImageDraw

from a2jax import checkpoints, configs, text, video
from a2jax import logs
from a2jax.data import encode, encoded, synthetic
from a2jax.errors import ConfigError, TrainingError
from a2jax.runner import run_main
from a2jax.eval import fidelity
from a2jax.models import clip as clip_model
from a2jax.models import transformer as transformer_model
from a2jax.models import umt5 as umt5_model
from a2jax.models.vae import WanVAE
from a2jax.pipeline import IMAGE_PROCESSOR_DIR, TOKENIZER_DIR, A2Pipeline, video_to_uint8
from a2jax.preprocess import PREPROCESSOR_CONFIG, to_vae_pixels
from a2jax.train.checkpointing import trained_params

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG = configs.CONFIG_DIR / "demo.yaml"
DATASET = "demo"
SAMPLED = 2        # held-out clips written as mp4 and PNG strips
SCORED = 8         # held-out clips scored


@dataclasses.dataclass(frozen=True)
class VAETraining:
  """The demo VAE's training: random 32×32 crops of single frames (the causal VAE's image path;
  `inflate` makes its video path follow), loss L1 + L2 of the reconstruction from the posterior
  mean + a small KL term, Adam with warmup and cosine decay."""

  steps: int = 1500
  batch_size: int = 8
  learning_rate: float = 4e-3
  crop: int = 32
  element_crops: float = 0.5
  element_weight: float = 10.0
  kl_weight: float = 1e-6
  seed: int = 0


class Paths:
  """The demo's folders under OUT, one a stage: data, model (the converted folder), encoded,
  runs (train.py's), samples; and demo.log, the libraries' log records (a2jax.logs)."""

  def __init__(self, out: pathlib.Path):
    self.out = pathlib.Path(out)
    self.data, self.model, self.encoded, self.runs, self.samples = (
        self.out / name for name in ("data", "model", "encoded", "runs", "samples"))
    self.log = self.out / "demo.log"


def log(message: str) -> None:
  print(f"[demo] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# 2. The model folder: VAE, frozen encoders, tokenizer, image processor.


def build_tokenizer(folder: pathlib.Path, words: Sequence[str]):
  """A word-level T5 tokenizer of `words` (one token a word, plus <pad>, </s>, <unk>)."""
  return text.train_tokenizer(folder, [" ".join(words)], len(words) + 3, model_type="word")


def inflate(path, kernel: jax.Array) -> jax.Array:
  """The causal VAE's video path as its image path: every 3×3×3 conv sees only the current frame
  (its two past-frame taps zero), the encoder's temporal downsampling keeps the later frame, the
  decoder's temporal upsampling repeats the frame. Training on single frames leaves this intact
  (the past taps only ever see zeros), so a video's latent frame k encodes its frame 4k and
  decodes to it, repeated over the 4 frames of its chunk: the image VAE inflated in time, as video
  VAEs are initialised. Learning motion inside a chunk would take more training than the demo's
  budget (measured: 200 video steps blur the elements and lower the fidelity)."""
  names = [str(getattr(k, "key", k)) for k in path]
  if names[-1] != "kernel" or kernel.ndim != 5 or kernel.shape[0] != 3:
    return kernel
  if "time_conv" in names:   # (3, 1, 1, C, C) down or (3, 1, 1, C, 2C) up: identity on frame t
    c_in, c_out = kernel.shape[3:]
    identity = jnp.tile(jnp.eye(c_in, dtype=kernel.dtype), (1, c_out // c_in))
    return jnp.zeros_like(kernel).at[2, 0, 0].set(identity)
  return kernel.at[:2].set(0.0)


def train_vae(cfg: configs.VAEConfig, frames: np.ndarray, elements: np.ndarray,
              centres: np.ndarray, settings: VAETraining) -> Any:
  """Trains the WanVAE on crops of `frames` (uint8 (N, H, W, 3)); returns its params.

  Elements are a few percent of the pixels, and their colours and edges are what the evaluation
  looks at, so the reconstruction loss weighs the pixels of `elements` (bool (N, H, W)) by
  `settings.element_weight`, and a share `settings.element_crops` of the crops is centred
  (± a quarter crop) on `centres` (N, 2) (x, y), an element of each frame."""
  vae = WanVAE(cfg)
  params = jax.jit(lambda k: jax.tree_util.tree_map_with_path(
      inflate, nn.meta.unbox(vae.init(k, jnp.zeros((1, 5, 16, 16, 3)))["params"])))(
          jax.random.key(settings.seed))
  tx = optax.adam(optax.warmup_cosine_decay_schedule(
      0.0, settings.learning_rate, min(20, settings.steps // 4), settings.steps,
      settings.learning_rate / 10))

  def loss_fn(p, x, w):
    mean, logvar = vae.apply({"params": p}, x, method=vae.encode)
    y = vae.apply({"params": p}, mean, method=vae.decode)
    kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1 - logvar)
    err = jnp.abs(y - x) + jnp.square(y - x)
    rec = jnp.sum(w[..., None] * err) / (3 * jnp.sum(w))
    return rec + settings.kl_weight * kl, rec

  @jax.jit
  def step(p, opt_state, x, w):
    (_, rec), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, x, w)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, rec

  rng = np.random.default_rng(settings.seed)
  c, b = settings.crop, settings.batch_size
  room = np.array(frames.shape[2:0:-1]) - c                      # (x, y) of the last crop corner
  opt_state = tx.init(params)
  bar = tqdm.trange(settings.steps, desc="vae", unit="step", mininterval=2)
  for _ in bar:
    picks = rng.integers(len(frames), size=b)
    corners = rng.integers(0, room + 1, size=(b, 2))
    focused = centres[picks] - c / 2 + rng.uniform(-c / 4, c / 4, size=(b, 2))
    use = rng.random(b) < settings.element_crops
    corners[use] = np.clip(np.round(focused[use]), 0, room).astype(int)
    window = [(i, slice(y, y + c), slice(x, x + c)) for i, (x, y) in zip(picks, corners)]
    batch = np.stack([frames[i, ys, xs] for i, ys, xs in window])[:, None]
    weight = 1 + (settings.element_weight - 1) * np.stack([elements[i, ys, xs]
                                                            for i, ys, xs in window])[:, None]
    params, opt_state, rec = step(params, opt_state, to_vae_pixels(batch),
                                  weight.astype(np.float32))
    bar.set_postfix_str(f"loss {float(rec):.3f}", refresh=False)
  return params


def latent_statistics(vae_params, cfg: configs.VAEConfig, clips: Sequence[np.ndarray]
                      ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of the clips' latents (the release's latents_mean / latents_std).
  The inflated VAE's latent frames are the image latents of frames 0, 4, 8, …, so those frames
  are encoded as images (a much smaller program than the video encoder)."""
  vae = WanVAE(cfg)
  encode_fn = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode)[0])
  frames = np.concatenate([clip[::video.TEMPORAL_STRIDE] for clip in clips])[:, None]
  means = np.concatenate([np.asarray(encode_fn(vae_params, to_vae_pixels(frames[i:i + 32])))
                          .reshape(-1, cfg.z_dim) for i in range(0, len(frames) - 31, 32)])
  return tuple(float(v) for v in means.mean(0)), tuple(float(v) for v in means.std(0))


def build_model_folder(paths: Paths, cfg: configs.Config, train_records: Sequence[dict],
                       settings: VAETraining) -> configs.Config:
  """Writes OUT/model (all but the transformer); returns the config with the VAE's statistics."""
  folder = paths.model
  tmp = folder.with_name(folder.name + ".partial")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  tokenizer = build_tokenizer(tmp / TOKENIZER_DIR, synthetic.vocabulary())
  if len(tokenizer) > cfg.umt5.vocab_size:
    raise ConfigError(f"the caption tokenizer has {len(tokenizer)} tokens > umt5.vocab_size "
                      f"= {cfg.umt5.vocab_size} in {CONFIG}: raise it")
  size = cfg.clip.image_size
  (tmp / IMAGE_PROCESSOR_DIR).mkdir()
  (tmp / IMAGE_PROCESSOR_DIR / PREPROCESSOR_CONFIG).write_text(json.dumps(
      {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}))
  k_clip, k_umt5 = jax.random.split(jax.random.key(settings.seed + 1))
  checkpoints.save_params(tmp / "clip", clip_model.init_params(cfg.clip, k_clip))
  checkpoints.save_params(tmp / "umt5", umt5_model.init_params(cfg.umt5, k_umt5))
  clips = [synthetic.record_frames(r) for r in train_records]
  specs = [synthetic.record_clip(r) for r in train_records]
  rng = np.random.default_rng(settings.seed)
  centres = np.concatenate([spec.centres(int(rng.integers(len(spec.elements)))) for spec in specs])
  elements = np.concatenate([np.any(frames != synthetic.render_background(
      spec.background, spec.height, spec.width), axis=-1) for frames, spec in zip(clips, specs)])
  log(f"training the VAE: {settings.steps} steps on frames of {len(clips)} clips")
  vae_params = train_vae(cfg.vae, np.concatenate(clips), elements, centres, settings)
  mean, std = latent_statistics(vae_params, cfg.vae, clips[:64])
  cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, latents_mean=mean,
                                                         latents_std=std))
  checkpoints.save_params(tmp / "vae", vae_params)
  checkpoints.write_config(tmp, cfg)
  shutil.rmtree(folder, ignore_errors=True)
  os.replace(tmp, folder)
  return cfg


# ---------------------------------------------------------------------------------------------
# 3. Encoding, 4. the transformer.


def encode_clips(paths: Paths, records: Sequence[dict], batch_size: int = 8) -> None:
  """Training clips → encoded records under OUT/encoded, through a2jax.data.encode.Encoder."""
  encoder = encode.Encoder.from_folder(paths.model)

  def batches() -> Iterator[dict]:
    for lo in tqdm.trange(0, len(records), batch_size, desc="encode", unit="batch"):
      chunk = [synthetic.encoder_example(r, encoder.clip_processor)
               for r in records[lo:lo + batch_size]]
      n = len(chunk)
      chunk += [chunk[-1]] * (batch_size - n)      # one compiled shape
      yield from encoder(chunk, list(range(lo, lo + batch_size)))[:n]

  tmp = paths.encoded.with_name(paths.encoded.name + ".partial")
  shutil.rmtree(tmp, ignore_errors=True)
  encoded.write_encoded(batches(), tmp, metadata={"source": f"synthetic_elements/{DATASET}"})
  os.replace(tmp, paths.encoded)


def train_transformer(paths: Paths) -> None:
  """Runs train.py on the encoded records (the folder's config), then copies its EMA parameters
  into the folder."""
  run = paths.runs / "dit"
  shutil.rmtree(run, ignore_errors=True)
  command = [sys.executable, str(REPO / "train.py"), str(paths.model / checkpoints.CONFIG_FILE),
             f"output_dir={paths.runs}", "run_name=dit", f"data.data_dir={paths.encoded}"]
  log(" ".join(command[1:]))
  code = subprocess.run(command).returncode
  if code:
    raise TrainingError(f"train.py stopped with exit status {code} (its message is above); fix "
                        f"that, then run the demo again")
  tmp = paths.model / "transformer.partial"
  shutil.rmtree(tmp, ignore_errors=True)
  checkpoints.save_params(tmp, trained_params(run / "checkpoints"))
  os.replace(tmp, paths.model / "transformer")


# ---------------------------------------------------------------------------------------------
# 5. Sampling and scores.


def strip(rows: Sequence[tuple[str, Sequence[np.ndarray], np.ndarray]]) -> np.ndarray:
  """A picture: per row, its caption, then the references, a gap and the frames, enlarged
  (nearest neighbour) to at least 96 pixels a frame."""
  line = 14
  pictures = []
  for caption, refs, frames in rows:
    h, w = frames.shape[1:3]
    scale = max(1, -(-96 // w))
    gap = np.full((h, w // 4, 3), 255, np.uint8)
    body = np.concatenate([*refs, gap, *frames], axis=1)
    body = np.asarray(Image.fromarray(body).resize((body.shape[1] * scale, h * scale),
                                                   Image.Resampling.NEAREST))
    head = Image.new("RGB", (body.shape[1], line + 4), "white")
    ImageDraw.Draw(head).text((4, 2), caption, fill=(0, 0, 0))
    pictures += [np.asarray(head), body]
  width = max(p.shape[1] for p in pictures)
  return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=255)
                         for p in pictures])


def sample_and_score(paths: Paths, records: Sequence[dict]) -> dict[str, Any]:
  """Samples held-out clips with the trained folder; writes the videos and strips; returns the
  scores of the trained transformer, an untrained one and the truth through the VAE."""
  pipe = A2Pipeline.from_folder(paths.model)
  cfg = pipe.cfg
  paths.samples.mkdir(parents=True, exist_ok=True)
  vae = WanVAE(cfg.vae)
  roundtrip = jax.jit(lambda p, x: vae.apply(
      {"params": p}, vae.apply({"params": p}, x, method=vae.encode)[0], method=vae.decode))
  trained = pipe.params["transformer"]
  untrained = transformer_model.init_params(cfg.transformer, jax.random.key(1))
  scores: dict[str, list] = {"trained": [], "untrained": [], "vae": []}
  rows = []
  for i, record in enumerate(tqdm.tqdm(records, desc="sample", unit="clip")):
    clip = synthetic.record_clip(record)
    refs = synthetic.record_references(record)
    results = {}
    for name, params in (("trained", trained), ("untrained", untrained)):
      pipe.params = {**pipe.params, "transformer": params}
      results[name] = pipe(clip.caption, refs[:-1], refs[-1], progress=False).frames[0]
    truth = synthetic.record_frames(record)
    recon = video_to_uint8(roundtrip(pipe.params["vae"], to_vae_pixels(truth[None]))[0])
    kept = len(results["trained"])
    clip_name = record["name"].decode()
    for name, frames in (*results.items(), ("vae", recon[-kept:])):
      scores[name].append({"name": clip_name, **fidelity.score_video(frames, clip)})
    if i < SAMPLED:
      video.write_mp4(paths.samples / f"{clip_name}.mp4", results["trained"], cfg.sampling.fps)
      row = (clip.caption, refs, results["trained"])
      Image.fromarray(strip([row])).save(paths.samples / f"{clip_name}.png")
      rows.append(row)
  pipe.params = {**pipe.params, "transformer": trained}
  Image.fromarray(strip(rows)).save(paths.samples / "demo.png")
  summary = {name: fidelity.summarize(s) for name, s in scores.items()}
  (paths.samples / "scores.json").write_text(json.dumps({"mean": summary, "videos": scores},
                                                        indent=1))
  return summary


def print_scores(summary: dict[str, dict[str, float]], count: int) -> None:
  labels = {"trained": "trained A2 (this demo)", "untrained": "untrained transformer, same VAE",
            "vae": "the truth through the VAE"}
  keys = (*fidelity.SCORES, "fidelity")
  print(f"\nE2V fidelity on {count} held-out combinations (a2jax.eval.fidelity, 0–1):")
  print(f"{'':34s}" + "".join(f"{k:>11s}" for k in keys))
  for name, label in labels.items():
    print(f"{label:34s}" + "".join(f"{summary[name][k]:11.3f}" for k in keys))


# ---------------------------------------------------------------------------------------------


def cpu_seconds() -> float:
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m a2jax.demo", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="out/demo", help="where everything is written")
  parser.add_argument("--retrain", action="store_true",
                      help="train the model again (the dataset is kept)")
  parser.add_argument("--vae-steps", type=int, default=VAETraining.steps, metavar="N",
                      help="the VAE's training steps for a new training (default %(default)s; a "
                           "few, with train.steps=…, check every stage quickly)")
  parser.add_argument("overrides", nargs="*", metavar="key=value",
                      help="overrides of configs/demo.yaml for a new training (train.steps=100)")
  args = parser.parse_args(argv)
  cfg = configs.load(CONFIG, args.overrides)
  paths = Paths(pathlib.Path(args.out).resolve())
  if args.vae_steps < 1:
    raise ConfigError(f"--vae-steps {args.vae_steps}: train the VAE for at least 1 step")
  if ((args.overrides or args.vae_steps != VAETraining.steps) and not args.retrain
      and (paths.model / "vae").is_dir()):
    raise ConfigError(f"overrides and --vae-steps apply to a new training, and {paths.model} is "
                      "already trained: add --retrain (make demo RETRAIN=1) or drop them")
  # Compiled programs are cached on disk: a second run skips the compiles.
  jax.config.update("jax_compilation_cache_dir", str(paths.out / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(paths.out / "jax_cache")
  if args.retrain:
    for path in (paths.model, paths.encoded, paths.runs, paths.samples):
      shutil.rmtree(path, ignore_errors=True)
  start, cpu_start = time.perf_counter(), cpu_seconds()
  timings = {}

  def stage(name: str, fn, *a) -> Any:
    t = time.perf_counter()
    out = fn(*a)
    timings[name] = time.perf_counter() - t
    log(f"{name}: {timings[name]:.0f} s")
    return out

  with logs.to_file(paths.log) as log_file:
    data = stage("data", synthetic.build, paths.data, DATASET)
    source = data.as_data_source()
    train_records = [source["train"][i] for i in range(len(source["train"]))]
    heldout_records = [source["heldout"][i] for i in range(min(SCORED, len(source["heldout"])))]
    trained_now = False
    if not (paths.model / "vae").is_dir():
      stage("model", build_model_folder, paths, cfg, train_records,
            dataclasses.replace(VAETraining(), steps=args.vae_steps))
      trained_now = True
    if not (paths.encoded / encoded.SPEC_FILE).is_file():
      stage("encode", encode_clips, paths, train_records)
    if not (paths.model / "transformer").is_dir():
      stage("dit", train_transformer, paths)
      trained_now = True
    if not trained_now:
      log(f"reusing the trained model in {paths.model} (--retrain / make demo RETRAIN=1 to train "
          "again)")
    summary = stage("sample", sample_and_score, paths, heldout_records)
  print_scores(summary, len(heldout_records))
  print(f"\nvideos and strips (references, then frames): {paths.samples}/*.mp4, *.png "
        f"(both: {paths.samples}/demo.png); scores: {paths.samples}/scores.json")
  print(f"the libraries' log records (TFDS, orbax, JAX): {log_file}, "
        f"{paths.runs / 'dit' / 'train.log'}")
  print(f"total {time.perf_counter() - start:.0f} s wall, {cpu_seconds() - cpu_start:.0f} s CPU "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
  return 0


if __name__ == "__main__":
  sys.exit(run_main(main))
