"""Elements-to-video sampling from a converted SkyReels-A2 folder.

  python sample.py --checkpoint a2jax-14b --prompt "A man is holding a teddy bear in the forest." \
      --ref man.png --ref bear.png --background forest.png --out video.mp4

Many videos with one compiled program: `--jobs jobs.jsonl`, one JSON object per line:
  {"prompt": "...", "refs": ["man.png", "bear.png"], "background": "forest.png", "out": "a.mp4",
   "negative_prompt": "...", "seed": 7}
(`background`, `negative_prompt` and `seed` are optional; relative paths are relative to the jobs
file). Flags not given take the checkpoint's `sampling:` config; trailing `key=value` arguments
override any config field (e.g. `transformer.attention=splash mesh.tensor=4`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np

from a2jax import conditioning, configs, preprocess, video
from a2jax.errors import A2JaxError, InputError

JOB_KEYS = ("prompt", "refs", "background", "out", "negative_prompt", "seed")
SAMPLING_FLAGS = ("frames", "height", "width", "steps", "guidance", "shift", "seed", "sampler",
                  "distill_timesteps", "distill_shift", "cache", "cache_threshold",
                  "cache_max_skips", "cache_retention", "cache_calibration")


@dataclasses.dataclass
class Job:
  prompt: str
  refs: list[pathlib.Path]
  background: pathlib.Path | None
  out: pathlib.Path
  negative_prompt: str | None = None
  seed: int | None = None


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="converted a2jax folder "
                 "(python -m convert_weights release --src RELEASE --dst FOLDER)")
  p.add_argument("--prompt", help="what happens in the video")
  p.add_argument("--ref", action="append", default=[], type=pathlib.Path,
                 help="a subject / object reference image (repeat for several, in order)")
  p.add_argument("--background", type=pathlib.Path, help="the background reference image")
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("video.mp4"), help="output mp4")
  p.add_argument("--negative-prompt", help="default: the release's negative prompt")
  p.add_argument("--jobs", type=pathlib.Path, help="JSONL file of jobs (see above) instead of "
                 "--prompt/--ref/--background/--out")
  p.add_argument("--frames", type=int, help="pixel frames, 4k+1 (release: 81)")
  p.add_argument("--height", type=int, help="multiple of 16 (release: 480)")
  p.add_argument("--width", type=int, help="multiple of 16 (release: 832)")
  p.add_argument("--steps", type=int, help="denoising steps (release: 50)")
  p.add_argument("--guidance", type=float, help="classifier-free guidance scale (release: 5.0)")
  p.add_argument("--shift", type=float, help="flow shift (release: 8.0)")
  p.add_argument("--seed", type=int, help="noise seed (release: 42)")
  p.add_argument("--sampler", choices=configs.SAMPLERS, help="unipc (release), euler, or distill "
                 "(a step-distilled model, e.g. --sampler distill --guidance 1 with lightx2v's LoRA)")
  fast = p.add_argument_group("fast sampling (README \"Fast sampling\")")
  fast.add_argument("--distill-timesteps", type=int_list, help="distill: training steps to sample "
                    "at, comma-separated (default 1000,750,500,250)")
  fast.add_argument("--distill-shift", type=float, help="distill: flow shift of its schedule (5)")
  fast.add_argument("--cache", choices=configs.CACHES, help="step caching: none (default), mag, "
                    "teacache or fbcache")
  fast.add_argument("--cache-threshold", type=float, help="skip threshold (0: never skip; default "
                    "mag 0.12, teacache 0.26, fbcache 0.05)")
  fast.add_argument("--cache-max-skips", type=int, help="mag: most skipped steps in a row (4)")
  fast.add_argument("--cache-retention", type=float, help="mag, teacache: first share of steps "
                    "always computed (0.2)")
  fast.add_argument("--cache-calibration", help="mag: the curve JSON written by --calibrate")
  fast.add_argument("--calibrate", type=pathlib.Path, metavar="OUT.json", help="instead of videos, "
                    "run the job(s) in full and write MagCache's curve (mean over jobs) to OUT.json")
  p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                 help="a LoRA .safetensors file (original Wan / ComfyUI, kohya / musubi or "
                 "diffusers names) merged into the transformer at load time, scaled by STRENGTH "
                 "(default 1); repeatable")
  p.add_argument("--weights", choices=("int8", "fp8"), help="quantize the transformer blocks' "
                 "matmul kernels at load, per output channel (README \"Quantized weights\"); "
                 "default: as stored (bfloat16)")
  p.add_argument("--mesh", default=None, help="mesh sizes, e.g. data=2,fsdp=-1,context=1,tensor=1 "
                 "(default: the checkpoint config's mesh: all devices on fsdp)")
  p.add_argument("--grid", action="store_true", help="also write OUT_grid.mp4 with the references "
                 "beside each frame")
  p.add_argument("--keep-reference-frames", action="store_true",
                 help="keep the first 4·N frames, which show the references")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("overrides", nargs="*", help="config overrides key=value")
  return p.parse_intermixed_args(argv)  # key=value overrides may follow the options


def int_list(text: str) -> list[int]:
  try:
    return [int(v) for v in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def mesh_overrides(text: str | None) -> list[str]:
  if not text:
    return []
  out = []
  for item in text.split(","):
    key, sep, value = item.partition("=")
    if not sep or key.strip() not in ("data", "fsdp", "context", "tensor"):
      raise InputError(f"--mesh {text!r}: use axis=size pairs of data, fsdp, context, tensor")
    out.append(f"mesh.{key.strip()}={value.strip()}")
  return out


def read_jobs(args) -> list[Job]:
  if args.jobs is None:
    if args.prompt is None:
      raise InputError("no --prompt: give --prompt with --ref/--background, or --jobs FILE.jsonl")
    return [Job(args.prompt, list(args.ref), args.background, args.out, args.negative_prompt)]
  if args.prompt or args.ref or args.background:
    raise InputError("--jobs replaces --prompt/--ref/--background: put them in the jobs file")
  if not args.jobs.is_file():
    raise InputError(f"jobs file {args.jobs} does not exist")
  base = args.jobs.parent
  jobs = []
  for number, line in enumerate(args.jobs.read_text().splitlines(), 1):
    if not line.strip():
      continue
    where = f"{args.jobs}:{number}"
    try:
      raw = json.loads(line)
    except ValueError:
      raise InputError(f"{where} is not a JSON object") from None
    if not isinstance(raw, dict):
      raise InputError(f"{where} is not a JSON object")
    unknown = sorted(set(raw) - set(JOB_KEYS))
    if unknown:
      raise InputError(f"{where}: unknown key {unknown[0]!r}: use {', '.join(JOB_KEYS)}")
    if "prompt" not in raw or "out" not in raw:
      raise InputError(f"{where}: a job needs 'prompt' and 'out'")
    jobs.append(Job(raw["prompt"], [base / r for r in raw.get("refs", [])],
                    base / raw["background"] if raw.get("background") else None, base / raw["out"],
                    raw.get("negative_prompt", args.negative_prompt), raw.get("seed")))
  if not jobs:
    raise InputError(f"{args.jobs} holds no jobs")
  return jobs


def validate(jobs: list[Job], sampling: configs.SamplingConfig) -> None:
  """Everything that can be checked before a model is loaded."""
  for job in jobs:
    if not job.prompt.strip():
      raise InputError(f"empty prompt for {job.out}: describe the video to generate")
    conditioning.check_reference_count(len(job.refs) + (job.background is not None), sampling.frames)
    for path in [*job.refs, *([job.background] if job.background else [])]:
      if not path.is_file():
        raise InputError(f"reference image {path} does not exist")
      preprocess.load_image(path)  # readable, or a one-line InputError
    if job.out.suffix.lower() != ".mp4":
      raise InputError(f"--out {job.out}: the output must be an .mp4 file")


def sampling_config(args, base: configs.SamplingConfig) -> configs.SamplingConfig:
  flags = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
  if args.keep_reference_frames:
    flags["drop_reference_frames"] = False
  raw = {**configs.to_dict(base), **flags}
  return configs.build(configs.SamplingConfig, raw, "sampling")


def grid_frames(frames: np.ndarray, references: list[np.ndarray]) -> np.ndarray:
  """References (fitted to the frame size) to the left of every frame, as the release's grid."""
  h, w = frames.shape[1:3]
  tiles = [preprocess.fit_subject(r, h, w) for r in references]
  row = np.concatenate(tiles, axis=1)
  return np.stack([np.concatenate([row, f], axis=1) for f in frames])


def calibrate(pipe, jobs: list[Job], sampling: configs.SamplingConfig, out: pathlib.Path) -> int:
  """MagCache's curve of full runs of the jobs (their mean), written for --cache-calibration."""
  from a2jax import step_cache
  curves = []
  for job in jobs:
    refs = [preprocess.load_image(p) for p in job.refs]
    background = preprocess.load_image(job.background) if job.background else None
    job_sampling = sampling if job.seed is None else dataclasses.replace(sampling, seed=job.seed)
    curves.append(pipe.calibrate(job.prompt, refs, background, negative_prompt=job.negative_prompt,
                                 sampling=job_sampling))
  step_cache.write_calibration(out, np.mean(curves, axis=0), sampling)
  print(f"wrote {out} ({len(curves[0])} steps, {len(jobs)} job(s)): sample with --cache mag "
        f"--cache-calibration {out}", file=sys.stderr)
  return 0


def read_loras(specs: list[str], cfg: configs.TransformerConfig):
  """The --lora files, read and checked against the transformer before any model loads; prints
  their notes (format, coverage, T2V LoRAs) to stderr."""
  from convert_weights import lora
  loaded = lora.read_loras([lora.parse_spec(spec) for spec in specs], cfg)
  for note in (n for one in loaded for n in one.notes):
    print(f"lora: {note}", file=sys.stderr)
  return loaded


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    from a2jax import checkpoints, pipeline, sharding
    folder = pathlib.Path(args.checkpoint)
    pipeline.check_folder(folder)
    overrides = [*mesh_overrides(args.mesh), *args.overrides]
    if args.weights:
      overrides.append(f"transformer.weights={args.weights}")
    cfg = checkpoints.read_config(folder, overrides)
    sampling = sampling_config(args, cfg.sampling)
    jobs = read_jobs(args)
    validate(jobs, sampling)
    loras = read_loras(args.lora, cfg.transformer)

    start = time.perf_counter()
    mesh = sharding.make_mesh(cfg.mesh)
    pipe = pipeline.A2Pipeline.from_folder(folder, mesh=mesh, overrides=overrides, loras=loras)
    load_seconds = time.perf_counter() - start
    if args.calibrate is not None:
      return calibrate(pipe, jobs, sampling, args.calibrate)
    totals: dict[str, float] = {}
    for number, job in enumerate(jobs, 1):
      refs = [preprocess.load_image(p) for p in job.refs]
      background = preprocess.load_image(job.background) if job.background else None
      job_sampling = sampling if job.seed is None else dataclasses.replace(sampling, seed=job.seed)
      result = pipe(job.prompt, refs, background, negative_prompt=job.negative_prompt,
                    sampling=job_sampling, progress=not args.no_progress)
      video.write_mp4(job.out, result.frames[0], sampling.fps)
      if args.grid:
        grid = grid_frames(result.frames[0], refs + ([background] if background is not None else []))
        video.write_mp4(job.out.with_name(job.out.stem + "_grid.mp4"), grid, sampling.fps)
      for k, v in result.timings.items():
        totals[k] = totals.get(k, 0.0) + v
      print(f"[{number}/{len(jobs)}] wrote {job.out} ({result.frames.shape[1]} frames, "
            f"{sampling.height}×{sampling.width})", file=sys.stderr)
  except A2JaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  stages = ", ".join(f"{k} {v:.1f}s" for k, v in totals.items() if k != "compile")
  print(f"timings: load {load_seconds:.1f}s, compile {totals.get('compile', 0.0):.1f}s, {stages}",
        file=sys.stderr)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
