"""Synthetic E2V fidelity: does a video show the references, composed and moving as the caption says?

On `a2jax.data.synthetic` clips the truth is known (`Clip`), so every part is measured directly:
- segmentation: a pixel shows element k when its nearest colour among the elements' tones and the
  known background at that pixel is a tone of k, within `TOLERANCE` (RGB distance);
- per element and frame: `colour` = presence × closeness, presence = min(a, 1/a) for a = segmented
  area / the reference's area, closeness = mean over the segment's interior of 1 − (distance / TOLERANCE)²;
  `shape` = IoU of the segment with the reference's shape drawn at the segment's centroid (0 when
  the element is absent: less than a quarter of its area);
- per element: `motion` = agreement of the centroids' least-squares velocity v with the caption's
  direction u at the clip's speed s: clip(v·u / s, 0, 1) · clip(1 − |v − (v·u)u| / s, 0, 1);
  `position_error` (pixels from the true path; a diagnostic, not scored);
- `background`: share of pixels away from every element (true and segmented) within
  `BACKGROUND_TOLERANCE` of the background reference in every channel;
- `fidelity` = mean(colour, shape, motion averaged over elements, background) ∈ [0, 1].

A video of T frames is compared with the clip's last T frames (sampling drops the first 4·N).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from a2jax.data import synthetic
from a2jax.errors import InputError

TOLERANCE = 60.0
BACKGROUND_TOLERANCE = 40.0
MIN_PRESENCE = 0.25
SCORES = ("colour", "shape", "motion", "background")


def segment(frames: np.ndarray, clip: synthetic.Clip) -> tuple[np.ndarray, np.ndarray]:
  """uint8 (T, H, W, 3) → (labels (T, H, W) int: element index or −1, distance (T, H, W) of each
  pixel to its label's nearest tone)."""
  x = frames.astype(np.float32)
  bg = synthetic.render_background(clip.background, clip.height, clip.width).astype(np.float32)
  d_bg = np.linalg.norm(x - bg, axis=-1)
  d = np.stack([np.min([np.linalg.norm(x - np.asarray(t, np.float32), axis=-1) for t in e.tones], 0)
                for e in clip.elements])                              # (K, T, H, W)
  best, dist = np.argmin(d, 0), np.min(d, 0)
  labels = np.where((dist < TOLERANCE) & (dist < d_bg), best, -1)
  return labels, dist


def _velocity(times: np.ndarray, centroids: np.ndarray) -> np.ndarray:
  """Least-squares slope (2,) of centroids (n, 2) over times (n,)."""
  t = times - times.mean()
  return (t[:, None] * (centroids - centroids.mean(0))).sum(0) / (t ** 2).sum()


def score_video(frames: np.ndarray, clip: synthetic.Clip) -> dict[str, Any]:
  """Scores of one video (uint8 (T, H, W, 3), T ≤ clip.frames) against its clip: per element
  {colour, shape, motion, position_error, present}, then background, the element averages and
  fidelity (module docstring)."""
  frames = np.asarray(frames)
  t_count = len(frames)
  if (frames.dtype != np.uint8 or frames.ndim != 4
      or frames.shape[1:] != (clip.height, clip.width, 3) or not 2 <= t_count <= clip.frames):
    raise InputError(f"video of shape {frames.shape} ({frames.dtype}) for a clip of {clip.frames} "
                     f"frames of {clip.height}×{clip.width}: expected uint8 (T ≤ {clip.frames}, "
                     f"{clip.height}, {clip.width}, 3), T ≥ 2")
  times = np.arange(clip.frames - t_count, clip.frames)
  labels, dist = segment(frames, clip)
  h, w = clip.height, clip.width
  centre = (w / 2, h / 2)
  yy, xx = np.mgrid[0:h, 0:w] + 0.5
  elements, footprint = [], np.zeros((t_count, h, w), bool)
  for k, element in enumerate(clip.elements):
    diameter = clip.diameter(k)
    ref_area = float(synthetic.shape_coverage(element.shape, centre, diameter, h, w).sum())
    truth = clip.centres(k)[times]
    colour, shape, present, centroids = [], [], [], []
    for t in range(t_count):
      footprint[t] |= synthetic.shape_coverage(element.shape, truth[t], diameter, h, w) > 0
      mask = labels[t] == k
      area = float(mask.sum())
      if area < MIN_PRESENCE * ref_area:
        colour.append(0.0)
        shape.append(0.0)
        continue
      c = np.array([xx[mask].mean(), yy[mask].mean()])
      drawn = synthetic.shape_coverage(element.shape, c, diameter, h, w) >= 0.5
      presence = min(area / ref_area, ref_area / area)
      inside = ndimage.binary_erosion(mask)   # anti-aliased edges mix with the background
      inside = inside if inside.any() else mask
      colour.append(presence * float(np.mean(1 - (dist[t][inside] / TOLERANCE) ** 2)))
      shape.append(float((mask & drawn).sum() / (mask | drawn).sum()))
      present.append(t)
      centroids.append(c)
    motion, position_error = 0.0, None
    if len(present) >= 2:
      centroids = np.stack(centroids)
      v = _velocity(times[present].astype(np.float64), centroids)
      u = np.asarray(synthetic.DIRECTIONS[element.direction])
      s = clip.speed(k)
      along, across = float(v @ u) / s, float(np.linalg.norm(v - (v @ u) * u)) / s
      motion = float(np.clip(along, 0, 1) * np.clip(1 - across, 0, 1))
      position_error = float(np.mean(np.linalg.norm(centroids - truth[present], axis=1)))
    elements.append({"caption": element.phrase, "colour": float(np.mean(colour)),
                     "shape": float(np.mean(shape)), "motion": motion,
                     "present": len(present) / t_count, "position_error": position_error})
  away = ~ndimage.binary_dilation(footprint | (labels >= 0), iterations=2,
                                  structure=np.ones((1, 3, 3), bool))
  bg = synthetic.render_background(clip.background, h, w).astype(np.int16)
  close = np.max(np.abs(frames.astype(np.int16) - bg), axis=-1) <= BACKGROUND_TOLERANCE
  background = float(close[away].mean()) if away.any() else 0.0
  out = {key: float(np.mean([e[key] for e in elements])) for key in SCORES[:3]}
  out["background"] = background
  out["fidelity"] = float(np.mean([out[key] for key in SCORES]))
  return {"caption": clip.caption, **out, "elements": elements}


def summarize(scores: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Averages of the per-video scores (fidelity and its four parts) over videos."""
  if not scores:
    raise InputError("no videos were scored")
  return {key: float(np.mean([s[key] for s in scores])) for key in (*SCORES, "fidelity")}
