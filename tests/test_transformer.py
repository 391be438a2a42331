"""A2Transformer parity with diffusers' WanTransformer3DModel (I2V options), sharded equality on 8
simulated devices, and the full-size parameter tree without memory."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

from a2jax import configs, sharding
from a2jax.configs import TransformerConfig
from a2jax.models.transformer import A2Transformer, init_abstract_boxed
from convert_weights import transformer as convert
from parity import max_rel_err, randomize_torch_, rel_l2_err, state_dict_numpy

F32_TOL = 1e-4   # max|Δ| ≤ F32_TOL · max|ref|
BF16_TOL = 2e-2  # relative L2 of bfloat16 compute vs the float32 reference
TEXT_LEN = 512   # the reference splits its context at a hard-coded 512 text tokens

# Two structures: head_dim not a multiple of 64, odd latent frames, non-square grids.
CONFIGS = {
    "h3d20": dict(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=20,
                  in_channels=36, out_channels=16, text_dim=32, freq_dim=16, ffn_dim=48,
                  num_layers=2, image_dim=24, added_kv_proj_dim=60),
    "h2d36": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=36,
                  in_channels=36, out_channels=16, text_dim=40, freq_dim=32, ffn_dim=80,
                  num_layers=3, image_dim=16, added_kv_proj_dim=72),
}
GRIDS = {"h3d20": (3, 6, 10), "h2d36": (5, 8, 4)}


def make_inputs(kw, grid, refs, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  f, h, w = grid
  x = rng.standard_normal((batch, f, h, w, kw["in_channels"])).astype(np.float32)
  t = rng.integers(0, 1000, size=batch)
  t[0] = 999
  text = rng.standard_normal((batch, TEXT_LEN, kw["text_dim"])).astype(np.float32)
  text[:, 20:] = 0.0  # zero past the prompt, as the pipeline feeds it
  image = rng.standard_normal((batch, 257 * refs, kw["image_dim"])).astype(np.float32)
  return x, t, text, image


def torch_forward(model, x, t, text, image):
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy()), torch.from_numpy(t),
                torch.from_numpy(text), torch.from_numpy(image), return_dict=False)[0]
  return out.numpy().transpose(0, 2, 3, 4, 1)


def jax_forward(cfg, params, x, t, text, image):
  model = A2Transformer(cfg)
  return np.asarray(jax.jit(lambda p, *a: model.apply({"params": p}, *a))(
      params, x, t.astype(np.float32), text, image), np.float32)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request):
  kw = CONFIGS[request.param]
  model = WanTransformer3DModel(**kw).eval()
  randomize_torch_(model, seed=len(request.param))
  return request.param, kw, model


@pytest.mark.parametrize("refs", [1, 3])
def test_parity_float32_and_bfloat16(reference, refs):
  name, kw, model = reference
  cfg = TransformerConfig(**kw)
  params = convert.from_torch(state_dict_numpy(model), cfg)
  x, t, text, image = make_inputs(kw, GRIDS[name], refs)
  ref = torch_forward(model, x, t, text, image)
  out = jax_forward(cfg, params, x, t, text, image)
  assert out.shape == ref.shape
  assert max_rel_err(out, ref) <= F32_TOL
  out_bf16 = jax_forward(dataclasses.replace(cfg, dtype="bfloat16"), params, x, t, text, image)
  assert rel_l2_err(out_bf16, ref) <= BF16_TOL


# Inverse of the original-Wan table, written independently of the converter: diffusers → original.
DIFFUSERS_TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    ("proj_out.", "head.head."),
    (".attn1.to_out.0.", ".self_attn.o."),
    (".attn2.to_out.0.", ".cross_attn.o."),
    (".attn1.to_", ".self_attn."),
    (".attn2.add_k_proj.", ".cross_attn.k_img."),
    (".attn2.add_v_proj.", ".cross_attn.v_img."),
    (".attn2.norm_added_k.", ".cross_attn.norm_k_img."),
    (".attn2.to_", ".cross_attn."),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".norm2.", ".norm3."),
    (".ffn.net.0.proj.", ".ffn.0."),
    (".ffn.net.2.", ".ffn.2."),
]


def to_original_names(state_dict):
  out = {}
  for key, value in state_dict.items():
    new = key
    if key == "scale_shift_table":
      new = "head.modulation"
    elif key.endswith(".scale_shift_table"):
      new = key.replace(".scale_shift_table", ".modulation")
    else:
      for a, b in DIFFUSERS_TO_ORIGINAL:
        if a in new:
          new = new.replace(a, b)
          if not a.startswith("."):
            break
    out[new] = value
  return out


def test_original_wan_names_convert_to_the_same_params():
  kw = CONFIGS["h3d20"]
  model = WanTransformer3DModel(**kw).eval()
  randomize_torch_(model, seed=3)
  cfg = TransformerConfig(**kw)
  sd = state_dict_numpy(model)
  original = to_original_names(sd)
  assert "blocks.0.self_attn.q.weight" in original and "blocks.1.norm3.weight" in original
  assert "blocks.0.cross_attn.norm_k_img.weight" in original and "head.head.weight" in original
  a = convert.from_torch(sd, cfg)
  b = convert.from_torch(original, cfg)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("mesh_sizes", [dict(fsdp=8), dict(fsdp=2, context=2, tensor=2),
                                        dict(data=2, fsdp=4)], ids=str)
def test_sharded_forward_equals_single_device(mesh_sizes):
  assert len(jax.devices()) == 8, "tests run with 8 simulated CPU devices"
  kw = dict(CONFIGS["h3d20"], num_attention_heads=4, added_kv_proj_dim=80, ffn_dim=96)
  cfg = TransformerConfig(**kw)
  model = WanTransformer3DModel(**kw).eval()
  randomize_torch_(model, seed=5)
  params = convert.from_torch(state_dict_numpy(model), cfg)
  x, t, text, image = make_inputs(kw, (3, 4, 8), refs=2, batch=8)
  single = jax_forward(cfg, params, x, t, text, image)

  mesh = sharding.make_mesh(configs.MeshConfig(**{"fsdp": 1, **mesh_sizes}))
  abstract, shardings = sharding.unboxed_shardings(init_abstract_boxed(cfg), mesh)
  sharding.check_replication(abstract, shardings, mesh)
  sharded_params = sharding.put(params, shardings)
  batch = lambda a: jax.device_put(a, jax.sharding.NamedSharding(
      mesh, sharding.logical_to_spec(("batch",) + (None,) * (a.ndim - 1), a.shape, mesh)))
  model_fn = A2Transformer(cfg)
  with jax.set_mesh(mesh):
    out = jax.jit(lambda p, *a: model_fn.apply({"params": p}, *a))(
        sharded_params, batch(x), batch(t.astype(np.float32)), batch(text), batch(image))
  assert any(len(s.device_set) > 1 for s in jax.tree.leaves(
      jax.tree.map(lambda a: a.sharding, sharded_params)))
  np.testing.assert_allclose(np.asarray(out), single, atol=1e-5 * np.abs(single).max(), rtol=0)


@pytest.mark.parametrize("preset, billions", [("a2_14b", (16.3, 16.5)), ("v3_r2v_14b", (14.2, 14.4))])
def test_full_size_parameter_count_and_logical_names(preset, billions):
  """The full transformer of each family (SkyReels-A2; SkyReels-V3 R2V: no image branch) has
  diffusers' WanTransformer3DModel's parameter count for its config, built on the meta device."""
  cfg = configs.load(preset).transformer
  boxed = init_abstract_boxed(cfg)
  assert sharding.missing_logical_names(boxed) == []
  abstract = jax.tree.map(lambda b: b.value, boxed,
                          is_leaf=lambda x: hasattr(x, "names") and hasattr(x, "value"))
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract))
  kw = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
        if f.name not in convert.A2JAX_FIELDS + convert.SKYREELS_V2_FIELDS}  # not Wan's
  with torch.device("meta"):
    reference = WanTransformer3DModel(**kw)
  assert count == sum(p.numel() for p in reference.parameters())
  assert billions[0] * 1e9 < count < billions[1] * 1e9, count
  # Every stacked parameter gets sharded on a pod-like mesh of 8: replication stays under 2%.
  mesh = jax.sharding.AbstractMesh((1, 4, 1, 2), sharding.MESH_AXES)
  specs = sharding.logical_specs(boxed)
  fraction = sharding.replicated_fraction(
      abstract, jax.tree.map(lambda a, s: jax.sharding.NamedSharding(
          mesh, sharding.logical_to_spec(tuple(s), a.shape, mesh)), abstract, specs,
          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
  assert fraction < 0.02


def test_bad_inputs_raise_one_line_errors():
  cfg = TransformerConfig(**CONFIGS["h3d20"])
  model = A2Transformer(cfg)
  x, t, text, image = make_inputs(CONFIGS["h3d20"], (3, 6, 10), refs=1)
  from a2jax.errors import InputError
  with pytest.raises(InputError, match="divisible by patch"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), x[:, :, :5], t.astype(np.float32), text, image))
  with pytest.raises(InputError, match="image tokens are required"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), x, t.astype(np.float32), text, None))
