"""A whole SkyReels-A2, SkyReels-V3 R2V or SkyReels-V2 DF release folder (diffusers layout) → one
a2jax folder.

A2 layout: `model_index.json`, `transformer/`, `vae/`, `image_encoder/`, `image_processor/`,
`text_encoder/`, `tokenizer/`, `scheduler/`. V3 R2V: the same without `image_encoder/` and
`image_processor/`, its `transformer/config.json` naming `SkyReelsA2WanI2v3DModel`. V2 DF (the
`…-DF-…-Diffusers` folders): V3's layout, the transformer `SkyReelsV2Transformer3DModel`, the
pipeline `SkyReelsV2DiffusionForcingPipeline`. Output:
`config.yaml` (the family, every component's config and the family's sampling defaults: A2's from
the release's scheduler, V3's those of its `generate_video`, V2 DF's diffusers' pipeline's with the
scheduler's shift), the components as orbax checkpoints
(`transformer/`, `vae/`, `umt5/`, A2 also `clip/`), and `tokenizer/`, `scheduler/` (A2 also
`image_processor/`) copied as they are.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

from a2jax import checkpoints, configs, families
from a2jax.errors import ConversionError
from convert_weights import common
from convert_weights.component import component_config, component_module, convert_component

# a2jax component -> release subfolder
SUBFOLDERS = {"transformer": "transformer", "vae": "vae", "clip": "image_encoder",
              "umt5": "text_encoder"}
COPIED = ("tokenizer", "image_processor", "scheduler")
V3_TRANSFORMER_CLASS = "SkyReelsA2WanI2v3DModel"
V2_TRANSFORMER_CLASS = "SkyReelsV2Transformer3DModel"
# SkyReels-V3 R2V's generate_video: UniPC flow prediction at flow shift 5 (set in its code, whatever
# the folder's scheduler says), 8 steps, guidance 1 and 1, negative prompt "", 5 s at 24 fps, 720P.
V3_SAMPLING = configs.SamplingConfig(frames=121, height=720, width=1280, steps=8, guidance=1.0,
                                     image_guidance=1.0, shift=5.0, sampler="unipc", fps=24,
                                     negative_prompt="")
# diffusers' SkyReelsV2DiffusionForcingPipeline: 97 frames at 544×960 in windows of 97, 50 steps,
# guidance 6, 24 fps, negative prompt ""; flow shift and solver from the folder's scheduler.
V2_DF_SAMPLING = dict(frames=97, height=544, width=960, steps=50, guidance=6.0, fps=24,
                      negative_prompt="", base_frames=97)


def family_of(src: pathlib.Path) -> str:
  """The family of a release folder by its transformer's class: "v3_r2v" for SkyReels-V3's R2V
  class, "v2_df" for SkyReels-V2's in a diffusion-forcing folder, else "a2"."""
  name = read_json(src / "transformer" / "config.json").get("_class_name")
  if name == V3_TRANSFORMER_CLASS:
    return "v3_r2v"
  if name == V2_TRANSFORMER_CLASS:
    pipeline = read_json(src / "model_index.json").get("_class_name", "")
    if "DiffusionForcing" not in pipeline:
      raise ConversionError(f"{src} is a SkyReels-V2 {pipeline or 'non-diffusion-forcing'} folder; "
                            "a2jax converts SkyReels-V2's diffusion-forcing folders (…-DF-…): "
                            "convert one of those")
    return "v2_df"
  return "a2"


def read_json(path: pathlib.Path) -> dict:
  """A release config file, {} when absent."""
  try:
    return json.loads(path.read_text()) if path.is_file() else {}
  except ValueError:
    raise ConversionError(f"{path} is not valid JSON: the release folder is damaged") from None


def check_compatible(cfg: configs.Config) -> None:
  """The components must fit together; says which does not."""
  t = cfg.transformer
  problems = []
  if t.text_dim != cfg.umt5.d_model:
    problems.append(f"transformer.text_dim {t.text_dim} ≠ text encoder width {cfg.umt5.d_model}")
  family, z = families.of(cfg), cfg.vae.z_dim
  if family.uses_clip and t.image_dim != cfg.clip.hidden_size:
    problems.append(f"transformer.image_dim {t.image_dim} ≠ CLIP width {cfg.clip.hidden_size}")
  if t.in_channels != family.in_channels(z):
    problems.append(f"transformer.in_channels {t.in_channels} ≠ {family.in_channels(z)}, the "
                    f"{family.name} layout for VAE z_dim {z}")
  if t.out_channels != cfg.vae.z_dim:
    problems.append(f"transformer.out_channels {t.out_channels} ≠ VAE z_dim {cfg.vae.z_dim}")
  if problems:
    raise ConversionError("the release's components do not fit together: " + "; ".join(problems))


def sampling_from_scheduler(folder: pathlib.Path) -> configs.SamplingConfig:
  """Sampling defaults with the release scheduler's flow shift and kind."""
  path = folder / "scheduler" / "scheduler_config.json"
  if not path.is_file():
    return configs.SamplingConfig()
  raw = json.loads(path.read_text())
  from a2jax import schedulers
  sched = schedulers.from_config(raw, num_steps=configs.SamplingConfig.steps)
  sampler = next(name for name, cls in schedulers.SCHEDULERS.items() if isinstance(sched, cls))
  return configs.SamplingConfig(shift=float(sched.shift), sampler=sampler)


def convert_release(src, dst, *, dtype: str | None = None, force: bool = False,
                    progress: bool = True) -> configs.Config:
  src = pathlib.Path(src)
  if not src.is_dir():
    raise ConversionError(f"--src {src} does not exist: pass the release folder")
  family = family_of(src)
  kind = families.FAMILIES[family]
  subfolders = {name: SUBFOLDERS[name] for name in kind.components}
  needed = [*subfolders.values(), "tokenizer", *(["image_processor"] if kind.uses_clip else [])]
  missing = [sub for sub in needed if not (src / sub).is_dir()]
  if missing:
    raise ConversionError(f"{src} is not a {kind.title} release folder: it lacks "
                          f"{', '.join(missing)}/")
  # Configs first, so that an incompatible release fails before anything is written.
  sections = {name: component_config(component_module(name), src / sub, None, [])
              for name, sub in subfolders.items()}
  if dtype is not None:
    sections = {n: dataclasses.replace(c, param_dtype=dtype) for n, c in sections.items()}
  sampling = {"a2": lambda: sampling_from_scheduler(src), "v3_r2v": lambda: V3_SAMPLING,
              "v2_df": lambda: dataclasses.replace(sampling_from_scheduler(src), **V2_DF_SAMPLING)
              }[family]()
  if family == "v2_df":  # diffusers' default causal block: the transformer's
    sampling = dataclasses.replace(
        sampling, causal_block_size=sections["transformer"].num_frame_per_block)
  cfg = configs.Config(family=family, **sections, sampling=sampling)
  check_compatible(cfg)

  final, tmp = common.prepare_output(dst, force)
  try:
    tmp.mkdir(parents=True)
    for name, sub in subfolders.items():
      convert_component(name, src / sub, None, dtype=dtype, into=tmp, progress=progress,
                        copy_extras=False)
    for extra in COPIED:
      if (src / extra).is_dir():
        shutil.copytree(src / extra, tmp / extra)
    checkpoints.write_config(tmp, cfg)
    common.commit_output(tmp, final)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
  return cfg
