"""The whole tiny elements-to-video pipeline, a2jax vs the PyTorch reference pipeline, on this CPU in
the same run: per stage and total, a2jax's compile time reported apart (median of several runs after
a warm-up). Prints each median and the ratio a2jax / PyTorch (target ≤ 1.0×).

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/sample_cpu.py [--frames 17 --height 64 --width 96
      --steps 10 --repeats 3]
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
import jax  # noqa: E402
import torch  # noqa: E402

from a2jax.pipeline import DEFAULT_NEGATIVE_PROMPT, A2Pipeline  # noqa: E402
from convert_weights import tiny_release  # noqa: E402
from convert_weights.reference import TorchA2  # noqa: E402
from convert_weights.release import convert_release  # noqa: E402

PROMPT = "A red ball rolls past a blue box in a green garden."
STAGES = ("encode_text", "encode_references", "denoise", "decode")


def torch_stages(ref: TorchA2, vae_refs, originals, noise, sampling) -> dict[str, float]:
  times = {}
  start = time.perf_counter()
  text, negative = ref.text(PROMPT), ref.text(DEFAULT_NEGATIVE_PROMPT)
  times["encode_text"] = time.perf_counter() - start
  start = time.perf_counter()
  image = ref.image_tokens(originals)
  condition, mean, inv_std = ref.condition(vae_refs, sampling.frames)
  times["encode_references"] = time.perf_counter() - start
  start = time.perf_counter()
  latents = ref.denoise(condition, text, negative, image, noise, sampling)
  times["denoise"] = time.perf_counter() - start
  start = time.perf_counter()
  ref.decode(latents, mean, inv_std)
  times["decode"] = time.perf_counter() - start
  return times


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--frames", type=int, default=17)
  p.add_argument("--height", type=int, default=64)
  p.add_argument("--width", type=int, default=96)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)
  torch.set_num_threads(2)

  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    src = tiny_release.build(tmp / "release", seed=0)
    refs = tiny_release.write_example_references(tmp / "refs")
    convert_release(src, tmp / "a2jax", progress=False)
    pipe = A2Pipeline.from_folder(tmp / "a2jax")
    ref = TorchA2(src, PROMPT)

    from a2jax import preprocess
    references = [preprocess.load_image(refs["subject"]), preprocess.load_image(refs["object"])]
    background = preprocess.load_image(refs["background"])
    sampling = dataclasses.replace(pipe.cfg.sampling, frames=args.frames, height=args.height,
                                   width=args.width, steps=args.steps)
    f = (sampling.frames - 1) // 4 + 1
    noise = np.random.default_rng(0).standard_normal(
        (1, f, sampling.height // 8, sampling.width // 8, 16)).astype(np.float32)
    vae_refs, originals = pipe.reference_images(references, background, sampling.height,
                                                sampling.width)

    warm = pipe(PROMPT, references, background, noise=noise, sampling=sampling, progress=False)
    compile_s = warm.timings["compile"]
    torch_stages(ref, vae_refs, originals, noise, sampling)  # warm-up
    ours = {s: [] for s in STAGES}
    theirs = {s: [] for s in STAGES}
    for _ in range(args.repeats):  # interleaved, so that machine load hits both alike
      result = pipe(PROMPT, references, background, noise=noise, sampling=sampling, progress=False)
      for s in STAGES:
        ours[s].append(result.timings[s])
      for s, v in torch_stages(ref, vae_refs, originals, noise, sampling).items():
        theirs[s].append(v)

  print(f"tiny A2 pipeline, {sampling.frames}×{sampling.height}×{sampling.width}, {sampling.steps} "
        f"steps, 3 references, float32, CPU, {jax.device_count()} JAX devices, torch "
        f"{torch.get_num_threads()} threads; a2jax compile {compile_s:.1f}s (apart)")
  print(f"{'stage':<20}{'a2jax s':>10}{'torch s':>10}{'ratio':>8}")
  total_ours = total_theirs = 0.0
  for s in STAGES:
    a, b = statistics.median(ours[s]), statistics.median(theirs[s])
    total_ours, total_theirs = total_ours + a, total_theirs + b
    print(f"{s:<20}{a:>10.3f}{b:>10.3f}{a / b:>7.2f}×")
  print(f"{'total':<20}{total_ours:>10.3f}{total_theirs:>10.3f}{total_ours / total_theirs:>7.2f}×")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
