"""A2-Bench-style metrics for any model's videos, with the a2jax CLIP vision tower.

Per video:
- `reference_similarity`: for each reference (subjects, then the background), the cosine
  similarity of its CLIP embedding (the sampling preprocessing: white-padded square, then the CLIP
  processor) with each frame's (CLIP processor: short side resized, center crop), averaged over
  frames;
- `frame_consistency`: mean cosine similarity of consecutive frames' CLIP embeddings;
- `motion_magnitude`: mean absolute difference of consecutive frames, pixels in [0, 1].
The embedding is the projected image embedding when the CLIP config has the projection, else the
pooled output (the post-layernorm class token; the release's encoder has no projection).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from a2jax import preprocess
from a2jax.configs import CLIPConfig
from a2jax.errors import InputError
from a2jax.models.clip import CLIPVisionEncoder


@functools.partial(jax.jit, static_argnames=("cfg",))
def embed(params: Any, cfg: CLIPConfig, pixels: jax.Array) -> jax.Array:
  """CLIP-preprocessed pixels (B, S, S, 3) → unit-norm embeddings (B, D) float32."""
  out = CLIPVisionEncoder(cfg).apply({"params": params}, pixels, full_tower=True)
  e = out.get("image_embeds", out["pooler_output"]).astype(jnp.float32)
  return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def score_video(frames: np.ndarray, references: Sequence[np.ndarray], params: Any, cfg: CLIPConfig,
                processor: preprocess.ClipImageProcessor) -> dict[str, Any]:
  """frames uint8 (T, H, W, 3), T ≥ 2; references uint8 RGB in conditioning order → metrics."""
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or len(frames) < 2:
    raise InputError(f"video of shape {frames.shape} ({frames.dtype}): expected uint8 (T ≥ 2, H, W, 3)")
  if not references:
    raise InputError("no references to compare the video with")
  f = np.asarray(embed(params, cfg, processor(list(frames))))
  r = np.asarray(embed(params, cfg, preprocess.clip_reference_pixels(references, processor)))
  diffs = np.abs(np.diff(frames.astype(np.float32) / 255.0, axis=0))
  return {"reference_similarity": [float(v) for v in (r @ f.T).mean(axis=1)],
          "frame_consistency": float(np.mean(np.sum(f[1:] * f[:-1], axis=1))),
          "motion_magnitude": float(diffs.mean())}


def summarize(scores: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Averages over videos (reference similarity averaged over each video's references first)."""
  if not scores:
    raise InputError("no videos were scored")
  return {"reference_similarity": float(np.mean([np.mean(s["reference_similarity"]) for s in scores])),
          "frame_consistency": float(np.mean([s["frame_consistency"] for s in scores])),
          "motion_magnitude": float(np.mean([s["motion_magnitude"] for s in scores]))}
