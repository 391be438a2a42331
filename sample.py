"""Video sampling from a converted folder: elements-to-video from SkyReels-A2 or SkyReels-V3 R2V,
long text- or image-to-video from SkyReels-V2 diffusion forcing (DF).

  python sample.py --checkpoint a2jax-14b --prompt "A man is holding a teddy bear in the forest." \
      --ref man.png --ref bear.png --background forest.png --out video.mp4
  python sample.py --checkpoint a2jax-v3-r2v --prompt "..." --ref man.png --ref bear.png \
      --resolution 540P --out video.mp4

The folder's family decides the conditioning and the defaults (docs/models.md "Model families");
`--image-guidance` and `--resolution` are SkyReels-V3 R2V's. `--frames` above the model's window
(its folder's frames, or `--base-frames`) makes a longer elements-to-video from windows chained by
`--overlap-history` frames, the references in every window, written as it is decoded. A
SkyReels-V2 DF folder makes video of any length in windows chained by latent history (README "Long
video"):
  python sample.py --checkpoint a2jax-v2-df --prompt "A cat walks along a garden wall." \
      --frames 257 --overlap-history 17 --ar-step 0 --addnoise-condition 20 --out cat.mp4
(`--image first.png`: image-to-video from that first frame).

Many videos with one compiled program: `--jobs jobs.jsonl`, one JSON object per line:
  {"prompt": "...", "refs": ["man.png", "bear.png"], "background": "forest.png", "out": "a.mp4",
   "negative_prompt": "...", "seed": 7}
(`background`, `negative_prompt` and `seed` are optional; a DF folder's jobs take `image` instead of
`refs` and `background`; relative paths are relative to the jobs
file). Jobs run `--batch B` at a time through one compiled program (default: the size of the
mesh's data axis); jobs with the same number of reference images (background included) share
batches, in file order, and the last short batch of each count repeats its last job.

Several processes (TPU pod hosts, GPU nodes): run the same command on every process (docs/multi-host.md
"Multi-host"); process 0 writes the videos and shows the progress. Flags not given take the
checkpoint's `sampling:` config; trailing `key=value` arguments override any config field (e.g.
`transformer.attention=splash mesh.tensor=4`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np

from a2jax import conditioning_v3, configs, families, preprocess, video
from a2jax.errors import InputError
from a2jax.runner import run_main

JOB_KEYS = ("prompt", "refs", "background", "image", "out", "negative_prompt", "seed")
SAMPLING_FLAGS = ("frames", "height", "width", "steps", "guidance", "image_guidance", "shift",
                  "seed", "sampler", "fps",
                  "distill_timesteps", "distill_shift", "cache", "cache_threshold",
                  "cache_max_skips", "cache_retention", "cache_calibration",
                  "base_frames", "overlap_history", "ar_step", "causal_block_size",
                  "addnoise_condition")
# Flags that elements-to-video has and a SkyReels-V2 DF folder does not (what they would act on).
ELEMENTS_ONLY_FLAGS = {"grid": "the references beside the video", "calibrate": "MagCache's curve "
                       "of the elements-to-video sampler", "keep_reference_frames": "reference "
                       "frames"}


@dataclasses.dataclass
class Job:
  prompt: str
  refs: list[pathlib.Path]
  background: pathlib.Path | None
  out: pathlib.Path
  negative_prompt: str | None = None
  seed: int | None = None
  image: pathlib.Path | None = None  # SkyReels-V2 DF: the first frame (image-to-video)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="converted a2jax folder "
                 "(python -m convert_weights release --src RELEASE --dst FOLDER)")
  p.add_argument("--prompt", help="what happens in the video")
  p.add_argument("--ref", action="append", default=[], type=pathlib.Path,
                 help="a subject / object reference image (repeat for several, in order)")
  p.add_argument("--background", type=pathlib.Path, help="the background reference image")
  p.add_argument("--image", type=pathlib.Path, help="SkyReels-V2 DF: the first frame "
                 "(image-to-video), resized to the video")
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("video.mp4"), help="output mp4")
  p.add_argument("--negative-prompt", help="default: the folder's (A2: the release's negative "
                 "prompt; V3 R2V: none)")
  p.add_argument("--jobs", type=pathlib.Path, help="JSONL file of jobs (see above) instead of "
                 "--prompt/--ref/--background/--out")
  p.add_argument("--batch", type=int, help="videos per compiled program (default: the mesh's data "
                 "axis size); rows are sharded over the mesh's data and fsdp axes")
  p.add_argument("--frames", type=int, help="pixel frames, 4k+1 (A2: 81, V3 R2V: 121)")
  p.add_argument("--height", type=int, help="multiple of 16 (A2: 480, V3 R2V: 720)")
  p.add_argument("--width", type=int, help="multiple of 16 (A2: 832, V3 R2V: 1280)")
  p.add_argument("--resolution", choices=conditioning_v3.RESOLUTIONS, help="V3 R2V: the video "
                 "size from the first reference's aspect ratio at this area, as its release "
                 "(default 720P unless --height/--width are given)")
  p.add_argument("--steps", type=int, help="denoising steps (A2: 50, V3 R2V: 8)")
  p.add_argument("--guidance", type=float, help="(text) guidance scale (A2: 5.0, V3 R2V: 1.0)")
  p.add_argument("--image-guidance", type=float, help="V3 R2V: reference guidance scale, used "
                 "above guidance 1 (1.0)")
  p.add_argument("--shift", type=float, help="flow shift (A2: 8.0, V3 R2V: 5.0)")
  p.add_argument("--seed", type=int, help="noise seed (42)")
  p.add_argument("--fps", type=int, help="frames per second of the mp4 (A2: 16, V3 R2V and V2 DF: "
                 "24); V2 DF also tells the model (16 or other)")
  p.add_argument("--sampler", choices=configs.SAMPLERS, help="unipc (release), euler, or distill "
                 "(a step-distilled model, e.g. --sampler distill --guidance 1 with lightx2v's LoRA)")
  fast = p.add_argument_group("fast sampling (docs/sampling.md \"Fast sampling\")")
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
  long = p.add_argument_group("long video (README \"Long video\")")
  long.add_argument("--base-frames", type=int, help="frames of one window, 4k+1 (A2 / V3 R2V: "
                    "the folder's frames; V2 DF 540P: 97, 720P: 121); longer videos are made of "
                    "several")
  long.add_argument("--overlap-history", type=int, help="frames of each window taken from the "
                    "video so far, as latents (4k+1, e.g. 17 or 37; V2 DF: needed above one "
                    "window; A2 / V3 R2V: default 17, at most half a window's scene)")
  long.add_argument("--ar-step", type=int, help="0 (default): a window's frames denoise together; "
                    "k > 0: each causal block starts k steps after the one before (e.g. 5)")
  long.add_argument("--causal-block-size", type=int, help="latent frames per causal attention "
                    "block (1: full attention; e.g. 5 with --ar-step 5)")
  long.add_argument("--addnoise-condition", type=float, help="re-noise the history to this level "
                    "before each step (0: off; the reference suggests 20 for long videos)")
  p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                 help="a LoRA .safetensors file (original Wan / ComfyUI, kohya / musubi or "
                 "diffusers names) merged into the transformer at load time, scaled by STRENGTH "
                 "(default 1); repeatable")
  p.add_argument("--weights", choices=("int8", "fp8"), help="quantize the transformer blocks' "
                 "matmul kernels at load, per output channel (docs/sampling.md \"Quantized weights\"); "
                 "default: as stored (bfloat16)")
  p.add_argument("--mesh", default=None, help="mesh sizes, e.g. data=2,fsdp=-1,context=1,tensor=1 "
                 "(default: the checkpoint config's mesh: all devices on fsdp)")
  p.add_argument("--grid", action="store_true", help="also write OUT_grid.mp4 with the references "
                 "beside each frame")
  p.add_argument("--save-arrays", action="store_true", help="also write OUT.npz: the uint8 frames "
                 "the mp4 encodes and the final latents, for exact comparisons (H.264 spreads a "
                 "one-level difference over a block)")
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
    return [Job(args.prompt, list(args.ref), args.background, args.out, args.negative_prompt,
                image=args.image)]
  if args.prompt or args.ref or args.background or args.image:
    raise InputError("--jobs replaces --prompt/--ref/--background/--image: put them in the jobs "
                     "file")
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
                    raw.get("negative_prompt", args.negative_prompt), raw.get("seed"),
                    base / raw["image"] if raw.get("image") else None))
  if not jobs:
    raise InputError(f"{args.jobs} holds no jobs")
  return jobs


def validate(jobs: list[Job], sampling: configs.SamplingConfig, family, window_frames: int
             ) -> None:
  """Everything that can be checked before a model is loaded (`window_frames`: the pixel frames
  of an elements-to-video window)."""
  outs = set()
  for job in jobs:
    if not job.prompt.strip():
      raise InputError(f"empty prompt for {job.out}: describe the video to generate")
    family.check(sampling, num_refs(job))
    if family.takes_references:
      from a2jax.long_video import chain_plan
      chain_plan(sampling.frames, window_frames, sampling.overlap_history,
                 family.scene_start(num_refs(job)))
    if job.image is not None and family.takes_references:
      raise InputError("--image is the first frame of a SkyReels-V2 DF folder's video; this folder "
                       "makes elements-to-video: give the references with --ref/--background")
    for path in [*job.refs, *([job.background] if job.background else []),
                 *([job.image] if job.image else [])]:
      if not path.is_file():
        raise InputError(f"{'image' if path == job.image else 'reference image'} {path} does not "
                         "exist")
      preprocess.load_image(path)  # readable, or a one-line InputError
    if job.out.suffix.lower() != ".mp4":
      raise InputError(f"--out {job.out}: the output must be an .mp4 file")
    if job.out.resolve() in outs:
      raise InputError(f"two jobs write {job.out}: give every job its own 'out'")
    outs.add(job.out.resolve())


def num_refs(job: Job) -> int:
  return len(job.refs) + (job.background is not None)


def batches(jobs: list[Job], size: int, key=num_refs) -> list[list[Job]]:
  """Jobs in batches of `size` that share their `key` (the reference count N, with --resolution
  also the size), in file order within one key; the last short batch of each key is filled with
  its last job, so that one program fits all."""
  groups: dict[object, list[Job]] = {}
  for job in jobs:
    groups.setdefault(key(job), []).append(job)
  out = []
  for group in groups.values():
    for start in range(0, len(group), size):
      chunk = group[start:start + size]
      out.append(chunk + [chunk[-1]] * (size - len(chunk)))
  return out


def sampling_config(args, base: configs.SamplingConfig, family) -> configs.SamplingConfig:
  has_size_rule = family.default_resolution is not None
  if args.resolution is not None and (not has_size_rule or args.height or args.width):
    raise InputError("--resolution is SkyReels-V3 R2V's size rule and replaces --height/--width"
                     if has_size_rule else "--resolution is a SkyReels-V3 R2V option: "
                     "give this folder --height and --width")
  if args.image_guidance is not None and family.name != "v3_r2v":
    raise InputError("--image-guidance is a SkyReels-V3 R2V option; this folder has one "
                     "guidance (--guidance)")
  if not family.takes_references:
    given = [name for name in ELEMENTS_ONLY_FLAGS if getattr(args, name)]
    if given:
      raise InputError(f"--{given[0].replace('_', '-')} acts on {ELEMENTS_ONLY_FLAGS[given[0]]}, "
                       "which a SkyReels-V2 DF folder's sampling does not have: leave it out")
  flags = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
  if args.keep_reference_frames:
    flags["drop_reference_frames"] = False
  raw = {**configs.to_dict(base), **flags}
  return configs.build(configs.SamplingConfig, raw, "sampling")


def size_rule(args, family) -> str | None:
  """The resolution whose size rule sizes each job, or None for the sampling config's height and
  width: --resolution, else the family's default (V3 R2V: 720P, as its release) unless --height or
  --width is given."""
  if args.resolution is not None or args.height or args.width:
    return args.resolution
  return family.default_resolution


def video_size(job: Job, resolution: str | None, sampling: configs.SamplingConfig
               ) -> tuple[int, int]:
  """(height, width) of a job's video: with --resolution from its first reference, else the
  sampling config's."""
  if resolution is None:
    return sampling.height, sampling.width
  first = job.refs[0] if job.refs else job.background
  return conditioning_v3.video_size(preprocess.load_image(first), resolution)


def grid_frames(frames: np.ndarray, references: list[np.ndarray]) -> np.ndarray:
  """References (fitted to the frame size) to the left of every frame, as the release's grid."""
  h, w = frames.shape[1:3]
  tiles = [preprocess.fit_subject(r, h, w) for r in references]
  row = np.concatenate(tiles, axis=1)
  return np.stack([np.concatenate([row, f], axis=1) for f in frames])


def request(job: Job):
  """The job as an A2Pipeline request, its images loaded."""
  from a2jax.pipeline import Request
  return Request(job.prompt, [preprocess.load_image(p) for p in job.refs],
                 preprocess.load_image(job.background) if job.background else None,
                 job.negative_prompt, job.seed)


def calibrate(pipe, jobs: list[Job], sampling: configs.SamplingConfig, out: pathlib.Path,
              writer: bool, sizes: dict[int, tuple[int, int]]) -> int:
  """MagCache's curve of full runs of the jobs (their mean, each at its size `sizes[id(job)]`),
  written for --cache-calibration by the `writer` process."""
  from a2jax import step_cache
  curves = []
  for job in jobs:
    r = request(job)
    height, width = sizes[id(job)]
    job_sampling = dataclasses.replace(sampling, height=height, width=width,
                                       seed=sampling.seed if job.seed is None else job.seed)
    curves.append(pipe.calibrate(r.prompt, r.references, r.background,
                                 negative_prompt=r.negative_prompt, sampling=job_sampling))
  if writer:
    step_cache.write_calibration(out, np.mean(curves, axis=0), sampling)
    print(f"wrote {out} ({len(curves[0])} steps, {len(jobs)} job(s)): sample with --cache mag "
          f"--cache-calibration {out}", file=sys.stderr)
  return 0


def read_loras(specs: list[str], cfg: configs.TransformerConfig, writer: bool):
  """The --lora files, read and checked against the transformer before any model loads; the
  `writer` process prints their notes (format, coverage, T2V LoRAs) to stderr."""
  from convert_weights import lora
  loaded = lora.read_loras([lora.parse_spec(spec) for spec in specs], cfg)
  notes = [n for one in loaded for n in one.notes] if writer else []
  for note in notes:
    print(f"lora: {note}", file=sys.stderr)
  return loaded


def sample(argv) -> int:
  args = parse_args(argv)
  if args.batch is not None and args.batch < 1:
    raise InputError(f"--batch {args.batch}: give the number of videos per compiled program "
                     "(≥ 1)")
  from a2jax import checkpoints, distributed, pipeline, sharding
  folder = pathlib.Path(args.checkpoint)
  pipeline.check_folder(folder)
  overrides = [*mesh_overrides(args.mesh), *args.overrides]
  if args.weights:
    overrides.append(f"transformer.weights={args.weights}")
  cfg = checkpoints.read_config(folder, overrides)
  family = families.of(cfg)
  distributed.initialize(cfg.distributed)  # before anything touches a device
  sampling = sampling_config(args, cfg.sampling, family)
  jobs = read_jobs(args)
  from a2jax import long_video
  window_frames = long_video.window_frames(sampling, cfg.sampling.frames)
  validate(jobs, sampling, family, window_frames)
  chained = family.takes_references and sampling.frames > window_frames
  if chained and args.grid:
    raise InputError(f"--grid is made from a whole video in memory, and {sampling.frames} frames "
                     f"are chained from windows of {window_frames} and streamed: leave --grid out")
  resolution = size_rule(args, family)
  sizes = {id(job): video_size(job, resolution, sampling) for job in jobs}
  import jax
  writer = jax.process_index() == 0  # the one process that writes files and shows progress
  loras = read_loras(args.lora, cfg.transformer, writer)
  start = time.perf_counter()
  mesh = sharding.make_mesh(cfg.mesh)
  if family.takes_references:
    pipe = pipeline.A2Pipeline.from_folder(folder, mesh=mesh, overrides=overrides, loras=loras)
  else:
    from a2jax.long_video import DiffusionForcingPipeline
    pipe = DiffusionForcingPipeline.from_folder(folder, mesh=mesh, overrides=overrides, loras=loras)
  load_seconds = time.perf_counter() - start
  if args.calibrate is not None:  # the curve of one window, which every window follows
    window = long_video.one_window(sampling, min(sampling.frames, window_frames))
    return calibrate(pipe, jobs, window, args.calibrate, writer, sizes)
  size = args.batch or mesh.shape["data"]
  if chained:
    pipe = long_video.LongElementsPipeline(pipe)
  write = write_videos if family.takes_references and not chained else write_long_videos
  totals = write(pipe, jobs, sampling, sizes, size, args, writer)
  if writer:
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in totals.items() if k != "compile")
    print(f"timings: load {load_seconds:.1f}s, compile {totals.get('compile', 0.0):.1f}s, "
          f"{stages} ({len(jobs)} video(s), batch {size})", file=sys.stderr)
  return 0


def write_videos(pipe, jobs: list[Job], sampling: configs.SamplingConfig,
                 sizes: dict[int, tuple[int, int]], size: int, args, writer: bool
                 ) -> dict[str, float]:
  """Elements-to-video: the jobs in batches of `size` through `A2Pipeline.generate`, each video
  written by the `writer` process; returns the seconds per stage."""
  totals: dict[str, float] = {}
  written = 0
  for batch in batches(jobs, size, key=lambda job: (num_refs(job), sizes[id(job)])):
    requests = [request(job) for job in batch]
    height, width = sizes[id(batch[0])]
    batch_sampling = dataclasses.replace(sampling, height=height, width=width)
    result = pipe.generate(requests, sampling=batch_sampling,
                           progress=not args.no_progress and writer)
    for k, v in result.timings.items():
      totals[k] = totals.get(k, 0.0) + v
    for row, job in unique_rows(batch):
      written += 1
      if not writer:
        continue
      frames, r = result.frames[row], requests[row]
      video.write_mp4(job.out, frames, sampling.fps)
      if args.save_arrays:
        video.write_arrays(job.out.with_suffix(".npz"), frames=frames,
                           latents=np.asarray(result.latents[row]))
      if args.grid:
        refs = [*r.references, *([r.background] if r.background is not None else [])]
        video.write_mp4(job.out.with_name(job.out.stem + "_grid.mp4"), grid_frames(frames, refs),
                        sampling.fps)
      print(f"[{written}/{len(jobs)}] wrote {job.out} ({frames.shape[0]} frames, "
            f"{height}×{width})", file=sys.stderr)
  return totals


def write_long_videos(pipe, jobs: list[Job], sampling: configs.SamplingConfig,
                      sizes: dict[int, tuple[int, int]], size: int, args, writer: bool
                      ) -> dict[str, float]:
  """Long videos, window by window: elements-to-video through `LongElementsPipeline.latents`
  (batches as `write_videos` makes them), SkyReels-V2 DF through `DiffusionForcingPipeline.latents`
  (text-to-video and image-to-video apart); each video then decoded one latent frame at a time and
  written as it comes by the `writer` process (every process decodes: the decode is one program
  over the mesh). Returns the seconds per stage."""
  from a2jax.long_video import LongElementsPipeline, VideoRequest
  elements = isinstance(pipe, LongElementsPipeline)
  totals: dict[str, float] = {"compile": 0.0}
  written = 0
  key = ((lambda job: (num_refs(job), sizes[id(job)])) if elements
         else (lambda job: job.image is not None))
  for batch in batches(jobs, size, key=key):
    height, width = sizes[id(batch[0])]
    batch_sampling = dataclasses.replace(sampling, height=height, width=width)
    if elements:
      requests = [request(job) for job in batch]
    else:
      requests = [VideoRequest(job.prompt, preprocess.load_image(job.image) if job.image else None,
                               job.negative_prompt, job.seed) for job in batch]
    drop = pipe.frames_to_drop(num_refs(batch[0]), sampling) if elements else 0
    latents = pipe.latents(requests, batch_sampling, progress=not args.no_progress and writer,
                           timings=totals)
    for row, job in unique_rows(batch):
      written += 1
      start = time.perf_counter()
      frames = [] if args.save_arrays else None
      chunks = decoded_chunks(pipe, latents[row:row + 1], frames,
                              progress=not args.no_progress and writer, drop=drop)
      if writer:
        video.write_mp4(job.out, chunks, sampling.fps)
      else:
        for _ in chunks:  # the decode's programs run on every process
          pass
      totals["decode"] = totals.get("decode", 0.0) + time.perf_counter() - start
      if not writer:
        continue
      if args.save_arrays:
        video.write_arrays(job.out.with_suffix(".npz"), frames=np.concatenate(frames),
                           latents=latents[row])
      print(f"[{written}/{len(jobs)}] wrote {job.out} ({sampling.frames - drop} frames, "
            f"{height}×{width})", file=sys.stderr)
  return totals


def decoded_chunks(pipe, latents: np.ndarray, keep: list | None, progress: bool, drop: int = 0):
  """One video's uint8 frame chunks (n, H, W, 3) from its latents (1, f, h, w, z) as they are
  decoded, the first `drop` frames left out, with a bar over the latent frames; each chunk also
  appended to `keep` when given."""
  import tqdm
  with tqdm.tqdm(total=latents.shape[1], desc="decode", unit="latent frame", leave=False,
                 disable=not progress) as bar:
    def counted():
      for chunk in pipe.decode_stream(latents):
        bar.update(1)
        yield chunk[0]
    for kept in video.drop_leading(counted(), drop):
      if keep is not None:
        keep.append(kept)
      yield kept


def unique_rows(batch: list[Job]) -> list[tuple[int, Job]]:
  """(row, job) of each job of a batch once: the repeats that fill a short batch are left out."""
  return [(row, job) for row, job in enumerate(batch) if all(job is not j for j in batch[:row])]


def main(argv=None) -> int:
  return run_main(sample, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  raise SystemExit(main())
