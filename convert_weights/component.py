"""One component of a SkyReels-A2 release (diffusers layout) or an original Wan2.1 `.pth` → its
a2jax checkpoint: the component's config (from `config.json` or a preset), the name plan, the
streamed write, and the extra files (tokenizer, image processor). `python -m convert_weights
COMPONENT` (convert_weights/cli.py) and the release converter (convert_weights/release.py) use it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
import shutil
import sys

import tqdm

from a2jax import checkpoints, configs
from a2jax.errors import ConversionError
from a2jax.models.layers import dtype_of
from convert_weights import common

COMPONENTS = ("transformer", "vae", "clip", "umt5")


def component_module(name: str):
  if name not in COMPONENTS:
    raise ConversionError(f"unknown component {name!r}: use one of {list(COMPONENTS)}")
  return importlib.import_module(f"convert_weights.{name}")


def weights_source(src: pathlib.Path) -> pathlib.Path:
  """A component folder, or a file inside one."""
  if not src.exists():
    raise ConversionError(f"--src {src} does not exist: pass the component folder or weights file")
  return src


def component_config(module, src: pathlib.Path, preset: str | None, overrides: list[str]):
  """The component's config: from `config.json` beside the weights (release folders), else the
  preset's section (original `.pth` files carry no config), then `component.key=value` overrides."""
  folder = src if src.is_dir() else src.parent
  section = module.COMPONENT
  config_json = folder / "config.json"
  if preset is None and config_json.is_file():
    raw = json.loads(config_json.read_text())
    base = configs.to_dict(module.CONFIG_CLASS.from_dict(raw))
  else:
    full = configs.read_yaml(configs.resolve_path(preset or "a2_14b"))
    base = full.get(section, {})
  tree = configs.apply_overrides({section: base}, [o for o in overrides])
  return configs.build(module.CONFIG_CLASS, tree[section], section)


def convert_component(name: str, src, dst, *, dtype: str | None = None, force: bool = False,
                      preset: str | None = None, overrides: list[str] = (),
                      into: pathlib.Path | None = None, progress: bool = True,
                      copy_extras: bool = True):
  """Converts one component. With `into`, writes `<into>/<name>/` inside a folder being assembled
  (the release converter); otherwise `dst` becomes a new a2jax folder. Returns the config."""
  module = component_module(name)
  src = weights_source(pathlib.Path(src))
  cfg = component_config(module, src, preset, list(overrides))
  if dtype is not None:
    cfg = dataclasses.replace(cfg, param_dtype=dtype)
  state_dict = common.read_state_dict(src, prefer=getattr(module, "WEIGHTS_PREFIX", None))
  targets, state_dict = module.plan(state_dict, cfg)  # raises ConversionError before any write
  tensors_of = {t.path: len(t.sources) for t in targets}

  def write(folder: pathlib.Path):
    bar = tqdm.tqdm(total=sum(tensors_of.values()), unit="tensor", desc=f"convert {name}", disable=not progress,
                    file=sys.stderr)
    items = common.execute(targets, state_dict, dtype_of(cfg.param_dtype))
    checkpoints.save_params_streaming(
        folder / name, items, on_item=lambda path, nbytes: bar.update(tensors_of[path]))
    bar.close()
    if copy_extras:
      copy_extra_files(module, src, folder)

  if into is not None:
    write(into)
    return cfg
  final, tmp = common.prepare_output(dst, force)
  try:
    tmp.mkdir(parents=True)
    write(tmp)
    checkpoints.write_config(tmp, configs.Config(**{name: cfg}))
    common.commit_output(tmp, final)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
  return cfg


def copy_extra_files(module, src: pathlib.Path, folder: pathlib.Path) -> None:
  """Copies the component's sibling folders (e.g. the release's `tokenizer/`) when present."""
  root = (src if src.is_dir() else src.parent).parent
  for extra in getattr(module, "EXTRA_FILES", ()):
    path = root / extra
    if path.is_dir():
      shutil.copytree(path, folder / extra)
    elif path.is_file():
      shutil.copy2(path, folder / extra)
