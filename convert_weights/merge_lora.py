"""`python -m convert_weights merge-lora --src A2JAX_FOLDER --lora FILE[:STRENGTH] [--lora …]
--dst NEW_FOLDER [--force]`: a converted folder with LoRA files merged into its transformer.

The new folder is the source's copy (config, tokenizer, image processor, VAE, CLIP, UMT5) with a
transformer whose kernels carry the LoRAs, so it samples at the base speed without `--lora`. The
transformer is rewritten one parameter at a time (host memory holds one stacked leaf, not the
model); the folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shutil
import sys
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import tqdm

from a2jax import checkpoints
from a2jax.runner import run_main
from a2jax.models import lora as lora_tree
from convert_weights import common, lora, transformer

COMPONENT = "transformer"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m convert_weights merge-lora",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--src", required=True, type=pathlib.Path, help="a converted a2jax folder")
  p.add_argument("--lora", required=True, action="append", metavar="FILE[:STRENGTH]",
                 help="a LoRA .safetensors file (original Wan / ComfyUI, kohya / musubi or diffusers "
                 "names) and its strength (default 1); repeatable, merged in order")
  p.add_argument("--dst", required=True, type=pathlib.Path, help="the new folder")
  p.add_argument("--force", action="store_true", help="replace --dst if it exists")
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def _leaf_lora(path: tuple[str, ...], loaded: lora_tree.LoadedLoRA) -> lora_tree.LoadedLoRA | None:
  """`loaded` restricted to the one parameter at `path`; None when it does not touch it."""
  factors, scales = {"blocks": {}}, {"blocks": {}}
  if len(path) == 4 and path[0] == "blocks" and path[-1] == "kernel":
    module, proj = path[1:3]
    if proj in loaded.factors["blocks"].get(module, {}):
      factors = {"blocks": {module: {proj: loaded.factors["blocks"][module][proj]}}}
      scales = {"blocks": {module: {proj: loaded.scales["blocks"][module][proj]}}}
  delta: Any = loaded.deltas
  for part in path:
    delta = delta.get(part) if isinstance(delta, dict) else None
  if not factors["blocks"] and delta is None:
    return None
  deltas = common.nest([(path, delta)]) if delta is not None else {}
  return dataclasses.replace(loaded, factors=factors, scales=scales, deltas=deltas)


def merged_leaves(items: Iterable[tuple[tuple[str, ...], np.ndarray]],
                  loaded: Sequence[lora_tree.LoadedLoRA]) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
  """(leaf path, array) of the transformer with every LoRA merged, one leaf at a time."""
  for path, array in items:
    for one in loaded:
      sub = _leaf_lora(path, one)
      if sub is not None:
        tree = lora_tree.apply_all(common.nest([(path, array)]), [sub])
        for part in path:
          tree = tree[part]
        array = np.asarray(tree)
    yield path, array


def merge(argv: Sequence[str] | None) -> int:
  args = parse_args(argv)
  specs = [lora.parse_spec(spec) for spec in args.lora]
  cfg = checkpoints.read_config(args.src)
  src_transformer = checkpoints.component_path(args.src, COMPONENT)
  # a damaged folder, or one another a2jax version wrote, ends here, before anything is written
  leaves = checkpoints.check_leaves(src_transformer, transformer.init_abstract(cfg.transformer))
  loaded = lora.read_loras(specs, cfg.transformer)
  for note in (n for one in loaded for n in one.notes):
    print(f"lora: {note}", file=sys.stderr)
  dst, tmp = common.prepare_output(args.dst, args.force)
  try:
    shutil.copytree(args.src, tmp, ignore=lambda d, names: [COMPONENT] if pathlib.Path(d).resolve()
                    == pathlib.Path(args.src).resolve() else [])
    bar = tqdm.tqdm(total=len(leaves), desc="merge-lora", unit="leaf", disable=args.no_progress)
    checkpoints.save_params_streaming(
        tmp / COMPONENT, merged_leaves(checkpoints.iter_params(src_transformer), loaded),
        on_item=lambda *_: bar.update())
    bar.close()
    common.commit_output(tmp, dst)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
  print(f"wrote {dst}: {len(loaded)} LoRA(s) merged into the transformer")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run_main(merge, argv)
