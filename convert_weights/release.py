"""A whole SkyReels-A2 release folder (diffusers layout) → one a2jax folder.

Release layout: `model_index.json`, `transformer/`, `vae/`, `image_encoder/`, `image_processor/`,
`text_encoder/`, `tokenizer/`, `scheduler/`. Output: `config.yaml` (every component's config and the
sampling defaults taken from the release's scheduler), `transformer/`, `vae/`, `clip/`, `umt5/`
(orbax checkpoints), and `tokenizer/`, `image_processor/`, `scheduler/` copied as they are.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

from a2jax import checkpoints, configs
from a2jax.errors import ConversionError
from convert_weights import common
from convert_weights.component import component_config, component_module, convert_component

# a2jax component -> release subfolder
SUBFOLDERS = {"transformer": "transformer", "vae": "vae", "clip": "image_encoder",
              "umt5": "text_encoder"}
COPIED = ("tokenizer", "image_processor", "scheduler")


def check_compatible(cfg: configs.Config) -> None:
  """The components must fit together; says which does not."""
  t = cfg.transformer
  problems = []
  if t.text_dim != cfg.umt5.d_model:
    problems.append(f"transformer.text_dim {t.text_dim} ≠ text encoder width {cfg.umt5.d_model}")
  if t.image_dim != cfg.clip.hidden_size:
    problems.append(f"transformer.image_dim {t.image_dim} ≠ CLIP width {cfg.clip.hidden_size}")
  if t.in_channels != 2 * cfg.vae.z_dim + 4:
    problems.append(f"transformer.in_channels {t.in_channels} ≠ 2·z_dim + 4 = {2 * cfg.vae.z_dim + 4}")
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
  missing = [sub for sub in [*SUBFOLDERS.values(), "tokenizer", "image_processor"]
             if not (src / sub).is_dir()]
  if missing:
    raise ConversionError(f"{src} is not a SkyReels-A2 release folder: it lacks {', '.join(missing)}/")
  # Configs first, so that an incompatible release fails before anything is written.
  sections = {name: component_config(component_module(name), src / sub, None, [])
              for name, sub in SUBFOLDERS.items()}
  if dtype is not None:
    sections = {n: dataclasses.replace(c, param_dtype=dtype) for n, c in sections.items()}
  cfg = configs.Config(**sections, sampling=sampling_from_scheduler(src))
  check_compatible(cfg)

  final, tmp = common.prepare_output(dst, force)
  try:
    tmp.mkdir(parents=True)
    for name, sub in SUBFOLDERS.items():
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
