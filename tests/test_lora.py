"""a2jax.models.lora: initialisation, logical sharding axes and the merge into the kernels."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from a2jax import configs, sharding
from a2jax.configs import TransformerConfig
from a2jax.models import lora
from a2jax.models.transformer import init_abstract_boxed, init_params

KW = dict(num_attention_heads=2, attention_head_dim=8, in_channels=36, out_channels=16, text_dim=12,
          freq_dim=8, ffn_dim=24, num_layers=3, image_dim=10, added_kv_proj_dim=16)


def _params(**kw):
  cfg = TransformerConfig(**{**KW, **kw})
  return cfg, init_params(cfg, jax.random.key(0))


def test_init_shapes_skip_absent_modules_and_zero_b():
  cfg, params = _params(image_dim=None, added_kv_proj_dim=None)
  tree = lora.init_lora(params, tuple(lora.TARGET_MODULES), 4, jax.random.key(1))
  assert "add_k_proj" not in tree["blocks"]["attn2"]
  a, b = tree["blocks"]["ffn"]["net_0"]["lora_a"], tree["blocks"]["ffn"]["net_0"]["lora_b"]
  assert a.shape == (3, 16, 4) and b.shape == (3, 4, 24)
  assert float(jnp.abs(a).max()) <= 1 / 16**0.5 and float(jnp.abs(a).min()) > 0
  assert not np.any(np.asarray(b))
  assert set(lora.DEFAULT_TARGETS) == set(lora.TARGET_MODULES) - {"ffn.net_0", "ffn.net_2"}


def test_merge_of_zero_b_is_the_base_and_untouched_leaves_are_shared():
  _, params = _params()
  tree = lora.init_lora(params, lora.DEFAULT_TARGETS, 4, jax.random.key(1))
  merged = lora.merge(params, tree, 2.0)
  for got, ref in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  assert merged["blocks"]["ffn"]["net_0"]["kernel"] is params["blocks"]["ffn"]["net_0"]["kernel"]
  assert merged["blocks"]["attn1"]["to_q"]["bias"] is params["blocks"]["attn1"]["to_q"]["bias"]
  assert merged["proj_out"] is params["proj_out"]


def test_merge_equals_a_hand_computation_with_scalar_and_per_layer_scales():
  _, params = _params(param_dtype="bfloat16")
  rng = np.random.default_rng(0)
  tree = {"blocks": {"attn2": {"add_v_proj": {
      "lora_a": rng.standard_normal((3, 16, 2)).astype(np.float32),
      "lora_b": rng.standard_normal((3, 2, 16)).astype(np.float32)}}}}
  kernel = np.asarray(params["blocks"]["attn2"]["add_v_proj"]["kernel"], np.float32)
  delta = np.stack([a @ b for a, b in zip(tree["blocks"]["attn2"]["add_v_proj"]["lora_a"],
                                           tree["blocks"]["attn2"]["add_v_proj"]["lora_b"])])
  per_layer = np.array([0.5, 0.0, 3.0], np.float32)
  for scale, factor in [(0.25, 0.25), ({"blocks": {"attn2": {"add_v_proj": per_layer}}},
                                      per_layer[:, None, None])]:
    got = jax.jit(lora.merge)(params, tree, scale)["blocks"]["attn2"]["add_v_proj"]["kernel"]
    assert got.dtype == jnp.bfloat16
    want = (kernel + factor * delta).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_logical_axes_follow_the_kernels_and_shard_on_a_mesh():
  cfg = TransformerConfig(**KW)
  boxed = init_abstract_boxed(cfg)
  tree = jax.eval_shape(lambda k: lora.init_lora(nn.meta.unbox(boxed), lora.DEFAULT_TARGETS, 4, k),
                        jax.random.key(0))
  axes = lora.lora_logical_axes(sharding.logical_specs(boxed), tree)
  assert tuple(axes["blocks"]["attn1"]["to_q"]["lora_a"]) == ("layers", "embed", None)
  assert tuple(axes["blocks"]["attn1"]["to_out_0"]["lora_b"]) == ("layers", None, "embed")
  mesh = sharding.make_mesh(configs.MeshConfig(data=1, fsdp=4, context=1, tensor=2))
  shardings = lora.lora_shardings(boxed, tree, mesh)
  assert tuple(shardings["blocks"]["attn1"]["to_q"]["lora_a"].spec) == (None, "fsdp", None)
  assert tuple(shardings["blocks"]["attn1"]["to_q"]["lora_b"].spec) == (None, None, "tensor")


def test_apply_all_adds_deltas_and_keeps_shardings():
  cfg = TransformerConfig(**KW)
  mesh = sharding.make_mesh(configs.MeshConfig(data=1, fsdp=4, context=1, tensor=2))
  params = init_params(cfg, jax.random.key(0), mesh)
  rng = np.random.default_rng(1)
  factors = {"blocks": {"attn1": {"to_q": {
      "lora_a": rng.standard_normal((3, 16, 2)).astype(np.float32),
      "lora_b": rng.standard_normal((3, 2, 16)).astype(np.float32)}}}}
  scales = {"blocks": {"attn1": {"to_q": np.array([1.0, 0.0, 0.5], np.float32)}}}
  bias_delta = rng.standard_normal((64,)).astype(np.float32)
  loaded = lora.LoadedLoRA("x", "test", factors, scales, {"proj_out": {"bias": bias_delta}}, ())
  merged = lora.apply_all(params, [loaded])
  kernel = merged["blocks"]["attn1"]["to_q"]["kernel"]
  assert kernel.sharding == params["blocks"]["attn1"]["to_q"]["kernel"].sharding
  want = np.asarray(lora.merge(params, factors, scales)["blocks"]["attn1"]["to_q"]["kernel"])
  np.testing.assert_allclose(np.asarray(kernel), want, rtol=1e-6, atol=1e-6)  # jit vs eager fusion
  np.testing.assert_allclose(np.asarray(merged["proj_out"]["bias"]),
                             np.asarray(params["proj_out"]["bias"]) + bias_delta, rtol=1e-6)
  assert merged["blocks"]["ffn"] is params["blocks"]["ffn"]
