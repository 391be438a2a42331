"""Model families: what SkyReels-A2 and SkyReels-V3 R2V do differently around the same Wan DiT
(docs/models.md "Model families"). A converted folder's config names its family (`family:`); the
pipeline, the data encoder and the trainer ask it, and read the same for both.

- `a2` (SkyReels-A2, Wan2.1-I2V): the references fill the first latent frames of a condition video
  given in 20 extra channels (mask ‖ latents, a2jax.conditioning), their CLIP tokens go to an
  image cross-attention; classifier-free guidance with 2 branches (prompt, negative prompt).
- `v3_r2v` (SkyReels-V3 reference-to-video): no CLIP; the 1–4 references are latent frames after
  the video's (a2jax.conditioning_v3); dual guidance with 3 branches (prompt + references,
  negative prompt + references, negative prompt + zero references).
- `v2_df` (SkyReels-V2 diffusion forcing): no references; text (or a first frame) to video of any
  length, sampled by a2jax.long_video rather than the elements-to-video pipeline.

Shapes: B videos, f latent frames of the video, h / w latent height / width, z latent channels,
N references, nB = branches · B.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from a2jax import conditioning, conditioning_v3, guidance
from a2jax.configs import Config, SamplingConfig
from a2jax.errors import ConfigError, InputError

# The A2 release's default negative prompt (a value of its sampling script).
A2_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "misshapen limbs, fused fingers, still picture, messy background, three legs, many people in "
    "the background, walking backwards")


class A2:
  """SkyReels-A2: condition channels, CLIP image tokens, 2-branch guidance."""

  name = "a2"
  title = "SkyReels-A2"
  components = ("transformer", "vae", "clip", "umt5")
  uses_clip = True
  takes_references = True
  default_negative_prompt = A2_NEGATIVE_PROMPT
  default_resolution = None  # sample.py: the config's height and width

  def check(self, sampling: SamplingConfig, num_refs: int) -> None:
    if sampling.image_guidance is not None:
      raise InputError("image_guidance is a SkyReels-V3 R2V option; an A2 folder has one "
                       "guidance: leave image_guidance unset")
    refuse_diffusion_forcing(self.title, sampling)
    self.check_reference_count(num_refs, window_frames(sampling))

  def check_reference_count(self, num_refs: int, frames: int) -> None:
    conditioning.check_reference_count(num_refs, frames)

  def scene_start(self, num_refs: int) -> int:
    """Latent frames of a window before the scene: the N reference frames."""
    return num_refs

  def in_channels(self, z: int) -> int:
    """The transformer's input channels for z latent channels: noise ‖ mask ‖ condition."""
    return 2 * z + conditioning.MASK_CHANNELS

  def condition_shape(self, f: int, h: int, w: int, z: int) -> tuple[int, ...]:
    """`condition` of one video: (f, h, w, 4 + z)."""
    return (f, h, w, conditioning.MASK_CHANNELS + z)

  def synthetic_condition(self, rng: np.random.Generator, num_refs: int, frames: int,
                          shape: tuple[int, ...]) -> np.ndarray:
    """A random `condition` of `shape` for synthetic training records: the mask over `num_refs`
    latent frames ‖ unit-normal latents."""
    f, h, w, c = shape
    mask = conditioning.latent_mask(num_refs, frames, h, w)
    return np.concatenate([mask, rng.standard_normal((f, h, w, c - mask.shape[-1]), np.float32)], -1)

  def branches(self, sampling: SamplingConfig) -> int:
    """2 (conditional + unconditional); 1 at guidance 1 (`guidance.branch_count`)."""
    return guidance.branch_count(sampling.guidance)

  def reference_pixels(self, subjects: Sequence[np.ndarray], background: np.ndarray | None,
                       height: int, width: int) -> np.ndarray:
    """RGB references → what the VAE sees of them (N, H, W, 3) in [−1, 1]: subjects white-padded,
    the background cropped (a2jax.conditioning)."""
    return conditioning.reference_pixels(subjects, background, height, width)

  def vae_input(self, references: np.ndarray, frames: int) -> np.ndarray:
    """(N, H, W, 3) → the condition video (F, H, W, 3), encoded as one video."""
    return conditioning.condition_video(references, frames)

  def condition(self, latents: jnp.ndarray, num_refs: int, frames: int) -> jnp.ndarray:
    """Normalised latents of the condition videos (B, f, h, w, z) of `frames` pixel frames →
    mask ‖ latents (B, f, h, w, 4 + z)."""
    return conditioning.with_mask(latents, num_refs, frames)

  def branch_conditions(self, condition: jnp.ndarray, branches: int) -> jnp.ndarray:
    """Every branch sees the references."""
    return jnp.concatenate([condition] * branches, axis=0)

  def transformer_input(self, x: jnp.ndarray, condition: jnp.ndarray) -> jnp.ndarray:
    """x (nB, f, h, w, z) ‖ condition (nB, f, h, w, 4 + z) on channels."""
    return jnp.concatenate([x, condition.astype(x.dtype)], axis=-1)

  def guide(self, v: jnp.ndarray, batch: int, sampling: SamplingConfig) -> jnp.ndarray:
    """Velocities of the branches (nB, f, h, w, z) → the guided one (B, f, h, w, z)."""
    return guidance.classifier_free(v, batch, sampling.guidance)

  def frames_to_drop(self, num_refs: int) -> int:
    """Output frames that show the references rather than the scene (`drop_reference_frames`)."""
    return conditioning.reference_frames_to_drop(num_refs)


class V3R2V:
  """SkyReels-V3 reference-to-video: reference latent frames after the video, 3-branch guidance."""

  name = "v3_r2v"
  title = "SkyReels-V3 R2V"
  components = ("transformer", "vae", "umt5")
  uses_clip = False
  takes_references = True
  default_negative_prompt = ""  # what its generate_video passes
  default_resolution = "720P"   # sample.py sizes each video as its generate_video does by default

  def check(self, sampling: SamplingConfig, num_refs: int) -> None:
    refuse_diffusion_forcing(self.title, sampling)
    self.check_reference_count(num_refs, window_frames(sampling))
    if sampling.guidance < 1.0:
      raise InputError(f"guidance {sampling.guidance}: SkyReels-V3 R2V runs one branch at "
                       "guidance 1 and three above it; use 1 or more")
    if sampling.guidance == 1.0 and self.image_guidance(sampling) != 1.0:
      raise InputError(f"image_guidance {sampling.image_guidance} needs guidance > 1 (at guidance "
                       "1 the model runs one branch, as its release does): raise guidance too")

  def check_reference_count(self, num_refs: int, frames: int) -> None:
    conditioning_v3.check_reference_count(num_refs)

  def scene_start(self, num_refs: int) -> int:
    """The video's latent frames come first (the references after them)."""
    return 0

  def in_channels(self, z: int) -> int:
    """The transformer's input channels: the latents alone (references come as frames)."""
    return z

  def condition_shape(self, f: int, h: int, w: int, z: int) -> tuple[int, ...]:
    """`condition` of one video: the 4 reference latent frames (4, h, w, z)."""
    return (conditioning_v3.MAX_REFERENCES, h, w, z)

  def synthetic_condition(self, rng: np.random.Generator, num_refs: int, frames: int,
                          shape: tuple[int, ...]) -> np.ndarray:
    """A random `condition` for synthetic training records: `num_refs` unit-normal reference
    latent frames, zero latents after them."""
    condition = np.zeros(shape, np.float32)
    condition[:num_refs] = rng.standard_normal((num_refs, *shape[1:]), np.float32)
    return condition

  @staticmethod
  def image_guidance(sampling: SamplingConfig) -> float:
    return 1.0 if sampling.image_guidance is None else sampling.image_guidance

  def branches(self, sampling: SamplingConfig) -> int:
    """3 (prompt + refs, negative + refs, negative + zero refs) above guidance 1, else 1."""
    return 3 if sampling.guidance > 1.0 else 1

  def reference_pixels(self, subjects: Sequence[np.ndarray], background: np.ndarray | None,
                       height: int, width: int) -> np.ndarray:
    """RGB references (the background, if any, last) → (N, H, W, 3) in [−1, 1], each fitted and
    white-padded alike (a2jax.conditioning_v3)."""
    return conditioning_v3.reference_pixels([*subjects, *([] if background is None else [background])],
                                            height, width)

  def vae_input(self, references: np.ndarray, frames: int) -> np.ndarray:
    """(N, H, W, 3) → one-frame videos (N, 1, H, W, 3), each encoded alone."""
    return references[:, None]

  def condition(self, latents: jnp.ndarray, num_refs: int, frames: int) -> jnp.ndarray:
    """Normalised reference latents (B, N, h, w, z) → (B, 4, h, w, z), zero latents after them."""
    return conditioning_v3.reference_latents(latents)

  def branch_conditions(self, condition: jnp.ndarray, branches: int) -> jnp.ndarray:
    """The third branch sees zero reference frames."""
    if branches == 1:
      return condition
    return jnp.concatenate([condition, condition, jnp.zeros_like(condition)], axis=0)

  def transformer_input(self, x: jnp.ndarray, condition: jnp.ndarray) -> jnp.ndarray:
    """x (nB, f, h, w, z) then the reference frames (nB, 4, h, w, z) in time: (nB, f + 4, h, w, z)."""
    return jnp.concatenate([x, condition.astype(x.dtype)], axis=1)

  def guide(self, v: jnp.ndarray, batch: int, sampling: SamplingConfig) -> jnp.ndarray:
    """u_ti + s_img·(u_t − u_ti) + s_txt·(c − u_t) over the 3 branches (c, u_t, u_ti)."""
    if v.shape[0] == batch:
      return v
    cond, uncond_text, uncond_all = v[:batch], v[batch:2 * batch], v[2 * batch:]
    return (uncond_all + self.image_guidance(sampling) * (uncond_text - uncond_all)
            + sampling.guidance * (cond - uncond_text))

  def frames_to_drop(self, num_refs: int) -> int:
    return 0  # the output holds the video frames only


class V2DiffusionForcing:
  """SkyReels-V2 diffusion forcing (DF-1.3B / 14B): text-to-video, or image-to-video from a first
  frame, of any length, sampled window by window with per-frame noise levels
  (a2jax/diffusion_forcing.py, a2jax/long_video.py). No references, no CLIP; 2-branch guidance."""

  name = "v2_df"
  title = "SkyReels-V2 DF"
  components = ("transformer", "vae", "umt5")
  uses_clip = False
  takes_references = False
  default_negative_prompt = ""  # diffusers' pipelines encode "" when none is given
  default_resolution = None

  def check(self, sampling: SamplingConfig, num_refs: int) -> None:
    """The sampling options a DF folder takes, and its windows (diffusion_forcing.plan)."""
    if num_refs:
      raise InputError("a SkyReels-V2 diffusion-forcing folder takes no reference images: give a "
                       "prompt, and a first frame with --image for image-to-video")
    if sampling.image_guidance is not None:
      raise InputError("image_guidance is a SkyReels-V3 R2V option; a SkyReels-V2 DF folder has "
                       "one guidance: leave image_guidance unset")
    if sampling.sampler == "distill" or sampling.cache != "none":
      what = (f"sampler {sampling.sampler!r}" if sampling.sampler == "distill"
              else f"cache {sampling.cache!r}")
      raise InputError(f"{what}: diffusion forcing steps every frame on its own schedule; use "
                       "sampler unipc or euler, without a step cache")
    from a2jax import diffusion_forcing  # it builds on this module
    diffusion_forcing.plan(sampling.frames, sampling.base_frames, sampling.overlap_history,
                           sampling.causal_block_size)

  def in_channels(self, z: int) -> int:
    return z

  def branches(self, sampling: SamplingConfig) -> int:
    return guidance.branch_count(sampling.guidance)


def window_frames(sampling: SamplingConfig) -> int:
  """Pixel frames of one window of an elements-to-video sampling: `base_frames` when a long video
  is chained from windows of it, else the whole video."""
  return min(sampling.frames, sampling.base_frames or sampling.frames)


def refuse_diffusion_forcing(family: str, sampling: SamplingConfig) -> None:
  """A2 and V3 R2V models were trained with one noise level for the whole video: per-frame levels
  are outside what they learned, so their folders refuse the per-frame DF options (their long
  videos chain windows by `base_frames` and `overlap_history`, a2jax/long_video.py)."""
  if sampling.ar_step or sampling.causal_block_size != 1 or sampling.addnoise_condition:
    raise InputError(f"ar_step, causal_block_size and addnoise_condition are diffusion-forcing "
                     f"options, and this {family} model was trained with one noise level for all "
                     "frames: leave them unset (a long video from this folder chains windows with "
                     "base_frames and overlap_history alone), or sample a SkyReels-V2 DF folder")


def require_references(cfg: Config, what: str) -> None:
  """Refuse a SkyReels-V2 DF config (`what` names the folder or config) where a command works on
  elements-to-video models (training, data encoding, the web app): one line."""
  if not of(cfg).takes_references:
    raise ConfigError(f"{what} is a SkyReels-V2 diffusion-forcing model (text or first frame to "
                      "video, no references); this command works on SkyReels-A2 and SkyReels-V3 "
                      "R2V models: sample the DF model with sample.py")


FAMILIES = {family.name: family for family in (A2(), V3R2V(), V2DiffusionForcing())}


def of(cfg: Config) -> A2 | V3R2V | V2DiffusionForcing:
  """The family of a config (`cfg.family`, checked on load)."""
  return FAMILIES[cfg.family]


def require_clip(cfg: Config, what: str) -> None:
  """Refuse a config whose family has no CLIP image encoder (V3 R2V) where a command needs one
  (`what` names the folder): one line with what to pass instead."""
  if not of(cfg).uses_clip:
    raise ConfigError(f"{what} is a SkyReels-V3 R2V model, which has no CLIP image encoder; this "
                      "command scores with one: pass a SkyReels-A2 folder")
