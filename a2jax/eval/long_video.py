"""Scores of a long synthetic elements-to-video, window by window (benchmarks/long_elements.py):

- `fidelity` of each window's new frames against the clip (`a2jax.eval.fidelity.score_video`: the
  references' colour and shape, motion along the caption, background) — it should not fall as
  windows go by;
- `continuity`: the mean absolute frame difference across a join between windows, over the same
  inside windows; and the element's jump: how far its centroid moves across a join, over the same
  inside. Both are taken at latent-frame boundaries (output frame o → o + 1 for o ≡ 0 mod 4: the
  frames a latent frame decodes to change together, and the demo's VAE moves only there); a ratio
  near 1 is a seamless join, well above 1 a jump;
- `drift`: the element colour score of the last window minus the first's.

Shapes: T output frames (uint8 (T, H, W, 3)); a window's span is its new frames [start, end).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from a2jax.data import synthetic
from a2jax.errors import InputError
from a2jax.eval import fidelity
from a2jax.video import TEMPORAL_STRIDE


def window_spans(plan, frames: int, drop: int) -> list[tuple[int, int]]:
  """[start, end) of each window's new output frames for a `long_video.ChainPlan` of `frames`
  pixel frames whose first `drop` (A2's reference frames) are not in the output."""
  ends = [TEMPORAL_STRIDE * (plan.window - 1) + 1]
  for _ in range(1, plan.count):
    ends.append(ends[-1] + TEMPORAL_STRIDE * plan.new)
  ends = [min(end, frames) - drop for end in ends]
  return list(zip([0, *ends[:-1]], ends))


def continuity(frames: np.ndarray, clip: synthetic.Clip,
               spans: Sequence[tuple[int, int]]) -> dict[str, float]:
  """{join, inside, ratio}: mean |Δ| (0–255) of consecutive frames at latent-frame boundaries
  across the joins, inside the windows, and join / inside; {jump_join, jump_inside, jump_ratio}:
  the same of the elements' centroid displacement (pixels; where the element shows in both
  frames)."""
  x = frames.astype(np.float32)
  boundaries = range(0, len(frames) - 1, TEMPORAL_STRIDE)
  joins = {start - 1 for start, _ in spans[1:]}
  if not joins or any(j not in boundaries for j in joins):
    raise InputError(f"joins at {sorted(joins)} are not latent-frame boundaries of a "
                     f"{len(frames)}-frame video: give the spans of window_spans")
  labels, _ = fidelity.segment(frames, clip)
  diffs, jumps = {}, {}
  for o in boundaries:
    diffs[o] = float(np.abs(x[o + 1] - x[o]).mean())
    moved = [np.linalg.norm(_centroid(labels[o + 1] == k) - _centroid(labels[o] == k))
             for k in range(len(clip.elements)) if (labels[o] == k).any()
             and (labels[o + 1] == k).any()]
    if moved:
      jumps[o] = float(np.mean(moved))

  def split(values: dict[int, float]) -> tuple[float, float]:
    at = [v for o, v in values.items() if o in joins]
    inside = [v for o, v in values.items() if o not in joins]
    return (float(np.mean(at)) if at else float("nan"),
            float(np.mean(inside)) if inside else float("nan"))
  join, inside = split(diffs)
  jump_join, jump_inside = split(jumps)
  return {"join": join, "inside": inside, "ratio": join / max(inside, 1e-6),
          "jump_join": jump_join, "jump_inside": jump_inside,
          "jump_ratio": jump_join / max(jump_inside, 1e-6)}


def _centroid(mask: np.ndarray) -> np.ndarray:
  ys, xs = np.nonzero(mask)
  return np.array([xs.mean(), ys.mean()])


def score_long_video(frames: np.ndarray, clip: synthetic.Clip,
                     spans: Sequence[tuple[int, int]]) -> dict[str, Any]:
  """Per-window fidelity scores, continuity and drift of one long video against its clip (each
  window's new frames scored as the last frames of the clip, `fidelity.score_video`)."""
  if spans[-1][1] != len(frames):
    raise InputError(f"the windows end at frame {spans[-1][1]}, the video has {len(frames)}")
  windows = [fidelity.score_video(frames[start:end], clip) for start, end in spans]
  per_window = [{key: w[key] for key in (*fidelity.SCORES, "fidelity")} for w in windows]
  return {"windows": per_window, "continuity": continuity(frames, clip, spans),
          "drift": per_window[-1]["colour"] - per_window[0]["colour"]}


def summarize(scores: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Means over videos: fidelity of the first window, of the last, of all; colour first and last,
  drift; the continuity join, inside and their ratio, and the element's jump (videos where it
  showed)."""
  def mean(fn):
    values = [fn(s) for s in scores]
    return float(np.mean([v for v in values if not np.isnan(v)] or [np.nan]))
  out = {"first": mean(lambda s: s["windows"][0]["fidelity"]),
         "last": mean(lambda s: s["windows"][-1]["fidelity"]),
         "all": mean(lambda s: np.mean([w["fidelity"] for w in s["windows"]])),
         "colour_first": mean(lambda s: s["windows"][0]["colour"]),
         "colour_last": mean(lambda s: s["windows"][-1]["colour"]),
         "drift": mean(lambda s: s["drift"]),
         **{key: mean(lambda s, key=key: s["continuity"][key])
            for key in ("join", "inside", "jump_join", "jump_inside")}}
  # Ratios of the means: a video whose element barely moves inside would dominate a mean of ratios.
  out["ratio"] = out["join"] / max(out["inside"], 1e-6)
  out["jump_ratio"] = out["jump_join"] / max(out["jump_inside"], 1e-6)
  return out
