"""UMT5Encoder vs transformers `UMT5EncoderModel`; the umT5 converter (both name sets, CLI, errors);
full-size parameter count and sharding without memory.

Tolerances (float32): one layer max|Δ| ≤ 1e-5·max|ref|, whole encoder ≤ 1e-4·max|ref|; bfloat16
compute vs the float32 reference: relative L2 ≤ 2e-2. Every position is compared, padded ones
included (both implementations compute them the same way: queries at padded positions attend the
unpadded keys); `a2jax.text.encode_prompt` zeroes them (tests/test_text.py).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from a2jax import checkpoints, configs, sharding
from a2jax.configs import UMT5Config
from a2jax.errors import ConfigError, ConversionError
from a2jax.models import umt5
from convert_weights import cli
from convert_weights import umt5 as conv
from parity import max_rel_err, randomize_torch_, rel_l2_err, state_dict_numpy

# Several layers and heads, sequence (160) longer than the max distance (128): every bucket is used.
TINY = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
            relative_attention_num_buckets=32, relative_attention_max_distance=128)
LENGTHS = (160, 97, 5)


def torch_encoder(seed=0, **overrides):
  from transformers import UMT5Config as TorchConfig, UMT5EncoderModel
  model = UMT5EncoderModel(TorchConfig(**{**TINY, **overrides}, dropout_rate=0.0)).eval()
  randomize_torch_(model, seed=seed, scale=0.3)
  return model


def config_of(model, **a2jax_fields) -> UMT5Config:
  return UMT5Config.from_dict(json.loads(model.config.to_json_string()), **a2jax_fields)


def inputs(vocab, lengths=LENGTHS, seed=0):
  length = max(lengths)
  ids = np.random.default_rng(seed).integers(0, vocab, (len(lengths), length))
  mask = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
  return ids, mask


def torch_forward(model, ids, mask):
  with torch.no_grad():
    return model(torch.from_numpy(ids), torch.from_numpy(mask)).last_hidden_state.float().numpy()


@pytest.fixture(scope="module")
def reference():
  model = torch_encoder()
  ids, mask = inputs(TINY["vocab_size"])
  return model, ids, mask, torch_forward(model, ids, mask)


# ---------------------------------------------------------------------------------------------
# Config and relative positions.


def test_config_from_saved_config_json(tmp_path):
  from transformers import UMT5Config as TorchConfig
  TorchConfig(**TINY).save_pretrained(tmp_path)
  raw = json.loads((tmp_path / "config.json").read_text())
  assert {"num_decoder_layers", "use_cache", "tie_word_embeddings", "pad_token_id",
          "dense_act_fn", "is_gated_act"} <= set(raw)
  cfg = UMT5Config.from_dict(raw)
  assert {k: getattr(cfg, k) for k in TINY} == TINY
  # keys of the release's text_encoder/config.json (written by transformers 4.x)
  release = {**raw, "scalable_attention": True, "output_past": True, "tokenizer_class": "T5Tokenizer",
             "torch_dtype": "float32", "architectures": ["UMT5EncoderModel"]}
  assert UMT5Config.from_dict(release) == cfg
  with pytest.raises(ConfigError, match="unknown key"):
    UMT5Config.from_dict({**raw, "rope_theta": 1.0})
  with pytest.raises(ConfigError, match="feed_forward_proj"):
    UMT5Config.from_dict({**raw, "feed_forward_proj": "relu"})
  with pytest.raises(ConfigError, match="relative_attention_num_buckets"):
    UMT5Config.from_dict({**raw, "relative_attention_num_buckets": 3})
  with pytest.raises(ConfigError, match="relative_attention_max_distance"):
    UMT5Config.from_dict({**raw, "relative_attention_max_distance": 8})


def test_presets_load():
  for name in ("tiny", "a2_14b"):
    cfg = configs.load(name).umt5
    assert cfg.feed_forward_proj == "gated-gelu" and cfg.max_length == 512


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 20), (8, 64)])
def test_relative_position_buckets_equal_reference(num_buckets, max_distance):
  model = torch_encoder(relative_attention_num_buckets=num_buckets,
                        relative_attention_max_distance=max_distance, num_layers=1)
  attn = model.encoder.block[0].layer[0].SelfAttention
  length = 600
  position = torch.arange(length)
  ref = attn._relative_position_bucket(position[None, :] - position[:, None]).numpy()
  got = umt5.relative_position_buckets(length, num_buckets, max_distance)
  np.testing.assert_array_equal(got, ref)
  # every bucket is reached except the first of the "key after query" half (distance 0 is "before")
  assert set(np.unique(got)) == set(range(num_buckets)) - {num_buckets // 2}


# ---------------------------------------------------------------------------------------------
# Parity.


def test_single_layer_parity(reference):
  """One block (attention with this layer's bias and the key mask, gated-gelu FFN) ≤ 1e-5."""
  from transformers.masking_utils import create_bidirectional_mask
  model, _, mask, _ = reference
  cfg = config_of(model)
  x = np.random.default_rng(1).normal(size=(len(LENGTHS), max(LENGTHS), cfg.d_model)).astype(np.float32)
  params = conv.from_torch(state_dict_numpy(model), cfg)
  buckets = umt5.relative_position_buckets(x.shape[1], cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)
  for i in (0, cfg.num_layers - 1):
    block = jax.tree.map(lambda a, i=i: a[i], params["encoder"]["block"])
    got, _ = umt5.UMT5Block(cfg).apply({"params": block}, x, buckets, mask.astype(bool))
    with torch.no_grad():
      xt = torch.from_numpy(x)
      mask4 = create_bidirectional_mask(config=model.config, inputs_embeds=xt,
                                        attention_mask=torch.from_numpy(mask))
      ref = model.encoder.block[i](xt, mask4).numpy()
    err = max_rel_err(got, ref)
    assert err <= 1e-5, f"layer {i}: {err:.2e}"


def test_encoder_parity_float32(reference):
  model, ids, mask, ref = reference
  cfg = config_of(model)
  got = jax.jit(umt5.UMT5Encoder(cfg).apply)({"params": conv.from_torch(state_dict_numpy(model), cfg)},
                                               ids, mask)
  assert got.shape == ref.shape and got.dtype == jnp.float32
  err = max_rel_err(got, ref)
  assert err <= 1e-4, f"max|Δ|/max|ref| = {err:.2e}"


def fan_in_scaled_encoder(seed=0):
  """Random weights at the scale T5 is initialised and trained at: Linear ~ N(0, 1/fan_in), q also
  × d_kv^-½ (T5 folds attention's 1/√d into q), norms 1 + N(0, 0.1²), tables N(0, 1).

  The float32 tests use N(0, 0.3²) everywhere, whose logits are ~√d_kv times larger: softmax is
  then so sharp that merely rounding the weights to bfloat16 moves the float32 output by ~5e-2
  (transformers' own bfloat16 run of that model is 8e-2 off), which measures the random model,
  not the bfloat16 path.
  """
  model = torch_encoder(seed=seed)
  randomize_torch_(model, seed=seed, scale=1.0)
  with torch.no_grad():
    for name, module in model.named_modules():
      if isinstance(module, torch.nn.Linear):
        q_fold = TINY["d_kv"] ** -0.5 if name.endswith(".q") else 1.0
        module.weight.mul_(module.weight.shape[1] ** -0.5 * q_fold)
  return model


@pytest.mark.parametrize("param_dtype", ["bfloat16", "float32"])
def test_encoder_parity_bfloat16(param_dtype):
  """bfloat16 matmuls (and bfloat16 params: the release preset) vs the float32 reference."""
  model = fan_in_scaled_encoder()
  ids, mask = inputs(TINY["vocab_size"])
  ref = torch_forward(model, ids, mask)
  cfg = config_of(model, dtype="bfloat16", param_dtype=param_dtype)
  params = conv.from_torch(state_dict_numpy(model), cfg)
  assert params["encoder"]["block"]["layer_0"]["SelfAttention"]["q"]["kernel"].dtype == param_dtype
  got = jax.jit(umt5.UMT5Encoder(cfg).apply)({"params": params}, ids, mask)
  assert got.dtype == jnp.bfloat16
  err = rel_l2_err(np.asarray(got, np.float32), ref)
  assert err <= 2e-2, f"relative L2 = {err:.2e}"


# ---------------------------------------------------------------------------------------------
# Converter.

_TO_WAN = (  # transformers name (regex) -> original Wan name, the inverse of the converter's table
    (r"shared\.weight", "token_embedding.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"blocks.\1.norm1.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight", r"blocks.\1.attn.\2.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
     r"blocks.\1.pos_embedding.embedding.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"blocks.\1.norm2.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight", r"blocks.\1.ffn.gate.0.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight", r"blocks.\1.ffn.fc1.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight", r"blocks.\1.ffn.fc2.weight"),
    (r"encoder\.final_layer_norm\.weight", "norm.weight"),
)


def wan_names(state_dict):
  from convert_weights.common import regex_renamer
  rename = regex_renamer(_TO_WAN)
  renamed = {rename(k): v for k, v in state_dict.items() if k != "encoder.embed_tokens.weight"}
  assert len(renamed) == len(state_dict) - 1 and not any(k.startswith("encoder.") for k in renamed)
  return renamed


def assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_converter_name_sets(reference):
  model = reference[0]
  cfg = config_of(model)
  sd = state_dict_numpy(model)
  assert "encoder.embed_tokens.weight" in sd and "shared.weight" in sd
  params = conv.from_torch(sd, cfg)
  abstract = conv.init_abstract(cfg)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(
      lambda a: (a.shape, np.dtype(a.dtype)), abstract)
  block = params["encoder"]["block"]
  np.testing.assert_array_equal(block["layer_0"]["SelfAttention"]["q"]["kernel"][1],
                                sd["encoder.block.1.layer.0.SelfAttention.q.weight"].T)
  np.testing.assert_array_equal(
      block["layer_0"]["SelfAttention"]["relative_attention_bias"]["embedding"][2],
      sd["encoder.block.2.layer.0.SelfAttention.relative_attention_bias.weight"])
  np.testing.assert_array_equal(params["shared"]["embedding"], sd["shared.weight"])
  # only the tied copy (what some exporters keep), and the original Wan names
  only_tied = {k: v for k, v in sd.items() if k != "shared.weight"}
  assert_same_tree(conv.from_torch(only_tied, cfg), params)
  assert_same_tree(conv.from_torch(wan_names(sd), cfg), params)


def test_converter_errors(reference):
  model = reference[0]
  cfg = config_of(model)
  sd = state_dict_numpy(model)
  missing = {k: v for k, v in sd.items() if k != "encoder.block.1.layer.1.DenseReluDense.wo.weight"}
  with pytest.raises(ConversionError, match=r"missing: encoder\.block\.1\.layer\.1\.DenseReluDense\.wo"):
    conv.from_torch(missing, cfg)
  with pytest.raises(ConversionError, match=r"unexpected: encoder\.block\.0\.layer\.2"):
    conv.from_torch({**sd, "encoder.block.0.layer.2.layer_norm.weight": np.ones(32, np.float32)}, cfg)
  bad = {**sd, "encoder.block.0.layer.0.SelfAttention.k.weight": np.zeros((32, 33), np.float32)}
  with pytest.raises(ConversionError, match=r"mis-shaped: encoder\.block\.0\.layer\.0\.SelfAttention\.k"):
    conv.from_torch(bad, cfg)
  with pytest.raises(ConversionError, match="tied copy"):
    conv.from_torch({**sd, "encoder.embed_tokens.weight": np.zeros((8, 32), np.float32)}, cfg)
  with pytest.raises(ConversionError, match="missing"):  # a config with more layers than the weights
    conv.from_torch(sd, config_of(model, num_layers=4))


def test_cli_round_trip_and_errors(reference, tmp_path):
  """save_pretrained (release layout: text_encoder/ + tokenizer/) → CLI → orbax → same outputs."""
  from tokenizer_util import build_tiny_tokenizer
  model, ids, mask, ref = reference
  release = tmp_path / "release"
  model.save_pretrained(release / "text_encoder")
  build_tiny_tokenizer(release / "tokenizer", vocab_size=TINY["vocab_size"])
  dst = tmp_path / "a2jax"
  assert cli.main(["umt5", "--src", str(release / "text_encoder"), "--dst", str(dst),
                   "--no-progress"]) == 0
  cfg = checkpoints.read_config(dst).umt5
  assert cfg == config_of(model)
  assert (dst / "tokenizer" / "tokenizer.json").is_file()
  params = checkpoints.load_params(dst / "umt5", conv.init_abstract(cfg))
  got = jax.jit(umt5.UMT5Encoder(cfg).apply)({"params": params}, ids, mask)
  assert max_rel_err(got, ref) <= 1e-4

  # the original Wan .pth (no config.json: the preset section plus overrides describe the model)
  torch.save({k: torch.from_numpy(v) for k, v in wan_names(state_dict_numpy(model)).items()},
             tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
  overrides = [f"{k}={v}" for k, v in TINY.items()] + ["param_dtype=float32"]
  dst_wan = tmp_path / "a2jax_wan"
  assert cli.main(["umt5", *overrides, "--src", str(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"),
                   "--dst", str(dst_wan), "--config", "tiny", "--no-progress"]) == 0
  assert_same_tree(checkpoints.load_params(dst_wan / "umt5", conv.init_abstract(cfg)), params)

  # errors: nothing is left behind (neither the destination nor a partial folder)
  sd = state_dict_numpy(model)
  sd.pop("encoder.embed_tokens.weight")
  cases = {
      "missing": {k: v for k, v in sd.items() if k != "encoder.final_layer_norm.weight"},
      "extra": {**sd, "encoder.block.0.layer.0.SelfAttention.q.bias": np.zeros(32, np.float32)},
      "shape": {**sd, "encoder.final_layer_norm.weight": np.ones(31, np.float32)},
  }
  for name, bad in cases.items():
    src = tmp_path / name / "text_encoder"
    src.mkdir(parents=True)
    (src / "config.json").write_text(model.config.to_json_string())
    save_file(bad, src / "model.safetensors")
    out = tmp_path / f"out_{name}"
    assert cli.main(["umt5", "--src", str(src), "--dst", str(out), "--no-progress"]) == 2, name
    assert not out.exists() and not list(tmp_path.glob(f".out_{name}*")), name
  truncated = tmp_path / "truncated" / "text_encoder"
  truncated.mkdir(parents=True)
  (truncated / "config.json").write_text(model.config.to_json_string())
  data = (release / "text_encoder" / "model.safetensors").read_bytes()
  (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
  out = tmp_path / "out_truncated"
  assert cli.main(["umt5", "--src", str(truncated), "--dst", str(out), "--no-progress"]) == 2
  assert not out.exists() and not list(tmp_path.glob(".out_truncated*"))


# ---------------------------------------------------------------------------------------------
# Full size, without memory.


def test_full_size_parameter_count_equals_reference():
  from transformers import UMT5Config as TorchConfig, UMT5EncoderModel
  cfg = configs.load("a2_14b").umt5
  ours = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(conv.init_abstract(cfg)))
  torch_cfg = TorchConfig(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv,
                          d_ff=cfg.d_ff, num_layers=cfg.num_layers, num_heads=cfg.num_heads)
  with torch.device("meta"):
    ref = sum(p.numel() for p in UMT5EncoderModel(torch_cfg).parameters())
  assert ours == ref
  assert 5.6e9 < ours < 5.7e9


def test_full_size_shards_over_fsdp_and_tensor():
  cfg = configs.load("a2_14b").umt5
  mesh = sharding.make_mesh(configs.MeshConfig(data=1, fsdp=4, context=1, tensor=2))
  boxed = umt5.init_abstract_boxed(cfg)
  assert sharding.missing_logical_names(boxed) == []
  abstract, shardings = sharding.unboxed_shardings(boxed, mesh)
  fraction = sharding.check_replication(abstract, shardings, mesh)
  assert fraction < 1e-3
  q = shardings["encoder"]["block"]["layer_0"]["SelfAttention"]["q"]["kernel"].spec
  assert tuple(q) == (None, "fsdp", "tensor")
  assert tuple(shardings["shared"]["embedding"].spec) == ("tensor", "fsdp")
