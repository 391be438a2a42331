"""Many videos per compiled program: sampling throughput against the batch size.

  python benchmarks/sample_batch.py cpu [--batches 1,2,4,8]     # tiny model on this machine
  python benchmarks/sample_batch.py tpu [--target tpu:v5p:4x4x4 --mesh data=8,context=8 --batch 8]

`cpu`: a tiny random release (convert_weights.tiny_release) converted into a temporary folder,
`A2Pipeline.generate` of B requests (distinct seeds and prompts) on this machine's devices, B in
`--batches`; videos per hour of the warm program (compiles apart, median of `--repeats` runs) and
each batch size's throughput over batch 1's, measured in the same run.

`tpu`: ahead of time (deviceless libtpu, nothing allocated), one whole full-size sampling step
(81×480×832, 3 references, bfloat16, splash attention; the CFG pair of each of B videos through
the DiT, guidance and the UniPC update: `pipeline.denoise_fn` with steps = 1) with B videos, for
`--target` on `--mesh`: per-chip peak memory, compile time, and videos per hour at the analytic
FLOPs (a2jax.flops.transformer_flops; a video = `--steps` steps × 2 CFG branches) and `--mfu` of the
chips' peak bfloat16 FLOP/s. Run with JAX_PLATFORMS=cpu (and ALLOW_MULTIPLE_LIBTPU_LOAD=1 when
another process compiles for TPU too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import a2jax  # noqa: E402,F401  before jax: chooses the backends

import jax  # noqa: E402
import numpy as np  # noqa: E402

# Peak dense bfloat16 FLOP/s per chip by TPU generation (Google Cloud's TPU pages).
PEAK_BF16 = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}
PROMPTS = ["A man is holding a teddy bear in the forest.", "A bear walks through the snow.",
           "A woman reads a book by the sea.", "A dog chases a ball in the park."]


def cpu(args) -> list[dict]:
  """Videos per hour of the tiny model for each batch size in `args.batches` (this machine)."""
  from a2jax import checkpoints, sharding
  from a2jax.pipeline import A2Pipeline, Request
  from convert_weights import tiny_release
  from convert_weights.release import convert_release
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    convert_release(tiny_release.build(tmp / "release", seed=0), tmp / "a2jax", progress=False)
    cfg = checkpoints.read_config(tmp / "a2jax", args.overrides)
    pipe = A2Pipeline.from_folder(tmp / "a2jax", mesh=sharding.make_mesh(cfg.mesh),
                                  overrides=args.overrides)
  sampling = dataclasses.replace(pipe.cfg.sampling, frames=args.frames, height=args.height,
                                 width=args.width, steps=args.steps)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (64, 48, 3), dtype=np.uint8) for _ in range(2)]
  rows = []
  for b in args.batches:
    requests = [Request(PROMPTS[i % len(PROMPTS)], [images[0]], images[1], seed=i)
                for i in range(b)]
    compile_before = pipe.compile_seconds
    pipe.generate(requests, sampling=sampling, progress=False)  # compiles
    runs = []  # (seconds, stage timings) of each timed run
    for _ in range(args.repeats):
      start = time.perf_counter()
      timings = pipe.generate(requests, sampling=sampling, progress=False).timings
      runs.append((time.perf_counter() - start, timings))
    per_batch, timings = sorted(runs, key=lambda run: run[0])[len(runs) // 2]  # the median run
    rows.append({"batch": b, "seconds_per_batch": round(per_batch, 3),
                 "videos_per_hour": round(3600 * b / per_batch, 1),
                 "compile_s": round(pipe.compile_seconds - compile_before, 1),
                 "stage_s_per_video": {k: round(v / b, 4) for k, v in timings.items()
                                       if k != "compile"}})
    print(f"  batch {b}: {per_batch:.2f} s per batch, {rows[-1]['videos_per_hour']:.0f} videos/h",
          file=sys.stderr, flush=True)
  for row in rows:
    row["vs_batch_1"] = round(row["videos_per_hour"] / rows[0]["videos_per_hour"], 2)
  mesh = dict(sharding.make_mesh(cfg.mesh).shape)
  print(f"\ntiny model, {args.frames}×{args.height}×{args.width}, {args.steps} steps, guidance "
        f"{sampling.guidance}, {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"mesh {mesh}")
  stages = list(rows[0]["stage_s_per_video"])
  print(f"| batch | s per batch | videos / h | × batch 1 | {' | '.join(stages)} (s per video) |\n"
        f"|{'---|' * (4 + len(stages))}")
  for r in rows:
    per_stage = " | ".join(f"{r['stage_s_per_video'][k]:.3f}" for k in stages)
    print(f"| {r['batch']} | {r['seconds_per_batch']:.2f} | {r['videos_per_hour']:.0f} | "
          f"{r['vs_batch_1']:.2f} | {per_stage} |")
  return rows


def sampling_step_args(cfg, mesh, video, videos: int):
  """(params, noise, text, negative_text, image, condition) of `pipeline.denoise_fn` for `videos`
  videos, sharded ShapeDtypeStructs (a2jax.aot.sampling_step_args holds one video)."""
  from a2jax import aot
  params, *one = aot.sampling_step_args(cfg, mesh, video)
  grid = ("batch", "frames", "height", "width", "channels")
  context = ("batch", "context_tokens", "act_embed")
  return (params, *(aot.abstract_array((videos, *a.shape[1:]), a.dtype, logical, mesh)
                    for a, logical in zip(one, (grid, context, context, context, grid))))


def tpu(args) -> dict:
  """The full-size sampling step with `args.batch` videos, compiled ahead of time for
  `args.target`."""
  from a2jax import aot, configs, flops, pipeline, sharding
  overrides = ["transformer.attention=splash", *args.overrides]
  cfg = configs.load("a2_14b", overrides=overrides)
  generation = args.target.split(":")[1] if args.target.startswith("tpu:") else None
  if generation not in PEAK_BF16:
    raise SystemExit(f"--target {args.target}: give a TPU target of {', '.join(PEAK_BF16)}")
  peak = PEAK_BF16[generation]
  devices = aot.target_devices(args.target)
  mesh = sharding.make_mesh(aot.mesh_arg(args.mesh), devices)
  video = flops.VideoShape(image_len=257 * 3)
  step = pipeline.denoise_fn(cfg, dataclasses.replace(cfg.sampling, steps=1))
  result = aot.compile_program(step, sampling_step_args(cfg, mesh, video, args.batch), mesh)
  forward = flops.transformer_flops(cfg.transformer, video)["total"]
  video_flops = args.steps * 2 * forward  # CFG: 2 transformer forwards per step
  seconds = args.batch * video_flops / (len(devices) * peak * args.mfu)
  out = {"target": args.target, "device_kind": devices[0].device_kind, "chips": len(devices),
         "mesh": dict(mesh.shape), "videos": args.batch,
         "peak_gib": round(result["peak_bytes"] / aot.GIB, 2), "compile_s": result["compile_s"],
         "lower_s": result["lower_s"], "flops_per_forward": forward,
         "flops_per_video": video_flops, "mfu": args.mfu,
         "seconds_per_batch": round(seconds, 1),
         "videos_per_hour": round(3600 * args.batch / seconds, 1),
         "custom_calls": result["custom_calls"]}
  print(json.dumps(out), flush=True)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("mode", choices=("cpu", "tpu"))
  parser.add_argument("--batches", default="1,2,4,8", help="cpu: batch sizes")
  parser.add_argument("--frames", type=int, default=9)
  parser.add_argument("--height", type=int, default=32)
  parser.add_argument("--width", type=int, default=48)
  parser.add_argument("--steps", type=int, default=None,
                      help="denoising steps (default: cpu 4, tpu 50 as the release)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--target", default="tpu:v5p:4x4x4")
  parser.add_argument("--mesh", default="data=8,context=8")
  parser.add_argument("--batch", type=int, default=8, help="tpu: videos per step")
  parser.add_argument("--mfu", type=float, default=0.4, help="tpu: assumed model FLOP utilisation")
  parser.add_argument("overrides", nargs="*", help="config overrides key=value")
  args = parser.parse_args(argv)
  args.batches = [int(b) for b in args.batches.split(",")]
  if args.steps is None:
    args.steps = 4 if args.mode == "cpu" else 50
  (cpu if args.mode == "cpu" else tpu)(args)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
