"""Prompt cleaning, tokenisation and `encode_prompt` vs the diffusers Wan pipeline's own text path
(`prompt_clean` → umT5 tokenizer → `UMT5EncoderModel` → zeroed tail), with a tokenizer trained here.

Tolerance (float32, every position): max|Δ| ≤ 1e-4·max|ref|; positions at or past each prompt's
length must be exactly zero.
"""

import dataclasses
import types

import jax
import numpy as np
import pytest
import torch

from a2jax import configs, sharding, text
from a2jax.errors import InputError
from a2jax.models import umt5
from convert_weights import umt5 as conv
from parity import max_rel_err, randomize_torch_, state_dict_numpy
from tokenizer_util import build_tiny_tokenizer

VOCAB = 128
MAX_LENGTH = 48
PROMPTS = [
    "  A woman in a red coat\twalks her dog through a  snowy park at dusk.\n",
    "Un chat noir dort sur le rebord de la fenêtre &amp;amp; the camera slowly pans.",
    # longer than MAX_LENGTH tokens: truncated, the end-of-sequence token kept
    " ".join(["Two children build a sandcastle on the beach while waves roll in."] * 5),
]
NEGATIVE = "Bright tones, overexposed, static, blurred details, subtitles, ugly, extra fingers"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from transformers import UMT5Config as TorchConfig, UMT5EncoderModel
  folder = tmp_path_factory.mktemp("tokenizer")
  build_tiny_tokenizer(folder, VOCAB)
  tokenizer = text.load_tokenizer(folder)
  model = UMT5EncoderModel(TorchConfig(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                       num_heads=4, dropout_rate=0.0)).eval()
  randomize_torch_(model, seed=3, scale=0.3)
  cfg = dataclasses.replace(configs.load("tiny").umt5, max_length=MAX_LENGTH)
  params = conv.from_torch(state_dict_numpy(model), cfg)
  return tokenizer, model, cfg, params


def reference_embeds(tokenizer, model, prompts):
  """diffusers' own `WanImageToVideoPipeline._get_t5_prompt_embeds` on the torch encoder."""
  from diffusers.pipelines.wan.pipeline_wan_i2v import WanImageToVideoPipeline
  pipe = types.SimpleNamespace(tokenizer=tokenizer, text_encoder=model)
  with torch.no_grad():
    return WanImageToVideoPipeline._get_t5_prompt_embeds(
        pipe, prompts, max_sequence_length=MAX_LENGTH, device=torch.device("cpu"),
        dtype=torch.float32).numpy()


def test_prompt_clean_equals_diffusers():
  from diffusers.pipelines.wan.pipeline_wan_i2v import prompt_clean as reference
  cases = ["  a &amp;amp; b\n\t c  ", "cafÃ© au lait", "&lt;b&gt;bold&lt;/b&gt;", "", "\u3000全角\u3000",
           *PROMPTS, NEGATIVE]
  for case in cases:
    assert text.prompt_clean(case) == reference(case)
  assert text.prompt_clean("  a &amp;amp; b\n\t c  ") == "a & b c"
  assert text.prompt_clean("cafÃ© au lait") == "café au lait"


def test_tokenize(setup):
  tokenizer = setup[0]
  ids, mask = text.tokenize(tokenizer, PROMPTS, MAX_LENGTH)
  assert ids.shape == mask.shape == (len(PROMPTS), MAX_LENGTH) and ids.dtype == np.int32
  lengths = mask.sum(1)
  assert lengths[2] == MAX_LENGTH and 0 < lengths[0] < MAX_LENGTH  # truncated, padded
  for row, n in zip(ids, lengths):
    assert row[n - 1] == tokenizer.eos_token_id and (row[n:] == tokenizer.pad_token_id).all()
  assert (mask[:, :-1] >= mask[:, 1:]).all()  # right padding: the mask is a prefix
  expected = tokenizer([text.prompt_clean(p) for p in PROMPTS], padding="max_length",
                       max_length=MAX_LENGTH, truncation=True)["input_ids"]
  np.testing.assert_array_equal(ids, expected)


def test_encode_prompt_equals_diffusers_text_path(setup):
  tokenizer, model, cfg, params = setup
  got, negative = text.encode_prompt(params, cfg, tokenizer, PROMPTS, NEGATIVE)
  ref = reference_embeds(tokenizer, model, PROMPTS)
  ref_negative = reference_embeds(tokenizer, model, [NEGATIVE] * len(PROMPTS))
  assert got.shape == ref.shape == (len(PROMPTS), MAX_LENGTH, cfg.d_model)
  err = max_rel_err(got, ref)
  assert err <= 1e-4, f"prompts: {err:.2e}"
  err = max_rel_err(negative, ref_negative)
  assert err <= 1e-4, f"negative prompts: {err:.2e}"
  _, mask = text.tokenize(tokenizer, PROMPTS, MAX_LENGTH)
  got = np.asarray(got)
  for row, n in zip(got, mask.sum(1)):
    assert (row[n:] == 0).all() and (np.abs(row[:n]).sum(-1) > 0).all()
  only, none = text.encode_prompt(params, cfg, tokenizer, PROMPTS[0])
  assert none is None
  np.testing.assert_allclose(np.asarray(only)[0], got[0], rtol=0, atol=1e-5 * np.abs(got).max())


def test_encode_prompt_with_sharded_params(setup):
  """Params sharded over fsdp=4 × tensor=2 (8 simulated devices) give the unsharded numbers."""
  tokenizer, _, cfg, params = setup
  mesh = sharding.make_mesh(configs.MeshConfig(data=1, fsdp=4, context=1, tensor=2))
  abstract, shardings = sharding.unboxed_shardings(umt5.init_abstract_boxed(cfg), mesh)
  sharded = sharding.put(params, shardings)
  q = sharded["encoder"]["block"]["layer_0"]["SelfAttention"]["q"]["kernel"]
  assert len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated
  with jax.set_mesh(mesh):
    got, _ = text.encode_prompt(sharded, cfg, tokenizer, PROMPTS)
  ref, _ = text.encode_prompt(params, cfg, tokenizer, PROMPTS)
  assert max_rel_err(got, ref) <= 1e-5


def test_input_errors(setup, tmp_path):
  tokenizer, _, cfg, params = setup
  with pytest.raises(InputError, match="negative prompts"):
    text.encode_prompt(params, cfg, tokenizer, PROMPTS, [NEGATIVE, NEGATIVE])
  with pytest.raises(InputError, match="no prompts"):
    text.encode_prompt(params, cfg, tokenizer, [])
  with pytest.raises(InputError, match="does not exist"):
    text.load_tokenizer(tmp_path / "nowhere")
