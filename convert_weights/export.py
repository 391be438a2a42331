"""`python -m convert_weights export --src A2JAX_FOLDER --dst OUT --format diffusers|comfyui`.

Writes a converted a2jax folder back in the PyTorch tools' formats:
- `diffusers`: a release folder (`model_index.json` for `WanImageToVideoPipeline`, or SkyReels-V3's
  `WanSkyReelsA2WanT2VPipeline` for a V3 R2V folder, `transformer/`, `vae/`, `image_encoder/`,
  `text_encoder/` with `config.json` and safetensors — sharded with an index past
  `--max-shard-size` —, and the folder's `tokenizer/`, `image_processor/`, `scheduler/`). Every
  component present in the a2jax folder is written; the transformer is required.
- `comfyui`: the transformer alone as one `.safetensors` file under the original Wan2.1 names
  (`blocks.N.self_attn.q.weight`, `head.head.weight`, …, no prefix), for ComfyUI's
  `models/diffusion_models/` (diffusers reads it with `WanTransformer3DModel.from_single_file`).

The names come from the converters' own plan run backwards. Tensors are read one a2jax leaf at a
time (a stacked `blocks` leaf holds every layer) and written as they come, so host memory holds
about one leaf. Output goes to a temporary name renamed at the end; nothing is left on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

import numpy as np
import tqdm

from a2jax import checkpoints, configs
from a2jax.errors import A2JaxError, ConversionError
from convert_weights import common, component, release, transformer

FORMATS = ("diffusers", "comfyui")
DTYPES = ("float32", "bfloat16", "float16")
# a2jax component -> (diffusers / transformers library, class) in model_index.json
MODEL_CLASSES = {"transformer": ("diffusers", "WanTransformer3DModel"),
                 "vae": ("diffusers", "AutoencoderKLWan"),
                 "clip": ("transformers", "CLIPVisionModel"),
                 "umt5": ("transformers", "UMT5EncoderModel")}
# family -> (the pipeline class of model_index.json, the transformer's class in its config.json):
# what diffusers loads for A2, and what SkyReels-V3's R2V code loads (its transformer class reads
# the weights of diffusers' WanTransformer3DModel, which loads the folder too).
FAMILY_CLASSES = {"a2": ("WanImageToVideoPipeline", "WanTransformer3DModel"),
                  "v3_r2v": ("WanSkyReelsA2WanT2VPipeline", release.V3_TRANSFORMER_CLASS)}
# copied folder -> (library, class) in model_index.json, and the config file naming its class
COPIED_CLASSES = {"tokenizer": ("transformers", "T5Tokenizer", "tokenizer_config.json", "tokenizer_class"),
                  "image_processor": ("transformers", "CLIPImageProcessor", "preprocessor_config.json",
                                      "image_processor_type"),
                  "scheduler": ("diffusers", "UniPCMultistepScheduler", "scheduler_config.json",
                                "_class_name")}


class _Component:
  """One stored component: its export plan and a leaf-by-leaf reader."""

  def __init__(self, folder: pathlib.Path, name: str, cfg, dtype: str | None):
    self.name, self.cfg = name, cfg
    self.module = component.component_module(name)
    self.path = checkpoints.component_path(folder, name)
    self.targets = getattr(self.module, "export_targets", self.module.reference_targets)(cfg)
    stored = checkpoints.check_leaves(self.path, self.module.init_abstract(cfg))
    self.dtype = None if dtype is None else np.dtype(_numpy_dtype(dtype))
    self.shapes = common.export_shapes(
        self.targets, lambda p: stored[p].dtype if self.dtype is None else self.dtype)
    self.nbytes = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for _, s, d in self.shapes)

  def items(self):
    """(reference name, tensor), one a2jax leaf read at a time."""
    return common.export_items(
        self.targets, lambda path: next(checkpoints.iter_params(self.path, [path]))[1], self.dtype)


def _numpy_dtype(name: str):
  from a2jax.models.layers import dtype_of
  return dtype_of(name)


def _check_source(src: pathlib.Path) -> configs.Config:
  if not src.is_dir():
    raise ConversionError(f"--src {src} is not a folder: pass a converted a2jax folder")
  return checkpoints.read_config(src)


def export_diffusers(src: pathlib.Path, dst: pathlib.Path, *, dtype: str | None = None,
                     max_shard_bytes: int = 5 * 10**9, force: bool = False, progress: bool = True):
  """Writes the a2jax folder `src` as a diffusers release folder `dst`; returns the components."""
  cfg = _check_source(src)
  present = [n for n in checkpoints.COMPONENTS if (src / n).is_dir()]
  if "transformer" not in present:
    raise ConversionError(f"{src} has no transformer/ checkpoint: export needs at least the transformer")
  components = [_Component(src, n, getattr(cfg, n), dtype) for n in present]
  final, tmp = common.prepare_output(dst, force)
  bar = tqdm.tqdm(total=sum(c.nbytes for c in components), unit="B", unit_scale=True,
                  desc="export diffusers", disable=not progress, file=sys.stderr)
  try:
    tmp.mkdir(parents=True)
    pipeline_class, transformer_class = FAMILY_CLASSES[cfg.family]
    index = {"_class_name": pipeline_class, "_diffusers_version": "0.42.1"}
    for c in components:
      sub = release.SUBFOLDERS[c.name]
      (tmp / sub).mkdir()
      config = c.module.reference_config(c.cfg)
      if c.name == "transformer":
        config["_class_name"] = transformer_class
      (tmp / sub / "config.json").write_text(json.dumps(config, indent=2))
      common.write_safetensors(tmp / sub, c.module.WEIGHTS_PREFIX, c.shapes, c.items(),
                               max_shard_bytes, on_item=lambda _, n: bar.update(n))
      index[sub] = list(MODEL_CLASSES[c.name])
      if c.name == "transformer":
        index[sub] = ["diffusers", transformer_class]
      if c.name == "clip" and c.cfg.with_projection:
        index[sub] = ["transformers", "CLIPVisionModelWithProjection"]
    for sub, (library, default, config_file, class_key) in COPIED_CLASSES.items():
      if (src / sub).is_dir():
        shutil.copytree(src / sub, tmp / sub)
        written = tmp / sub / config_file
        name = json.loads(written.read_text()).get(class_key) if written.is_file() else None
        index[sub] = [library, name or default]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    common.commit_output(tmp, final)
  finally:
    bar.close()
    if tmp.exists():
      shutil.rmtree(tmp)
  return present


def comfyui_items(component: _Component):
  """The transformer's tensors under the original Wan2.1 names."""
  for name, tensor in component.items():
    yield transformer.original_name(name), tensor


def export_comfyui(src: pathlib.Path, dst: pathlib.Path, *, dtype: str | None = None,
                   force: bool = False, progress: bool = True) -> None:
  """Writes the transformer of the a2jax folder `src` as one original-Wan-names safetensors file."""
  cfg = _check_source(src)
  if dst.suffix != ".safetensors":
    raise ConversionError(f"--dst {dst}: the comfyui format writes one file, name it *.safetensors")
  c = _Component(src, "transformer", cfg.transformer, dtype)
  dst = dst.resolve()
  if dst.exists() and not force:
    raise ConversionError(f"{dst} already exists: pass --force to overwrite it, or choose another --dst")
  shapes = [(transformer.original_name(n), s, d) for n, s, d in c.shapes]
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp_dir = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
  bar = tqdm.tqdm(total=c.nbytes, unit="B", unit_scale=True, desc="export comfyui",
                  disable=not progress, file=sys.stderr)
  try:
    tmp_dir.mkdir()
    (written,) = common.write_safetensors(tmp_dir, dst.stem, shapes, comfyui_items(c),
                                          on_item=lambda _, n: bar.update(n))
    os.replace(written, dst)
  finally:
    bar.close()
    shutil.rmtree(tmp_dir, ignore_errors=True)


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m convert_weights export", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--src", required=True, help="a converted a2jax folder (config.yaml + checkpoints)")
  p.add_argument("--dst", required=True, help="diffusers: the output folder; comfyui: the output "
                 "*.safetensors file (must not exist unless --force)")
  p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
  p.add_argument("--dtype", default=None, help=f"one of {', '.join(DTYPES)} (default: as stored)")
  p.add_argument("--max-shard-size", default="5GB",
                 help="diffusers: largest safetensors shard, e.g. 5GB (10^9 bytes), 2GiB")
  p.add_argument("--force", action="store_true", help="overwrite an existing --dst")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else list(argv))
  start = time.time()
  try:
    if args.format not in FORMATS:
      raise ConversionError(f"--format {args.format!r} is unknown: use one of {list(FORMATS)}")
    if args.dtype is not None and args.dtype not in DTYPES:
      raise ConversionError(f"--dtype {args.dtype!r} is unknown: use one of {list(DTYPES)}")
    src, dst = pathlib.Path(args.src), pathlib.Path(args.dst)
    if args.format == "diffusers":
      done = export_diffusers(src, dst, dtype=args.dtype, force=args.force,
                              max_shard_bytes=common.parse_size(args.max_shard_size),
                              progress=not args.no_progress)
      what = ", ".join(release.SUBFOLDERS[n] for n in done)
    else:
      export_comfyui(src, dst, dtype=args.dtype, force=args.force, progress=not args.no_progress)
      what = "transformer, original Wan names"
  except A2JaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.dst} ({args.format}: {what}) in {time.time() - start:.1f}s", file=sys.stderr)
  return 0
