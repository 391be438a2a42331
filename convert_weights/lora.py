"""LoRA files for the A2 transformer: reading the three formats people publish for Wan, merging them,
and writing an a2jax LoRA tree (torch-free: safetensors through numpy).

Formats, detected from the keys (DESIGN.md §11):
  original  `diffusion_model.blocks.0.self_attn.q.lora_down.weight` / `.lora_up.weight` (or
            `.lora_A` / `.lora_B`), `.alpha`, `.diff` (norm weights), `.diff_b` (biases),
            `blocks.0.diff_m` (modulation): ComfyUI, lightx2v, ai-toolkit;
  kohya     `lora_unet_blocks_0_self_attn_q.lora_down.weight` + `.alpha`: kohya / musubi-tuner;
  diffusers `transformer.blocks.0.attn1.to_q.lora_A.weight` / `.lora_B.weight` (PEFT), alpha from
            the safetensors metadata `lora_adapter_metadata` when present.
Each pair merges as W' = W + strength · (alpha / rank) · up @ down (alpha / rank = 1 without an
alpha). Names go through the converter's own tables (`transformer.reference_targets`,
`transformer.original_name`), so every parameter the converter reads can carry a LoRA or a diff.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import struct
from collections import defaultdict
from typing import Any, Iterable, Sequence

import numpy as np

from a2jax.configs import TransformerConfig
from a2jax.errors import ConversionError, InputError
from a2jax.models import lora as lora_tree
from a2jax.models.lora import LoadedLoRA
from convert_weights import common, transformer

FORMATS = ("original", "kohya", "diffusers")
# Parts of the image branch's module names (A2 / Wan I2V) in every format's spelling: diffusers
# (attn2.add_k_proj, …, image_embedder) and original / kohya (cross_attn.k_img, …, img_emb).
IMAGE_BRANCH_PARTS = ("add_k_proj", "add_v_proj", "norm_added_k", "image_embedder", "k_img",
                      "v_img", "img_emb")
_PREFIXES = {"original": "diffusion_model.", "kohya": "lora_unet_", "diffusers": "transformer."}
# key suffix -> (kind, the parameter's torch leaf name)
_SUFFIXES = (
    (".lora_down.weight", "down", "weight"), (".lora_A.weight", "down", "weight"),
    (".lora_up.weight", "up", "weight"), (".lora_B.weight", "up", "weight"),
    (".alpha", "alpha", "weight"), (".diff_b", "diff", "bias"), (".diff", "diff", "weight"),
    (".lora_B.bias", "diff", "bias"),  # diffusers' spelling of a bias diff (PEFT lora_bias)
)


@dataclasses.dataclass(frozen=True)
class _Param:
  """One torch parameter name's place in the a2jax tree."""
  target: common.Target
  layer: int | None  # index along "layers" for stacked block params


def _parameter_index(cfg: TransformerConfig) -> dict[str, dict[str, _Param]]:
  """{format: {name of a torch parameter in that format's spelling: its a2jax place}}; kohya names
  are the original ones with `.` → `_` (the leaf name kept after a dot)."""
  diffusers = {}
  for target in transformer.reference_targets(cfg):
    for i, source in enumerate(target.sources):
      diffusers[source] = _Param(target, i if target.stacked else None)
  original = {transformer.original_name(name): p for name, p in diffusers.items()}
  kohya = {}
  for name, p in original.items():
    module, leaf = name.rsplit(".", 1)
    kohya[f"{module.replace('.', '_')}.{leaf}"] = p
  return {"diffusers": diffusers, "original": original, "kohya": kohya}


def detect_format(names: Iterable[str]) -> str:
  names = list(names)
  for fmt, prefix in _PREFIXES.items():
    if any(n.startswith(prefix) for n in names):
      return fmt
  if any(".self_attn." in n or ".cross_attn." in n for n in names):
    return "original"  # without the `diffusion_model.` prefix
  if any(".attn1." in n or ".attn2." in n for n in names):
    return "diffusers"
  raise ConversionError(f"cannot tell the LoRA format from its keys (first: {names[:1]}): expected "
                        "diffusion_model.blocks.N…, lora_unet_blocks_N_… or transformer.blocks.N…")


def _split_key(key: str, fmt: str) -> tuple[str, str, str]:
  """(module name in the format's spelling without prefix, kind, torch leaf of the parameter)."""
  name = key.removeprefix(_PREFIXES[fmt])
  if name.endswith("diff_m"):  # blocks.N.diff_m: the block's modulation table
    module = name.removesuffix("diff_m").rstrip("._")
    return module + ("_" if fmt == "kohya" else ".") + "modulation", "diff", ""
  for suffix, kind, leaf in _SUFFIXES:
    if name.endswith(suffix):
      return name.removesuffix(suffix), kind, leaf
  raise ConversionError(f"LoRA key {key!r} has no known suffix (.lora_down/.lora_up/.lora_A/.lora_B"
                        ".weight, .alpha, .diff, .diff_b, .lora_B.bias, diff_m)")


def _read(path: pathlib.Path) -> tuple[common.LazyStateDict, dict[str, str]]:
  """(tensors, safetensors metadata) of a LoRA file."""
  if not path.is_file():
    raise InputError(f"LoRA file {path} does not exist")
  if path.suffix != ".safetensors":
    raise InputError(f"LoRA file {path} is not a .safetensors file")
  tensors = common.read_safetensors([path])
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    metadata = json.loads(f.read(n)).get("__metadata__") or {}
  return tensors, metadata


def _metadata_alpha(metadata: dict[str, str]) -> float | None:
  """lora_alpha of diffusers' `lora_adapter_metadata` (PEFT LoraConfig, keys maybe prefixed
  `transformer.`); None when absent."""
  raw = metadata.get("lora_adapter_metadata")
  if not raw:
    return None
  config = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
  return None if config.get("lora_alpha") is None else float(config["lora_alpha"])


def read_lora(path: str | os.PathLike, cfg: TransformerConfig, strength: float = 1.0) -> LoadedLoRA:
  """A LoRA safetensors file as a `LoadedLoRA` for the transformer of `cfg`, its strength applied.

  Raises ConversionError naming the key for a key that maps to no parameter, a factor pair of the
  wrong width, or a lone half of a pair."""
  path = pathlib.Path(path)
  tensors, metadata = _read(path)
  fmt = detect_format(tensors)
  index = _parameter_index(cfg)[fmt]
  grouped: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)  # (module, leaf) -> kind -> key
  for key in tensors:
    module, kind, leaf = _split_key(key, fmt)
    grouped[(module, leaf)][kind] = key
  layers = cfg.num_layers
  default_alpha = _metadata_alpha(metadata) if fmt == "diffusers" else None
  factors: dict[tuple[str, ...], dict[int, tuple[np.ndarray, np.ndarray, float]]] = defaultdict(dict)
  deltas: dict[tuple[str, ...], np.ndarray] = {}
  for (module, leaf), keys in grouped.items():
    name = f"{module}.{leaf}" if leaf else module
    some_key = next(iter(keys.values()))
    if name not in index and cfg.image_dim is None and any(p in name for p in IMAGE_BRANCH_PARTS):
      raise ConversionError(f"{path}: LoRA key {some_key!r} is of an image branch (an A2 / Wan I2V "
                            "LoRA), and this transformer has none (SkyReels-V3 R2V, text-to-video): "
                            "use a LoRA trained for this model")
    if name not in index:
      raise ConversionError(f"{path}: LoRA key {some_key!r} maps to no parameter of the transformer "
                            f"({cfg.num_layers} layers, image branch {cfg.image_dim is not None})")
    param = index[name]
    if "diff" in keys:
      delta = tensors[keys["diff"]].astype(np.float32)
      if tuple(delta.shape) != param.target.source_shape:
        raise ConversionError(f"{path}: {keys['diff']!r} has shape {tuple(delta.shape)}, the "
                              f"parameter {param.target.sources[0]!r} {param.target.source_shape}")
      _add_delta(deltas, param, strength * param.target.layout(delta), layers)
    if {"down", "up", "alpha"} & keys.keys():
      if not {"down", "up"} <= keys.keys():
        raise ConversionError(f"{path}: {some_key!r} has no matching "
                              f"{'lora_up/lora_B' if 'down' in keys else 'lora_down/lora_A'} weight")
      down = tensors[keys["down"]].astype(np.float32)  # (r, in)
      up = tensors[keys["up"]].astype(np.float32)      # (out, r)
      out_dim, in_dim = param.target.source_shape
      if down.ndim != 2 or up.ndim != 2 or down.shape[1] != in_dim or up.shape[0] != out_dim or (
          up.shape[1] != down.shape[0]):
        raise ConversionError(
            f"{path}: {keys['down']!r} {tuple(down.shape)} and {keys['up']!r} {tuple(up.shape)} do "
            f"not fit the weight {param.target.sources[0]!r} (out, in) = {(out_dim, in_dim)}: a LoRA "
            "for another model size")
      rank = down.shape[0]
      alpha = (float(tensors[keys["alpha"]].reshape(())) if "alpha" in keys
               else default_alpha if default_alpha is not None else float(rank))
      scale = strength * alpha / rank
      if param.layer is None or param.target.path[0] != "blocks":
        _add_delta(deltas, param, scale * (up @ down).T, layers)
      else:
        factors[param.target.path[1:-1]][param.layer] = (down.T, up.T, scale)
  notes = [f"{path.name}: {fmt} LoRA, strength {strength:g}, {_coverage(factors, deltas)}"]
  if cfg.image_dim is not None and factors and not any(m[-1] in ("add_k_proj", "add_v_proj")
                                                        for m in factors):
    notes.append(f"{path.name}: no image-branch entries (k_img / v_img): a T2V LoRA; the image "
                 "branch keeps its base weights")
  lora, scales = _stack_factors(factors, layers)
  return LoadedLoRA(str(path), fmt, lora, scales, _nest(deltas), tuple(notes))


def _add_delta(deltas: dict, param: _Param, delta: np.ndarray, layers: int) -> None:
  path = param.target.path
  if param.layer is None:
    deltas[path] = deltas.get(path, 0) + delta
    return
  stacked = deltas.setdefault(path, np.zeros((layers, *delta.shape), np.float32))
  stacked[param.layer] += delta


def _stack_factors(factors, layers: int) -> tuple[dict[str, Any], dict[str, Any]]:
  """(LoRA tree, per-layer scales) from {module path: {layer: (a (in, r), b (r, out), scale)}}; ranks
  that differ between layers are zero-padded to the largest (exact: the padding adds nothing)."""
  tree: dict[str, Any] = {}
  scales: dict[str, Any] = {}
  for module, per_layer in factors.items():
    a0, b0, _ = next(iter(per_layer.values()))
    rank = max(a.shape[1] for a, _, _ in per_layer.values())
    a = np.zeros((layers, a0.shape[0], rank), np.float32)
    b = np.zeros((layers, rank, b0.shape[1]), np.float32)
    s = np.zeros((layers,), np.float32)
    for layer, (la, lb, scale) in per_layer.items():
      a[layer, :, :la.shape[1]], b[layer, :lb.shape[0]], s[layer] = la, lb, scale
    node, snode = tree, scales
    for part in module[:-1]:
      node, snode = node.setdefault(part, {}), snode.setdefault(part, {})
    node[module[-1]] = {"lora_a": a, "lora_b": b}
    snode[module[-1]] = s
  return {"blocks": tree}, {"blocks": scales}


def _nest(flat: dict[tuple[str, ...], np.ndarray]) -> dict[str, Any]:
  return common.nest((path, np.asarray(v, np.float32)) for path, v in flat.items())


def _coverage(factors, deltas) -> str:
  layers = sorted({layer for per_layer in factors.values() for layer in per_layer})
  span = f"layers {layers[0]}–{layers[-1]}" if layers else "no layers"
  return (f"{len(factors)} projections per block ({span}), "
          f"{len(deltas)} parameter deltas (.diff/.diff_b/diff_m or outside the blocks)")


def parse_spec(spec: str) -> tuple[pathlib.Path, float]:
  """`FILE[:STRENGTH]` → (path, strength); strength defaults to 1. Raises InputError."""
  path, sep, strength = spec.rpartition(":")
  if not sep or not strength or "/" in strength:
    path, strength = spec, "1"
  try:
    value = float(strength)
  except ValueError:
    raise InputError(f"--lora {spec!r}: the strength after ':' is not a number (FILE[:STRENGTH])")
  path = pathlib.Path(path)
  if not path.is_file():
    raise InputError(f"--lora {spec!r}: no such file {path}")
  return path, value


def read_loras(loras: Sequence[tuple[str | os.PathLike, float]],
               cfg: TransformerConfig) -> list[LoadedLoRA]:
  return [read_lora(path, cfg, strength) for path, strength in loras]


def apply_loras(params: Any, cfg: TransformerConfig,
                loras: Sequence[tuple[str | os.PathLike, float]]) -> tuple[Any, list[str]]:
  """(params with every LoRA file merged in order, the notes of each); params numpy or jax arrays
  (placed arrays keep their shardings)."""
  loaded = read_loras(loras, cfg)
  return lora_tree.apply_all(params, loaded), [n for one in loaded for n in one.notes]


# ---------------------------------------------------------------------------------------------
# Writing


def write_lora(lora: Any, alpha: float, path: str | os.PathLike, format: str,
               metadata: dict[str, str] | None = None) -> pathlib.Path:
  """Writes an a2jax LoRA tree ({"blocks": {module: {proj: {"lora_a" (L, in, r), "lora_b"
  (L, r, out)}}}}, trained with W' = W + (alpha / rank) · a @ b) as a safetensors file, atomically.

  format "comfyui": original Wan names `diffusion_model.blocks.N.self_attn.q.lora_down.weight` (r, in),
  `.lora_up.weight` (out, r), `.alpha` (read by ComfyUI, diffusers and lightx2v's loader applies a
  strength instead). "diffusers": PEFT names `transformer.blocks.N.attn1.to_q.lora_A.weight` /
  `.lora_B.weight` with alpha / rank folded into lora_B (diffusers reads PEFT files without metadata
  at scale 1). "kohya": `lora_unet_blocks_N_self_attn_q.lora_down.weight` / `.lora_up.weight` /
  `.alpha`. Float32 tensors; `metadata` goes into the safetensors header."""
  from safetensors.numpy import save_file
  if format not in ("comfyui", "diffusers", "kohya"):
    raise ConversionError(f"LoRA format {format!r}: choose comfyui, diffusers or kohya")
  tensors = {}
  for module, projections in lora["blocks"].items():
    for proj, factors in projections.items():
      a, b = np.asarray(factors["lora_a"], np.float32), np.asarray(factors["lora_b"], np.float32)
      rank = a.shape[-1]
      a2 = f"blocks.{module}.{proj}"
      diffusers_module = transformer.MODULE_RENAMES.get(a2, a2).removeprefix("blocks.")
      for layer in range(a.shape[0]):
        name = f"blocks.{layer}.{diffusers_module}"
        down, up = np.ascontiguousarray(a[layer].T), np.ascontiguousarray(b[layer].T)
        if format == "diffusers":
          tensors[f"transformer.{name}.lora_A.weight"] = down
          tensors[f"transformer.{name}.lora_B.weight"] = up * np.float32(alpha / rank)
          continue
        original = transformer.original_name(f"{name}.weight").removesuffix(".weight")
        prefix = ("diffusion_model." + original if format == "comfyui"
                  else "lora_unet_" + original.replace(".", "_"))
        tensors[f"{prefix}.lora_down.weight"] = down
        tensors[f"{prefix}.lora_up.weight"] = up
        tensors[f"{prefix}.alpha"] = np.asarray(alpha, np.float32)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
  try:
    save_file(tensors, str(tmp), metadata=dict(metadata or {}))
    tmp.replace(path)
  finally:
    tmp.unlink(missing_ok=True)
  return path
