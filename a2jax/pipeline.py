"""Elements-to-video sampling: references + prompt → video, on one device or a whole mesh, for
either model family of a converted folder (a2jax/families.py: SkyReels-A2, SkyReels-V3 R2V).

Stages (DESIGN.md §1): text (umT5, prompt and negative prompt in one batch) · references (A2: CLIP
tokens of all references and the VAE-encoded condition video with its mask; V3 R2V: each reference
VAE-encoded alone) · denoising (the guidance branches as one batch, the whole scheduler loop one
`lax.scan` inside one jitted program per shape) · VAE decode.

```python
pipe = A2Pipeline.from_folder("a2jax-14b", mesh=sharding.make_mesh(cfg.mesh))
result = pipe("A man is holding a teddy bear in the forest.",
              references=[load_image("man.png"), load_image("bear.png")],
              background=load_image("forest.png"))
result.frames   # uint8 (1, F − 4·N, H, W, 3) for A2 (its reference frames dropped), (1, F, …) for V3
result = pipe.generate([Request("A man walks.", [man], forest, seed=1),
                        Request("A bear sits.", [bear], forest, seed=2)])
result.frames   # uint8 (2, F − 4·N, H, W, 3): the same frames as the two videos one by one
```

B videos per compiled program: every stage runs on the batch (rows sharded on the mesh's batch axes,
"data" and "fsdp"), each row with its own prompt, negative prompt, references and seed. In several
processes (a2jax.distributed) every process calls with the same requests and gets the whole batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import pathlib
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from a2jax import (checkpoints, distributed, families, preprocess, schedulers, sharding, step_cache,
                   text)
from a2jax.configs import Config, SamplingConfig
from a2jax.errors import InputError
from a2jax.guidance import branch_contexts
from a2jax.video import latent_frames
from a2jax.models import clip as clip_model
from a2jax.models import lora, quant
from a2jax.models.layers import dtype_of
from a2jax.models.transformer import A2Transformer, apply_layers
from a2jax.models.vae import WanVAE, denormalize_latents, normalize_latents

DEFAULT_NEGATIVE_PROMPT = families.A2_NEGATIVE_PROMPT

TOKENIZER_DIR = "tokenizer"
IMAGE_PROCESSOR_DIR = "image_processor"


@dataclasses.dataclass(frozen=True)
class Request:
  """One video of a batch. `references` are the subject/object images (uint8 HWC, any of RGB, RGBA,
  grayscale), `background` the scene (V3 R2V: one more reference, the last); `negative_prompt`
  None: the sampling config's, else the family's; `seed` None: the sampling config's."""

  prompt: str
  references: Sequence[np.ndarray] = ()
  background: np.ndarray | None = None
  negative_prompt: str | None = None
  seed: int | None = None

  @property
  def num_refs(self) -> int:
    """N: the references with the background."""
    return len(self.references) + (self.background is not None)


@dataclasses.dataclass
class Conditioning:
  """Everything the denoiser needs for one batch of B videos.

  text, negative_text (B, T, text_dim); image (B, 257·N, image_dim) for A2, None for V3 R2V;
  condition: A2 (B, f, h, w, 4 + z) = mask ‖ normalised condition latents, V3 R2V (B, 4, h, w, z)
  normalised reference latents; num_refs N; noise_keys (B, 2) uint32: each row's keys for samplers
  that draw noise at every step (`step_noise_keys` of its seed).
  """

  text: jax.Array
  negative_text: jax.Array
  image: jax.Array | None
  condition: jax.Array
  num_refs: int
  noise_keys: np.ndarray


@dataclasses.dataclass
class History:
  """Latent frames a window must continue (chained long video, a2jax/long_video.py): the window's
  frames `start` … `start` + O − 1 are held to `latents` (B, O, h, w, z), shown to the transformer
  at each step's noise level as (1 − σ)·latents + σ·`noise` (B, O, h, w, z): every frame at one
  noise level, as the model was trained, the history's content fixed."""

  latents: np.ndarray | jax.Array
  noise: np.ndarray | jax.Array
  start: int


@dataclasses.dataclass
class Result:
  frames: np.ndarray             # uint8 (B, F', H, W, 3), reference frames dropped if configured
  latents: np.ndarray            # float32 (B, f, h, w, z), normalised, before decoding
  timings: dict[str, float]      # seconds per stage; "compile" apart


def scheduler_for(sampling: SamplingConfig):
  return schedulers.for_sampling(sampling)


def to_uint8(video: jax.Array) -> jax.Array:
  """[−1, 1] → uint8 with rounding (what the release's export does via (x + 1)/2 · 255), on the
  video's devices."""
  return jnp.round((jnp.asarray(video, jnp.float32) + 1.0) * 127.5).clip(0, 255).astype(jnp.uint8)


def video_to_uint8(video: jax.Array) -> np.ndarray:
  """`to_uint8`, fetched to the host."""
  return fetch(to_uint8(video))


def fetch(x: jax.Array) -> np.ndarray:
  """The whole array on the host, also when it spans several processes (each gets all of it)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def guidance_branches(sampling: SamplingConfig, family: str = "a2") -> int:
  """Transformer rows per video and step: A2 2 (conditional + unconditional), V3 R2V 3; 1 at
  guidance 1 (a2jax/families.py)."""
  return families.FAMILIES[family].branches(sampling)


def denoise_fn(cfg: Config, sampling: SamplingConfig,
               on_step: Callable[[jax.Array], None] | None = None,
               with_stats: bool = False, history_start: int | None = None) -> Callable[..., Any]:
  """The denoising loop for one sampling config, to be jitted:
  (transformer params, noise (B, f, h, w, z), text (B, T, text_dim), negative_text (B, T, text_dim),
  image (B, I, image_dim) | None, condition (`Conditioning.condition`), noise_keys (B, 2) uint32:
  the distill sampler's per-row PRNG keys[, history (B, O, h, w, z), history noise (B, O, h, w, z)
  when `history_start` is given: `History`]) → latents (B, f, h, w, z), with `with_stats` also the
  `step_cache.StepStats` of every step (S, …) (the split path then runs even without a cache).

  The family's guidance branches run as one batch of branches · B rows (the first with the prompt,
  the others with the negative prompt; what each sees of the references is the family's), one row
  per video at guidance 1; the family builds the transformer input and combines the branches, the
  output is cropped to the video's f frames; the scheduler loop is one `lax.scan`; a step cache
  (a2jax/step_cache.py) decides inside it whether the blocks run. `on_step(i)` is called from
  inside the loop (progress)."""
  family = families.of(cfg)
  sched = scheduler_for(sampling)
  model = A2Transformer(cfg.transformer)
  branches = family.branches(sampling)
  cache = step_cache.for_sampling(sampling, sched.num_steps, cfg.transformer.num_layers, branches)
  split = cache.mode != "none" or with_stats
  timesteps = jnp.asarray(sched.timesteps, jnp.float32)
  sigmas = jnp.asarray(sched.sigmas, jnp.float32)

  def denoise(params, noise, text_states, negative_text, image, condition, noise_keys=None,
              history=None, history_noise=None):
    b, f = noise.shape[:2]

    def hold_history(x, sigma):
      """x with its history frames replaced by the history at noise level σ."""
      if history_start is None:
        return x
      held = (1.0 - sigma) * history + sigma * history_noise
      return jax.lax.dynamic_update_slice_in_dim(x, held.astype(x.dtype), history_start, axis=1)

    context = branch_contexts(text_states, negative_text, branches)
    image_n = None if image is None else jnp.concatenate([image] * branches, axis=0)
    cond_n = family.branch_conditions(condition, branches)
    apply = functools.partial(model.apply, {"params": params})

    def velocity(x_in, t, cache_state, i):
      """(velocity (nB, f, h, w, z) float32, cache state, step stats)."""
      if not split:
        return apply(x_in, t, context, image_n).astype(jnp.float32), cache_state, None
      tokens, temb, block_inputs = apply(x_in, t, context, image_n, method=model.embed)

      def run(tokens, layers: slice):
        if layers == slice(None):
          return apply(tokens, block_inputs, method=model.run_blocks)
        stacked = jax.tree.map(lambda p: p[layers], params["blocks"])
        return apply_layers(cfg.transformer, stacked, tokens, block_inputs)

      tokens, cache_state, stats = cache.blocks(run, tokens, temb, i, cache_state)
      v = apply(tokens, temb, x_in.shape, method=model.head)
      return v.astype(jnp.float32), cache_state, stats

    def step(carry, i):
      x, state, cache_state = carry
      x = hold_history(x, sigmas[i])
      x_in = family.transformer_input(jnp.concatenate([x] * branches, axis=0), cond_n)
      x_in = sharding.constrain(x_in, ("batch", "frames", "height", "width", "channels"))
      t = jnp.full((branches * b,), timesteps[i])
      v, cache_state, stats = velocity(x_in, t, cache_state, i)
      v = family.guide(v[:, :f], b, sampling)
      x, state = sched.step(state, v, x)
      if on_step is not None:
        jax.debug.callback(on_step, i)
      return (x, state, cache_state), stats

    pt, ph, pw = cfg.transformer.patch_size
    f_in, h, w = jax.eval_shape(family.transformer_input, noise, condition).shape[1:4]
    tokens_shape = (branches * b, (f_in // pt) * (h // ph) * (w // pw), cfg.transformer.inner_dim)
    cache_state = cache.init(tokens_shape, cfg.transformer.inner_dim,
                             dtype_of(cfg.transformer.dtype))
    init = (noise, sched.init(noise, noise_keys), cache_state)
    (x, _, _), stats = jax.lax.scan(step, init, jnp.arange(sched.num_steps))
    x = hold_history(x, 0.0)
    return (x, stats) if with_stats else x

  return denoise


def transformer_passes(stats: step_cache.StepStats, branches: int) -> float:
  """Full transformer passes of batch 1 that a run took (blocks, which dominate; embed and head
  run every step): Σ over steps of branches × the share of the block stack run."""
  return float(branches * np.asarray(stats.blocks_run).sum())


def denoise_program_key(sampling: SamplingConfig) -> tuple:
  """The sampling fields that change the denoising program (not the seed or the prompt)."""
  return (sampling.steps, sampling.shift, sampling.sampler, sampling.guidance,
          sampling.image_guidance, tuple(sampling.distill_timesteps), sampling.distill_shift, sampling.cache,
          sampling.cache_threshold, sampling.cache_max_skips, sampling.cache_retention,
          sampling.cache_calibration)


def step_noise_keys(seed: int, batch: int) -> jax.Array:
  """(B, 2) uint32 PRNG key data, one per batch row, for samplers that draw noise at every step
  (distill); apart from the seed's initial-noise and posterior keys."""
  return jax.random.key_data(jax.random.split(jax.random.fold_in(jax.random.key(seed), 1), batch))


class A2Pipeline:
  """The components of the folder's family (params on one mesh), the tokenizer and, for A2, the CLIP
  image processor (None for V3 R2V)."""

  def __init__(self, cfg: Config, params: dict[str, Any], tokenizer, image_processor,
               mesh: jax.sharding.Mesh | None = None):
    self.cfg, self.params, self.mesh = cfg, params, mesh
    self.family = families.of(cfg)
    self.tokenizer, self.image_processor = tokenizer, image_processor
    self._programs: dict[Any, Callable] = {}
    self.compile_seconds = 0.0

  @classmethod
  def from_folder(cls, folder: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None,
                  overrides: Sequence[str] = (),
                  loras: Sequence[lora.LoadedLoRA] = ()) -> "A2Pipeline":
    """Loads a converted folder (`python -m convert_weights release`), each component's params
    straight onto its logical shardings on `mesh`, then merges `loras` into the transformer
    (`with_loras`). Read LoRA files with `convert_weights.lora.read_lora(path, cfg.transformer,
    strength)` (the config: `checkpoints.read_config(folder, overrides)`)."""
    folder = pathlib.Path(folder)
    check_folder(folder)
    cfg = checkpoints.read_config(folder, overrides)
    family = families.of(cfg)
    params = {name: checkpoints.load_component(folder, name, getattr(cfg, name), mesh)
              for name in family.components}
    processor = (preprocess.ClipImageProcessor.from_folder(folder / IMAGE_PROCESSOR_DIR)
                 if family.uses_clip else None)
    pipe = cls(cfg, params, text.load_tokenizer(folder / TOKENIZER_DIR), processor, mesh)
    pipe = pipe.with_loras(loras) if loras else pipe
    # Quantized after the LoRA merge, which needs the float kernels.
    pipe.params["transformer"] = quant.quantize_params(pipe.params["transformer"],
                                                       cfg.transformer.weights)
    return pipe

  def with_loras(self, loras: Sequence[lora.LoadedLoRA]) -> "A2Pipeline":
    """A new pipeline whose transformer has `loras` merged into its kernels, in order (sampling
    speed unchanged); it shares the other components' params, the tokenizer and the processor
    with this one, which keeps its own transformer. The merge runs jitted on the params'
    shardings (nothing gathered on the host); programs compile anew for the new pipeline."""
    quant.check_float_kernels(self.params["transformer"])
    merged = lora.apply_all(self.params["transformer"], loras)
    return type(self)(self.cfg, {**self.params, "transformer": merged}, self.tokenizer,
                      self.image_processor, self.mesh)

  # -- conditioning ---------------------------------------------------------------------------

  def encode_text(self, prompts: Sequence[str], negative_prompts: Sequence[str]
                  ) -> tuple[jax.Array, jax.Array]:
    """(text (B, T, text_dim), negative text (B, T, text_dim)): the B prompts and their negative
    prompts as one umT5 batch of 2B."""
    ids, mask = text.tokenize(self.tokenizer, [*prompts, *negative_prompts],
                              self.cfg.umt5.max_length)
    states = self._run("umt5", functools.partial(text.encode_ids, cfg=self.cfg.umt5),
                       self.params["umt5"], ids, mask)
    b = len(prompts)
    return states[:b], states[b:]

  def encode_prompts(self, requests: Sequence[Any], sampling: SamplingConfig
                     ) -> tuple[jax.Array, jax.Array]:
    """`encode_text` of the requests' prompts and negative prompts (a request's own, else the
    sampling config's, else the family's default)."""
    default = (self.family.default_negative_prompt if sampling.negative_prompt is None
               else sampling.negative_prompt)
    return self.encode_text([r.prompt for r in requests],
                            [default if r.negative_prompt is None else r.negative_prompt
                             for r in requests])

  def vae_encode(self, videos: np.ndarray | jax.Array) -> tuple[jax.Array, jax.Array]:
    """Videos (N, F, H, W, 3) in [−1, 1] → the VAE posterior's (mean, logvar) (N, f, h, w, z)."""
    vae = WanVAE(self.cfg.vae)
    return self._run("vae_encode", lambda p, v: vae.apply({"params": p}, v, method=vae.encode),
                     self.params["vae"], videos)

  def reference_images(self, references: Sequence[np.ndarray], background: np.ndarray | None,
                       height: int, width: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(what the VAE sees of the references (N, H, W, 3) in [−1, 1], as the family fits them; the
    RGB originals in reference order, the background last)."""
    originals = [preprocess.to_rgb(r) for r in references]
    bg = None if background is None else preprocess.to_rgb(background)
    fitted = self.family.reference_pixels(originals, bg, height, width)
    return fitted, originals + ([bg] if bg is not None else [])

  def condition(self, requests: Sequence[Request], sampling: SamplingConfig,
                posterior_keys: Sequence[jax.Array]) -> tuple[jax.Array | None, jax.Array]:
    """(image tokens (B, 257·N, D) for A2 else None, `Conditioning.condition`) of the requests'
    references (one N for all), as the family lays them out; `posterior_keys` (one per row) draw
    the reference latents when `sampling.condition_posterior` is "sample"."""
    videos, clip_pixels = [], []
    for request in requests:
      fitted, originals = self.reference_images(request.references, request.background,
                                                sampling.height, sampling.width)
      videos.append(self.family.vae_input(fitted, sampling.frames))
      if self.family.uses_clip:
        clip_pixels.append(preprocess.clip_reference_pixels(originals, self.image_processor))
    image = None
    if self.family.uses_clip:
      image = self._run("clip", lambda p, x: clip_model.encode_references(p, self.cfg.clip, x),
                        self.params["clip"], np.stack(clip_pixels))
    # A2: one condition video per row; V3 R2V: one one-frame video per reference.
    videos = np.stack(videos)
    mean, logvar = self.vae_encode(videos.reshape(-1, *videos.shape[-4:]))
    rows = len(requests)
    mean, logvar = (a.reshape(rows, -1, *a.shape[-3:]) for a in (mean, logvar))
    latents = mean
    if sampling.condition_posterior == "sample":
      row = (1, *mean.shape[1:])  # each row's draw as in a run of its own
      eps = np.concatenate([np.asarray(jax.random.normal(k, row, mean.dtype))
                            for k in posterior_keys])
      latents = mean + jnp.exp(0.5 * logvar) * eps
    condition = self.family.condition(normalize_latents(latents, self.cfg.vae),
                                      requests[0].num_refs, sampling.frames)
    return image, condition

  def prepare(self, requests: Sequence[Request], sampling: SamplingConfig,
              timings: dict[str, float] | None = None) -> tuple[Conditioning, np.ndarray]:
    """(the batch's conditioning, initial noise (B, f, h, w, z) float32): row b is what a run of
    request b alone gets, its seed giving its noise, posterior and step-noise keys. `timings`, when
    given, receives the seconds of encode_text / encode_references (compiles apart)."""
    check_requests(requests)
    self.family.check(sampling, requests[0].num_refs)
    seeds = request_seeds(requests, sampling)
    noise_keys, posterior_keys = zip(*(jax.random.split(jax.random.key(s)) for s in seeds))
    text_states, negative_text = self._stage(timings, "encode_text", lambda: self.encode_prompts(
        requests, sampling))
    image, condition = self._stage(timings, "encode_references", lambda: self.condition(
        requests, sampling, posterior_keys))
    row = (1, latent_frames(sampling.frames), *condition.shape[2:4], self.cfg.vae.z_dim)
    noise = np.concatenate([np.asarray(jax.random.normal(k, row, jnp.float32)) for k in noise_keys])
    keys = np.concatenate([np.asarray(step_noise_keys(s, 1)) for s in seeds])
    return Conditioning(text_states, negative_text, image, condition, requests[0].num_refs,
                        keys), noise

  def _stage(self, timings: dict[str, float] | None, name: str, fn: Callable[[], Any]) -> Any:
    """fn()'s result, waited for; its seconds (compiles apart, under "compile") added to
    `timings`."""
    compile_before, start = self.compile_seconds, time.perf_counter()
    out = jax.block_until_ready(fn())
    if timings is not None:
      compiled = self.compile_seconds - compile_before
      timings[name] = timings.get(name, 0.0) + time.perf_counter() - start - compiled
      timings["compile"] = timings.get("compile", 0.0) + compiled
    return out

  def _compiled(self, name: str, fn: Callable, params: Any, *inputs: np.ndarray | jax.Array):
    """(executable of jitted `fn(params, *inputs)`, placed inputs): compiled once per (name, input
    shapes) with the compile time counted apart; inputs batch-sharded on the mesh (params are
    already placed)."""
    with self._mesh_context():
      inputs = self._place(inputs)
      key = (name, tuple(None if a is None else (a.shape, str(a.dtype)) for a in inputs))
      if key not in self._programs:
        start = time.perf_counter()
        self._programs[key] = distributed.compile_together(jax.jit(fn), params, *inputs, name=name)
        self.compile_seconds += time.perf_counter() - start
    return self._programs[key], inputs

  def _run(self, name: str, fn: Callable, params: Any, *inputs: np.ndarray | jax.Array):
    executable, inputs = self._compiled(name, fn, params, *inputs)
    return executable(params, *inputs)

  # -- denoising ------------------------------------------------------------------------------

  def denoise(self, cond: Conditioning, noise: np.ndarray | jax.Array, sampling: SamplingConfig,
              progress: bool | Callable[[int, int], None] = True, with_stats: bool = False,
              history: History | None = None):
    """Runs the compiled denoising loop (compiled once per sampling config and shape) from `noise`
    (B, f, h, w, z) → latents (B, f, h, w, z), with `with_stats` also the `step_cache.StepStats`
    of every step; `history` holds frames of the window to given latents (chained long video).
    `progress`: True shows a tqdm bar (on process 0); a callable is called as
    `progress(steps done, total steps)` instead."""
    start = None if history is None else history.start
    program = denoise_fn(self.cfg, sampling, on_step=self._report_step, with_stats=with_stats,
                         history_start=start)
    name = ("denoise", with_stats, start, *denoise_program_key(sampling))
    params = self.params["transformer"]
    held = () if history is None else (history.latents, history.noise)
    executable, inputs = self._compiled(name, program, params, noise, cond.text,
                                        cond.negative_text, cond.image, cond.condition,
                                        cond.noise_keys, *held)
    self._bar = tqdm.tqdm(total=scheduler_for(sampling).num_steps, desc="denoise", unit="step",
                          disable=progress is not True or jax.process_index() != 0, leave=False)
    self._on_progress = progress if callable(progress) else None
    self._steps_done = 0
    try:
      out = jax.block_until_ready(executable(params, *inputs))
      jax.effects_barrier()  # the last progress callbacks
    finally:
      self._bar.close()
      self._bar = None
    return out

  def denoise_with_stats(self, prompt: str, references: Sequence[np.ndarray],
                         background: np.ndarray | None = None, *,
                         negative_prompt: str | None = None, sampling: SamplingConfig | None = None
                         ) -> tuple[jax.Array, step_cache.StepStats]:
    """One job's denoising (the seed's noise) with the per-step statistics of `denoise_fn`:
    (latents (1, f, h, w, z), StepStats of every step); decode with `decode`."""
    sampling = sampling or self.cfg.sampling
    cond, noise = self.prepare([Request(prompt, references, background, negative_prompt)], sampling)
    return self.denoise(cond, noise, sampling, progress=False, with_stats=True)

  def calibrate(self, prompt: str, references: Sequence[np.ndarray],
                background: np.ndarray | None = None, *, negative_prompt: str | None = None,
                sampling: SamplingConfig | None = None) -> np.ndarray:
    """One full sampling (no cache) of a job → MagCache's curve (S, branches): per step the mean
    per-token ratio of the block stack's residual norm to the previous step's (1 at step 0);
    `step_cache.write_calibration` stores it for `cache: mag`."""
    sampling = dataclasses.replace(sampling or self.cfg.sampling, cache="none")
    _, stats = self.denoise_with_stats(prompt, references, background,
                                       negative_prompt=negative_prompt, sampling=sampling)
    return fetch(stats.mag_ratio)

  def _report_step(self, i) -> None:
    """Progress from inside the compiled loop; may run once per device, so it only moves forward."""
    bar, done = getattr(self, "_bar", None), int(i) + 1
    if bar is not None and done > self._steps_done:
      bar.update(done - self._steps_done)
      self._steps_done = done
      if self._on_progress is not None:
        self._on_progress(done, bar.total)

  def _place(self, inputs):
    """Inputs as device arrays, batch-sharded on the mesh's data/fsdp axes when there is a mesh,
    scalars replicated (None stays None: V3 R2V has no image tokens)."""
    def place(a):
      if a is None or self.mesh is None:
        return None if a is None else jnp.asarray(a)
      logical = ("batch",) + (None,) * (a.ndim - 1) if a.ndim else ()
      return jax.device_put(a, jax.sharding.NamedSharding(
          self.mesh, sharding.logical_to_spec(logical, a.shape, self.mesh)))
    return tuple(place(a) for a in inputs)

  def _mesh_context(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  # -- decode and whole videos ----------------------------------------------------------------

  def decode(self, latents: jax.Array) -> jax.Array:
    """Normalised latents (B, f, h, w, z) → video (B, F, H, W, 3) in [−1, 1]."""
    vae = WanVAE(self.cfg.vae)
    decode = lambda p, z: vae.apply({"params": p}, denormalize_latents(z, self.cfg.vae),
                                    method=vae.decode)
    return self._run("vae_decode", decode, self.params["vae"], latents)

  def decode_stream(self, latents: np.ndarray | jax.Array) -> Iterator[np.ndarray]:
    """Normalised latents (B, f, h, w, z) → the video as uint8 chunks (B, 1 then 4 frames, H, W, 3)
    on the host, one latent frame at a time: the decoder's cache has a fixed size, so device
    memory is that of one chunk, and the host holds one chunk of frames, whatever the length
    (`video.write_mp4` takes the chunks as they come). Equal to `decode` up to float rounding;
    untiled (VAE tiling applies to whole-video `decode`)."""
    vae, vae_cfg, params = WanVAE(self.cfg.vae), self.cfg.vae, self.params["vae"]

    def first(p, z):
      out, cache = vae.apply({"params": p}, denormalize_latents(z, vae_cfg), method=vae.decode_first)
      return to_uint8(out), cache

    def later(p, cache, z):
      out, cache = vae.apply({"params": p}, cache, denormalize_latents(z, vae_cfg),
                             method=vae.decode_next)
      return to_uint8(out), cache

    frames, cache = self._run("vae_stream_first", first, params, latents[:, :1])
    yield fetch(frames)
    key = ("vae_stream_next", tuple(latents[:, :1].shape), str(latents.dtype))  # any length
    if key not in self._programs:
      self._programs[key] = jax.jit(later, donate_argnums=1)
    for i in range(1, latents.shape[1]):
      with self._mesh_context():
        frames, cache = self._programs[key](params, cache, *self._place((latents[:, i:i + 1],)))
      yield fetch(frames)

  def generate(self, requests: Sequence[Request], *, sampling: SamplingConfig | None = None,
               noise: np.ndarray | None = None,
               progress: bool | Callable[[int, int], None] = True) -> Result:
    """B videos with one compiled program per stage: row b of the result is what request b alone
    gives (same seed → same noise). All requests need the same number of references N (the
    background counts). `noise` (B, f, h, w, z) replaces the seeds' noise; `progress` as in
    `denoise`. In several processes every process passes the same requests and gets every row."""
    sampling = sampling or self.cfg.sampling
    timings = {"compile": 0.0}
    cond, seed_noise = self.prepare(requests, sampling, timings)
    if noise is None:
      noise = seed_noise
    elif tuple(noise.shape) != seed_noise.shape:
      raise InputError(f"noise has shape {tuple(noise.shape)}; this batch needs {seed_noise.shape}")
    latents = self._stage(timings, "denoise", lambda: self.denoise(
        cond, np.asarray(noise, np.float32), sampling, progress))
    frames = self._stage(timings, "decode", lambda: video_to_uint8(self.decode(latents)))
    return Result(frames[:, self.frames_to_drop(cond.num_refs, sampling):], fetch(latents), timings)

  def frames_to_drop(self, num_refs: int, sampling: SamplingConfig) -> int:
    """Leading output frames that show the references (A2, unless `drop_reference_frames` is
    off)."""
    return self.family.frames_to_drop(num_refs) if sampling.drop_reference_frames else 0

  def __call__(self, prompt: str, references: Sequence[np.ndarray],
               background: np.ndarray | None = None, *, negative_prompt: str | None = None,
               noise: np.ndarray | None = None, sampling: SamplingConfig | None = None,
               progress: bool | Callable[[int, int], None] = True) -> Result:
    """One video: `generate` of one `Request` (frames (1, F', H, W, 3)); `noise` (1, f, h, w, z)."""
    return self.generate([Request(prompt, references, background, negative_prompt)],
                         sampling=sampling, noise=noise, progress=progress)


def request_seeds(requests: Sequence[Any], sampling: SamplingConfig) -> list[int]:
  """Each request's seed: its own, else the sampling config's."""
  return [sampling.seed if r.seed is None else r.seed for r in requests]


def check_prompts(requests: Sequence[Any], example: str) -> None:
  """A non-empty batch of requests (`example` shows one), each with a prompt."""
  if not requests:
    raise InputError(f"no requests: pass at least one {example}")
  for i, request in enumerate(requests):
    if not request.prompt or not request.prompt.strip():
      raise InputError(f"the prompt is empty{f' (request {i})' if len(requests) > 1 else ''}: "
                       "describe the video to generate")


def check_requests(requests: Sequence[Request]) -> None:
  """A non-empty batch of requests with prompts and one reference count."""
  check_prompts(requests, "Request(prompt, references, background)")
  counts = [r.num_refs for r in requests]
  if len(set(counts)) > 1:
    other = next(i for i, c in enumerate(counts) if c != counts[0])
    raise InputError(f"request {other} has {counts[other]} reference images (background "
                     f"included), request 0 has {counts[0]}: one batch needs one count; generate "
                     "requests with another count in another batch")


def check_folder(folder: pathlib.Path) -> None:
  """A converted a2jax folder with its config, every component of its family, the tokenizer and (A2)
  the image processor."""
  from a2jax.errors import CheckpointError
  if not folder.is_dir():
    raise CheckpointError(f"checkpoint folder {folder} does not exist: convert the release with "
                          "python -m convert_weights release --src RELEASE --dst FOLDER")
  # Without a config the family is unknown: list what an A2 folder (the default family) holds.
  family = (families.of(checkpoints.read_config(folder))
            if (folder / checkpoints.CONFIG_FILE).is_file() else families.FAMILIES["a2"])
  needed = [checkpoints.CONFIG_FILE, *family.components, TOKENIZER_DIR,
            *([IMAGE_PROCESSOR_DIR] * family.uses_clip)]
  missing = [n for n in needed if not (folder / n).exists()]
  if missing:
    raise CheckpointError(f"{folder} lacks {', '.join(missing)}: it is not a complete converted "
                          "release (python -m convert_weights release …)")
