"""umT5 encoder weights → a2jax `UMT5Encoder` params.

Two name sets are accepted:
- transformers `UMT5EncoderModel` (the release's `text_encoder/`): `shared.weight`,
  `encoder.block.N.layer.0.SelfAttention.{q,k,v,o,relative_attention_bias}.weight`, … The map is
  structural; the only rename is `layer_0` / `layer_1` ↔ `layer.0` / `layer.1`.
- the original Wan `models_t5_umt5-xxl-enc-bf16.pth` (`token_embedding.weight`, `blocks.N.attn.q.weight`,
  …), renamed onto the transformers names by one regex table.

Tied embedding: transformers ties `encoder.embed_tokens.weight` to `shared.weight` (the loaded model
uses `shared` for both). `shared.weight` is used when present and a copy under
`encoder.embed_tokens.weight` is accepted unread (its shape must match); when only
`encoder.embed_tokens.weight` is present, it is used as `shared`.
"""

from __future__ import annotations

import flax.linen as nn

from a2jax.configs import UMT5Config
from a2jax.errors import ConversionError
from a2jax.models import umt5 as model
from convert_weights import common
from convert_weights.common import (LazyStateDict, Target, check_plan, convert_in_memory,
                                    regex_renamer, sorted_renames, structural_targets)

COMPONENT = "umt5"
CONFIG_CLASS = UMT5Config
# The tokenizer folder of the release, copied beside the converted weights under the same name.
EXTRA_FILES = ("tokenizer",)
WEIGHTS_PREFIX = "model"

_SHARED, _TIED = "shared.weight", "encoder.embed_tokens.weight"

# original Wan (models/t5.py) names -> transformers names
_WAN_RULES = (
    (r"token_embedding\.weight", _SHARED),
    (r"blocks\.(\d+)\.norm1\.weight", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"blocks\.(\d+)\.attn\.([qkvo])\.weight", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (r"blocks\.(\d+)\.pos_embedding\.embedding\.weight",
     r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight"),
    (r"blocks\.(\d+)\.norm2\.weight", r"encoder.block.\1.layer.1.layer_norm.weight"),
    (r"blocks\.(\d+)\.ffn\.gate\.0\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
    (r"blocks\.(\d+)\.ffn\.fc1\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (r"blocks\.(\d+)\.ffn\.fc2\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
    (r"norm\.weight", "encoder.final_layer_norm.weight"),
)

_MODULE_RENAMES = sorted_renames({
    "encoder.block.layer_0": "encoder.block.layer.0",
    "encoder.block.layer_1": "encoder.block.layer.1",
})


def init_abstract(cfg: UMT5Config):
  """Abstract params (unboxed ShapeDtypeStructs) of `UMT5Encoder(cfg)`."""
  return nn.meta.unbox(model.init_abstract_boxed(cfg))


def reference_targets(cfg: UMT5Config) -> list[Target]:
  """Targets of every a2jax leaf, sourced from transformers names (conversion and export). Export
  writes `shared.weight` only, as `save_pretrained` does: transformers ties the encoder's
  `embed_tokens` to it on load (`tie_word_embeddings: true`)."""
  return structural_targets(init_abstract(cfg), stacked_prefixes={"encoder.block": "encoder.block.{i}"},
                            module_renames=_MODULE_RENAMES)


# a2jax's own config fields (not in transformers' config.json).
A2JAX_FIELDS = ("param_dtype", "dtype", "max_length")


def reference_config(cfg: UMT5Config) -> dict:
  """transformers' `config.json` of this config (what `UMT5EncoderModel.from_pretrained` reads)."""
  return common.reference_config(cfg, A2JAX_FIELDS, {
      "architectures": ["UMT5EncoderModel"], "model_type": "umt5", "transformers_version": "5.23.0",
      "tie_word_embeddings": True, "is_encoder_decoder": True, "decoder_start_token_id": 0,
      "pad_token_id": 0, "eos_token_id": 1})


def plan(state_dict: LazyStateDict, cfg: UMT5Config) -> tuple[list[Target], LazyStateDict]:
  """Targets of every a2jax leaf and the state dict under transformers names; raises
  ConversionError listing missing, unexpected and mis-shaped keys."""
  if "token_embedding.weight" in state_dict:  # the original Wan names
    state_dict = state_dict.renamed(regex_renamer(_WAN_RULES))
  if _SHARED not in state_dict and _TIED in state_dict:
    state_dict = state_dict.renamed(lambda k: _SHARED if k == _TIED else k)
  ignored = ()
  if _SHARED in state_dict and _TIED in state_dict:
    if tuple(state_dict.shape(_TIED)) != tuple(state_dict.shape(_SHARED)):
      raise ConversionError(f"{_TIED} {state_dict.shape(_TIED)} must be the tied copy of {_SHARED} "
                            f"{state_dict.shape(_SHARED)}: the checkpoint is inconsistent")
    ignored = (_TIED.replace(".", r"\."),)
  targets = reference_targets(cfg)
  check_plan(targets, state_dict, ignored=ignored, component=COMPONENT)
  return targets, state_dict


def from_torch(state_dict, cfg: UMT5Config, dtype=None):
  """Flat {name: array} (transformers or original Wan names) → a2jax params (nested numpy dict),
  in `dtype` (default: the config's param_dtype)."""
  return convert_in_memory(plan, state_dict, cfg, dtype)
