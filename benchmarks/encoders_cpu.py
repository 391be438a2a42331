"""CPU timings of the conditioning encoders: a2jax (jitted) against the PyTorch reference.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/encoders_cpu.py

Small-but-real widths with random weights, float32, both frameworks on the same cores. Compile
time is measured apart; step times are medians after warm-up. A ratio ≤ 1.0 means a2jax is at least
as fast as the reference.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import a2jax  # noqa: E402,F401  first: it chooses the JAX backends (a2jax/platforms.py)
import jax  # noqa: E402
import numpy as np  # noqa: E402

REPEATS = 10
WARMUP = 2


def interleaved_medians(fns: dict, repeats: int = REPEATS, warmup: int = WARMUP) -> dict:
  """Median seconds of each function, calls interleaved round by round so that a load change on a
  shared machine hits every contestant alike."""
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def median_seconds(fn, repeats: int = REPEATS, warmup: int = WARMUP) -> float:
  """Median seconds of one function after warm-up."""
  return interleaved_medians({"fn": fn}, repeats, warmup)["fn"]


def bench_clip(batch: int = 3, hidden: int = 640, layers: int = 8, heads: int = 10) -> dict:
  """CLIP vision tower at 224² (patch 14, 257 tokens), `batch` references, width `hidden`.

  Times a2jax's sampling path (penultimate layer, layers 0..N−2) and its full tower against
  transformers' `CLIPVisionModel` forward (which runs every layer; the release reads
  `hidden_states[-2]` from it).
  """
  import torch
  import transformers

  from a2jax.configs import CLIPConfig
  from a2jax.models import clip
  from convert_weights import clip as convert

  torch.set_num_threads(os.cpu_count())
  dims = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
              num_attention_heads=heads, image_size=224, patch_size=14, hidden_act="gelu")
  ref = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**dims)).eval()
  cfg = CLIPConfig(**dims)
  params = jax.device_put(convert.from_torch(ref.state_dict(), cfg))
  pixels = np.random.default_rng(0).normal(size=(batch, 224, 224, 3)).astype(np.float32)
  pixels_torch = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
  x = jax.device_put(pixels)

  model = clip.CLIPVisionEncoder(cfg)
  penultimate = jax.jit(lambda p, x: model.apply({"params": p}, x))
  full = jax.jit(lambda p, x: model.apply({"params": p}, x, full_tower=True)["pooler_output"])
  start = time.perf_counter()
  penultimate.lower(params, x).compile()
  compile_s = time.perf_counter() - start
  full.lower(params, x).compile()

  def torch_forward():
    with torch.inference_mode():
      return ref(pixels_torch, output_hidden_states=True).hidden_states[-2]

  result = interleaved_medians({
      "torch_s": torch_forward,
      "a2jax_penultimate_s": lambda: penultimate(params, x).block_until_ready(),
      "a2jax_full_s": lambda: full(params, x).block_until_ready(),
  })
  result["compile_s"] = compile_s
  got = np.asarray(penultimate(params, x))
  want = torch_forward().numpy()
  result["max_rel_err"] = float(np.abs(got - want).max() / np.abs(want).max())
  print(f"CLIP vision {hidden} wide, {layers} layers, {heads} heads, 224², batch {batch}, float32, "
        f"{os.cpu_count()} CPU threads")
  print(f"  transformers CLIPVisionModel       {result['torch_s'] * 1e3:8.1f} ms")
  print(f"  a2jax penultimate (sampling path)  {result['a2jax_penultimate_s'] * 1e3:8.1f} ms   "
        f"ratio {result['a2jax_penultimate_s'] / result['torch_s']:.2f}×")
  print(f"  a2jax full tower (like for like)   {result['a2jax_full_s'] * 1e3:8.1f} ms   "
        f"ratio {result['a2jax_full_s'] / result['torch_s']:.2f}×")
  print(f"  a2jax compile {compile_s:.1f} s; max|Δ|/max|ref| {result['max_rel_err']:.1e}")
  return result


def bench_umt5(length: int = 512, prompt_tokens: int = 300, d_model: int = 512, layers: int = 4,
               heads: int = 8, d_ff: int = 1024, vocab: int = 32000) -> dict:
  """umT5 encoder on one prompt of `prompt_tokens` tokens padded to `length` (as the pipeline runs
  it), d_kv 64, against transformers' `UMT5EncoderModel` forward with the same mask."""
  import torch
  import transformers

  from a2jax.configs import UMT5Config
  from a2jax.models import umt5
  from convert_weights import umt5 as convert

  torch.set_num_threads(os.cpu_count())
  dims = dict(vocab_size=vocab, d_model=d_model, d_kv=64, d_ff=d_ff, num_layers=layers,
              num_heads=heads)
  ref = transformers.UMT5EncoderModel(transformers.UMT5Config(**dims, dropout_rate=0.0)).eval()
  cfg = UMT5Config(**dims)
  params = jax.device_put(convert.from_torch(ref.state_dict(), cfg))
  ids = np.random.default_rng(0).integers(0, vocab, (1, length))
  mask = (np.arange(length)[None] < prompt_tokens).astype(np.int64)
  ids_torch, mask_torch = torch.from_numpy(ids), torch.from_numpy(mask)

  model = umt5.UMT5Encoder(cfg)
  encode = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask))
  start = time.perf_counter()
  encode.lower(params, ids, mask).compile()
  compile_s = time.perf_counter() - start

  def torch_forward():
    with torch.inference_mode():
      return ref(ids_torch, mask_torch).last_hidden_state

  result = {
      "torch_s": median_seconds(torch_forward),
      "a2jax_s": median_seconds(lambda: encode(params, ids, mask).block_until_ready()),
      "compile_s": compile_s,
  }
  got = np.asarray(encode(params, ids, mask))
  want = torch_forward().numpy()
  result["max_rel_err"] = float(np.abs(got - want).max() / np.abs(want).max())
  print(f"umT5 encoder d_model {d_model}, {layers} layers, {heads} heads × 64, d_ff {d_ff}, vocab "
        f"{vocab}, {length} tokens ({prompt_tokens} unpadded), float32, {os.cpu_count()} CPU threads")
  print(f"  transformers UMT5EncoderModel      {result['torch_s'] * 1e3:8.1f} ms")
  print(f"  a2jax UMT5Encoder                  {result['a2jax_s'] * 1e3:8.1f} ms   "
        f"ratio {result['a2jax_s'] / result['torch_s']:.2f}×")
  print(f"  a2jax compile {compile_s:.1f} s; max|Δ|/max|ref| {result['max_rel_err']:.1e}")
  return result


def main() -> None:
  bench_clip()
  bench_umt5()


if __name__ == "__main__":
  main()
