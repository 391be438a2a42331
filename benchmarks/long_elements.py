"""Long elements-to-video on the `make demo` model, scored window by window (a2jax.eval.long_video):
for held-out element / background pairs, videos 4× the model's window (65 frames from windows of
17) made three ways, each against its clip:

- one window: the model's own 17-frame video (the baseline; its one window is "first" and "last");
- chained: `LongElementsPipeline`, each window holding the last `--overlap-history` frames of the
  video so far (a2jax's training-free chaining);
- independent: every window sampled alone from its own noise, the same references and prompt,
  its new frames appended (no history: what chaining must beat at the joins).

Prints, per way: fidelity of the first window, the last and all; the element colour score first →
last and its drift; continuity (mean |Δ| across joins, inside windows, their ratio; the same of the
element's centroid jump in pixels). Writes the per-video scores to --out (JSON).

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/long_elements.py [--demo out/demo] [--count 8]
      [--frames 65] [--overlap-history 1] [--out long_elements.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import a2jax  # noqa: E402,F401  first: it chooses the JAX backends (a2jax/platforms.py)

from a2jax import long_video  # noqa: E402
from a2jax.data import synthetic  # noqa: E402
from a2jax.errors import InputError  # noqa: E402
from a2jax.eval import long_video as long_scores  # noqa: E402
from a2jax.pipeline import Request  # noqa: E402
from a2jax.video import TEMPORAL_STRIDE  # noqa: E402

WAYS = ("one window", "chained", "independent")


def independent_windows(pipe: long_video.LongElementsPipeline, request: Request, sampling,
                        plan: long_video.ChainPlan) -> np.ndarray:
  """Window k sampled alone with seed + k; window 0 whole, then each later one's last new frames."""
  window = plan.window_sampling(sampling)
  parts = []
  for k in range(plan.count):
    frames = pipe.base.generate([dataclasses.replace(request, seed=request.seed + 1000 * k)],
                                sampling=window, progress=False).frames[0]
    parts.append(frames if k == 0 else frames[-TEMPORAL_STRIDE * plan.new:])
  drop = pipe.frames_to_drop(request.num_refs, sampling)
  return np.concatenate(parts)[:sampling.frames - drop]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--demo", type=pathlib.Path, default=pathlib.Path("out/demo"),
                 help="the folder `python -m a2jax.demo --out` wrote (its model/ and data/)")
  p.add_argument("--count", type=int, default=8, help="held-out clips")
  p.add_argument("--frames", type=int, default=65)
  p.add_argument("--overlap-history", type=int, default=1)
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("long_elements.json"))
  args = p.parse_args(argv)
  if not (args.demo / "model" / "transformer").is_dir():
    raise InputError(f"{args.demo} holds no trained demo model: run make demo (or python -m "
                     "a2jax.demo --out DIR) first")
  pipe = long_video.LongElementsPipeline.from_folder(args.demo / "model")
  source = synthetic.open_dataset(args.demo / "data", "demo").as_data_source()["heldout"]
  base = dataclasses.replace(pipe.cfg.sampling, frames=args.frames,
                             overlap_history=args.overlap_history)
  scores = {way: [] for way in WAYS}
  start = time.perf_counter()
  for index in range(min(args.count, len(source))):
    record = source[index]
    clip, refs = synthetic.record_clip(record), synthetic.record_references(record)
    request = Request(clip.caption, refs[:-1], refs[-1], seed=index)
    plan = pipe.plan(base, request.num_refs)
    drop = pipe.frames_to_drop(request.num_refs, base)
    spans = long_scores.window_spans(plan, args.frames, drop)
    one = pipe.base.generate([request], sampling=plan.window_sampling(base),
                             progress=False).frames[0]
    window = fidelity_only(one, clip)
    scores["one window"].append({"windows": [window], "drift": 0.0, "continuity": None})
    chained = pipe.generate([request], sampling=base, progress=False).frames[0]
    scores["chained"].append(long_scores.score_long_video(chained, clip, spans))
    alone = independent_windows(pipe, request, base, plan)
    scores["independent"].append(long_scores.score_long_video(alone, clip, spans))
    print(f"[{index + 1}/{args.count}] {clip.caption}: {plan.count} windows "
          f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
  print(f"\n{args.frames} frames from windows of {plan.window_frames}, {plan.history} latent "
        f"frame(s) of history, {len(scores['chained'])} held-out clips (fidelity 0–1; |Δ| 0–255):")
  print(f"{'':14}{'first':>7}{'last':>7}{'all':>7}{'colour':>15}{'drift':>8}{'|Δ| join':>10}"
        f"{'inside':>8}{'ratio':>7}{'jump join':>11}{'inside':>8}{'ratio':>7}")
  summary = {}
  for way in WAYS:
    rows = scores[way]
    if way == "one window":
      f = float(np.mean([s["windows"][0]["fidelity"] for s in rows]))
      c = float(np.mean([s["windows"][0]["colour"] for s in rows]))
      summary[way] = {"first": f, "colour_first": c}
      print(f"{way:14}{f:7.3f}{'':14}{c:8.3f}")
      continue
    s = summary[way] = long_scores.summarize(rows)
    print(f"{way:14}{s['first']:7.3f}{s['last']:7.3f}{s['all']:7.3f}"
          f"{s['colour_first']:8.3f}→{s['colour_last']:.3f}{s['drift']:+8.3f}{s['join']:10.2f}"
          f"{s['inside']:8.2f}{s['ratio']:7.2f}{s['jump_join']:11.2f}{s['jump_inside']:8.2f}"
          f"{s['jump_ratio']:7.2f}")
  args.out.write_text(json.dumps({"summary": summary, "videos": scores}, indent=1))
  print(f"per-video scores: {args.out}")
  return 0


def fidelity_only(frames: np.ndarray, clip: synthetic.Clip) -> dict:
  from a2jax.eval import fidelity
  scored = fidelity.score_video(frames, clip)
  return {key: scored[key] for key in (*fidelity.SCORES, "fidelity")}


if __name__ == "__main__":
  from a2jax.runner import run_main
  raise SystemExit(run_main(main, sys.argv[1:]))
