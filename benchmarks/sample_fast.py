"""Fast sampling modes against the full run: transformer passes, wall time, PSNR / SSIM of the decoded
frames (docs/sampling.md "Fast sampling").

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/sample_fast.py [--steps 50] [--quick]

The mid-size A2 transformer of benchmarks/transformer_cpu.py (dim 1536 = 12 heads × 128, 4 layers,
ffn 8960, the release's text / image widths) with random weights, float32, batch 1, shrunk inputs so
that ~450 transformer passes fit on a 2-core CPU: latents 2×16×16 (128 video tokens; 5 frames of
128×128 pixels), 64 text + 257 image tokens. Frames are decoded by the tiny random VAE of
configs/tiny.yaml (z 16). Every mode starts from the same noise and conditioning as the baseline
(UniPC, 50 steps, shift 8, guidance 5); the MagCache curve is the baseline run's own (its
with-stats program is the calibration run). Compile time is excluded; each mode is timed in
alternation with the baseline (medians of 2), so that both see the same load of the shared machine.

Random weights make the numbers about cost, not quality: a random model's output changes little
from step to step and nothing was distilled, so the distance columns say how far a mode moves the
result of *this* model, not how a trained A2 looks.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import a2jax  # noqa: E402,F401  first: it chooses the JAX backends (a2jax/platforms.py)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402

from transformer_cpu import DIMS, interleaved_medians  # noqa: E402  (benchmarks/ is sys.path[0])

LATENTS = (2, 16, 16)
TEXT_LEN, IMAGE_LEN = 64, 257


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  """dB of uint8 frames a against b."""
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
  """Mean SSIM (Wang et al. 2004: Gaussian window σ 1.5, K 0.01 / 0.03) over frames and channels
  of uint8 frames (F, H, W, C)."""
  a, b = a.astype(np.float64), b.astype(np.float64)
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  blur = lambda x: gaussian_filter(x, sigma=(0, 1.5, 1.5, 0), truncate=3.5)
  mu_a, mu_b = blur(a), blur(b)
  var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
  cov = blur(a * b) - mu_a * mu_b
  ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
  return float(ssim_map.mean())


def modes(curve: str, quick: bool) -> dict[str, dict]:
  """Name → sampling changes against the baseline (`quick`: one of each kind)."""
  mag = lambda thr, k: dict(cache="mag", cache_threshold=thr, cache_max_skips=k,
                            cache_calibration=curve)
  every = {
      "guidance 1 (one branch)": dict(guidance=1.0),
      "distill 4 steps, guidance 1": dict(sampler="distill", guidance=1.0),
      "mag 0.03, K 2": mag(0.03, 2),
      "mag 0.06, K 4": mag(0.06, 4),
      "mag 0.12, K 4": mag(0.12, 4),
      "mag 0.24, K 6": mag(0.24, 6),
      "teacache 0.26": dict(cache="teacache", cache_threshold=0.26),
      "fbcache 0.05": dict(cache="fbcache", cache_threshold=0.05),
      "fbcache 0.10": dict(cache="fbcache", cache_threshold=0.10),
  }
  quick_names = ("guidance 1 (one branch)", "distill 4 steps, guidance 1", "mag 0.12, K 4",
                 "teacache 0.26", "fbcache 0.05")
  return {k: v for k, v in every.items() if k in quick_names} if quick else every


def demo_rows(folder: str, steps: int, count: int, quick: bool):
  """(the demo model's sampling, table rows with E2V fidelity) on `count` held-out clips of the
  `make demo` model in `folder`: each mode against `steps` UniPC steps at guidance 5."""
  from a2jax import conditioning, demo, step_cache
  from a2jax.data import synthetic
  from a2jax.eval import fidelity
  from a2jax.pipeline import A2Pipeline, guidance_branches, transformer_passes, video_to_uint8
  paths = demo.Paths(folder)
  source = synthetic.build(paths.data, demo.DATASET).as_data_source()
  records = [source["heldout"][i] for i in range(count)]
  pipe = A2Pipeline.from_folder(paths.model)
  base = dataclasses.replace(pipe.cfg.sampling, steps=steps, guidance=5.0)

  def denoise(record, sampling):
    clip, refs = synthetic.record_clip(record), synthetic.record_references(record)
    return jax.block_until_ready(pipe.denoise_with_stats(clip.caption, refs[:-1], refs[-1],
                                                         sampling=sampling))

  def run(sampling):
    """(frames per clip, passes per video, seconds vs the baseline's, mean E2V fidelity)."""
    frames, passes, scores, seconds = [], 0.0, [], np.zeros(2)
    for record in records:
      clip, refs = synthetic.record_clip(record), synthetic.record_references(record)
      latents, stats = denoise(record, sampling)  # compiles once per mode
      seconds += interleaved_medians([lambda: denoise(record, base),
                                      lambda: denoise(record, sampling)], repeats=2, warmup=0)
      passes += transformer_passes(stats, guidance_branches(sampling)) / len(records)
      dropped = conditioning.reference_frames_to_drop(len(refs))
      video = video_to_uint8(pipe.decode(latents))[0, dropped:]
      frames.append(video)
      scores.append(fidelity.score_video(video, clip))
    return frames, passes, seconds[1] / seconds[0], fidelity.summarize(scores)["fidelity"]

  ref_frames, ref_passes, _, ref_fidelity = run(base)
  curve = os.path.join(tempfile.mkdtemp(), "curve.json")
  clip, refs = synthetic.record_clip(records[0]), synthetic.record_references(records[0])
  step_cache.write_calibration(curve, pipe.calibrate(clip.caption, refs[:-1], refs[-1],
                                                     sampling=base), base)
  rows = [(f"baseline: UniPC {steps} steps, guidance 5", ref_passes, 1.0, float("inf"), 1.0,
           ref_fidelity)]
  for name, changes in modes(curve, quick).items():
    frames, passes, ratio, fid = run(dataclasses.replace(base, **changes))
    rows.append((name, passes, ratio,
                 float(np.mean([psnr(a, b) for a, b in zip(frames, ref_frames)])),
                 float(np.mean([ssim(a, b) for a, b in zip(frames, ref_frames)])), fid))
    print(f"  demo {name}: {passes:.1f} passes, {ratio:.2f}× the baseline's time",
          file=sys.stderr, flush=True)
  return base, rows


def print_table(rows) -> None:
  fid = len(rows[0]) > 5
  print("| mode | transformer passes | wall time vs baseline | PSNR vs baseline (dB) | SSIM |"
        + (" E2V fidelity |" if fid else ""))
  print("|---|---:|---:|---:|---:|" + ("---:|" if fid else ""))
  for name, passes, ratio, p, s, *f in rows:
    print(f"| {name} | {passes:.1f} | {ratio:.2f}× | {p:.1f} | {s:.3f} |"
          + (f" {f[0]:.3f} |" if fid else ""))


def mid_size_rows(steps: int, quick: bool):
  """Table rows of the mid-size random model (module docstring)."""
  from a2jax import configs, pipeline, step_cache
  from a2jax.models.transformer import init_params
  from a2jax.models.vae import WanVAE
  from a2jax.pipeline import video_to_uint8

  cfg = configs.load("a2_14b")
  cfg = dataclasses.replace(cfg, transformer=dataclasses.replace(cfg.transformer, **DIMS),
                            vae=configs.load("tiny").vae)
  t = cfg.transformer
  params = init_params(t, jax.random.key(0))
  rng = np.random.default_rng(0)
  f, h, w = LATENTS
  noise = rng.standard_normal((1, f, h, w, 16)).astype(np.float32)
  inputs = (noise, rng.standard_normal((1, TEXT_LEN, t.text_dim)).astype(np.float32),
            rng.standard_normal((1, TEXT_LEN, t.text_dim)).astype(np.float32),
            rng.standard_normal((1, IMAGE_LEN, t.image_dim)).astype(np.float32),
            rng.standard_normal((1, f, h, w, t.in_channels - 16)).astype(np.float32),
            pipeline.step_noise_keys(0, 1))
  vae = WanVAE(cfg.vae)
  vae_params = vae.init(jax.random.key(1), noise, method=vae.decode)["params"]
  decode = jax.jit(lambda z: vae.apply({"params": vae_params}, z, method=vae.decode))
  base = dataclasses.replace(cfg.sampling, steps=steps, guidance=5.0, shift=8.0)
  print(f"mid-size A2 DiT {t.num_attention_heads}×{t.attention_head_dim}, {t.num_layers} layers, "
        f"ffn {t.ffn_dim}, random weights; {f * (h // 2) * (w // 2)} video + {TEXT_LEN} text + "
        f"{IMAGE_LEN} image tokens; baseline UniPC {steps} steps, guidance 5, shift 8; "
        f"{os.cpu_count()} CPU threads", flush=True)

  def compiled(sampling):
    program = jax.jit(pipeline.denoise_fn(cfg, sampling, with_stats=True)).lower(
        params, *inputs).compile()
    return lambda: jax.block_until_ready(program(params, *inputs))

  run_base = compiled(base)
  ref_x, stats = run_base()
  ref_frames = video_to_uint8(decode(ref_x))[0]
  curve = os.path.join(tempfile.mkdtemp(), "curve.json")
  step_cache.write_calibration(curve, np.asarray(stats.mag_ratio), base)
  rows = [(f"baseline: UniPC {steps} steps, guidance 5", pipeline.transformer_passes(stats, 2),
           1.0, float("inf"), 1.0)]
  for name, changes in modes(curve, quick).items():
    sampling = dataclasses.replace(base, **changes)
    run = compiled(sampling)
    x, stats = run()
    # Timed in alternation with the baseline: the machine is shared, the ratio is what counts.
    base_s, mode_s = interleaved_medians([run_base, run], repeats=2, warmup=0)
    frames = video_to_uint8(decode(x))[0]
    passes = pipeline.transformer_passes(stats, pipeline.guidance_branches(sampling))
    rows.append((name, passes, mode_s / base_s, psnr(frames, ref_frames), ssim(frames, ref_frames)))
    print(f"  {name}: {passes:.1f} passes, {mode_s:.1f} s (baseline {base_s:.1f} s)",
          file=sys.stderr, flush=True)
  print(f"frames {ref_frames.shape}", flush=True)
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=50, help="baseline steps (release: 50)")
  parser.add_argument("--quick", action="store_true", help="only guidance 1, distill, one of each "
                      "cache")
  parser.add_argument("--demo", default="out/demo", help="the `make demo` output folder: its "
                      "trained model is measured too when OUT/model exists")
  parser.add_argument("--demo-clips", type=int, default=4, help="held-out demo clips per mode")
  parser.add_argument("--skip-mid", action="store_true", help="only the demo model")
  args = parser.parse_args(argv)
  if not args.skip_mid:
    print_table(mid_size_rows(args.steps, args.quick))
  if os.path.isfile(os.path.join(args.demo, "samples", "scores.json")):  # a finished `make demo`
    base, rows = demo_rows(args.demo, args.steps, args.demo_clips, args.quick)
    print(f"\n`make demo` model ({args.demo}/model), {args.demo_clips} held-out clips, "
          f"{base.frames} frames {base.height}×{base.width}, shift {base.shift}; E2V fidelity of "
          "a2jax.eval.fidelity (0–1, higher is better):")
    print_table(rows)
  else:
    print(f"\n(no finished `make demo` in {args.demo}: it builds the trained model measured here too)")


if __name__ == "__main__":
  main()
