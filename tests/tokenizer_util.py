"""A tiny umT5-style tokenizer built inside the tests (nothing is downloaded).

A unigram sentencepiece model is trained on a few sentences and wrapped as a transformers
`T5Tokenizer` (ids: <pad> 0, </s> 1, <unk> 2, like umT5). With transformers 5 the wrapper is built
from the trained model's (piece, score) list: `T5Tokenizer(vocab_file=…)` silently yields a
4-token vocabulary.
"""

from __future__ import annotations

import os

from convert_weights import tiny_release

SENTENCES = (
    "A woman in a red coat walks her dog through a snowy park at dusk.",
    "Two children build a sandcastle on the beach while waves roll in.",
    "A man plays the guitar on a crowded street corner, people stop to listen.",
    "The camera slowly pans across a quiet lake surrounded by pine trees.",
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings.",
    "Worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers.",
    "Un chat noir dort sur le rebord de la fenêtre au soleil du matin.",
    "Ein Radfahrer fährt durch die Altstadt, die Glocken läuten.",
    "Una mujer baila flamenco en un escenario iluminado por velas.",
    "Poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers.",
    "Still picture, messy background, three legs, many people in the background, walking backwards.",
    "A cup of hot coffee steams on a wooden table next to an open book.",
)


def build_tiny_tokenizer(folder: str | os.PathLike, vocab_size: int = 128):
  """Trains a `vocab_size`-piece unigram model on SENTENCES, saves it as a T5 tokenizer in
  `folder`; returns it. The vocabulary keeps umT5's special ids (<pad> 0, </s> 1, <unk> 2) and
  has no extra ids, so every id is below `vocab_size` (the tiny encoder's embedding size)."""
  return tiny_release.build_tokenizer(folder, vocab_size, SENTENCES)
