"""Prompts → umT5 text embeddings, as the release does it.

`prompt_clean` (ftfy, html unescape twice, whitespace collapse) → umT5 tokenizer (padding and
truncation to `max_length`, 512 in the release) → `UMT5Encoder` with the attention mask → every
position at or past the prompt's true length set to zero (B, max_length, d_model).
"""

from __future__ import annotations

import functools
import html
import io
import os
import pathlib
import re
from typing import Any, Iterable, Sequence

import ftfy
import jax
import jax.numpy as jnp
import numpy as np

from a2jax.configs import UMT5Config
from a2jax.errors import InputError
from a2jax.models.umt5 import UMT5Encoder


def prompt_clean(text: str) -> str:
  """ftfy.fix_text, html.unescape twice, runs of whitespace → one space, strip (diffusers' Wan)."""
  text = html.unescape(html.unescape(ftfy.fix_text(text)))
  return re.sub(r"\s+", " ", text).strip()


def load_tokenizer(folder: str | os.PathLike):
  """The umT5 tokenizer saved in a local folder (the release's `tokenizer/`); never a hub id."""
  from transformers import AutoTokenizer
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise InputError(f"tokenizer folder {folder} does not exist: pass the converted folder's "
                     "tokenizer/ (copied by python -m convert_weights umt5)")
  return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def train_tokenizer(folder: str | os.PathLike, sentences: Iterable[str], vocab_size: int,
                    **trainer_options):
  """Trains a sentencepiece model on `sentences` and saves it in `folder` as a T5 tokenizer with
  umT5's special ids (<pad> 0, </s> 1, <unk> 2); returns the tokenizer. `trainer_options` go to
  `SentencePieceTrainer.train` (model_type, …). transformers 5 needs the (piece, score) list:
  `T5Tokenizer(vocab_file=…)` silently yields a 4-token vocabulary."""
  import sentencepiece as spm
  from transformers import T5Tokenizer
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=proto, vocab_size=vocab_size, pad_id=0,
      eos_id=1, unk_id=2, bos_id=-1, minloglevel=2, **trainer_options)
  sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
  tokenizer = T5Tokenizer(vocab=[(sp.id_to_piece(i), sp.get_score(i))
                                 for i in range(sp.get_piece_size())], extra_ids=0)
  tokenizer.save_pretrained(str(folder))
  return tokenizer


def tokenize(tokenizer, prompts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Cleaned prompts → (ids (B, max_length) int32, mask (B, max_length) int32), padded and
  truncated to `max_length` with the end-of-sequence token kept."""
  out = tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=max_length,
                  truncation=True, add_special_tokens=True, return_attention_mask=True,
                  return_tensors="np")
  return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def encode_ids(params: Any, ids: jax.Array, mask: jax.Array, cfg: UMT5Config) -> jax.Array:
  """(B, L) ids and mask → (B, L, d_model), zero at and past each prompt's length."""
  hidden = UMT5Encoder(cfg).apply({"params": params}, ids, mask)
  length = jnp.sum(mask > 0, axis=1)
  keep = jnp.arange(ids.shape[1])[None, :] < length[:, None]
  return jnp.where(keep[..., None], hidden, jnp.zeros((), hidden.dtype))


def encode_prompt(params: Any, cfg: UMT5Config, tokenizer, prompts: str | Sequence[str],
                  negative_prompts: str | Sequence[str] | None = None
                  ) -> tuple[jax.Array, jax.Array | None]:
  """Text embeddings of prompts and negative prompts: ((B, L, d), (B, L, d) or None), L = max_length.

  `params` may be sharded (committed arrays keep their shardings inside the jit). A single
  negative prompt is repeated for every prompt. Both sets run as one batch.
  """
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  if not prompts:
    raise InputError("encode_prompt got no prompts: pass at least one string")
  if negative_prompts is None:
    negatives = []
  else:
    negatives = [negative_prompts] if isinstance(negative_prompts, str) else list(negative_prompts)
    if len(negatives) == 1:
      negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
      raise InputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: pass one "
                       "negative prompt, or one per prompt")
  ids, mask = tokenize(tokenizer, prompts + negatives, cfg.max_length)
  text = encode_ids(params, ids, mask, cfg)
  b = len(prompts)
  return text[:b], (text[b:] if negatives else None)
