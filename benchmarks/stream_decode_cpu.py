"""Peak host memory of decoding a long video to mp4: the streamed path (`A2Pipeline.decode_stream`
into `video.write_mp4`, one latent frame at a time) against the whole-video path (`decode`, then
write), each at 17 and at 257 frames, each in a fresh process on this CPU (where device memory is
host memory). The streamed path should be flat in length, the whole one grows with it. Prints
each run's peak RSS and, per path, the ratio 257 / 17 frames of the growth over the process's
memory before decoding.

Tiny random VAE (convert_weights.tiny_release), random latents: the numbers measure memory, not
pictures.

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/stream_decode_cpu.py [--height 256 --width 256]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

FRAMES = (17, 257)


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_run(folder: str, path: str, frames: int, height: int, width: int) -> dict:
  """Decodes `frames` frames with one path in this process; {before, peak} RSS in MB."""
  import numpy as np

  import a2jax  # noqa: F401  first: it chooses the JAX backends
  from a2jax import video
  from a2jax.pipeline import A2Pipeline, video_to_uint8
  pipe = A2Pipeline.from_folder(folder)
  f = (frames - 1) // 4 + 1
  latents = np.random.default_rng(0).standard_normal(
      (1, f, height // 8, width // 8, pipe.cfg.vae.z_dim)).astype(np.float32)
  # Compile on a short video first, so that the growth measured is the decode's, not XLA's.
  list(pipe.decode_stream(latents[:, :2])) if path == "streamed" else pipe.decode(latents[:, :2])
  before = peak_rss_mb()
  out = pathlib.Path(tempfile.mkdtemp()) / "v.mp4"
  if path == "streamed":
    video.write_mp4(out, (chunk[0] for chunk in pipe.decode_stream(latents)), 16)
  else:
    video.write_mp4(out, video_to_uint8(pipe.decode(latents))[0], 16)
  return {"before": before, "peak": peak_rss_mb(), "frames": video.probe(out)[0]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--height", type=int, default=256)
  p.add_argument("--width", type=int, default=256)
  p.add_argument("--one", nargs=3, metavar=("FOLDER", "PATH", "FRAMES"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.one:
    print(json.dumps(one_run(args.one[0], args.one[1], int(args.one[2]), args.height, args.width)))
    return 0

  from convert_weights import tiny_release
  from convert_weights.release import convert_release
  work = pathlib.Path(tempfile.mkdtemp())
  convert_release(tiny_release.build(work / "release"), work / "a2jax", progress=False)
  print(f"tiny VAE, {args.height}×{args.width}, peak RSS of a fresh process per run (MB)")
  for path in ("streamed", "whole"):
    growth = {}
    for frames in FRAMES:
      cmd = [sys.executable, __file__, "--height", str(args.height), "--width", str(args.width),
             "--one", str(work / "a2jax"), path, str(frames)]
      run = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                      env=os.environ).stdout.strip().splitlines()[-1])
      assert run["frames"] == frames, run
      growth[frames] = run["peak"] - run["before"]
      print(f"{path:9s} {frames:4d} frames: before decoding {run['before']:7.0f}, "
            f"peak {run['peak']:7.0f}, growth {growth[frames]:7.0f}")
    print(f"{path:9s} growth 257 / 17 frames: {growth[257] / max(growth[17], 1.0):.2f}×")
  return 0


if __name__ == "__main__":
  sys.exit(main())
