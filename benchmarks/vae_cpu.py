"""WanVAE on CPU against diffusers' AutoencoderKLWan, at the release config with random weights.

  python benchmarks/vae_cpu.py [--frames 17 --height 128 --width 224] [--runs 3]
      [--mem-latent-frames 21 --mem-latent-height 60 --mem-latent-width 104]
      [--compile-frames 81 9] [--only time,memory,compile]

1. time: encode + decode of a (frames × height × width) video, float32; median of `--runs` runs
   after a warm-up; a2jax's compile is reported apart. Prints a2jax / diffusers.
2. memory: peak resident memory (VmHWM) of decoding (latent frames × h × w) in bfloat16, with and
   without tiling (diffusers' default tiles, 256 px at stride 192), each in a fresh subprocess,
   a2jax vs diffusers; the resident size before the decode is printed too.
3. compile: a2jax compile time of encode + decode at `--compile-frames` (e.g. 81 vs 9 frames): the
   chunk loop is a scan, so the ratio should stay near 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def peak_rss_mib() -> float:
  """This process's peak resident memory (VmHWM). ru_maxrss would do, but Linux carries it over
  from the parent through fork + exec, so a child of a big process would report the parent's."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def jax_params(cfg, seed: int = 0):
  """Random parameters of the right shapes (values do not matter for time and memory)."""
  import jax
  import numpy as np
  from convert_weights import vae as convert
  from a2jax.models.layers import dtype_of
  rng = np.random.default_rng(seed)
  dtype = dtype_of(cfg.param_dtype)

  def one(path, leaf):
    name = path[-1].key
    if name == "gamma":
      return jax.numpy.ones(leaf.shape, dtype)
    if name == "bias":
      return jax.numpy.zeros(leaf.shape, dtype)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return jax.numpy.asarray(rng.standard_normal(leaf.shape, np.float32) * fan_in ** -0.5, dtype)
  return jax.tree_util.tree_map_with_path(one, convert.init_abstract(cfg))


def jax_fns(cfg):
  import jax
  from a2jax.models.vae import WanVAE
  vae = WanVAE(cfg)
  encode = jax.jit(lambda p, v: vae.apply({"params": p}, v, method=vae.encode)[0])
  decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))
  return encode, decode


def bench_time(args) -> dict:
  import jax
  import numpy as np
  import torch
  from diffusers import AutoencoderKLWan
  from a2jax.configs import VAEConfig
  from convert_weights import vae as convert
  from tests.parity import state_dict_numpy

  torch.manual_seed(0)
  ref = AutoencoderKLWan().eval()
  cfg = VAEConfig()
  params = jax.tree.map(jax.numpy.asarray, convert.from_torch(state_dict_numpy(ref), cfg))
  video = np.random.default_rng(0).uniform(-1, 1, (1, args.frames, args.height, args.width, 3))
  video = video.astype(np.float32)
  video_t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(video, -1, 1)))

  encode, decode = jax_fns(cfg)
  t = time.perf_counter()
  enc_c = encode.lower(params, video).compile()
  z_shape = jax.eval_shape(encode, params, video)
  dec_c = decode.lower(params, jax.ShapeDtypeStruct(z_shape.shape, z_shape.dtype)).compile()
  compile_s = time.perf_counter() - t

  def run_jax():
    return jax.block_until_ready(dec_c(params, enc_c(params, video)))

  def run_torch():
    with torch.no_grad():
      return ref.decode(ref.encode(video_t).latent_dist.mean).sample

  mine, theirs = np.asarray(run_jax()), np.moveaxis(run_torch().numpy(), 1, -1)  # warm-up
  out = {"compile_s": compile_s, "a2jax_all": [], "diffusers_all": [],
         "max_rel_err": float(np.abs(mine - theirs).max() / np.abs(theirs).max())}
  for _ in range(args.runs):  # interleaved, so that a shared machine's load hits both alike
    for name, fn in (("a2jax", run_jax), ("diffusers", run_torch)):
      t = time.perf_counter()
      fn()
      out[name + "_all"].append(time.perf_counter() - t)
  for name in ("a2jax", "diffusers"):
    out[name] = statistics.median(out[name + "_all"])
  return out


def memory_child(impl: str, tiled: bool, f: int, h: int, w: int) -> dict:
  """Runs in a fresh process: one bfloat16 decode of (1, f, h, w, 16) latents."""
  import numpy as np
  z = np.random.default_rng(0).normal(size=(1, f, h, w, 16)).astype(np.float32)
  if impl == "a2jax":
    import dataclasses
    import jax
    from a2jax.configs import VAEConfig
    cfg = dataclasses.replace(VAEConfig(), dtype="bfloat16", param_dtype="bfloat16", tiling=tiled)
    params = jax_params(cfg)
    _, decode = jax_fns(cfg)
    z = jax.numpy.asarray(z, jax.numpy.bfloat16)
    compiled = decode.lower(params, z).compile()
    before = current_rss_mib()
    t = time.perf_counter()
    jax.block_until_ready(compiled(params, z))
  else:
    import torch
    from diffusers import AutoencoderKLWan
    ref = AutoencoderKLWan().eval().to(torch.bfloat16)
    if tiled:
      ref.enable_tiling()
    zt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(z, -1, 1))).to(torch.bfloat16)
    before = current_rss_mib()
    t = time.perf_counter()
    with torch.no_grad():
      ref.decode(zt)
  return {"peak_mib": peak_rss_mib(), "before_decode_mib": before, "decode_s": time.perf_counter() - t}


def bench_memory(args) -> dict:
  out = {}
  f, h, w = args.mem_latent_frames, args.mem_latent_height, args.mem_latent_width
  for tiled in (False, True):
    for impl in ("a2jax", "diffusers"):
      cmd = [sys.executable, os.path.abspath(__file__), "--memory-child",
             json.dumps([impl, tiled, f, h, w])]
      proc = subprocess.run(cmd, capture_output=True, text=True)
      if proc.returncode:
        raise RuntimeError(f"{impl} tiled={tiled} failed:\n{proc.stderr[-3000:]}")
      out[f"{impl}{'_tiled' if tiled else ''}"] = json.loads(proc.stdout.strip().splitlines()[-1])
      print(f"  memory {impl} tiled={tiled}: {out[f'{impl}' + ('_tiled' if tiled else '')]}",
            flush=True)
  return out


def bench_compile(args) -> dict:
  import jax
  import numpy as np
  from a2jax.configs import VAEConfig
  from convert_weights import vae as convert
  cfg = VAEConfig()
  params = convert.init_abstract(cfg)
  encode, decode = jax_fns(cfg)
  out = {}
  for frames in args.compile_frames:
    video = jax.ShapeDtypeStruct((1, frames, args.height, args.width, 3), np.float32)
    t = time.perf_counter()
    encode.lower(params, video).compile()
    z = jax.eval_shape(encode, params, video)
    decode.lower(params, z).compile()
    out[frames] = time.perf_counter() - t
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--frames", type=int, default=17)
  p.add_argument("--height", type=int, default=128)
  p.add_argument("--width", type=int, default=224)
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--mem-latent-frames", type=int, default=21)
  p.add_argument("--mem-latent-height", type=int, default=60)
  p.add_argument("--mem-latent-width", type=int, default=104)
  p.add_argument("--compile-frames", type=int, nargs=2, default=[81, 9])
  p.add_argument("--only", default="time,memory,compile")
  p.add_argument("--memory-child", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.memory_child:
    print(json.dumps(memory_child(*json.loads(args.memory_child))))
    return
  parts = args.only.split(",")
  if "time" in parts:
    r = bench_time(args)
    print(f"time  {args.frames}×{args.height}×{args.width} float32 encode+decode: a2jax "
          f"{r['a2jax']:.2f}s (compile {r['compile_s']:.1f}s apart), diffusers {r['diffusers']:.2f}s, "
          f"ratio {r['a2jax'] / r['diffusers']:.2f} (target ≤ 1.0); max|Δ|/max = {r['max_rel_err']:.1e}; "
          f"runs a2jax {['%.2f' % x for x in r['a2jax_all']]}, "
          f"diffusers {['%.2f' % x for x in r['diffusers_all']]}", flush=True)
  if "memory" in parts:
    r = bench_memory(args)
    for suffix in ("", "_tiled"):
      a, d = r["a2jax" + suffix], r["diffusers" + suffix]
      print(f"memory decode {args.mem_latent_frames}×{args.mem_latent_height}×{args.mem_latent_width} "
            f"bf16{' tiled' if suffix else ''}: a2jax peak {a['peak_mib']:.0f} MiB "
            f"({a['before_decode_mib']:.0f} before decode, {a['decode_s']:.1f}s), diffusers peak "
            f"{d['peak_mib']:.0f} MiB ({d['before_decode_mib']:.0f} before, {d['decode_s']:.1f}s), "
            f"ratio {a['peak_mib'] / d['peak_mib']:.2f} (target ≤ 0.5)", flush=True)
  if "compile" in parts:
    r = bench_compile(args)
    big, small = args.compile_frames
    print(f"compile encode+decode {args.height}×{args.width}: {big} frames {r[big]:.1f}s, {small} "
          f"frames {r[small]:.1f}s, ratio {r[big] / r[small]:.2f} (target ≤ 1.5)", flush=True)


if __name__ == "__main__":
  main()
