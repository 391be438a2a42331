"""Configs: every preset loads, overrides apply, release config.json files are accepted, bad input is a
one-line ConfigError; the mesh helpers."""

import json

import jax
import pytest
from diffusers import WanTransformer3DModel

from a2jax import configs, sharding
from a2jax.configs import CONFIG_DIR, TransformerConfig
from a2jax.errors import ConfigError, ShardingError


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads(path):
  cfg = configs.load(path)
  assert configs.load(path.stem) == cfg
  # round trip through plain data
  assert configs.build(type(cfg), configs.to_dict(cfg), "config") == cfg


def test_release_values_and_overrides():
  cfg = configs.load("a2_14b", ["transformer.num_layers=2", "mesh.tensor=2", "vae.tiling=true"])
  t = cfg.transformer
  assert (t.num_layers, t.inner_dim, t.rope_dims, t.in_channels) == (2, 5120, (44, 42, 42), 36)
  assert (t.image_dim, t.added_kv_proj_dim, t.param_dtype) == (1280, 5120, "bfloat16")
  assert cfg.mesh.tensor == 2 and cfg.vae.tiling is True
  # YAML 1.1 reads 1e-5 (no dot) as a string: float fields still take it.
  assert configs.load("tiny", ["train.learning_rate=1e-5"]).train.learning_rate == 1e-5


@pytest.mark.parametrize("override, message", [
    ("transformer.nope=1", "unknown key config.transformer.nope"),
    ("nosection.x=1", "unknown key config.nosection"),
    ("transformer.num_layers=two", "must be int"),
    ("transformer.cross_attn_norm=3", "must be true or false"),
    ("transformer.patch_size=[1,2]", "must have 3 entries"),
    ("transformer.attention_head_dim=21", "cannot be split into even RoPE parts"),
    ("transformer.added_kv_proj_dim=64", "must equal heads × head_dim"),
    ("transformer.dtype=fp8", "is not one of"),
    ("transformer.remat=sometimes", "is not one of"),
    ("mesh.fsdp=0", "use positive sizes"),
    ("transformer.num_layers", "is not key=value"),
])
def test_bad_overrides_are_one_line_config_errors(override, message):
  with pytest.raises(ConfigError, match=message) as info:
    configs.load("tiny", [override])
  assert "\n" not in str(info.value)


def test_unknown_preset_and_missing_file():
  with pytest.raises(ConfigError, match="no config named"):
    configs.load("does_not_exist")
  with pytest.raises(ConfigError, match="does not exist"):
    configs.load("/nonexistent/file.yaml")


def test_from_dict_takes_diffusers_config_json(tmp_path):
  kw = dict(num_attention_heads=2, attention_head_dim=12, in_channels=36, text_dim=16, freq_dim=8,
            ffn_dim=20, num_layers=1, image_dim=8, added_kv_proj_dim=24)
  WanTransformer3DModel(**kw).save_config(tmp_path)
  raw = json.loads((tmp_path / "config.json").read_text())
  assert "_class_name" in raw and "_diffusers_version" in raw
  cfg = TransformerConfig.from_dict(raw, dtype="bfloat16")
  assert cfg.num_attention_heads == 2 and cfg.patch_size == (1, 2, 2) and cfg.dtype == "bfloat16"
  with pytest.raises(ConfigError, match="unknown key TransformerConfig.surprise"):
    TransformerConfig.from_dict({**raw, "surprise": 1})


def test_mesh_sizes():
  assert dict(sharding.make_mesh(configs.MeshConfig(fsdp=-1, tensor=2)).shape) == {
      "data": 1, "fsdp": 4, "context": 1, "tensor": 2}
  with pytest.raises(ShardingError, match="needs 16 devices"):
    sharding.make_mesh(configs.MeshConfig(fsdp=8, tensor=2))
  with pytest.raises(ShardingError, match="not divisible"):
    sharding.make_mesh(configs.MeshConfig(fsdp=-1, tensor=3))


def test_logical_rules_drop_axes_that_do_not_divide():
  mesh = sharding.make_mesh(configs.MeshConfig(fsdp=4, tensor=2))
  spec = sharding.logical_to_spec(("embed", "heads"), (64, 6), mesh)
  assert tuple(spec) == ("fsdp", "tensor")
  assert tuple(sharding.logical_to_spec(("embed", "heads"), (6, 5), mesh)) == (None, None)
  with pytest.raises(ShardingError, match="has no rule"):
    sharding.logical_to_spec(("nonsense",), (4,), mesh)


def test_replication_check_fails_when_dimensions_do_not_divide():
  mesh = sharding.make_mesh(configs.MeshConfig(fsdp=8))
  abstract = {"w": jax.ShapeDtypeStruct((6, 10), "float32")}
  shard = {"w": jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("embed", "mlp"), (6, 10), mesh))}
  with pytest.raises(ShardingError, match="replicated"):
    sharding.check_replication(abstract, shard, mesh)
