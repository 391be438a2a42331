"""Long video from a SkyReels-V2 diffusion-forcing folder (family `v2_df`): a prompt, and for
image-to-video a first frame, → a video of any length, window by window (a2jax.diffusion_forcing),
the frames decoded one latent frame at a time so that they can be written as they come.

```python
pipe = DiffusionForcingPipeline.from_folder("a2jax-v2-df", mesh=sharding.make_mesh(cfg.mesh))
sampling = dataclasses.replace(pipe.cfg.sampling, frames=257, overlap_history=17,
                               addnoise_condition=20)
latents = pipe.latents([VideoRequest("A cat walks along a wall.", seed=1)], sampling)
video.write_mp4("cat.mp4", (chunk[0] for chunk in pipe.decode_stream(latents)), sampling.fps)
```

Stages: text (umT5, prompt and negative prompt in one batch) · first frame (image-to-video: the
VAE latent of the image resized to the video, as diffusers' pipeline makes it) · windows (one
compiled program per window shape; history kept as latents on the host) · streamed VAE decode.
Elements-to-video of any length from an A2 or V3 R2V folder (`LongElementsPipeline`): windows of
the model's own length, each after the first holding its first scene frames to the last latent
frames of the video so far (`pipeline.History`), the references in every window as in a short video.

Shapes: B videos, f latent frames of the whole video, h / w latent height / width, z latent channels.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import tqdm

from a2jax import diffusion_forcing as df
from a2jax import pipeline, preprocess, schedulers, video
from a2jax.configs import SamplingConfig
from a2jax.errors import CheckpointError, InputError
from a2jax.models import lora
from a2jax.models.vae import normalize_latents
from a2jax.video import TEMPORAL_STRIDE, latent_frames

# Latent frames of history when none is given: 17 pixel frames, SkyReels-V2's recommended overlap
# (at most half of a window's scene frames).
DEFAULT_HISTORY_LATENT = 5
WINDOW_NOISE_STREAM = 2  # fold_in of a row's seed key that draws windows ≥ 1 (0 / 1: pipeline's)


@dataclasses.dataclass(frozen=True)
class VideoRequest:
  """One video: `image` the first frame for image-to-video (uint8 HWC, any of RGB, RGBA,
  grayscale) or None for text-to-video; `negative_prompt` None: the sampling config's, else the
  family's ("");
  `seed` None: the sampling config's."""

  prompt: str
  image: np.ndarray | None = None
  negative_prompt: str | None = None
  seed: int | None = None


def first_frame_pixels(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """An image → the first frame (H, W, 3) float32 in [−1, 1]: RGB, resized to the video with
  Lanczos, as diffusers' VideoProcessor does (no crop: the aspect ratio follows the video)."""
  rgb = PIL.Image.fromarray(preprocess.to_rgb(image))
  if rgb.size != (width, height):
    rgb = rgb.resize((width, height), resample=PIL.Image.LANCZOS)
  return 2.0 * (np.asarray(rgb, np.float32) / 255.0) - 1.0


class DiffusionForcingPipeline:
  """A SkyReels-V2 DF folder's components on one mesh (an `A2Pipeline` of family v2_df, whose text
  encoding, compiled-program cache and streamed decode it uses) and the window sampler."""

  def __init__(self, base: pipeline.A2Pipeline):
    if base.family.name != "v2_df":
      raise CheckpointError(f"a {base.family.name} folder is an elements-to-video model: sample it "
                            "with A2Pipeline; DiffusionForcingPipeline takes a SkyReels-V2 DF folder")
    self.base, self.cfg = base, base.cfg
    self._bar: tqdm.tqdm | None = None

  @classmethod
  def from_folder(cls, folder: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None,
                  overrides: Sequence[str] = (),
                  loras: Sequence[lora.LoadedLoRA] = ()) -> "DiffusionForcingPipeline":
    """Loads a converted DF folder (`python -m convert_weights release`) as `A2Pipeline.from_folder`
    does, LoRAs merged."""
    return cls(pipeline.A2Pipeline.from_folder(folder, mesh, overrides, loras))

  def first_frames(self, images: Sequence[np.ndarray], height: int, width: int) -> jax.Array:
    """Images → normalised latents (B, 1, h, w, z) of the first frames (the VAE posterior's mean,
    as the reference takes it)."""
    pixels = np.stack([first_frame_pixels(im, height, width) for im in images])[:, None]
    mean, _ = self.base.vae_encode(pixels)
    return normalize_latents(mean, self.cfg.vae)

  def latents(self, requests: Sequence[VideoRequest], sampling: SamplingConfig | None = None, *,
              progress: bool | Callable[[int, int], None] = True,
              timings: dict[str, float] | None = None) -> np.ndarray:
    """The videos' normalised latents (B, f, h, w, z) on the host: row b is what request b alone
    gives (its seed draws its window noise and its history re-noising). All requests are
    text-to-video or all image-to-video. `progress`: True shows a bar over the rows of every
    window (process 0); a callable gets (rows done, total rows). `timings` receives the seconds
    of encode_text, encode_image and denoise (compiles apart, under "compile")."""
    sampling = sampling or self.cfg.sampling
    check_requests(requests)
    self.base.family.check(sampling, 0)
    with_image = requests[0].image is not None
    windows = df.plan(sampling.frames, sampling.base_frames, sampling.overlap_history,
                      sampling.causal_block_size, first_frame=with_image)
    text, negative = self.base._stage(timings, "encode_text", lambda: self.base.encode_prompts(
        requests, sampling))
    first = None
    if with_image:
      first = self.base._stage(timings, "encode_image", lambda: pipeline.fetch(self.first_frames(
          [r.image for r in requests], sampling.height, sampling.width)))
    noise_keys, history_keys = seed_keys(pipeline.request_seeds(requests, sampling))
    fps = np.full((len(requests),), df.fps_index(sampling.fps), np.int32)
    sched = schedulers.for_sampling(sampling)
    rows = [df.num_rows(w, sched.timesteps, sampling.ar_step, sampling.causal_block_size)
            for w in windows]

    def run_window(window: df.Window, index: int, latents: jax.Array) -> np.ndarray:
      program = df.window_fn(self.cfg.transformer, sched, window, ar_step=sampling.ar_step,
                             causal_block=sampling.causal_block_size, guidance=sampling.guidance,
                             addnoise_condition=sampling.addnoise_condition,
                             on_row=self._report_row)
      name = ("df_window", window, *window_program_key(sampling))
      params = self.base.params["transformer"]
      executable, inputs = self.base._compiled(name, program, params, latents, text, negative, fps,
                                               history_keys, np.int32(index))
      self._rows_before = sum(rows[:index])
      return pipeline.fetch(jax.block_until_ready(executable(params, *inputs)))

    latent_shape = (sampling.height // self.cfg.vae.scale_factor_spatial,
                    sampling.width // self.cfg.vae.scale_factor_spatial, self.cfg.vae.z_dim)
    self._start_progress(progress, sum(rows))
    try:
      return self.base._stage(timings, "denoise", lambda: df.sample_latents(
          run_window, windows, noise_keys, latent_shape, first))
    finally:
      jax.effects_barrier()  # the last progress callbacks
      self._bar.close()
      self._bar = None

  def decode_stream(self, latents: np.ndarray | jax.Array) -> Iterator[np.ndarray]:
    """Normalised latents (B, f, h, w, z) → uint8 chunks (B, 1 then 4 frames, H, W, 3), one latent
    frame at a time, constant memory whatever the length (`A2Pipeline.decode_stream`)."""
    return self.base.decode_stream(latents)

  def generate(self, requests: Sequence[VideoRequest], *, sampling: SamplingConfig | None = None,
               progress: bool | Callable[[int, int], None] = True) -> pipeline.Result:
    """`latents`, then every frame decoded into one array (uint8 (B, F, H, W, 3)): for videos that
    fit in host memory; stream long ones with `decode_stream`."""
    return whole_videos(self, requests, sampling, progress)

  def _start_progress(self, progress, total: int) -> None:
    self._bar = tqdm.tqdm(total=total, desc="denoise", unit="row", leave=False,
                          disable=progress is not True or jax.process_index() != 0)
    self._on_progress = progress if callable(progress) else None
    self._rows_before, self._rows_done = 0, 0

  def _report_row(self, r) -> None:
    """Progress from inside a window's compiled loop (row r of the window); may run once per
    device, so it only moves forward."""
    done = self._rows_before + int(r) + 1
    if self._bar is not None and done > self._rows_done:
      self._bar.update(done - self._rows_done)
      self._rows_done = done
      if self._on_progress is not None:
        self._on_progress(done, self._bar.total)


def whole_videos(pipe: "DiffusionForcingPipeline | LongElementsPipeline",
                 requests: Sequence[object], sampling: SamplingConfig | None,
                 progress: bool | Callable[[int, int], None], drop: int = 0) -> pipeline.Result:
  """`pipe.latents`, then every frame decoded into one array (uint8 (B, F', H, W, 3), the first
  `drop` left out), with the seconds of each stage."""
  timings = {"compile": 0.0}
  latents = pipe.latents(requests, sampling, progress=progress, timings=timings)
  frames = pipe.base._stage(timings, "decode", lambda: np.concatenate(
      list(video.drop_leading(pipe.decode_stream(latents), drop, axis=1)), axis=1))
  return pipeline.Result(frames, latents, timings)


def seed_keys(seeds: Sequence[int]) -> tuple[jax.Array, np.ndarray]:
  """(window-noise keys (B,) PRNG keys, history re-noising keys (B, 2) uint32 key data): two keys
  split from each row's seed."""
  keys = [jax.random.split(jax.random.key(s)) for s in seeds]
  return (jnp.stack([k[0] for k in keys]),
          np.stack([np.asarray(jax.random.key_data(k[1])) for k in keys]))


def window_program_key(sampling: SamplingConfig) -> tuple:
  """The sampling fields that change a window's program (the window's shape apart)."""
  return (sampling.steps, sampling.shift, sampling.sampler, sampling.guidance, sampling.ar_step,
          sampling.causal_block_size, sampling.addnoise_condition)


def check_requests(requests: Sequence[VideoRequest]) -> None:
  """A non-empty batch with prompts, all with a first frame or all without."""
  pipeline.check_prompts(requests, "VideoRequest(prompt)")
  with_image = [r.image is not None for r in requests]
  if len(set(with_image)) > 1:
    raise InputError(f"request {with_image.index(not with_image[0])} and request 0 differ in "
                     "having a first frame: one batch is all text-to-video or all image-to-video")


# ---------------------------------------------------------------------------------------------
# Elements-to-video of any length (A2, V3 R2V), windows chained by held history.


@dataclasses.dataclass(frozen=True)
class ChainPlan:
  """The windows of a long elements-to-video, in latent frames: `count` windows of `window` frames
  (the model's length), the first `scene_start` of each the family's reference frames (A2's N;
  V3 R2V's come after the video), then in every window after the first `history` frames held to
  the end of the video so far and `new` fresh ones; `total` frames in all (A2's reference frames
  included, as in a short video)."""

  window: int
  scene_start: int
  history: int
  count: int
  total: int

  @property
  def new(self) -> int:
    return self.window - self.scene_start - self.history

  @property
  def window_frames(self) -> int:
    """Pixel frames of one window."""
    return TEMPORAL_STRIDE * (self.window - 1) + 1

  def window_sampling(self, sampling: SamplingConfig) -> SamplingConfig:
    """`sampling` for one window alone."""
    return one_window(sampling, self.window_frames)


def one_window(sampling: SamplingConfig, frames: int) -> SamplingConfig:
  """`sampling` for one unchained window of `frames` pixel frames."""
  return dataclasses.replace(sampling, frames=frames, base_frames=None, overlap_history=None)


def window_frames(sampling: SamplingConfig, folder_frames: int) -> int:
  """Pixel frames of an elements-to-video window: `base_frames`, else the folder's own `frames`
  (the length its model was trained on); a longer `sampling.frames` is chained."""
  return sampling.base_frames or folder_frames


def chain_plan(frames: int, window_frames: int, overlap_history: int | None,
               scene_start: int) -> ChainPlan:
  """The plan for `frames` pixel frames (4k + 1) in windows of `window_frames` with
  `overlap_history` pixel frames of history (None: `DEFAULT_HISTORY_LATENT` latent frames, at
  most half the scene); one window when the video fits in one."""
  total, window = latent_frames(frames), latent_frames(window_frames)
  if total <= window:
    return ChainPlan(total, scene_start, 0, 1, total)
  scene = window - scene_start
  history = (min(DEFAULT_HISTORY_LATENT, scene // 2) if overlap_history is None
             else latent_frames(overlap_history))
  if not 1 <= history < scene:
    most = f"at most {TEMPORAL_STRIDE * (scene - 2) + 1}" if scene > 1 else "fewer references"
    given = "the default" if overlap_history is None else f"overlap_history {overlap_history}"
    raise InputError(f"{given} ({history} latent frames of history) leaves no new frame in a "
                     f"window of {window_frames} frames, whose scene has {scene} latent frames "
                     f"after {scene_start} of references: use {most}")
  count = 1 + -(-(total - window) // (scene - history))
  return ChainPlan(window, scene_start, history, count, total)


class LongElementsPipeline:
  """An A2 or V3 R2V folder's `A2Pipeline`, chaining windows of the model's length into a video of
  any length (docs/long-video.md "Elements-to-video of any length").

  The released models were trained on one window with one noise level for all frames; a window
  that continues a video keeps exactly that: its first scene frames are the video's last latent
  frames, re-noised at every step to the step's noise level (`pipeline.History`), so the model
  sees a noisy clip it was trained on whose start is fixed, and the references in every window."""

  def __init__(self, base: pipeline.A2Pipeline):
    if not base.family.takes_references:
      raise CheckpointError(f"a {base.family.name} folder takes no references: sample its long "
                            "videos with DiffusionForcingPipeline")
    self.base, self.cfg = base, base.cfg

  @classmethod
  def from_folder(cls, folder: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None,
                  overrides: Sequence[str] = (),
                  loras: Sequence[lora.LoadedLoRA] = ()) -> "LongElementsPipeline":
    return cls(pipeline.A2Pipeline.from_folder(folder, mesh, overrides, loras))

  def plan(self, sampling: SamplingConfig, num_refs: int) -> ChainPlan:
    """Windows of `sampling.base_frames`, else of the folder's own `frames`."""
    return chain_plan(sampling.frames, window_frames(sampling, self.cfg.sampling.frames),
                      sampling.overlap_history, self.base.family.scene_start(num_refs))

  def latents(self, requests: Sequence[pipeline.Request], sampling: SamplingConfig | None = None,
              *, progress: bool | Callable[[int, int], None] = True,
              timings: dict[str, float] | None = None) -> np.ndarray:
    """The videos' normalised latents (B, f, h, w, z) on the host, f = `plan(...).total`: window
    0 is what `A2Pipeline.generate` makes of a window-long video, each later window continues the
    last `history` latent frames; row b is what request b alone gives. `progress`: True shows a
    bar over every window's steps (process 0); a callable gets (steps done, total steps).
    `timings` receives the seconds of the encoders and of denoise (compiles apart)."""
    sampling = sampling or self.cfg.sampling
    pipeline.check_requests(requests)
    plan = self.plan(sampling, requests[0].num_refs)
    window_sampling = plan.window_sampling(sampling)
    cond, noise = self.base.prepare(requests, window_sampling, timings)
    steps = schedulers.for_sampling(sampling).num_steps
    bar = tqdm.tqdm(total=plan.count * steps, desc="denoise", unit="step", leave=False,
                    disable=progress is not True or jax.process_index() != 0)

    def run(index: int, noise: np.ndarray, history: pipeline.History | None) -> np.ndarray:
      def report(done: int, _: int) -> None:
        bar.update(index * steps + done - bar.n)
        if callable(progress):
          progress(index * steps + done, plan.count * steps)
      return pipeline.fetch(self.base._stage(timings, "denoise", lambda: self.base.denoise(
          cond, noise, window_sampling, report, history=history)))

    seeds = pipeline.request_seeds(requests, sampling)
    try:
      parts = [run(0, noise, None)]
      tail = parts[0][:, -plan.history:] if plan.history else None  # the next window's history
      for index in range(1, plan.count):
        fresh, held_noise = window_noise(seeds, index, noise.shape[1:], plan.history)
        out = run(index, fresh, pipeline.History(tail, held_noise, plan.scene_start))
        parts.append(out[:, plan.scene_start + plan.history:])
        tail = np.concatenate([tail, parts[-1]], axis=1)[:, -plan.history:]
    finally:
      bar.close()
    return np.concatenate(parts, axis=1)[:, :plan.total]

  def decode_stream(self, latents: np.ndarray | jax.Array, drop: int = 0) -> Iterator[np.ndarray]:
    """Normalised latents (B, f, h, w, z) → uint8 chunks (B, n, H, W, 3) as `A2Pipeline.
    decode_stream` makes them, the first `drop` frames (A2's reference frames) left out."""
    return video.drop_leading(self.base.decode_stream(latents), drop, axis=1)

  def frames_to_drop(self, num_refs: int, sampling: SamplingConfig) -> int:
    """`A2Pipeline.frames_to_drop`: A2's reference frames."""
    return self.base.frames_to_drop(num_refs, sampling)

  def generate(self, requests: Sequence[pipeline.Request], *,
               sampling: SamplingConfig | None = None,
               progress: bool | Callable[[int, int], None] = True) -> pipeline.Result:
    """`latents`, then every frame decoded into one array (uint8 (B, F', H, W, 3), reference frames
    dropped as `A2Pipeline.generate` drops them): for videos that fit in host memory; stream long
    ones with `decode_stream`."""
    sampling = sampling or self.cfg.sampling
    return whole_videos(self, requests, sampling, progress,
                        drop=self.frames_to_drop(requests[0].num_refs, sampling))


def window_noise(seeds: Sequence[int], index: int, shape: tuple[int, ...], history: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(fresh noise (B, *shape), the history's noise (B, history, *shape[1:])) of window `index` ≥ 1,
  float32, each row from its own seed."""
  fresh, held = [], []
  for seed in seeds:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), WINDOW_NOISE_STREAM), index)
    fresh_key, held_key = jax.random.split(key)
    fresh.append(np.asarray(jax.random.normal(fresh_key, (1, *shape), jnp.float32)))
    held.append(np.asarray(jax.random.normal(held_key, (1, history, *shape[1:]), jnp.float32)))
  return np.concatenate(fresh), np.concatenate(held)
