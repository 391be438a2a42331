"""`python -m convert_weights COMPONENT --src DIR_OR_FILE --dst OUT [--dtype bfloat16] [--force]`.

Other commands, each a module with its own `main(argv)` (`python -m convert_weights COMMAND -h`):
`export` (a2jax folder → diffusers / ComfyUI files), `export-lora` (a trained LoRA → a LoRA file),
`merge-lora` (LoRA files merged into a new a2jax folder).

Converts one component of a SkyReels-A2 release (diffusers layout) or an original Wan2.1 `.pth`
into an a2jax folder: `config.yaml` + `<component>/` (an orbax checkpoint) + the component's extra
files (tokenizer, image processor). Streams tensor by tensor, writes into a temporary folder that
is renamed only when complete, and leaves nothing behind on failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import pathlib
import shutil
import sys
import time

import tqdm

from a2jax import checkpoints, configs
from a2jax.errors import A2JaxError, ConversionError
from convert_weights import common

COMPONENTS = ("transformer", "vae", "clip", "umt5")
# command -> module whose main(argv) -> int runs it
COMMANDS = {"export": "convert_weights.export", "export-lora": "convert_weights.export_lora",
            "merge-lora": "convert_weights.merge_lora"}


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
    items = common.execute(targets, state_dict, configs_dtype(cfg.param_dtype))
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


def configs_dtype(name: str):
  from a2jax.models.layers import dtype_of
  return dtype_of(name)


def copy_extra_files(module, src: pathlib.Path, folder: pathlib.Path) -> None:
  """Copies the component's sibling folders (e.g. the release's `tokenizer/`) when present."""
  root = (src if src.is_dir() else src.parent).parent
  for extra in getattr(module, "EXTRA_FILES", ()):
    path = root / extra
    if path.is_dir():
      shutil.copytree(path, folder / extra)
    elif path.is_file():
      shutil.copy2(path, folder / extra)


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m convert_weights", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("component", choices=(*COMPONENTS, "release"),
                 help="one component, or 'release': every component of a release folder (other "
                 f"commands: {', '.join(COMMANDS)})")
  p.add_argument("--src", required=True, help="component folder of the release (with config.json "
                 "and safetensors shards), a weights file (.safetensors, .pth, .bin), or for "
                 "'release' the whole release folder")
  p.add_argument("--dst", required=True, help="output a2jax folder (must not exist unless --force)")
  p.add_argument("--dtype", choices=configs.DTYPES, default=None,
                 help="parameter dtype to store (default: the config's param_dtype)")
  p.add_argument("--config", default=None, help="preset name or YAML whose section describes the "
                 "model (required for original .pth files, which carry no config.json)")
  p.add_argument("--force", action="store_true", help="overwrite an existing --dst")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("overrides", nargs="*", help="component.key=value config overrides")
  return p.parse_intermixed_args(argv)  # key=value overrides may follow the options


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] in COMMANDS:
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
  args = parse_args(argv)
  start = time.time()
  try:
    if args.component == "release":
      if args.overrides or args.config:
        raise ConversionError("'release' reads every config from the release folder: drop "
                              "--config and key=value overrides")
      from convert_weights.release import convert_release
      convert_release(args.src, args.dst, dtype=args.dtype, force=args.force,
                      progress=not args.no_progress)
    else:
      overrides = [o if o.startswith(args.component + ".") else f"{args.component}.{o}"
                   for o in args.overrides]
      convert_component(args.component, args.src, args.dst, dtype=args.dtype, force=args.force,
                        preset=args.config, overrides=overrides, progress=not args.no_progress)
  except A2JaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.dst} ({args.component}) in {time.time() - start:.1f}s", file=sys.stderr)
  return 0
