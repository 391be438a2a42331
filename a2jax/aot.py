"""Ahead-of-time compilation of the full-size model for hardware this machine does not have.

Deviceless: `jax.experimental.topologies` describes a TPU slice (libtpu) or a CUDA host (the CUDA
PJRT plugin plus a device spec text proto); the program is lowered on `jax.ShapeDtypeStruct`s that
carry NamedShardings on that topology's mesh and compiled, so nothing real is allocated. What comes
back: compile time, the per-chip memory of `compiled.memory_analysis()`, and an analytic FLOP
count (XLA's cost analysis counts a scanned layer loop once and Pallas kernels not at all).

TPU targets are libtpu topologies, chips per dimension: `v5p:2x2x1` is 4 chips on one host, the
slice sold as v5p-8 (v5p-N counts TensorCores, 2 per chip), `v5p:2x2x2` a v5p-16 (8 chips, 2 hosts),
`v5p:4x4x4` a v5p-128 (64 chips, 16 hosts); v6e-N and v5e-N count chips (`v6e:2x4` is a v6e-8).

One compile per process (a compiler keeps its caches): tests call the CLI in a subprocess,
    python -m a2jax.aot --target tpu:v5p:2x2x2 --mesh fsdp=2,context=4 --attention splash
(the sampling forward on a v5p-16), or for the full fine-tune's step on a v5p-8
    python -m a2jax.aot --program train_step --preset a2_14b_train --target tpu:v5p:2x2x1 \
        --mesh fsdp=4 --batch 4 [train.moments_dtype=float32]
which prints one JSON line {"compile_s", "peak_bytes", "flops", ...}, or {"error": ...} with exit
status 1 when the compiler refuses the program. `--program df_window` (SkyReels-V2 diffusion
forcing, preset v2_df_14b) compiles one window with all its denoising rows, and with
`--video-frames N --overlap-history H` each distinct window of an N-frame video, in one process.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import re
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from a2jax import configs, platforms, sharding
from a2jax.flops import VideoShape, step_flops, transformer_flops
from a2jax.configs import MeshConfig, TransformerConfig
from a2jax.errors import ConfigError
from a2jax.video import latent_frames

GIB = 1024**3
# XLA GPU device specs (from openxla/xla, Apache-2.0): what the CUDA plugin compiles for without a GPU.
GPU_SPEC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs")
GRID = ("batch", "frames", "height", "width", "channels")  # logical axes of latents (B, f, h, w, z)
CONTEXT = ("batch", "context_tokens", "act_embed")          # of text / image tokens (B, T, D)


# ---------------------------------------------------------------------------------------------
# Targets: devices of a topology this machine does not have.


def gpu_spec_path() -> str:
  """Device spec of the CUDA target: $A2JAX_GPU_SPEC, else the bundled H100 SXM spec."""
  path = os.environ.get("A2JAX_GPU_SPEC") or os.path.join(GPU_SPEC_DIR, "h100_sxm.txtpb")
  if not os.path.isfile(path):
    raise ConfigError(f"GPU device spec {path} does not exist: set A2JAX_GPU_SPEC to an XLA GPU "
                      f"target config .txtpb ({GPU_SPEC_DIR} holds h100_sxm and h200)")
  return path


def _cuda_toolkit_dir() -> str | None:
  """The `nvidia-cuda-nvcc-cu12` wheel's folder (bin/ptxas, nvvm/): XLA's CUDA data dir."""
  import importlib.util
  spec = importlib.util.find_spec("nvidia")
  for root in (spec.submodule_search_locations or []) if spec else []:
    if os.path.exists(os.path.join(root, "cuda_nvcc", "bin", "ptxas")):
      return os.path.join(root, "cuda_nvcc")
  return None


def cuda_env(env: dict[str, str] | None = None) -> dict[str, str]:
  """Environment of a process compiling for CUDA deviceless: the CUDA plugin allowed to load, the
  nvcc wheel's ptxas first on PATH.

  The CUDA plugin finds that wheel by itself (it looks in ../../nvidia/cuda_nvcc from its own
  folder; checked with no ptxas on PATH); putting it first on PATH keeps a system toolkit of
  another CUDA major version from being picked instead. Set before jax starts, hence for a
  subprocess.
  """
  env = dict(os.environ if env is None else env)
  env[platforms.CUDA_AOT_ENV] = "1"  # load the CUDA plugin even without a GPU (a2jax/platforms.py)
  toolkit = _cuda_toolkit_dir()
  if toolkit:
    env["PATH"] = os.path.join(toolkit, "bin") + os.pathsep + env.get("PATH", "")
  return env


def target_devices(target: str) -> list[Any]:
  """Devices of `tpu:<topology>` (e.g. tpu:v5p:2x2x1, the 4 chips of a v5p-8; one chip:
  tpu:v6e:1x1) or `cuda:<hosts>x<gpus>` (e.g. cuda:1x8)."""
  from jax.experimental import topologies
  platform, _, name = target.partition(":")
  if platform == "tpu":
    # libtpu locks /tmp/libtpu_lockfile so that two processes never drive the same chips; a
    # deviceless compile drives none, and two of them at once (parallel tests, a sweep) must not
    # refuse each other.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # A single chip (e.g. v6e:1x1) is a host of one chip; libtpu's default host is bigger.
    single = all(part == "1" for part in name.partition(":")[2].split("x"))
    extra = {"chips_per_host_bounds": (1, 1, 1)} if single else {}
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name, **extra).devices)
  if platform == "cuda":
    spec = gpu_spec_path()
    hosts, _, gpus = name.partition("x")
    with open(spec) as f:
      desc = topologies.get_topology_desc(platform="cuda", topology_name="",
                                          topology=f"1x{hosts}x{gpus}", target_config=f.read())
    return list(desc.devices)
  raise ConfigError(f"target {target!r}: use tpu:<topology> (tpu:v5p:2x2x1) or cuda:1x8")


# ---------------------------------------------------------------------------------------------
# Abstract arguments.


def abstract_array(shape, dtype, logical, mesh):
  """A ShapeDtypeStruct of `shape` sharded on `mesh` by its logical axis names."""
  spec = sharding.logical_to_spec(logical, shape, mesh)
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def transformer_args(cfg: TransformerConfig, mesh, video: VideoShape) -> tuple[Any, ...]:
  """(params, x, t, text, image) as ShapeDtypeStructs with shardings by the logical rules.

  params in the config's param dtype (the blocks' kernels quantized when `cfg.weights` asks);
  x (B, f + video.reference_frames, h, w, in_channels) float32 (the sampler's state, with V3 R2V's
  reference frames), t (B,) float32, text (B, T, text_dim) and image (B, I, image_dim) in the
  compute dtype (None without an image branch).
  """
  from a2jax.models import quant
  from a2jax.models.transformer import init_abstract_boxed
  boxed = quant.quantize_abstract(init_abstract_boxed(cfg), cfg.weights)
  params, shardings = sharding.unboxed_shardings(boxed, mesh)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        params, shardings)
  b, (f, h, w) = video.batch, video.latent_grid
  dtype = jnp.dtype(cfg.dtype)
  x = abstract_array((b, f + video.reference_frames, h, w, cfg.in_channels), jnp.float32,
                     GRID, mesh)
  t = abstract_array((b,), jnp.float32, ("batch",), mesh)
  text = abstract_array((b, video.text_len, cfg.text_dim), dtype, CONTEXT, mesh)
  image = (None if cfg.image_dim is None else
           abstract_array((b, video.image_len, cfg.image_dim), dtype, CONTEXT, mesh))
  return params, x, t, text, image


def transformer_forward(cfg: TransformerConfig) -> Callable[..., jax.Array]:
  """forward(params, x, t, text, image) → velocity (B, f, h, w, out_channels)."""
  from a2jax.models.transformer import A2Transformer
  model = A2Transformer(cfg)
  return lambda params, x, t, text, image: model.apply({"params": params}, x, t, text, image)


# ---------------------------------------------------------------------------------------------
# Compile and measure.


def peak_bytes(compiled) -> int:
  """Per-device peak of a compiled program: peak_memory_in_bytes where the backend reports it,
  else arguments + outputs + temporaries − aliased bytes."""
  mem = compiled.memory_analysis()
  peak = getattr(mem, "peak_memory_in_bytes", 0) or 0
  if peak > 0:
    return int(peak)
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)


def compile_program(fn: Callable, args: Sequence[Any], mesh) -> dict[str, Any]:
  """Lowers and compiles `fn(*args)` on `mesh` (args are sharded ShapeDtypeStructs); `fn` may be
  jitted already (with its own shardings and donation).

  Returns {"compile_s", "lower_s", "peak_bytes", "argument_bytes", "output_bytes", "temp_bytes",
  "custom_calls"} (custom-call targets of the compiled program and their counts: which kernels ran).
  """
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  mem = compiled.memory_analysis()
  targets = re.findall(r'custom_call_target="([^"]+)"', compiled.as_text() or "")
  return {"lower_s": round(lowered_at - start, 2), "compile_s": round(done - lowered_at, 2),
          "custom_calls": dict(collections.Counter(targets)),
          "peak_bytes": peak_bytes(compiled),
          "argument_bytes": int(mem.argument_size_in_bytes),
          "output_bytes": int(mem.output_size_in_bytes),
          "temp_bytes": int(mem.temp_size_in_bytes)}


def compile_transformer(target: str, mesh_cfg: MeshConfig, overrides: Sequence[str] = (),
                        video: VideoShape = VideoShape(), preset: str = "a2_14b") -> dict[str, Any]:
  """Compiles the sampling forward of `preset`'s transformer for `target` on `mesh_cfg`.

  Returns compile_program's measurements plus the analytic FLOPs of the whole batch, the mesh
  and the target's device kind.
  """
  full = configs.load(preset, overrides=list(overrides))
  cfg, video = full.transformer, for_family(video, full)
  devices = target_devices(target)
  mesh = sharding.make_mesh(mesh_cfg, devices)  # follows the physical topology (mesh_utils)
  args = transformer_args(cfg, mesh, video)
  result = compile_program(transformer_forward(cfg), args, mesh)
  flops = transformer_flops(cfg, video)
  result.update(target=target, device_kind=devices[0].device_kind, mesh=dict(mesh.shape),
                attention=cfg.attention, tokens=int(flops["tokens"]),
                flops=video.batch * flops["total"], flops_per_sample=flops["total"],
                peak_gib=round(result["peak_bytes"] / GIB, 2))
  return result


def for_family(video: VideoShape, cfg: configs.Config) -> VideoShape:
  """`video` with the family's reference latent frames (V3 R2V: 4) and no image tokens where the
  family has no CLIP."""
  return dataclasses.replace(video, reference_frames=configs.REFERENCE_FRAMES[cfg.family],
                             image_len=video.image_len if cfg.transformer.image_dim else 0)


def video_args(cfg: configs.Config, mesh, video: VideoShape) -> tuple[Any, ...]:
  """(params, latents (1, f, h, w, z) float32, text, negative_text (1, T, text_dim) in the compute
  dtype, image (1, I, image_dim) | None) of one video's denoising (its guidance branches are the
  batch inside), as sharded ShapeDtypeStructs."""
  t = cfg.transformer
  params, *_, image = transformer_args(t, mesh, dataclasses.replace(video, batch=1))
  (f, h, w), z = video.latent_grid, cfg.vae.z_dim
  text = abstract_array((1, video.text_len, t.text_dim), jnp.dtype(t.dtype), CONTEXT, mesh)
  return params, abstract_array((1, f, h, w, z), jnp.float32, GRID, mesh), text, text, image


def sampling_step_args(cfg: configs.Config, mesh, video: VideoShape) -> tuple[Any, ...]:
  """(params, noise, text, negative_text, image, condition) of `pipeline.denoise_fn` for one video
  (`video_args`); condition the reference frames for V3 R2V (`families.condition_shape`)."""
  from a2jax import families
  (f, h, w), z = video.latent_grid, cfg.vae.z_dim
  condition = families.of(cfg).condition_shape(f, h, w, z)
  return (*video_args(cfg, mesh, video), abstract_array((1, *condition), jnp.float32, GRID, mesh))


def compile_sampling_step(target: str, mesh_cfg: MeshConfig, overrides: Sequence[str] = (),
                          video: VideoShape = VideoShape(), preset: str = "a2_14b",
                          overlap_history: int | None = None, refs: int = 3) -> dict[str, Any]:
  """Compiles one whole sampling step of the pipeline (the preset's guidance branches through the
  transformer — A2: the CFG pair; V3 R2V: 1, or 3 above guidance 1 —, the guidance combination and
  a UniPC update: `pipeline.denoise_fn` with steps = 1) for `target`; with `overlap_history`
  (pixel frames) the step of a chained long video's later window, its first scene frames held to
  a history (`pipeline.History`, after `refs` A2 reference frames)."""
  from a2jax import families, pipeline
  cfg = configs.load(preset, overrides=list(overrides))
  video = for_family(video, cfg)
  devices = target_devices(target)
  mesh = sharding.make_mesh(mesh_cfg, devices)
  args = sampling_step_args(cfg, mesh, video)
  start = None
  if overlap_history is not None:
    (_, h, w), z = video.latent_grid, cfg.vae.z_dim
    held = abstract_array((1, latent_frames(overlap_history), h, w, z), jnp.float32, GRID, mesh)
    start = families.of(cfg).scene_start(refs)
    args = (*args, None, held, held)  # no distill keys; the history and its noise
  step = pipeline.denoise_fn(cfg, dataclasses.replace(cfg.sampling, steps=1), history_start=start)
  result = compile_program(step, args, mesh)
  flops = transformer_flops(cfg.transformer, video)
  branches = families.of(cfg).branches(cfg.sampling)
  result.update(target=target, device_kind=devices[0].device_kind, mesh=dict(mesh.shape),
                attention=cfg.transformer.attention, tokens=int(flops["tokens"]),
                branches=branches, flops=branches * flops["total"],
                flops_per_sample=flops["total"], program="sampling_step",
                history_latent_frames=None if overlap_history is None else latent_frames(
                    overlap_history), peak_gib=round(result["peak_bytes"] / GIB, 2))
  return result


def df_window_args(cfg: configs.Config, mesh, video: VideoShape) -> tuple[Any, ...]:
  """(params, latents (1, f, h, w, z) float32, text, negative_text (1, T, text_dim), fps_index (1,)
  int32, history_keys (1, 2) uint32, window_index () int32) of `diffusion_forcing.window_fn` for
  one video whose window is `video`, as sharded ShapeDtypeStructs."""
  params, latents, text, negative_text, _ = video_args(cfg, mesh, video)
  return (params, latents, text, negative_text,
          abstract_array((1,), jnp.int32, ("batch",), mesh),
          abstract_array((1, 2), jnp.uint32, ("batch", None), mesh),
          abstract_array((), jnp.int32, (), mesh))


def sampling_window(sampling: configs.SamplingConfig) -> VideoShape:
  """The window of a DF sampling config: base_frames (else frames) × height × width."""
  return VideoShape(frames=sampling.base_frames or sampling.frames, height=sampling.height,
                    width=sampling.width)


def compile_df_window(target: str, mesh_cfg: MeshConfig, overrides: Sequence[str] = (),
                      video: VideoShape | None = None, preset: str = "v2_df_14b",
                      video_frames: int | None = None) -> dict[str, Any]:
  """Compiles the diffusion-forcing program of one window of `video.frames` × height × width
  (default: the config's `sampling_window`) for one video (`diffusion_forcing.window_fn`: every
  row of the window's timestep matrix in one `lax.scan`, each row the guidance branches through
  the block-causal DiT and the per-frame UniPC updates) for `target`. The DF settings are the
  config's sampling (causal_block_size, ar_step, addnoise_condition, steps, guidance, shift).

  With `video_frames`, the windows of a video that long chained by sampling.overlap_history
  (`diffusion_forcing.plan`, windows of `video.frames`): windows of equal (latent frames, history
  prefix) share a program, so each distinct shape compiles once. Returns the mesh, the target,
  "windows" (per distinct shape, in plan order: latent frames, prefix, how many windows of the plan
  it serves, scan rows, tokens and compile_program's measurements), "peak_bytes" the largest of
  their peaks (what the whole video needs on a chip: the windows run one after another) and
  "compile_s" / "lower_s" their sums.
  """
  from a2jax import diffusion_forcing as df, families, schedulers
  cfg = configs.load(preset, overrides=list(overrides))
  if cfg.family != "v2_df":
    raise ConfigError(f"preset {preset!r} is family {cfg.family!r}: the df_window program compiles "
                      "a SkyReels-V2 diffusion-forcing model (--preset v2_df_14b)")
  s = cfg.sampling
  video = sampling_window(s) if video is None else video
  windows = df.plan(video_frames or video.frames, video.frames, s.overlap_history,
                    s.causal_block_size)
  sched = schedulers.for_sampling(s)
  devices = target_devices(target)
  mesh = sharding.make_mesh(mesh_cfg, devices)
  shapes: dict[tuple[int, int], list[df.Window]] = {}
  for window in windows:
    shapes.setdefault((window.frames, window.prefix), []).append(window)
  measured = []
  for (frames, prefix), group in shapes.items():
    shape = dataclasses.replace(video, frames=(frames - 1) * video.vae_stride[0] + 1)  # in pixels
    run = df.window_fn(cfg.transformer, sched, group[0], ar_step=s.ar_step,
                       causal_block=s.causal_block_size, guidance=s.guidance,
                       addnoise_condition=s.addnoise_condition)
    result = compile_program(run, df_window_args(cfg, mesh, shape), mesh)
    rows = df.num_rows(group[0], sched.timesteps, s.ar_step, s.causal_block_size)
    measured.append({"latent_frames": frames, "prefix": prefix, "windows": len(group), "rows": rows,
                     "tokens": int(transformer_flops(cfg.transformer, shape)["tokens"]), **result,
                     "peak_gib": round(result["peak_bytes"] / GIB, 2)})
  peak = max(m["peak_bytes"] for m in measured)
  return {"program": "df_window", "target": target, "device_kind": devices[0].device_kind,
          "mesh": dict(mesh.shape), "attention": cfg.transformer.attention,
          "frames": video.frames, "height": video.height, "width": video.width,
          "video_frames": video_frames or video.frames, "overlap_history": s.overlap_history,
          "plan_windows": len(windows), "causal_block": s.causal_block_size, "ar_step": s.ar_step,
          "steps": s.steps, "branches": families.of(cfg).branches(s),
          "tokens": measured[0]["tokens"],
          "compile_s": round(sum(m["compile_s"] for m in measured), 2),
          "lower_s": round(sum(m["lower_s"] for m in measured), 2),
          "peak_bytes": peak, "peak_gib": round(peak / GIB, 2), "windows": measured}


def train_step_args(cfg: configs.Config, mesh, video: VideoShape):
  """(optimizer, state shardings, (state, batch, rng)) of `a2jax.train.step` for `video.batch`
  encoded samples, as sharded ShapeDtypeStructs: float32 master params and Adam's moments in
  train.moments_dtype (with train.lora: float32 adapters and their Adam state, the frozen base in
  its param dtype)."""
  from a2jax.train import optimizer, state as train_state, step as train_step
  tx = optimizer.make_optimizer(cfg.train)
  abstract, shardings = train_state.abstract_state(cfg.transformer, tx, mesh,
                                                   cfg.train.ema_decay is not None, cfg.train.lora)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract, shardings)
  from a2jax import families
  t, b, (f, h, w), z = cfg.transformer, video.batch, video.latent_grid, cfg.vae.z_dim
  family = families.of(cfg)
  shapes = {"latents": (b, f, h, w, z), "condition": (b, *family.condition_shape(f, h, w, z)),
            "text": (b, video.text_len, t.text_dim)}
  if family.uses_clip:
    shapes["image"] = (b, video.image_len, t.image_dim)
  batch = {k: abstract_array(v, jnp.float32, train_step.BATCH_LOGICAL_AXES[k], mesh)
           for k, v in shapes.items()}
  key = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype,
                             sharding=NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return tx, shardings, (state, batch, rng)


def compile_train_step(target: str, mesh_cfg: MeshConfig, overrides: Sequence[str] = (),
                       video: VideoShape = VideoShape(), preset: str = "a2_14b_train"
                       ) -> dict[str, Any]:
  """Compiles the DiT training step (`a2jax.train.step`, state donated) of `preset` for `target`
  on a global batch of `video.batch` samples. FLOPs: 3 forwards per sample (model FLOPs, what MFU
  counts); `flops_with_remat` adds the recomputed forward of full remat. A LoRA preset (train.lora
  set, e.g. a2_14b_lora) compiles the LoRA step: `flops` as a2jax.train.metrics counts it, and
  `lora_params` the number of trained parameters."""
  from a2jax.train import step as train_step
  cfg = configs.load(preset, overrides=list(overrides))
  video = for_family(video, cfg)
  devices = target_devices(target)
  mesh = sharding.make_mesh(mesh_cfg, devices)
  tx, shardings, args = train_step_args(cfg, mesh, video)
  step = train_step.jit_train_step(cfg, tx, mesh, shardings,
                                   {k: v.sharding for k, v in args[1].items()})
  result = compile_program(step, args, mesh)
  flops = transformer_flops(cfg.transformer, video)
  forwards = 4 if cfg.transformer.remat == "full" else 3
  result.update(target=target, device_kind=devices[0].device_kind, mesh=dict(mesh.shape),
                attention=cfg.transformer.attention, remat=cfg.transformer.remat,
                tokens=int(flops["tokens"]), batch=video.batch, program="train_step",
                flops=3 * video.batch * flops["total"],
                flops_with_remat=forwards * video.batch * flops["total"],
                flops_per_sample=flops["total"], peak_gib=round(result["peak_bytes"] / GIB, 2))
  if cfg.train.lora is not None:
    model_flops = step_flops(cfg, {k: v.shape for k, v in args[1].items()})
    result.update(program="lora_train_step", flops=model_flops,
                  flops_with_remat=model_flops + (forwards - 3) * video.batch * flops["total"],
                  lora_params=sum(x.size for x in jax.tree.leaves(args[0].params)))
  return result


# ---------------------------------------------------------------------------------------------
# CLI: one compile per process, one JSON line out.


PROGRAMS = {"forward": compile_transformer, "sampling_step": compile_sampling_step,
            "train_step": compile_train_step, "df_window": compile_df_window}


def mesh_arg(text: str) -> MeshConfig:
  """`fsdp=4,context=2` → MeshConfig."""
  sizes = {}
  for item in filter(None, text.split(",")):
    key, _, value = item.partition("=")
    if key not in sharding.MESH_AXES or not value.lstrip("-").isdigit():
      raise argparse.ArgumentTypeError(f"mesh {text!r}: use e.g. fsdp=2,context=4")
    sizes[key] = int(value)
  return MeshConfig(**sizes)  # axes left out: 1, except fsdp which takes the remaining devices


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m a2jax.aot", description=__doc__.split("\n\n")[0])
  parser.add_argument("--target", required=True,
                      help="tpu:<topology> in chips, e.g. tpu:v5p:2x2x1 (a v5p-8: 4 chips; v5p-N "
                      "counts 2 TensorCores per chip), tpu:v6e:2x4 (a v6e-8); or cuda:1x8")
  parser.add_argument("--mesh", type=mesh_arg, default=MeshConfig(), help="e.g. fsdp=2,context=4")
  parser.add_argument("--attention", choices=("xla", "cudnn", "splash"), default=None)
  parser.add_argument("--preset", default=None, help="default a2_14b, for df_window v2_df_14b")
  parser.add_argument("--program", choices=tuple(PROGRAMS), default="forward",
                      help="the transformer forward on a CFG batch, one whole sampling step, the "
                      "training step (use --preset a2_14b_train, or a2_14b_lora for the LoRA "
                      "step), or one diffusion-forcing window with all its steps")
  parser.add_argument("--frames", type=int, default=None,
                      help=f"default {VideoShape.frames}; df_window: the window, default the "
                      "preset's base_frames")
  parser.add_argument("--height", type=int, default=None, help=f"default {VideoShape.height}; "
                      "df_window: the preset's")
  parser.add_argument("--width", type=int, default=None, help=f"default {VideoShape.width}; "
                      "df_window: the preset's")
  parser.add_argument("--batch", type=int, default=VideoShape.batch)
  parser.add_argument("--refs", type=int, default=3, help="reference images (257 CLIP tokens each)")
  df_group = parser.add_argument_group("df_window (sampling.* overrides; default the preset's)")
  df_group.add_argument("--causal-block", type=int, help="latent frames per causal block")
  df_group.add_argument("--ar-step", type=int, help="rows between the starts of two causal blocks")
  df_group.add_argument("--video-frames", type=int, help="compile every distinct window of a "
                        "video this long, chained by --overlap-history frames of history")
  df_group.add_argument("--overlap-history", type=int, help="frames of history; also with "
                        "--program sampling_step: the step of a chained elements-to-video's later "
                        "window, its first scene frames held to that history")
  parser.add_argument("overrides", nargs="*", help="section.key=value config overrides, e.g. "
                      "train.moments_dtype=float32")
  args = parser.parse_args(argv)
  df_options = {"causal_block_size": args.causal_block, "ar_step": args.ar_step,
                "overlap_history": args.overlap_history}
  if args.program != "df_window" and any(
      v is not None for v in (args.video_frames, args.causal_block, args.ar_step)):
    parser.error("--causal-block, --ar-step and --video-frames are options of --program df_window")
  if args.overlap_history is not None and args.program not in ("df_window", "sampling_step"):
    parser.error("--overlap-history is an option of --program df_window and sampling_step (a "
                 "chained long video's window)")
  if args.program == "df_window" and (args.video_frames is None) != (
      args.overlap_history is None):
    parser.error("a long video needs both --video-frames and --overlap-history (e.g. 1457 and 17)")
  if args.target.startswith("cuda:") and platforms.cuda_plugin_blocked():
    # This process started without the CUDA plugin (no GPU here): start again with it.
    command = [sys.executable, "-m", "a2jax.aot", *(sys.argv[1:] if argv is None else argv)]
    os.execve(sys.executable, command, cuda_env())
  overrides = list(args.overrides)
  if args.attention:
    overrides.append(f"transformer.attention={args.attention}")
  if args.program == "df_window":
    overrides += [f"sampling.{k}={v}" for k, v in df_options.items() if v is not None]
  preset = args.preset or ("v2_df_14b" if args.program == "df_window" else "a2_14b")
  try:
    size = VideoShape()
    if args.program == "df_window":
      size = sampling_window(configs.load(preset, overrides=overrides).sampling)
    video = VideoShape(frames=args.frames or size.frames, height=args.height or size.height,
                       width=args.width or size.width, batch=args.batch, image_len=257 * args.refs)
    compile_fn = PROGRAMS[args.program]
    if args.program == "df_window":
      compile_fn = functools.partial(compile_df_window, video_frames=args.video_frames)
    elif args.program == "sampling_step" and args.overlap_history is not None:
      compile_fn = functools.partial(compile_sampling_step, overlap_history=args.overlap_history,
                                     refs=args.refs)
    result = compile_fn(args.target, args.mesh, overrides, video, preset)
  except Exception as e:  # the compiler's refusal (e.g. RESOURCE_EXHAUSTED) is a result here
    print(json.dumps({"error": f"{type(e).__name__}: {e}"[:4000]}), flush=True)
    return 1
  print(json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
