"""CPU timings of the A2 transformer forward: a2jax (jitted) vs diffusers' WanTransformer3DModel.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/transformer_cpu.py [--repeats 3]

A mid-size config with the release's structure (dim 1536 = 12 heads × 128, 4 layers, ffn 8960, the
release's text / image widths), latents 5×30×52 (1,950 video tokens), 512 text + 257 image tokens,
batch 1; the same random weights in both frameworks (converted with convert_weights.transformer),
float32 and bfloat16 (torch: `model.to(torch.bfloat16)`, as the release runs it; a2jax: bfloat16
params and compute). Compile time is measured apart; step times are medians after warm-up, both
frameworks on the same cores in the same process, timed in alternation. A ratio ≤ 1.0 means a2jax
is at least as fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import a2jax  # noqa: E402,F401  first: it chooses the JAX backends (a2jax/platforms.py)
import jax  # noqa: E402
import numpy as np  # noqa: E402

DIMS = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=36,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=4,
            image_dim=1280, added_kv_proj_dim=1536)
LATENTS = (5, 30, 52)
TEXT_LEN, IMAGE_LEN = 512, 257


def cpu_description() -> str:
  """The CPU's model name and the vector extensions that decide the matmul kernels (Linux), e.g.
  'AMD EPYC (avx2 fma)': XLA's and torch's kernels differ most across these, so ratios measured
  on different CPUs are not comparable."""
  try:
    with open("/proc/cpuinfo") as f:
      first_cpu = f.read().split("\n\n")[0].splitlines()
  except OSError:
    return "unknown CPU"
  info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first_cpu)}
  flags = info.get("flags", "").split()
  isa = [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if x in flags]
  return f"{info.get('model name', 'unknown CPU')} ({' '.join(isa)})"


def interleaved_medians(fns, repeats: int, warmup: int = 1) -> list[float]:
  """Median seconds of each function, timed in alternation so that both see the same load."""
  for fn in fns:
    for _ in range(warmup):
      fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, out in zip(fns, times):
      start = time.perf_counter()
      fn()
      out.append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)

  import torch
  from diffusers import WanTransformer3DModel

  from a2jax.configs import TransformerConfig
  from a2jax.models.transformer import A2Transformer
  from convert_weights import transformer as convert

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  ref = WanTransformer3DModel(**DIMS).eval()
  params32 = jax.device_put(convert.from_torch(ref.state_dict(), TransformerConfig(**DIMS)))

  rng = np.random.default_rng(0)
  f, h, w = LATENTS
  x = rng.standard_normal((1, f, h, w, DIMS["in_channels"])).astype(np.float32)
  t = np.array([999], np.int64)
  text = rng.standard_normal((1, TEXT_LEN, DIMS["text_dim"])).astype(np.float32)
  image = rng.standard_normal((1, IMAGE_LEN, DIMS["image_dim"])).astype(np.float32)
  tokens = f * (h // 2) * (w // 2)
  print(f"A2 DiT {DIMS['num_attention_heads']}×{DIMS['attention_head_dim']} wide, "
        f"{DIMS['num_layers']} layers, ffn {DIMS['ffn_dim']}; {tokens} video + {TEXT_LEN} text + "
        f"{IMAGE_LEN} image tokens, batch 1; {os.cpu_count()} CPU threads, {cpu_description()}, "
        f"{jax.device_count()} JAX device(s)")

  for dtype in ("float32", "bfloat16"):
    tdt = getattr(torch, dtype)
    model = ref.to(tdt)
    tx = torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy()).to(tdt)
    tt, ttext, timage = (torch.from_numpy(t), torch.from_numpy(text).to(tdt),
                         torch.from_numpy(image).to(tdt))

    def torch_forward():
      with torch.inference_mode():
        return model(tx, tt, ttext, timage, return_dict=False)[0]

    cfg = dataclasses.replace(TransformerConfig(**DIMS), param_dtype=dtype, dtype=dtype)
    params = jax.tree.map(lambda p: p.astype(dtype), params32)
    jx, jt, jtext, jimage = jax.device_put((x, t.astype(np.float32), text.astype(dtype),
                                            image.astype(dtype)))
    a2 = A2Transformer(cfg)
    start = time.perf_counter()
    forward = jax.jit(lambda p, *a: a2.apply({"params": p}, *a)).lower(
        params, jx, jt, jtext, jimage).compile()
    compile_s = time.perf_counter() - start

    torch_s, jax_s = interleaved_medians(
        [torch_forward, lambda: forward(params, jx, jt, jtext, jimage).block_until_ready()],
        args.repeats)
    want = torch_forward().float().numpy().transpose(0, 2, 3, 4, 1)
    got = np.asarray(forward(params, jx, jt, jtext, jimage), np.float32)
    rel_l2 = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    print(f"  {dtype:8s}  diffusers {torch_s:6.2f} s   a2jax {jax_s:6.2f} s   ratio "
          f"{jax_s / torch_s:.2f}×   (a2jax compile {compile_s:.1f} s; rel L2 vs diffusers "
          f"{rel_l2:.1e})", flush=True)


if __name__ == "__main__":
  main()
