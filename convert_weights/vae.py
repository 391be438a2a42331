"""Wan VAE weights: diffusers `AutoencoderKLWan` names, or the original `Wan2.1_VAE.pth` names.

The map is structural: a2jax module paths are the diffusers names with `_N` for `.N`
(`encoder.down_blocks_3.resample_1` ← `encoder.down_blocks.3.resample.1`). Two layout changes:
Conv kernels (out, in, *k) → (*k, in, out), and the RMS-norm gains (C, 1, 1[, 1]) → (C,).
`original_wan_rules(cfg)` renames the original Wan2.1 keys to diffusers names (the same map as
diffusers' single-file loader, with the decoder's flat `upsamples.N` index derived from the config).
"""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn

from a2jax.configs import VAEConfig
from a2jax.models import vae as model
from convert_weights import common

COMPONENT = "vae"
CONFIG_CLASS = VAEConfig
WEIGHTS_PREFIX = "diffusion_pytorch_model"

_INDEX = re.compile(r"_(\d+)(?=\.|$)")  # a2jax `down_blocks_3` ↔ diffusers `down_blocks.3`

# Inside a residual block of the original code: residual.{0 norm1, 2 conv1, 3 norm2, 6 conv2}.
_ORIGINAL_RESIDUAL_RULES = (
    (r"(.+)\.residual\.0\.gamma", r"\1.norm1.gamma"),
    (r"(.+)\.residual\.2\.(\w+)", r"\1.conv1.\2"),
    (r"(.+)\.residual\.3\.gamma", r"\1.norm2.gamma"),
    (r"(.+)\.residual\.6\.(\w+)", r"\1.conv2.\2"),
    (r"(.+)\.shortcut\.(\w+)", r"\1.conv_shortcut.\2"),
)


def original_wan_rules(cfg: VAEConfig) -> tuple[tuple[str, str], ...]:
  """Block-level renames (regex, full match) original Wan2.1 → diffusers for this config."""
  rules = [
      (r"(encoder|decoder)\.conv1\.(\w+)", r"\1.conv_in.\2"),
      (r"conv1\.(\w+)", r"quant_conv.\1"),
      (r"conv2\.(\w+)", r"post_quant_conv.\1"),
      (r"(encoder|decoder)\.head\.0\.gamma", r"\1.norm_out.gamma"),
      (r"(encoder|decoder)\.head\.2\.(\w+)", r"\1.conv_out.\2"),
      (r"(encoder|decoder)\.middle\.0\.(.+)", r"\1.mid_block.resnets.0.\2"),
      (r"(encoder|decoder)\.middle\.1\.(.+)", r"\1.mid_block.attentions.0.\2"),
      (r"(encoder|decoder)\.middle\.2\.(.+)", r"\1.mid_block.resnets.1.\2"),
      (r"encoder\.downsamples\.(\d+)\.(.+)", r"encoder.down_blocks.\1.\2"),
  ]
  # The original decoder is flat: per level, num_res_blocks + 1 resnets, then the upsampler.
  n = 0
  for i in range(len(cfg.dim_mult)):
    for j in range(cfg.num_res_blocks + 1):
      rules.append((rf"decoder\.upsamples\.{n}\.(.+)", rf"decoder.up_blocks.{i}.resnets.{j}.\1"))
      n += 1
    if i != len(cfg.dim_mult) - 1:
      rules.append((rf"decoder\.upsamples\.{n}\.(.+)", rf"decoder.up_blocks.{i}.upsamplers.0.\1"))
      n += 1
  return tuple(rules)


def is_original_wan(names) -> bool:
  return any(k.startswith(("encoder.downsamples.", "decoder.upsamples.", "encoder.middle."))
             for k in names)


def init_abstract(cfg: VAEConfig):
  return nn.meta.unbox(model.init_abstract_boxed(cfg))


def _diffusers_target(t: common.Target) -> common.Target:
  """Spells the sources with `.N`; gains come from (C, 1, 1) (attention) or (C, 1, 1, 1) tensors."""
  t = dataclasses.replace(t, sources=tuple(_INDEX.sub(r".\1", s) for s in t.sources))
  if t.path[-1] == "gamma":
    ones = (1, 1) if ".attentions." in t.sources[0] else (1, 1, 1)
    shape = t.source_shape + ones
    t = dataclasses.replace(t, source_shape=shape, layout=lambda a: a.reshape(-1),
                            to_source=lambda a: a.reshape(shape))
  return t


def reference_targets(cfg: VAEConfig) -> list[common.Target]:
  """Targets of every a2jax leaf, sourced from diffusers names (conversion and export)."""
  return [_diffusers_target(t)
          for t in common.structural_targets(init_abstract(cfg), stacked_prefixes={})]


# a2jax's own config fields (not in diffusers' config.json) and the header diffusers writes.
A2JAX_FIELDS = ("param_dtype", "dtype", "tiling", "tile_sample_min_height", "tile_sample_min_width",
                "tile_sample_stride_height", "tile_sample_stride_width", "attention")
CONFIG_HEADER = {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.42.1"}


def reference_config(cfg: VAEConfig) -> dict:
  """diffusers' `config.json` of this config (what `AutoencoderKLWan.from_pretrained` reads)."""
  return common.reference_config(cfg, A2JAX_FIELDS, CONFIG_HEADER)


def plan(state_dict: common.LazyStateDict, cfg: VAEConfig):
  """Targets for every a2jax leaf, after renaming original-Wan keys; strict key checks."""
  if is_original_wan(state_dict):
    blocks = common.regex_renamer(original_wan_rules(cfg))
    residual = common.regex_renamer(_ORIGINAL_RESIDUAL_RULES)
    state_dict = state_dict.renamed(lambda k: residual(blocks(k)))
  targets = reference_targets(cfg)
  common.check_plan(targets, state_dict, component=COMPONENT)
  return targets, state_dict


def from_torch(state_dict, cfg: VAEConfig, dtype=None):
  """Flat {name: array} (diffusers or original Wan names) → a2jax params (nested dict of numpy)."""
  return common.convert_in_memory(plan, state_dict, cfg, dtype)
