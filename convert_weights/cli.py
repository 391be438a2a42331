"""`python -m convert_weights COMPONENT --src DIR_OR_FILE --dst OUT [--dtype bfloat16] [--force]`.

Other commands, each a module with its own `main(argv)` (`python -m convert_weights COMMAND -h`):
`export` (a2jax folder → diffusers / ComfyUI files), `export-lora` (a trained LoRA → a LoRA file),
`merge-lora` (LoRA files merged into a new a2jax folder).

Converts one component of a SkyReels-A2 release (diffusers layout) or an original Wan2.1 `.pth`
into an a2jax folder, or with `release` a whole SkyReels-A2, SkyReels-V3 R2V or SkyReels-V2 DF
release folder: `config.yaml` + `<component>/` (an orbax checkpoint) + the component's extra
files (tokenizer, image processor). Streams tensor by tensor, writes into a temporary folder that
is renamed only when complete, and leaves nothing behind on failure.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from a2jax import configs
from a2jax.errors import ConversionError
from a2jax.runner import run_main
from convert_weights.component import COMPONENTS, convert_component
from convert_weights.release import convert_release

# command -> module whose main(argv) -> int runs it
COMMANDS = {"export": "convert_weights.export", "export-lora": "convert_weights.export_lora",
            "merge-lora": "convert_weights.merge_lora"}


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


def convert(argv) -> int:
  args = parse_args(argv)
  start = time.time()
  if args.component == "release":
    if args.overrides or args.config:
      raise ConversionError("'release' reads every config from the release folder: drop "
                            "--config and key=value overrides")
    convert_release(args.src, args.dst, dtype=args.dtype, force=args.force,
                    progress=not args.no_progress)
  else:
    overrides = [o if o.startswith(args.component + ".") else f"{args.component}.{o}"
                 for o in args.overrides]
    convert_component(args.component, args.src, args.dst, dtype=args.dtype, force=args.force,
                      preset=args.config, overrides=overrides, progress=not args.no_progress)
  print(f"wrote {args.dst} ({args.component}) in {time.time() - start:.1f}s", file=sys.stderr)
  return 0


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] in COMMANDS:
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
  return run_main(convert, argv)
