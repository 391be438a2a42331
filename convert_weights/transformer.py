"""A2 transformer weights: diffusers `WanTransformer3DModel` names, or the original Wan2.1 names.

The map is structural (a2jax module paths are the diffusers names); `MODULE_RENAMES` holds the few
names a flax module cannot spell, and `ORIGINAL_WAN_RULES` renames the original Wan2.1 / SkyReels
`.pth` keys to diffusers names (the same table as diffusers' single-file loader).
"""

from __future__ import annotations

import re

import flax.linen as nn

from a2jax.configs import TransformerConfig
from a2jax.models import transformer as model
from convert_weights import common

COMPONENT = "transformer"
CONFIG_CLASS = TransformerConfig
WEIGHTS_PREFIX = "diffusion_pytorch_model"

MODULE_RENAMES = common.sorted_renames({
    "blocks.attn1.to_out_0": "blocks.attn1.to_out.0",
    "blocks.attn2.to_out_0": "blocks.attn2.to_out.0",
    "blocks.ffn.net_0": "blocks.ffn.net.0.proj",
    "blocks.ffn.net_2": "blocks.ffn.net.2",
    "condition_embedder.image_embedder.ff.net_0": "condition_embedder.image_embedder.ff.net.0.proj",
    "condition_embedder.image_embedder.ff.net_2": "condition_embedder.image_embedder.ff.net.2",
    "fps_projection.net_0": "fps_projection.net.0.proj",
    "fps_projection.net_2": "fps_projection.net.2",
})

# Original Wan2.1 name (regex, full match) -> diffusers name.
_N = r"blocks\.(\d+)\."
ORIGINAL_WAN_RULES = (
    (r"time_embedding\.0\.(\w+)", r"condition_embedder.time_embedder.linear_1.\1"),
    (r"time_embedding\.2\.(\w+)", r"condition_embedder.time_embedder.linear_2.\1"),
    (r"text_embedding\.0\.(\w+)", r"condition_embedder.text_embedder.linear_1.\1"),
    (r"text_embedding\.2\.(\w+)", r"condition_embedder.text_embedder.linear_2.\1"),
    (r"time_projection\.1\.(\w+)", r"condition_embedder.time_proj.\1"),
    (r"img_emb\.proj\.0\.(\w+)", r"condition_embedder.image_embedder.norm1.\1"),
    (r"img_emb\.proj\.1\.(\w+)", r"condition_embedder.image_embedder.ff.net.0.proj.\1"),
    (r"img_emb\.proj\.3\.(\w+)", r"condition_embedder.image_embedder.ff.net.2.\1"),
    (r"img_emb\.proj\.4\.(\w+)", r"condition_embedder.image_embedder.norm2.\1"),
    (r"head\.head\.(\w+)", r"proj_out.\1"),
    (r"head\.modulation", r"scale_shift_table"),
    (_N + r"modulation", r"blocks.\1.scale_shift_table"),
    (_N + r"self_attn\.([qkv])\.(\w+)", r"blocks.\1.attn1.to_\2.\3"),
    (_N + r"self_attn\.o\.(\w+)", r"blocks.\1.attn1.to_out.0.\2"),
    (_N + r"self_attn\.(norm_[qk])\.(\w+)", r"blocks.\1.attn1.\2.\3"),
    (_N + r"cross_attn\.([qkv])\.(\w+)", r"blocks.\1.attn2.to_\2.\3"),
    (_N + r"cross_attn\.o\.(\w+)", r"blocks.\1.attn2.to_out.0.\2"),
    (_N + r"cross_attn\.(norm_[qk])\.(\w+)", r"blocks.\1.attn2.\2.\3"),
    (_N + r"cross_attn\.([kv])_img\.(\w+)", r"blocks.\1.attn2.add_\2_proj.\3"),
    (_N + r"cross_attn\.norm_k_img\.(\w+)", r"blocks.\1.attn2.norm_added_k.\2"),
    (_N + r"norm3\.(\w+)", r"blocks.\1.norm2.\2"),  # the original's norm3 is the cross-attn norm
    (_N + r"ffn\.0\.(\w+)", r"blocks.\1.ffn.net.0.proj.\2"),
    (_N + r"ffn\.2\.(\w+)", r"blocks.\1.ffn.net.2.\2"),
)
_original_to_diffusers = common.regex_renamer(ORIGINAL_WAN_RULES)


def _inverse_rule(pattern: str, replacement: str) -> tuple[str, str]:
  """(regex, replacement) of diffusers → original from one original → diffusers rule: the groups
  `(…)` of the pattern become the `\\N` of the inverse replacement and the reverse."""
  groups = re.findall(r"\(([^()]*)\)", pattern)
  inverse_pattern = "".join(f"({groups[int(part[1:]) - 1]})" if re.fullmatch(r"\\\d+", part)
                            else re.escape(part)
                            for part in re.split(r"(\\\d+)", replacement) if part)
  # Pattern literals are `\.`-escaped; each group is used once in the forward replacement.
  order = [int(n) for n in re.findall(r"\\(\d+)", replacement)]
  count = iter(range(1, len(groups) + 1))
  inverse_replacement = re.sub(r"\([^()]*\)", lambda _: f"\\{order.index(next(count)) + 1}",
                               pattern).replace("\\.", ".")
  return inverse_pattern, inverse_replacement


ORIGINAL_WAN_INVERSE = tuple(_inverse_rule(p, r) for p, r in ORIGINAL_WAN_RULES)
_diffusers_to_original = common.regex_renamer(ORIGINAL_WAN_INVERSE)


def original_name(diffusers_name: str) -> str:
  """The original Wan2.1 name (also ComfyUI's) of a diffusers `WanTransformer3DModel` key, e.g.
  `blocks.0.attn1.to_q.weight` → `blocks.0.self_attn.q.weight`; names both spell alike
  (`patch_embedding.*`) are returned unchanged."""
  return _diffusers_to_original(diffusers_name)

# Present in some checkpoints and unused by the model (diffusers builds no image-query norm).
IGNORED_KEYS = (r"blocks\.\d+\.attn2\.norm_added_q\.weight",)


def is_original_wan(names) -> bool:
  return any(k.startswith("head.head.") or ".self_attn." in k for k in names)


def init_abstract(cfg: TransformerConfig):
  return nn.meta.unbox(model.init_abstract_boxed(cfg))


def reference_targets(cfg: TransformerConfig) -> list[common.Target]:
  """Targets of every a2jax leaf, sourced from diffusers names (conversion and export)."""
  return common.structural_targets(init_abstract(cfg), stacked_prefixes={"blocks": "blocks.{i}"},
                                   module_renames=MODULE_RENAMES)


# a2jax's own config fields (not in diffusers' config.json) and the header diffusers writes.
A2JAX_FIELDS = ("param_dtype", "dtype", "remat", "attention", "weights")
CONFIG_HEADER = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.42.1"}


# SkyReels-V2's diffusion-forcing fields: a config that uses them is a `SkyReelsV2Transformer3DModel`.
SKYREELS_V2_FIELDS = ("inject_sample_info", "num_frame_per_block")
SKYREELS_V2_HEADER = {"_class_name": "SkyReelsV2Transformer3DModel", "_diffusers_version": "0.42.1"}


def is_skyreels_v2(cfg: TransformerConfig) -> bool:
  return cfg.inject_sample_info or cfg.num_frame_per_block > 1


def reference_config(cfg: TransformerConfig) -> dict:
  """diffusers' `config.json` of this config (what `WanTransformer3DModel.from_pretrained` reads,
  or `SkyReelsV2Transformer3DModel`'s for a diffusion-forcing config)."""
  if is_skyreels_v2(cfg):
    return common.reference_config(cfg, A2JAX_FIELDS, SKYREELS_V2_HEADER)
  return common.reference_config(cfg, A2JAX_FIELDS + SKYREELS_V2_FIELDS, CONFIG_HEADER)


def plan(state_dict: common.LazyStateDict, cfg: TransformerConfig):
  """Targets for every a2jax leaf, after renaming original-Wan keys; strict key checks."""
  if any(k.startswith("model.diffusion_model.") for k in state_dict):
    state_dict = state_dict.renamed(lambda k: k.removeprefix("model.diffusion_model."))
  if is_original_wan(state_dict):
    state_dict = state_dict.renamed(_original_to_diffusers)
  targets = reference_targets(cfg)
  common.check_plan(targets, state_dict, ignored=IGNORED_KEYS, component=COMPONENT)
  return targets, state_dict


def from_torch(state_dict, cfg: TransformerConfig, dtype=None):
  """Flat {name: array} (diffusers or original Wan names) → a2jax params (nested dict of numpy)."""
  return common.convert_in_memory(plan, state_dict, cfg, dtype)
