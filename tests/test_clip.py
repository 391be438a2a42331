"""CLIPVisionEncoder against transformers' CLIPVisionModel, its converter (transformers and original
Wan names), the CLI round trip, and the full-size parameter count.

Tolerances: float32 max|Δ| ≤ 1e-4·max|ref| for the model, ≤ 1e-5 for a single layer; bfloat16
compute relative L2 ≤ 2e-2 against the float32 reference.
"""

import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from a2jax import checkpoints, configs, sharding
from a2jax.configs import CLIPConfig
from a2jax.errors import ConfigError, ConversionError
from a2jax.models import clip
from convert_weights import cli
from convert_weights import clip as convert
from convert_weights import common
from parity import max_rel_err, randomize_torch_, rel_l2_err, state_dict_numpy

REPO = pathlib.Path(__file__).resolve().parent.parent
# Small but with the real structure: 4 layers (the output is the penultimate), 4 heads, a 3×3 patch
# grid (S = 10 tokens), exact gelu like ViT-H, batch 2.
SMALL = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             image_size=42, patch_size=14, hidden_act="gelu", projection_dim=20)
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
             image_size=224, patch_size=14, hidden_act="gelu", projection_dim=1024)


def torch_config(**overrides):
  return transformers.CLIPVisionConfig(**{**SMALL, **overrides})


def a2_config(tmp_path, tc: transformers.CLIPVisionConfig, **a2jax_fields) -> CLIPConfig:
  """The a2jax config read from the config.json that transformers writes."""
  tc.save_pretrained(tmp_path / "cfg")
  return CLIPConfig.from_dict(json.loads((tmp_path / "cfg" / "config.json").read_text()),
                              **a2jax_fields)


@pytest.fixture(scope="module")
def reference():
  """A randomised CLIPVisionModelWithProjection (its `vision_model` is the CLIPVisionModel)."""
  model = transformers.CLIPVisionModelWithProjection(torch_config()).eval()
  randomize_torch_(model, seed=1)
  pixels = np.random.default_rng(0).normal(size=(2, 42, 42, 3)).astype(np.float32)
  with torch.no_grad():
    out = model(torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
  return model, pixels, out


def plain_sd(model) -> dict:
  """The CLIPVisionModel state dict (transformers 5 names, no prefix)."""
  return state_dict_numpy(model.vision_model)


def test_config_from_transformers_json(tmp_path):
  tc = transformers.CLIPVisionConfig(**VIT_H)
  cfg = a2_config(tmp_path, tc)
  assert cfg == CLIPConfig()  # the defaults are ViT-H/14
  raw = json.loads((tmp_path / "cfg" / "config.json").read_text())
  assert {"projection_dim", "initializer_factor", "attention_dropout"} <= set(raw)
  with pytest.raises(ConfigError, match="unknown key"):
    CLIPConfig.from_dict({**raw, "vision_layers": 3})
  with pytest.raises(ConfigError, match="penultimate"):
    CLIPConfig.from_dict({**raw, "num_hidden_layers": 1})
  for name in ("tiny", "a2_14b"):
    assert isinstance(configs.load(name).clip, CLIPConfig)


def test_parity_float32(tmp_path, reference):
  model, pixels, out = reference
  cfg = a2_config(tmp_path, model.config, with_projection=True)
  params = convert.from_torch(state_dict_numpy(model), cfg)
  penultimate = clip.CLIPVisionEncoder(cfg).apply({"params": params}, pixels)
  assert penultimate.shape == (2, 10, 48)
  assert max_rel_err(penultimate, out.hidden_states[-2].numpy()) <= 1e-4
  full = clip.CLIPVisionEncoder(cfg).apply({"params": params}, pixels, full_tower=True)
  with torch.no_grad():
    plain = model.vision_model(torch.from_numpy(pixels).permute(0, 3, 1, 2))
  assert max_rel_err(full["last_hidden_state"], plain.last_hidden_state.numpy()) <= 1e-4
  assert max_rel_err(full["pooler_output"], plain.pooler_output.numpy()) <= 1e-4
  assert max_rel_err(full["image_embeds"], out.image_embeds.numpy()) <= 1e-4


def test_sampling_path_skips_the_last_layer(tmp_path, reference):
  """NaN weights in the last layer change nothing on the sampling path: it is never run."""
  model, pixels, _ = reference
  cfg = a2_config(tmp_path, model.config)
  params = convert.from_torch(plain_sd(model), cfg)
  apply = jax.jit(clip.CLIPVisionEncoder(cfg).apply)
  layers = jax.tree.map(np.copy, params["encoder"]["layers"])
  for leaf in jax.tree.leaves(layers):
    leaf[-1] = np.nan
  poisoned = {**params, "encoder": {"layers": layers}}
  np.testing.assert_array_equal(apply({"params": poisoned}, pixels), apply({"params": params}, pixels))


def test_single_layer_float32(tmp_path):
  tc = torch_config()
  layer = transformers.models.clip.modeling_clip.CLIPEncoderLayer(tc).eval()
  randomize_torch_(layer, seed=2)
  x = np.random.default_rng(1).normal(size=(2, 10, 48)).astype(np.float32)
  with torch.no_grad():
    ref = layer(torch.from_numpy(x), None).numpy()
  module = clip.CLIPEncoderLayer(a2_config(tmp_path, tc))
  abstract = nn.meta.unbox(jax.eval_shape(
      lambda: module.init(jax.random.key(0), jnp.asarray(x), True))["params"])
  targets = common.structural_targets(abstract, stacked_prefixes={})
  params = common.nest(common.execute(targets, common.as_lazy(state_dict_numpy(layer)), np.float32))
  got = module.apply({"params": params}, jnp.asarray(x), method=clip.CLIPEncoderLayer.forward)
  assert max_rel_err(got, ref) <= 1e-5


def test_bfloat16_compute(tmp_path, reference):
  model, pixels, out = reference
  cfg = a2_config(tmp_path, model.config, dtype="bfloat16", param_dtype="bfloat16")
  params = convert.from_torch(plain_sd(model), cfg)
  assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
  got = clip.CLIPVisionEncoder(cfg).apply({"params": params}, pixels)
  assert got.dtype == jnp.bfloat16
  assert rel_l2_err(np.asarray(got, np.float32), out.hidden_states[-2].numpy()) <= 2e-2


def test_encode_references_concatenates_in_order(tmp_path, reference):
  model, pixels, _ = reference
  cfg = a2_config(tmp_path, model.config)
  params = convert.from_torch(plain_sd(model), cfg)
  refs = np.random.default_rng(3).normal(size=(2, 3, 42, 42, 3)).astype(np.float32)
  tokens = clip.encode_references(params, cfg, refs)
  assert tokens.shape == (2, 3 * clip.num_tokens(cfg), 48)
  for b in range(2):
    for n in range(3):
      one = clip.CLIPVisionEncoder(cfg).apply({"params": params}, refs[b, n][None])[0]
      np.testing.assert_allclose(tokens[b, 10 * n:10 * (n + 1)], one, rtol=1e-5, atol=1e-5)


def test_sharded_forward_equals_unsharded(tmp_path, reference):
  model, pixels, _ = reference
  cfg = a2_config(tmp_path, model.config)
  mesh = sharding.make_mesh(configs.MeshConfig(data=2, fsdp=2, tensor=2))
  boxed = clip.init_abstract_boxed(cfg)
  assert sharding.missing_logical_names(boxed) == []
  abstract, shardings = sharding.unboxed_shardings(boxed, mesh)
  params = convert.from_torch(plain_sd(model), cfg)
  expected = clip.CLIPVisionEncoder(cfg).apply({"params": params}, pixels)
  placed = sharding.put(params, shardings)
  assert placed["encoder"]["layers"]["mlp"]["fc1"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor")
  with jax.set_mesh(mesh):
    got = jax.jit(clip.CLIPVisionEncoder(cfg).apply)({"params": placed}, pixels)
  assert max_rel_err(got, expected) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Converter.


def wan_state_dict(model) -> dict:
  """The original Wan open-clip names of a CLIPVisionModelWithProjection (qkv fused, head (D, E)),
  plus text-side keys that the converter must ignore."""
  sd = state_dict_numpy(model)
  v = lambda k: sd[f"vision_model.{k}"]
  wan = {
      "visual.patch_embedding.weight": v("embeddings.patch_embedding.weight"),
      "visual.cls_embedding": v("embeddings.class_embedding")[None, None],
      "visual.pos_embedding": v("embeddings.position_embedding.weight")[None],
      "visual.head": sd["visual_projection.weight"].T,
      "textual.token_embedding.weight": np.zeros((7, 4), np.float32),
      "textual.head.0.weight": np.zeros((4, 4), np.float32),
      "log_scale": np.zeros((), np.float32),
  }
  for ours, theirs in (("pre_layrnorm", "pre_norm"), ("post_layernorm", "post_norm")):
    for leaf in ("weight", "bias"):
      wan[f"visual.{theirs}.{leaf}"] = v(f"{ours}.{leaf}")
  for i in range(model.config.num_hidden_layers):
    layer = lambda k: v(f"encoder.layers.{i}.{k}")
    for leaf in ("weight", "bias"):
      wan[f"visual.transformer.{i}.attn.to_qkv.{leaf}"] = np.concatenate(
          [layer(f"self_attn.{p}_proj.{leaf}") for p in "qkv"], axis=0)
      for ours, theirs in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"),
                           ("self_attn.out_proj", "attn.proj"), ("mlp.fc1", "mlp.0"),
                           ("mlp.fc2", "mlp.2")):
        wan[f"visual.transformer.{i}.{theirs}.{leaf}"] = layer(f"{ours}.{leaf}")
  return wan


def assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_converter_name_sets_agree(tmp_path, reference):
  model = reference[0]
  sd = state_dict_numpy(model)
  for with_projection in (False, True):
    cfg = a2_config(tmp_path, model.config, with_projection=with_projection)
    base = convert.from_torch(sd, cfg)  # CLIPVisionModelWithProjection: vision_model. prefix
    assert ("visual_projection" in base) == with_projection
    assert_same_tree(convert.from_torch(wan_state_dict(model), cfg), base)
    if not with_projection:  # CLIPVisionModel, transformers 5 (no prefix) and 4.x (prefix)
      assert_same_tree(convert.from_torch(plain_sd(model), cfg), base)
      prefixed = {f"vision_model.{k}": v for k, v in plain_sd(model).items()}
      prefixed["vision_model.embeddings.position_ids"] = np.arange(10)[None]
      assert_same_tree(convert.from_torch(prefixed, cfg), base)
  # The projection is required when the config asks for it.
  cfg = a2_config(tmp_path, model.config, with_projection=True)
  with pytest.raises(ConversionError, match="missing: visual_projection.weight"):
    convert.from_torch(plain_sd(model), cfg)


@pytest.mark.parametrize("names", ["transformers", "wan"])
def test_converter_errors(tmp_path, reference, names):
  model = reference[0]
  cfg = a2_config(tmp_path, model.config)
  sd = plain_sd(model) if names == "transformers" else wan_state_dict(model)
  some_key = "encoder.layers.1.mlp.fc1.bias" if names == "transformers" else "visual.transformer.1.mlp.0.bias"
  missing = {k: v for k, v in sd.items() if k != some_key}
  with pytest.raises(ConversionError, match=rf"missing: {some_key}"):
    convert.from_torch(missing, cfg)
  with pytest.raises(ConversionError, match=r"unexpected: .*\bextra\.weight"):
    convert.from_torch({**sd, "extra.weight": np.zeros(3)}, cfg)
  with pytest.raises(ConversionError, match=rf"mis-shaped: {some_key} \(5,\)"):
    convert.from_torch({**sd, some_key: np.zeros(5, np.float32)}, cfg)
  with pytest.raises(ConversionError, match="weights do not match"):  # a config of another size
    convert.from_torch(sd, a2_config(tmp_path, torch_config(hidden_size=24, num_attention_heads=2)))


def release_folder(root: pathlib.Path, model) -> pathlib.Path:
  """`image_encoder/` (CLIPVisionModel, safetensors) and `image_processor/` as the release has."""
  vision = transformers.CLIPVisionModel(model.config)
  vision.load_state_dict(model.vision_model.state_dict())
  vision.save_pretrained(root / "image_encoder")
  transformers.CLIPImageProcessor(crop_size={"height": 42, "width": 42},
                                  size={"shortest_edge": 42}).save_pretrained(root / "image_processor")
  return root / "image_encoder"


def test_cli_round_trip(tmp_path, reference):
  model, pixels, out = reference
  src = release_folder(tmp_path / "release", model)
  dst = tmp_path / "converted"
  assert cli.main(["clip", "--src", str(src), "--dst", str(dst), "--no-progress"]) == 0
  cfg = checkpoints.read_config(dst).clip
  assert cfg == a2_config(tmp_path, model.config)
  params = checkpoints.load_params(checkpoints.component_path(dst, "clip"), convert.init_abstract(cfg))
  got = clip.CLIPVisionEncoder(cfg).apply({"params": params}, pixels)
  assert max_rel_err(got, out.hidden_states[-2].numpy()) <= 1e-4
  assert (dst / "image_processor" / "preprocessor_config.json").is_file()


def test_cli_round_trip_wan_pth(tmp_path, reference):
  """The original Wan `.pth` (open-clip names, text side included) with a YAML config."""
  model, pixels, out = reference
  src = tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in wan_state_dict(model).items()},
             src)
  preset = tmp_path / "small.yaml"
  preset.write_text(json.dumps({"clip": {**SMALL, "with_projection": True}}))  # JSON is YAML
  dst = tmp_path / "converted"
  assert cli.main(["clip", "--src", str(src), "--dst", str(dst), "--config", str(preset),
                   "--no-progress"]) == 0
  cfg = checkpoints.read_config(dst).clip
  params = checkpoints.load_params(checkpoints.component_path(dst, "clip"), convert.init_abstract(cfg))
  got = clip.CLIPVisionEncoder(cfg).apply({"params": params}, pixels, full_tower=True)
  assert max_rel_err(got["image_embeds"], out.image_embeds.numpy()) <= 1e-4


def test_cli_errors_leave_nothing_behind(tmp_path, reference, capsys):
  model = reference[0]
  src = release_folder(tmp_path / "release", model)
  weights = src / "model.safetensors"
  data = weights.read_bytes()
  # A truncated file.
  weights.write_bytes(data[:len(data) // 2])
  dst = tmp_path / "converted"
  result = subprocess.run([sys.executable, "-m", "convert_weights", "clip", "--src", str(src),
                           "--dst", str(dst), "--no-progress"], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 2 and "truncated" in result.stderr
  # A missing key (a config that wants the projection this checkpoint lacks).
  weights.write_bytes(data)
  assert cli.main(["clip", "with_projection=true", "--src", str(src), "--dst", str(dst),
                   "--no-progress"]) == 2
  assert "missing: visual_projection.weight" in capsys.readouterr().err
  assert not dst.exists()
  assert not list(tmp_path.glob(".converted*"))


def test_full_size_parameter_count():
  with torch.device("meta"):
    ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VIT_H))
  count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
  vision = sum(p.numel() for p in ref.vision_model.parameters())
  assert count(convert.init_abstract(CLIPConfig())) == vision  # 630.8M, the release's tower
  assert round(vision / 1e6, 1) == 630.8
  with_projection = sum(p.numel() for p in ref.parameters())
  assert count(convert.init_abstract(CLIPConfig(with_projection=True))) == with_projection
  boxed = clip.init_abstract_boxed(CLIPConfig())
  assert nn.get_partition_spec(boxed)["encoder"]["layers"]["mlp"]["fc1"]["kernel"] == (
      jax.sharding.PartitionSpec("layers", "embed", "mlp"))
