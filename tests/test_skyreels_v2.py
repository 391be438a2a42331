"""The diffusion-forcing DiT (SkyReels-V2's `SkyReelsV2Transformer3DModel` in diffusers): timesteps
per latent frame, block-causal self-attention and the fps embedding, against diffusers; the A2 DiT
unchanged by per-frame timesteps of equal values; sharded equal to unsharded on 8 CPU devices."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from diffusers import SkyReelsV2Transformer3DModel

from a2jax import configs, sharding
from a2jax.configs import TransformerConfig
from a2jax.errors import InputError
from a2jax.models.transformer import A2Transformer, init_abstract_boxed, init_params
from convert_weights import transformer as convert
from parity import max_rel_err, randomize_torch_, rel_l2_err, state_dict_numpy

F32_TOL = 1e-4   # max|Δ| ≤ F32_TOL · max|ref|
BF16_TOL = 2e-2  # relative L2 of bfloat16 compute vs the float32 reference

# The DF models are text-to-video (image-to-video gives the first frame as a latent prefix).
DF = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=16,
          out_channels=16, text_dim=32, freq_dim=16, ffn_dim=56, num_layers=2,
          inject_sample_info=True)
GRID = (6, 4, 6)  # latent frames, height, width: 6 tokens a frame, blocks of 2 frames → 3 blocks


def df_inputs(batch=2, seed=0):
  rng = np.random.default_rng(seed)
  f, h, w = GRID
  x = rng.standard_normal((batch, f, h, w, DF["in_channels"])).astype(np.float32)
  t = rng.integers(0, 1000, size=(batch, f))  # every latent frame its own noise level
  t[0, :2] = 0  # a clean history prefix, as the sampler feeds it
  text = rng.standard_normal((batch, 512, DF["text_dim"])).astype(np.float32)
  text[:, 20:] = 0.0
  return x, t, text


def torch_forward(model, x, t, text, fps):
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy()), torch.from_numpy(t),
                torch.from_numpy(text), enable_diffusion_forcing=True,
                fps=[0 if fps == 16 else 1], return_dict=False)[0]
  return out.numpy().transpose(0, 2, 3, 4, 1)


def jax_apply(cfg):
  model = A2Transformer(cfg)
  return jax.jit(lambda p, x, t, text, fps_index: model.apply(
      {"params": p}, x, t, text, None, fps_index))


def fps_index(fps, batch):
  return np.full((batch,), 0 if fps == 16 else 1, np.int32)


@pytest.fixture(scope="module", params=[1, 2], ids=["full", "causal2"])
def reference(request):
  kw = dict(DF, num_frame_per_block=request.param)
  model = SkyReelsV2Transformer3DModel(**kw).eval()
  randomize_torch_(model, seed=request.param)
  cfg = TransformerConfig(**kw)
  return cfg, model, convert.from_torch(state_dict_numpy(model), cfg)


def test_parity_per_frame_timesteps_fps_16_and_24(reference):
  cfg, model, params = reference
  x, t, text = df_inputs()
  forward = jax_apply(cfg)
  outs = {}
  for fps in (16, 24):
    ref = torch_forward(model, x, t, text, fps)
    outs[fps] = np.asarray(forward(params, x, t.astype(np.float32), text, fps_index(fps, 2)))
    assert max_rel_err(outs[fps], ref) <= F32_TOL, fps
  assert max_rel_err(outs[16], outs[24]) > 1e-3  # the fps class reaches the output
  out_bf16 = jax_apply(dataclasses.replace(cfg, dtype="bfloat16"))(
      params, x, t.astype(np.float32), text, fps_index(24, 2))
  assert rel_l2_err(np.asarray(out_bf16, np.float32), ref) <= BF16_TOL


def test_causal_blocks_do_not_see_later_frames(reference):
  """With causal blocks, changing the last block's latents changes nothing before it; with full
  attention it changes everything (the test can fail both ways)."""
  cfg, _, params = reference
  x, t, text = df_inputs(seed=1)
  forward = jax_apply(cfg)
  moved = x.copy()
  moved[:, -2:] += 1.0
  a, b = (np.asarray(forward(params, v, t.astype(np.float32), text, fps_index(16, 2)))
          for v in (x, moved))
  earlier = np.abs(a[:, :-2] - b[:, :-2]).max()
  assert earlier == 0.0 if cfg.num_frame_per_block > 1 else earlier > 1e-3


def test_a2_unchanged_by_per_frame_timesteps_of_equal_values():
  """An A2 (Wan I2V) config: t (B,) and the same t repeated per latent frame (B, f) agree."""
  cfg = TransformerConfig(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=20,
                          in_channels=36, out_channels=16, text_dim=32, freq_dim=16, ffn_dim=48,
                          num_layers=2, image_dim=24, added_kv_proj_dim=60)
  params = init_params(cfg, jax.random.key(0))
  x, t, text, image = _a2_inputs(cfg)
  model = A2Transformer(cfg)
  forward = jax.jit(lambda p, t: model.apply({"params": p}, x, t, text, image))
  per_frame = np.repeat(t[:, None], x.shape[1], axis=1)
  got, want = np.asarray(forward(params, per_frame)), np.asarray(forward(params, t))
  assert max_rel_err(got, want) <= 1e-6


def _a2_inputs(cfg, batch=2):
  rng = np.random.default_rng(3)
  x = rng.standard_normal((batch, 3, 4, 6, cfg.in_channels)).astype(np.float32)
  t = np.array([999.0, 412.0], np.float32)
  text = rng.standard_normal((batch, 16, cfg.text_dim)).astype(np.float32)
  image = rng.standard_normal((batch, 257, cfg.image_dim)).astype(np.float32)
  return x, t, text, image


def test_sharded_forward_equals_single_device():
  """fsdp × context × tensor = 2 × 2 × 2 with causal blocks, per-frame t and fps."""
  cfg = TransformerConfig(**dict(DF, num_frame_per_block=2))
  params = jax.device_get(init_params(cfg, jax.random.key(1)))
  x, t, text = df_inputs(seed=4)
  t, fps = t.astype(np.float32), fps_index(24, 2)
  single = np.asarray(jax_apply(cfg)(params, x, t, text, fps))

  mesh = sharding.make_mesh(configs.MeshConfig(fsdp=2, context=2, tensor=2))
  abstract, shardings = sharding.unboxed_shardings(init_abstract_boxed(cfg), mesh)
  sharded_params = sharding.put(params, shardings)
  batch = lambda a: jax.device_put(a, jax.sharding.NamedSharding(
      mesh, sharding.logical_to_spec(("batch",) + (None,) * (a.ndim - 1), a.shape, mesh)))
  with jax.set_mesh(mesh):
    out = jax_apply(cfg)(sharded_params, *(batch(a) for a in (x, t, text, fps)))
  np.testing.assert_allclose(np.asarray(out), single, atol=1e-5 * np.abs(single).max(), rtol=0)


def test_converted_folder_config_round_trips_through_diffusers_config():
  """A DF config exports as `SkyReelsV2Transformer3DModel` with its two fields; an A2 one stays a
  `WanTransformer3DModel` without them."""
  df = convert.reference_config(TransformerConfig(**dict(DF, num_frame_per_block=2)))
  assert df["_class_name"] == "SkyReelsV2Transformer3DModel"
  assert df["num_frame_per_block"] == 2 and df["inject_sample_info"] is True
  a2 = convert.reference_config(configs.load("a2_14b").transformer)
  assert a2["_class_name"] == "WanTransformer3DModel"
  assert "num_frame_per_block" not in a2 and "inject_sample_info" not in a2


def test_bad_inputs_raise_one_line_errors():
  cfg = TransformerConfig(**dict(DF, num_frame_per_block=4))
  model = A2Transformer(cfg)
  x, t, text = df_inputs()
  init = lambda *a: jax.eval_shape(lambda: model.init(jax.random.key(0), *a))
  with pytest.raises(InputError, match="causal blocks of 4"):
    init(x, t.astype(np.float32), text, None, fps_index(16, 2))
  cfg2 = TransformerConfig(**dict(DF, num_frame_per_block=2))
  with pytest.raises(InputError, match="fps_index"):
    jax.eval_shape(lambda: A2Transformer(cfg2).init(jax.random.key(0), x, t.astype(np.float32),
                                                    text, None))
  with pytest.raises(InputError, match="one per latent frame"):
    jax.eval_shape(lambda: A2Transformer(cfg2).init(
        jax.random.key(0), x, t[:, :3].astype(np.float32), text, None, fps_index(16, 2)))
