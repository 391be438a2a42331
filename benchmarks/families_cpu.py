"""SkyReels-A2's sampling defaults against SkyReels-V3 R2V's, per video, on the same tiny shape and
the same transformer widths, in one run on this CPU: DiT passes (steps × guidance branches) and
the time of one video (wall and process CPU seconds, and the denoising stage's wall seconds,
median of several after a warm-up that compiles; compiles reported apart). Prints each family's row and the ratio V3 / A2.

A2: UniPC 50 steps at guidance 5 (2 branches: 100 passes); V3 R2V: UniPC 8 steps at guidance 1
(1 branch: 8 passes). Both from tiny random release folders (convert_weights.tiny_release): the
numbers measure cost, not quality.

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/families_cpu.py [--frames 17 --height 64
      --width 96 --refs 2 --repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import a2jax  # noqa: E402,F401  first: it chooses the JAX backends (a2jax/platforms.py)

from a2jax import families  # noqa: E402
from a2jax.pipeline import A2Pipeline  # noqa: E402
from convert_weights import tiny_release  # noqa: E402
from convert_weights.release import convert_release  # noqa: E402

PROMPT = "A red ball rolls past a blue box in a green garden."


def one_video(pipe: A2Pipeline, sampling, references) -> tuple[float, float, float, float]:
  """(wall s, process CPU s, compile s, denoising wall s) of one video through the whole
  pipeline."""
  wall, cpu = time.perf_counter(), time.process_time()
  result = pipe(PROMPT, references, sampling=sampling, progress=False)
  return (time.perf_counter() - wall, time.process_time() - cpu, result.timings["compile"],
          result.timings["denoise"])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--frames", type=int, default=17)
  p.add_argument("--height", type=int, default=64)
  p.add_argument("--width", type=int, default=96)
  p.add_argument("--refs", type=int, default=2, help="reference images per video")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  references = [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(args.refs)]
  rows = {}
  with tempfile.TemporaryDirectory() as tmp:
    for family in ("a2", "v3_r2v"):
      src = tiny_release.build(pathlib.Path(tmp) / family, seed=0, family=family)
      convert_release(src, pathlib.Path(tmp) / f"{family}_converted", progress=False)
      pipe = A2Pipeline.from_folder(pathlib.Path(tmp) / f"{family}_converted")
      sampling = dataclasses.replace(pipe.cfg.sampling, frames=args.frames, height=args.height,
                                     width=args.width)
      passes = sampling.steps * families.FAMILIES[family].branches(sampling)
      compile_s = one_video(pipe, sampling, references)[2]  # warm-up: compiles every program
      runs = [one_video(pipe, sampling, references) for _ in range(args.repeats)]
      rows[family] = dict(steps=sampling.steps, guidance=sampling.guidance, passes=passes,
                          wall=statistics.median(r[0] for r in runs),
                          cpu=statistics.median(r[1] for r in runs), compile=compile_s,
                          denoise=statistics.median(r[3] for r in runs))
  print(f"{args.frames}×{args.height}×{args.width}, {args.refs} references, tiny random models, "
        f"median of {args.repeats} after a compiling warm-up")
  print(f"{'family':<8} {'steps':>5} {'guidance':>8} {'DiT passes':>10} {'wall s':>8} "
        f"{'CPU s':>8} {'denoise s':>9} {'compile s':>9}")
  for family, r in rows.items():
    print(f"{family:<8} {r['steps']:>5} {r['guidance']:>8g} {r['passes']:>10} {r['wall']:>8.2f} "
          f"{r['cpu']:>8.2f} {r['denoise']:>9.3f} {r['compile']:>9.1f}")
  a2, v3 = rows["a2"], rows["v3_r2v"]
  print(f"V3 / A2 per video: DiT passes {v3['passes'] / a2['passes']:.2f}×, wall "
        f"{v3['wall'] / a2['wall']:.2f}×, CPU {v3['cpu'] / a2['cpu']:.2f}×, denoising "
        f"{v3['denoise'] / a2['denoise']:.2f}× (the rest: text, VAE encode / decode, CLIP)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
