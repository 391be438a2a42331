"""Scores of generated videos, per video and averaged, as JSON (stdout, and --out).

  python -m a2jax.eval fidelity --data-dir DATA [--config demo] [--split heldout] --videos DIR
      every DIR/<name>.mp4 named after a clip of the synthetic split is scored against that clip's
      truth (a2jax.eval.fidelity: colour, shape, motion, background, fidelity in [0, 1])
  python -m a2jax.eval bench --checkpoint FOLDER --jobs JOBS.jsonl
      sample.py's jobs file: each job's "out" video against its "refs" and "background"
      (relative paths are relative to the jobs file), with the folder's CLIP (a2jax.eval.bench)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from a2jax import checkpoints, families, preprocess, video
from a2jax.data import synthetic
from a2jax.errors import A2JaxError, InputError
from a2jax.eval import bench, fidelity


def run_fidelity(args) -> dict:
  videos = {p.stem: p for p in sorted(pathlib.Path(args.videos).glob("*.mp4"))}
  if not videos:
    raise InputError(f"{args.videos} holds no .mp4 files")
  source = synthetic.open_dataset(args.data_dir, args.config).as_data_source()[args.split]
  clips = {}
  for record in source:
    name = record["name"].decode()
    if name in videos:
      clips[name] = synthetic.record_clip(record)
  unknown = sorted(set(videos) - set(clips))
  if unknown:
    raise InputError(f"{len(unknown)} videos are not named after a clip of the {args.split} split "
                     f"(first: {unknown[0]}.mp4): name each video <clip name>.mp4")
  scores = {name: fidelity.score_video(video.read_mp4(videos[name]), clip)
            for name, clip in clips.items()}
  return {"videos": scores, "mean": fidelity.summarize(list(scores.values()))}


def run_bench(args) -> dict:
  jobs_file = pathlib.Path(args.jobs)
  folder = pathlib.Path(args.checkpoint)
  cfg = checkpoints.read_config(folder)
  families.require_clip(cfg, str(folder))
  cfg = cfg.clip
  params = checkpoints.load_component(folder, "clip", cfg)
  processor = preprocess.ClipImageProcessor.from_folder(folder / "image_processor")
  scores = {}
  for lineno, line in enumerate(jobs_file.read_text().splitlines(), 1):
    if not line.strip():
      continue
    job = json.loads(line)
    if "out" not in job or not (job.get("refs") or job.get("background")):
      raise InputError(f"{jobs_file}:{lineno}: a job needs 'out' and 'refs' and/or 'background'")
    paths = [*job.get("refs", []), *([job["background"]] if job.get("background") else [])]
    refs = [preprocess.load_image(jobs_file.parent / p) for p in paths]
    scores[job["out"]] = bench.score_video(video.read_mp4(jobs_file.parent / job["out"]), refs,
                                           params, cfg, processor)
  return {"videos": scores, "mean": bench.summarize(list(scores.values()))}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m a2jax.eval", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("fidelity", help="synthetic E2V fidelity against the known truth")
  p.add_argument("--data-dir", required=True, help="built synthetic_elements dataset folder")
  p.add_argument("--config", default="demo", help="its config name (default: demo)")
  p.add_argument("--split", default="heldout", choices=synthetic.SPLITS)
  p.add_argument("--videos", required=True, help="folder of <clip name>.mp4")
  p.add_argument("--out", help="also write the JSON here")
  p = sub.add_parser("bench", help="A2-Bench-style CLIP metrics of sampled videos")
  p.add_argument("--checkpoint", required=True, help="converted a2jax folder (its clip/)")
  p.add_argument("--jobs", required=True, help="sample.py jobs file (JSONL)")
  p.add_argument("--out", help="also write the JSON here")
  args = parser.parse_args(argv)
  try:
    result = run_fidelity(args) if args.command == "fidelity" else run_bench(args)
  except A2JaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  text = json.dumps(result, indent=1)
  if args.out:
    pathlib.Path(args.out).write_text(text + "\n")
  print(json.dumps(result["mean"], indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
