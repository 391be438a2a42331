"""Elements-to-video sampling: references + prompt → video, on one device or a whole mesh.

Stages (DESIGN.md §1): text (umT5, prompt and negative prompt in one batch) · references (CLIP tokens
of all references; VAE-encoded condition video, normalised, with its 4-channel mask) · denoising
(classifier-free guidance with the conditional and unconditional branch as one batch of 2, the
whole scheduler loop one `lax.scan` inside one jitted program per shape) · VAE decode.

```python
pipe = A2Pipeline.from_folder("a2jax-14b", mesh=sharding.make_mesh(cfg.mesh))
result = pipe("A man is holding a teddy bear in the forest.",
              references=[load_image("man.png"), load_image("bear.png")],
              background=load_image("forest.png"))
result.frames   # uint8 (F − 4·N, H, W, 3)
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from a2jax import (checkpoints, conditioning, preprocess, schedulers, sharding, step_cache,
                    text)
from a2jax.configs import Config, SamplingConfig
from a2jax.errors import InputError
from a2jax.models import clip as clip_model
from a2jax.models import lora, quant
from a2jax.models.layers import dtype_of
from a2jax.models.transformer import A2Transformer, apply_layers
from a2jax.models.vae import WanVAE, denormalize_latents, normalize_latents

# The release's default negative prompt (a value of its sampling script).
DEFAULT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "misshapen limbs, fused fingers, still picture, messy background, three legs, many people in "
    "the background, walking backwards")

TOKENIZER_DIR = "tokenizer"
IMAGE_PROCESSOR_DIR = "image_processor"


@dataclasses.dataclass
class Conditioning:
  """Everything the denoiser needs for one batch of B videos.

  text, negative_text (B, T, text_dim); image (B, 257·N, image_dim); condition (B, f, h, w, 4 + z)
  = mask ‖ normalised condition latents; num_refs N.
  """

  text: jax.Array
  negative_text: jax.Array
  image: jax.Array
  condition: jax.Array
  num_refs: int


@dataclasses.dataclass
class Result:
  frames: np.ndarray             # uint8 (B, F', H, W, 3), reference frames dropped if configured
  latents: np.ndarray            # float32 (B, f, h, w, z), normalised, before decoding
  timings: dict[str, float]      # seconds per stage; "compile" apart


def scheduler_for(sampling: SamplingConfig):
  return schedulers.for_sampling(sampling)


def video_to_uint8(video: jax.Array) -> np.ndarray:
  """[−1, 1] → uint8 with rounding (what the release's export does via (x + 1)/2 · 255)."""
  return np.asarray(jnp.round((jnp.asarray(video, jnp.float32) + 1.0) * 127.5).clip(0, 255), np.uint8)


def guidance_branches(sampling: SamplingConfig) -> int:
  """2 (conditional + unconditional) for classifier-free guidance; 1 at guidance 1, where the
  unconditional branch contributes nothing."""
  return 1 if sampling.guidance == 1.0 else 2


def denoise_fn(cfg: Config, sampling: SamplingConfig,
               on_step: Callable[[jax.Array], None] | None = None,
               with_stats: bool = False) -> Callable[..., Any]:
  """The denoising loop for one sampling config, to be jitted:
  (transformer params, noise (B, f, h, w, z), text (B, T, text_dim), negative_text (B, T, text_dim),
  image (B, I, image_dim), condition (B, f, h, w, 4 + z)[, noise_keys (B, 2) uint32: the distill
  sampler's per-row PRNG keys]) → latents (B, f, h, w, z), with `with_stats` also the
  `step_cache.StepStats` of every step (S, …) (the split path then runs even without a cache).

  Classifier-free guidance runs the conditional and unconditional branch as one batch of 2B (the
  unconditional one with the negative prompt and the same image tokens), guidance 1 the conditional
  branch alone; the scheduler loop is one `lax.scan`; a step cache (a2jax/step_cache.py) decides
  inside it whether the blocks run. `on_step(i)` is called from inside the loop (progress)."""
  sched = scheduler_for(sampling)
  model = A2Transformer(cfg.transformer)
  guidance, branches = sampling.guidance, guidance_branches(sampling)
  cache = step_cache.for_sampling(sampling, sched.num_steps, cfg.transformer.num_layers, branches)
  split = cache.mode != "none" or with_stats
  timesteps = jnp.asarray(sched.timesteps, jnp.float32)

  def denoise(params, noise, text_states, negative_text, image, condition, noise_keys=None):
    b = noise.shape[0]
    context = text_states if branches == 1 else jnp.concatenate([text_states, negative_text], 0)
    image_n = jnp.concatenate([image] * branches, axis=0)
    cond_n = jnp.concatenate([condition] * branches, axis=0)
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
      x_in = jnp.concatenate([jnp.concatenate([x] * branches, axis=0), cond_n], axis=-1)
      x_in = sharding.constrain(x_in, ("batch", "frames", "height", "width", "channels"))
      t = jnp.full((branches * b,), timesteps[i])
      v, cache_state, stats = velocity(x_in, t, cache_state, i)
      if branches == 2:
        v = v[b:] + guidance * (v[:b] - v[b:])
      x, state = sched.step(state, v, x)
      if on_step is not None:
        jax.debug.callback(on_step, i)
      return (x, state, cache_state), stats

    pt, ph, pw = cfg.transformer.patch_size
    f, h, w = noise.shape[1:4]
    tokens_shape = (branches * b, (f // pt) * (h // ph) * (w // pw), cfg.transformer.inner_dim)
    cache_state = cache.init(tokens_shape, cfg.transformer.inner_dim,
                             dtype_of(cfg.transformer.dtype))
    init = (noise, sched.init(noise, noise_keys), cache_state)
    (x, _, _), stats = jax.lax.scan(step, init, jnp.arange(sched.num_steps))
    return (x, stats) if with_stats else x

  return denoise


def transformer_passes(stats: step_cache.StepStats, branches: int) -> float:
  """Full transformer passes of batch 1 that a run took (blocks, which dominate; embed and head
  run every step): Σ over steps of branches × the share of the block stack run."""
  return float(branches * np.asarray(stats.blocks_run).sum())


def denoise_program_key(sampling: SamplingConfig) -> tuple:
  """The sampling fields that change the denoising program (not the seed or the prompt)."""
  return (sampling.steps, sampling.shift, sampling.sampler, sampling.guidance,
          tuple(sampling.distill_timesteps), sampling.distill_shift, sampling.cache,
          sampling.cache_threshold, sampling.cache_max_skips, sampling.cache_retention,
          sampling.cache_calibration)


def step_noise_keys(seed: int, batch: int) -> jax.Array:
  """(B, 2) uint32 PRNG key data, one per batch row, for samplers that draw noise at every step
  (distill); apart from the seed's initial-noise and posterior keys."""
  return jax.random.key_data(jax.random.split(jax.random.fold_in(jax.random.key(seed), 1), batch))


class A2Pipeline:
  """The four components (params on one mesh), the tokenizer and the CLIP image processor."""

  def __init__(self, cfg: Config, params: dict[str, Any], tokenizer, image_processor,
               mesh: jax.sharding.Mesh | None = None):
    self.cfg, self.params, self.mesh = cfg, params, mesh
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
    params = {name: checkpoints.load_component(folder, name, getattr(cfg, name), mesh)
              for name in checkpoints.COMPONENTS}
    pipe = cls(cfg, params, text.load_tokenizer(folder / TOKENIZER_DIR),
               preprocess.ClipImageProcessor.from_folder(folder / IMAGE_PROCESSOR_DIR), mesh)
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

  def encode_text(self, prompts: Sequence[str], negative_prompt: str | None):
    negative = self.cfg.sampling.negative_prompt if negative_prompt is None else negative_prompt
    negative = DEFAULT_NEGATIVE_PROMPT if negative is None else negative
    ids, mask = text.tokenize(self.tokenizer, [*prompts, negative], self.cfg.umt5.max_length)
    states = self._run("umt5", functools.partial(text.encode_ids, cfg=self.cfg.umt5),
                       self.params["umt5"], ids, mask)
    b = len(prompts)
    return states[:b], jnp.broadcast_to(states[b:], states[:b].shape)

  def reference_images(self, references: Sequence[np.ndarray], background: np.ndarray | None,
                       height: int, width: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(VAE-branch references (N, H, W, 3) in [−1, 1], the RGB originals in reference order)."""
    originals = [preprocess.to_rgb(r) for r in references]
    bg = None if background is None else preprocess.to_rgb(background)
    vae_refs = conditioning.reference_pixels(originals, bg, height, width)
    return vae_refs, originals + ([bg] if bg is not None else [])

  def condition(self, references: Sequence[np.ndarray], background: np.ndarray | None,
                sampling: SamplingConfig, key: jax.Array | None = None):
    """(image tokens (1, 257·N, D), condition (1, f, h, w, 4 + z), N) for one set of references."""
    vae_refs, originals = self.reference_images(references, background, sampling.height,
                                                sampling.width)
    n = len(originals)
    conditioning.check_reference_count(n, sampling.frames)
    clip_pixels = preprocess.clip_reference_pixels(originals, self.image_processor)
    video = conditioning.condition_video(vae_refs, sampling.frames)[None]
    image = self._run("clip", lambda p, x: clip_model.encode_references(p, self.cfg.clip, x),
                      self.params["clip"], clip_pixels[None])
    vae = WanVAE(self.cfg.vae)
    mean, logvar = self._run("vae_encode", lambda p, v: vae.apply({"params": p}, v, method=vae.encode),
                             self.params["vae"], video)
    latents = mean
    if sampling.condition_posterior == "sample":
      if key is None:
        raise InputError("condition_posterior='sample' needs a key")
      latents = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    cond = conditioning.with_mask(normalize_latents(latents, self.cfg.vae), n, sampling.frames)
    return image, cond, n

  def _compiled(self, name: str, fn: Callable, params: Any, *inputs: np.ndarray | jax.Array):
    """(executable of jitted `fn(params, *inputs)`, placed inputs): compiled once per (name, input
    shapes) with the compile time counted apart; inputs batch-sharded on the mesh (params are
    already placed)."""
    with self._mesh_context():
      inputs = self._place(inputs)
      key = (name, tuple((a.shape, str(a.dtype)) for a in inputs))
      if key not in self._programs:
        start = time.perf_counter()
        self._programs[key] = jax.jit(fn).lower(params, *inputs).compile()
        self.compile_seconds += time.perf_counter() - start
    return self._programs[key], inputs

  def _run(self, name: str, fn: Callable, params: Any, *inputs: np.ndarray | jax.Array):
    executable, inputs = self._compiled(name, fn, params, *inputs)
    return executable(params, *inputs)

  # -- denoising ------------------------------------------------------------------------------

  def denoise(self, cond: Conditioning, noise: jax.Array, sampling: SamplingConfig,
              progress: bool | Callable[[int, int], None] = True) -> jax.Array:
    """Runs the compiled denoising loop (compiled once per sampling config and shape). `progress`:
    True shows a tqdm bar; a callable is called as `progress(steps done, total steps)` instead."""
    program = denoise_fn(self.cfg, sampling, on_step=self._report_step)
    name = ("denoise", *denoise_program_key(sampling))
    params = self.params["transformer"]
    executable, inputs = self._compiled(name, program, params, noise, cond.text,
                                        cond.negative_text, cond.image, cond.condition,
                                        step_noise_keys(sampling.seed, noise.shape[0]))
    self._bar = tqdm.tqdm(total=scheduler_for(sampling).num_steps, desc="denoise", unit="step",
                          disable=progress is not True, leave=False)
    self._on_progress = progress if callable(progress) else None
    self._steps_done = 0
    try:
      out = executable(params, *inputs)
      out.block_until_ready()
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
    text_states, negative_text = self.encode_text([prompt], negative_prompt)
    noise_key, posterior_key = jax.random.split(jax.random.key(sampling.seed))
    image, condition, _ = self.condition(references, background, sampling, posterior_key)
    noise = jax.random.normal(noise_key, (1, *condition.shape[1:4], self.cfg.vae.z_dim))
    program = denoise_fn(self.cfg, sampling, with_stats=True)
    params = self.params["transformer"]
    executable, inputs = self._compiled(("denoise_stats", *denoise_program_key(sampling)), program,
                                        params, noise, text_states, negative_text, image, condition,
                                        step_noise_keys(sampling.seed, 1))
    return executable(params, *inputs)

  def calibrate(self, prompt: str, references: Sequence[np.ndarray],
                background: np.ndarray | None = None, *, negative_prompt: str | None = None,
                sampling: SamplingConfig | None = None) -> np.ndarray:
    """One full sampling (no cache) of a job → MagCache's curve (S, branches): per step the mean
    per-token ratio of the block stack's residual norm to the previous step's (1 at step 0);
    `step_cache.write_calibration` stores it for `cache: mag`."""
    sampling = dataclasses.replace(sampling or self.cfg.sampling, cache="none")
    _, stats = self.denoise_with_stats(prompt, references, background,
                                       negative_prompt=negative_prompt, sampling=sampling)
    return np.asarray(stats.mag_ratio)

  def _report_step(self, i) -> None:
    """Progress from inside the compiled loop; may run once per device, so it only moves forward."""
    bar, done = getattr(self, "_bar", None), int(i) + 1
    if bar is not None and done > self._steps_done:
      bar.update(done - self._steps_done)
      self._steps_done = done
      if self._on_progress is not None:
        self._on_progress(done, bar.total)

  def _place(self, inputs):
    """Inputs as device arrays, batch-sharded on the mesh's data/fsdp axes when there is a mesh."""
    if self.mesh is None:
      return tuple(jnp.asarray(a) for a in inputs)
    return tuple(jax.device_put(a, jax.sharding.NamedSharding(
        self.mesh, sharding.logical_to_spec(("batch",) + (None,) * (a.ndim - 1), a.shape, self.mesh)))
        for a in inputs)

  def _mesh_context(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  # -- decode and the whole job ---------------------------------------------------------------

  def decode(self, latents: jax.Array) -> jax.Array:
    """Normalised latents (B, f, h, w, z) → video (B, F, H, W, 3) in [−1, 1]."""
    vae = WanVAE(self.cfg.vae)
    decode = lambda p, z: vae.apply({"params": p}, denormalize_latents(z, self.cfg.vae),
                                    method=vae.decode)
    return self._run("vae_decode", decode, self.params["vae"], latents)

  def __call__(self, prompt: str, references: Sequence[np.ndarray],
               background: np.ndarray | None = None, *, negative_prompt: str | None = None,
               noise: np.ndarray | None = None, sampling: SamplingConfig | None = None,
               progress: bool | Callable[[int, int], None] = True) -> Result:
    """One video. `references` are the subject/object images (uint8 HWC, any of RGB, RGBA,
    grayscale), `background` the scene; `noise` (1, f, h, w, z) replaces the seed's noise;
    `progress` as in `denoise` (a tqdm bar, or `progress(step, total)` from inside the loop)."""
    sampling = sampling or self.cfg.sampling
    if not prompt or not prompt.strip():
      raise InputError("the prompt is empty: describe the video to generate")
    timings = {"compile": 0.0}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
      compile_before, start = self.compile_seconds, time.perf_counter()
      out = jax.block_until_ready(fn())
      compiled = self.compile_seconds - compile_before
      timings[name] = time.perf_counter() - start - compiled
      timings["compile"] += compiled
      return out

    text_states, negative_text = stage("encode_text",
                                       lambda: self.encode_text([prompt], negative_prompt))
    noise_key, posterior_key = jax.random.split(jax.random.key(sampling.seed))
    image, condition, n = stage("encode_references", lambda: self.condition(
        references, background, sampling, posterior_key))
    cond = Conditioning(text_states, negative_text, image, condition, n)
    shape = (1, *condition.shape[1:4], self.cfg.vae.z_dim)
    if noise is None:
      noise = jax.random.normal(noise_key, shape, jnp.float32)
    elif tuple(noise.shape) != shape:
      raise InputError(f"noise has shape {tuple(noise.shape)}; this job needs {shape}")
    latents = stage("denoise", lambda: self.denoise(cond, jnp.asarray(noise, jnp.float32),
                                                    sampling, progress))
    frames = stage("decode", lambda: video_to_uint8(self.decode(latents)))
    if sampling.drop_reference_frames:
      frames = frames[:, conditioning.reference_frames_to_drop(n):]
    return Result(frames, np.asarray(latents), timings)


def check_folder(folder: pathlib.Path) -> None:
  """A converted a2jax folder with every component, the tokenizer and the image processor."""
  from a2jax.errors import CheckpointError
  if not folder.is_dir():
    raise CheckpointError(f"checkpoint folder {folder} does not exist: convert the release with "
                          "python -m convert_weights release --src RELEASE --dst FOLDER")
  needed = [checkpoints.CONFIG_FILE, *checkpoints.COMPONENTS, TOKENIZER_DIR, IMAGE_PROCESSOR_DIR]
  missing = [n for n in needed if not (folder / n).exists()]
  if missing:
    raise CheckpointError(f"{folder} lacks {', '.join(missing)}: it is not a complete converted "
                          "release (python -m convert_weights release …)")
