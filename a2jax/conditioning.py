"""The elements-to-video conditioning layout (DESIGN.md §1), shared by sampling, data encoding and
training so that all three build exactly the same inputs.

N references in order (subjects/objects first, the background last):
- condition video (F frames): frame 0 is ref 0; ref k ≥ 1 fills pixel frames 4k−3 … 4k, so that it
  lands alone in latent frame k of the causal VAE (latent 0 ← frame 0, latent k ← frames 4k−3…4k);
  the remaining frames are zeros.
- mask (f latent frames × 4 channels): 1 for latent frames 0 … N−1, 0 after.
- transformer input channels: [noisy latents ‖ mask ‖ normalised condition latents].
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from a2jax import preprocess
from a2jax.video import TEMPORAL_STRIDE, latent_frames
from a2jax.errors import InputError

MASK_CHANNELS = 4


def check_reference_count(num_refs: int, frames: int) -> None:
  f = latent_frames(frames)
  if num_refs < 1:
    raise InputError("no reference images: pass at least one --ref (or a --background)")
  if num_refs > f - 1:
    raise InputError(f"{num_refs} references need at least {num_refs + 1} latent frames, {frames} "
                     f"frames give {f}: use ≥ {4 * num_refs + 1} frames or fewer references")


def condition_video(references: np.ndarray, frames: int) -> np.ndarray:
  """references (N, H, W, 3) in [−1, 1] → condition video (F, H, W, 3) float32."""
  n, h, w, c = references.shape
  check_reference_count(n, frames)
  video = np.zeros((frames, h, w, c), np.float32)
  video[0] = references[0]
  for k in range(1, n):
    video[TEMPORAL_STRIDE * (k - 1) + 1: TEMPORAL_STRIDE * k + 1] = references[k]
  return video


def latent_mask(num_refs: int, frames: int, height: int, width: int) -> np.ndarray:
  """(f, h, w, 4) float32 mask over the latent grid: 1 for latent frames 0 … N−1."""
  f = latent_frames(frames)
  check_reference_count(num_refs, frames)
  mask = np.zeros((f, height, width, MASK_CHANNELS), np.float32)
  mask[:num_refs] = 1.0
  return mask


def reference_frames_to_drop(num_refs: int) -> int:
  """Output frames that show the references rather than the scene (the release drops 12 for 3)."""
  return TEMPORAL_STRIDE * num_refs


def reference_pixels(subjects: Sequence[np.ndarray], background: np.ndarray | None, height: int,
                     width: int) -> np.ndarray:
  """The VAE branch's references (N, H, W, 3) float32 in [−1, 1], in conditioning order: uint8 RGB
  subjects / objects white-padded to H×W keeping their aspect ratio, then the background (if any)
  center-cropped to the aspect ratio and resized."""
  fitted = [preprocess.fit_subject(r, height, width) for r in subjects]
  if background is not None:
    fitted.append(preprocess.crop_background(background, height, width))
  if not fitted:
    raise InputError("no reference images: pass at least one subject, object or background")
  return preprocess.to_vae_pixels(np.stack(fitted))


def with_mask(cond_latents: jax.Array, num_refs: int, frames: int) -> jax.Array:
  """Normalised condition latents (..., f, h, w, z) → mask ‖ latents (..., f, h, w, 4 + z) float32:
  the 4 + z conditioning channels of the transformer input."""
  *lead, f, h, w, _ = cond_latents.shape
  mask = jnp.broadcast_to(latent_mask(num_refs, frames, h, w), (*lead, f, h, w, MASK_CHANNELS))
  return jnp.concatenate([mask, cond_latents.astype(jnp.float32)], axis=-1)
