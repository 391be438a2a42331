"""CLIP vision tower weights: transformers names, or the original Wan2.1 open-clip `.pth` names.

transformers: `CLIPVisionModel` (`embeddings.…`, `encoder.layers.N.…`; transformers 4.x wrote a
`vision_model.` prefix on every key) and `CLIPVisionModelWithProjection` (`vision_model.…` plus
`visual_projection.weight`). The map is structural: a2jax module paths are these names.

Original Wan2.1 (`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`): the vision tower under
`visual.`, with a fused `attn.to_qkv` ([q; k; v] along the output dim), `cls_embedding` (1, 1, D),
`pos_embedding` (1, S, D) and a `head` parameter (D, projection_dim) applied as x @ head. Its
`textual.*` (XLM-RoBERTa) and `log_scale` keys belong to the text side and are ignored. Each
transformers source name of a target is mapped to the Wan tensor it comes from, with the small
adapter (slice, reshape, transpose) that turns the Wan tensor into the transformers one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import flax.linen as nn
import numpy as np

from a2jax.configs import CLIPConfig
from a2jax.errors import ConversionError
from a2jax.models import clip as model
from convert_weights import common

COMPONENT = "clip"
CONFIG_CLASS = CLIPConfig
WEIGHTS_PREFIX = "model"
# Copied beside the converted weights: the release's CLIP preprocessing settings
# (`image_processor/preprocessor_config.json`, read by `a2jax.preprocess.ClipImageProcessor`).
EXTRA_FILES = ("image_processor",)

STACKED = {"encoder.layers": "encoder.layers.{i}"}
PROJECTION = "visual_projection.weight"

Adapter = Callable[[np.ndarray], np.ndarray]  # Wan tensor -> transformers tensor
ShapeMap = Callable[[tuple[int, ...]], tuple[int, ...]]  # transformers shape -> Wan shape


def _qkv_part(j: int) -> tuple[str, Adapter, ShapeMap]:
  def adapt(a):
    n = a.shape[0] // 3
    return a[j * n:(j + 1) * n]
  return r"visual.transformer.\1.attn.to_qkv.\2", adapt, lambda s: (3 * s[0],) + tuple(s[1:])


_same: tuple[Adapter, ShapeMap] = (lambda a: a, lambda s: s)
_L = r"encoder\.layers\.(\d+)\."
# transformers name (regex, full match) -> (Wan name, adapter, shape map).
WAN_SOURCES: tuple[tuple[str, tuple[str, Adapter, ShapeMap]], ...] = (
    (r"embeddings\.patch_embedding\.weight", ("visual.patch_embedding.weight", *_same)),
    (r"embeddings\.class_embedding",
     ("visual.cls_embedding", lambda a: a.reshape(-1), lambda s: (1, 1) + tuple(s))),
    (r"embeddings\.position_embedding\.weight",
     ("visual.pos_embedding", lambda a: a[0], lambda s: (1,) + tuple(s))),
    (r"pre_layrnorm\.(\w+)", (r"visual.pre_norm.\1", *_same)),
    (r"post_layernorm\.(\w+)", (r"visual.post_norm.\1", *_same)),
    (_L + r"layer_norm1\.(\w+)", (r"visual.transformer.\1.norm1.\2", *_same)),
    (_L + r"layer_norm2\.(\w+)", (r"visual.transformer.\1.norm2.\2", *_same)),
    (_L + r"self_attn\.q_proj\.(\w+)", _qkv_part(0)),
    (_L + r"self_attn\.k_proj\.(\w+)", _qkv_part(1)),
    (_L + r"self_attn\.v_proj\.(\w+)", _qkv_part(2)),
    (_L + r"self_attn\.out_proj\.(\w+)", (r"visual.transformer.\1.attn.proj.\2", *_same)),
    (_L + r"mlp\.fc1\.(\w+)", (r"visual.transformer.\1.mlp.0.\2", *_same)),
    (_L + r"mlp\.fc2\.(\w+)", (r"visual.transformer.\1.mlp.2.\2", *_same)),
    (re.escape(PROJECTION), ("visual.head", lambda a: a.T, lambda s: tuple(s[::-1]))),
)
_WAN_SOURCES = [(re.compile(p), r) for p, r in WAN_SOURCES]

# Keys that the vision tower does not use, per name set. Old transformers checkpoints saved the
# `position_ids` buffer; the Wan file holds the whole XLM-RoBERTa CLIP.
IGNORED_TRANSFORMERS = (r"embeddings\.position_ids",)
IGNORED_WAN = (r"textual\..*", r"log_scale")


def is_original_wan(names) -> bool:
  return any(k.startswith("visual.") for k in names)


def init_abstract(cfg: CLIPConfig):
  return nn.meta.unbox(model.init_abstract_boxed(cfg))


def _wan_source(name: str) -> tuple[str, Adapter, ShapeMap]:
  """(Wan name, adapter, shape map) of one transformers source name."""
  for pattern, (replacement, adapt, to_wan_shape) in _WAN_SOURCES:
    if pattern.fullmatch(name):
      return pattern.sub(replacement, name), adapt, to_wan_shape
  raise ConversionError(f"{name} has no original-Wan counterpart: add it to WAN_SOURCES")


def _from_wan(target: common.Target) -> common.Target:
  """The same target read from the Wan tensors (one rule per target: stacked layers share it)."""
  sources = [_wan_source(name) for name in target.sources]
  _, adapt, to_wan_shape = sources[0]
  layout = target.layout
  return dataclasses.replace(target, sources=tuple(name for name, _, _ in sources),
                             source_shape=tuple(to_wan_shape(target.source_shape)),
                             layout=lambda a: layout(adapt(a)))


def reference_targets(cfg: CLIPConfig) -> list[common.Target]:
  """Targets of every a2jax leaf, sourced from transformers names (conversion and export)."""
  return common.structural_targets(init_abstract(cfg), stacked_prefixes=STACKED)


def export_targets(cfg: CLIPConfig) -> list[common.Target]:
  """`reference_targets` as transformers saves them: `CLIPVisionModelWithProjection` keeps the
  tower under `vision_model.` beside `visual_projection.weight`; `CLIPVisionModel` has no prefix."""
  targets = reference_targets(cfg)
  if not cfg.with_projection:
    return targets
  return [t if t.sources == (PROJECTION,) else
          dataclasses.replace(t, sources=tuple(f"vision_model.{s}" for s in t.sources))
          for t in targets]


# a2jax's own config fields (not in transformers' config.json).
A2JAX_FIELDS = ("with_projection", "param_dtype", "dtype", "attention")


def reference_config(cfg: CLIPConfig) -> dict:
  """transformers' `config.json` of this config (`CLIPVisionModel`, or
  `CLIPVisionModelWithProjection` with the projection)."""
  model = "CLIPVisionModelWithProjection" if cfg.with_projection else "CLIPVisionModel"
  return common.reference_config(cfg, A2JAX_FIELDS, {
      "architectures": [model], "model_type": "clip_vision_model", "transformers_version": "5.23.0"})


def plan(state_dict: common.LazyStateDict, cfg: CLIPConfig):
  """Targets for every a2jax leaf from either name set; strict key checks.

  A projection in the checkpoint is used when `cfg.with_projection`, and ignored otherwise (the
  image tokens do not need it).
  """
  targets = reference_targets(cfg)
  if is_original_wan(state_dict):
    targets = [_from_wan(t) for t in targets]
    ignored = IGNORED_WAN + (() if cfg.with_projection else (r"visual\.head",))
  else:
    if any(k.startswith("vision_model.") for k in state_dict):
      state_dict = state_dict.renamed(lambda k: k.removeprefix("vision_model."))
    ignored = IGNORED_TRANSFORMERS + (() if cfg.with_projection else (re.escape(PROJECTION),))
  common.check_plan(targets, state_dict, ignored=ignored, component=COMPONENT)
  return targets, state_dict


def from_torch(state_dict, cfg: CLIPConfig, dtype=None):
  """Flat {name: array} (transformers or Wan open-clip names) → a2jax params (nested numpy)."""
  return common.convert_in_memory(plan, state_dict, cfg, dtype)
