"""The diffusion-forcing sampler (a2jax.diffusion_forcing) against diffusers'
`SkyReelsV2DiffusionForcingPipeline` and its image-to-video variant: tiny random weights, the same
noise (the reference's draws replaced by a2jax's), several windows chained by latent history;
synchronous and asynchronous, with and without causal blocks and `addnoise_condition`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (AutoencoderKLWan, SkyReelsV2DiffusionForcingImageToVideoPipeline,
                       SkyReelsV2DiffusionForcingPipeline, SkyReelsV2Transformer3DModel,
                       UniPCMultistepScheduler)
from diffusers.pipelines.skyreels_v2 import pipeline_skyreels_v2_diffusion_forcing as t2v_module
from diffusers.pipelines.skyreels_v2 import pipeline_skyreels_v2_diffusion_forcing_i2v as i2v_module

from a2jax import diffusion_forcing as df
from a2jax import schedulers
from a2jax.configs import TransformerConfig, VAEConfig
from a2jax.errors import InputError
from a2jax.models.vae import WanVAE, denormalize_latents, normalize_latents
from a2jax.pipeline import to_uint8
from convert_weights import transformer as convert_transformer
from convert_weights import tiny_release
from convert_weights import vae as convert_vae
from df_reference import decode_torch, patch_reference_noise
from parity import randomize_torch_, rel_l2_err, state_dict_numpy

LATENT_TOL = 1e-4    # relative L2 of the whole video's final latents
PIXEL_TOL = 2        # max |Δ| of the decoded uint8 frames (of 255)
TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                   in_channels=16, out_channels=16, text_dim=32, freq_dim=16, ffn_dim=40,
                   num_layers=2, inject_sample_info=True)
HEIGHT, WIDTH, STEPS, SHIFT = 16, 32, 3, 8.0

# frames, base window, history, ar_step, causal block, addnoise: ≥ 3 windows each, ending on a
# shorter window; "async" cuts its 3-frame history to 2 (whole causal blocks). The image-to-video
# test runs synchronously with addnoise.
CASES = {
    "sync": dict(frames=37, base_frames=17, overlap_history=5, ar_step=0, causal_block=1,
                 addnoise=0.0, fps=24),
    "async_causal_addnoise": dict(frames=49, base_frames=21, overlap_history=9, ar_step=2,
                                  causal_block=2, addnoise=20.0, fps=24),
}


@pytest.fixture(scope="module")
def models():
  """(torch transformer, torch VAE, a2jax transformer config and params, VAE config and params)."""
  transformer = SkyReelsV2Transformer3DModel(**TRANSFORMER).eval()
  randomize_torch_(transformer, seed=11)
  vae = AutoencoderKLWan(**tiny_release.VAE).eval()
  randomize_torch_(vae, seed=12)
  t_cfg = TransformerConfig(**TRANSFORMER)
  v_cfg = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v
                       for k, v in tiny_release.VAE.items()})
  return (transformer, vae, t_cfg, convert_transformer.from_torch(state_dict_numpy(transformer), t_cfg),
          v_cfg, convert_vae.from_torch(state_dict_numpy(vae), v_cfg))


def addnoise_keys():
  """The keys of the addnoise_condition draws (one row), for a2jax and for the patched reference."""
  return jax.random.split(jax.random.key(99), 1)


def text_states(seed):
  rng = np.random.default_rng(seed)
  text = rng.standard_normal((2, 1, 512, TRANSFORMER["text_dim"])).astype(np.float32)
  text[:, :, 12:] = 0.0
  return text[0], text[1]  # prompt, negative prompt (B = 1)


def a2jax_latents(t_cfg, params, case, noise_keys, text, negative, first_frame=None):
  sched = schedulers.UniPC(num_steps=STEPS, shift=SHIFT)
  windows = df.plan(case["frames"], case["base_frames"], case["overlap_history"],
                    case["causal_block"], first_frame=first_frame is not None)
  fps_index = np.full((1,), df.fps_index(case["fps"]), np.int32)
  history_keys = jax.random.key_data(addnoise_keys())

  def run_window(window, index, latents):
    fn = df.window_fn(t_cfg, sched, window, ar_step=case["ar_step"],
                      causal_block=case["causal_block"], guidance=5.0,
                      addnoise_condition=case["addnoise"])
    return jax.jit(fn)(params, latents, text, negative, fps_index, history_keys,
                       np.int32(index))

  latent_shape = (HEIGHT // 8, WIDTH // 8, 16)
  return df.sample_latents(run_window, windows, noise_keys, latent_shape, first_frame), windows


def reference_pipeline(cls, transformer, vae):
  scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                      flow_shift=SHIFT, num_train_timesteps=1000)
  transformer.register_to_config(num_frame_per_block=1)  # each case sets its own
  return cls(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae, scheduler=scheduler)


def decode_a2jax(v_cfg, params, latents):
  vae = WanVAE(v_cfg)
  video = jax.jit(lambda p, z: vae.apply({"params": p}, denormalize_latents(z, v_cfg),
                                         method=vae.decode))(params, latents)
  return np.asarray(to_uint8(video))


@pytest.mark.parametrize("name", sorted(CASES))
def test_text_to_video_matches_diffusers(models, monkeypatch, name):
  transformer, vae, t_cfg, params, v_cfg, v_params = models
  case = CASES[name]
  text, negative = text_states(1)
  noise_keys = jax.random.split(jax.random.key(7), 1)
  got, windows = a2jax_latents(t_cfg, params, case, noise_keys, text, negative)
  assert len(windows) >= 3

  patch_reference_noise(monkeypatch, t2v_module, windows, noise_keys, addnoise_keys(), (HEIGHT // 8, WIDTH // 8, 16))
  pipe = reference_pipeline(SkyReelsV2DiffusionForcingPipeline, transformer, vae)
  want = pipe(prompt=None, prompt_embeds=torch.from_numpy(text),
              negative_prompt_embeds=torch.from_numpy(negative),
              height=HEIGHT, width=WIDTH, num_frames=case["frames"], num_inference_steps=STEPS,
              guidance_scale=5.0, overlap_history=case["overlap_history"],
              addnoise_condition=case["addnoise"], base_num_frames=case["base_frames"],
              ar_step=case["ar_step"], causal_block_size=case["causal_block"], fps=case["fps"],
              output_type="latent", return_dict=False)[0]
  assert got.shape == want.numpy().transpose(0, 2, 3, 4, 1).shape
  err = rel_l2_err(got, want.numpy().transpose(0, 2, 3, 4, 1))
  frames = decode_a2jax(v_cfg, v_params, got)
  ref_frames = decode_torch(vae, want)
  assert frames.shape == ref_frames.shape == (1, case["frames"], HEIGHT, WIDTH, 3)
  levels = np.abs(frames.astype(int) - ref_frames).max()
  print(f"{name}, {len(windows)} windows: latents relative L2 {err:.2e}, frames max {levels}/255")
  assert err <= LATENT_TOL and levels <= PIXEL_TOL


def test_image_to_video_matches_diffusers(models, monkeypatch):
  """The first frame given: its latent is window 0's clean prefix (re-noised by addnoise too)."""
  transformer, vae, t_cfg, params, v_cfg, v_params = models
  # 41 frames: three windows of 5 latent frames (diffusers' image-to-video pipeline indexes past a
  # last window shorter than base_num_frames, so the case avoids one).
  case = dict(CASES["sync"], frames=41, addnoise=20.0, fps=16)
  text, negative = text_states(2)
  pixels = np.random.default_rng(5).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
  image = (pixels.astype(np.float32) / 127.5 - 1.0)[None, None]  # (1, 1, H, W, 3) in [−1, 1]
  mean = WanVAE(v_cfg).apply({"params": v_params}, image, method=WanVAE(v_cfg).encode)[0]
  first = normalize_latents(mean, v_cfg)
  noise_keys = jax.random.split(jax.random.key(8), 1)
  got, windows = a2jax_latents(t_cfg, params, case, noise_keys, text, negative, first_frame=first)
  assert windows[0].prefix == 1

  patch_reference_noise(monkeypatch, i2v_module, windows, noise_keys, addnoise_keys(), (HEIGHT // 8, WIDTH // 8, 16))
  pipe = reference_pipeline(SkyReelsV2DiffusionForcingImageToVideoPipeline, transformer, vae)
  want = pipe(image=PIL.Image.fromarray(pixels),
              prompt_embeds=torch.from_numpy(text), negative_prompt_embeds=torch.from_numpy(negative),
              height=HEIGHT, width=WIDTH, num_frames=case["frames"], num_inference_steps=STEPS,
              guidance_scale=5.0, overlap_history=case["overlap_history"],
              addnoise_condition=case["addnoise"], base_num_frames=case["base_frames"],
              ar_step=case["ar_step"], causal_block_size=case["causal_block"], fps=case["fps"],
              output_type="latent", return_dict=False)[0]
  err = rel_l2_err(got, want.numpy().transpose(0, 2, 3, 4, 1))
  frames, ref_frames = decode_a2jax(v_cfg, v_params, got), decode_torch(vae, want)
  levels = np.abs(frames.astype(int) - ref_frames).max()
  print(f"image-to-video, {len(windows)} windows: latents relative L2 {err:.2e}, frames max "
        f"{levels}/255")
  assert err <= LATENT_TOL and levels <= PIXEL_TOL


def test_timestep_matrix_rows():
  """Synchronous: every frame steps every row; asynchronous: blocks start ar_step rows apart and the
  row count grows by ar_step per extra block; a history prefix is never stepped."""
  timesteps = np.array([999, 941, 800])
  values, mask = df.timestep_matrix(4, timesteps, ar_step=0, num_pre_ready=0, causal_block=1)
  assert values.shape == (3, 4) and mask.all()
  np.testing.assert_array_equal(values[:, 0], timesteps)
  values, mask = df.timestep_matrix(6, timesteps, ar_step=2, num_pre_ready=2, causal_block=2)
  assert values.shape == (3 + 2, 6)
  assert not mask[:, :2].any() and (values[:, :2] == 0).all()
  np.testing.assert_array_equal(mask.sum(axis=0)[2:], [3, 3, 3, 3])  # each frame: every step once
  np.testing.assert_array_equal(values[0], [0, 0, 999, 999, df.NOT_STARTED_TIMESTEP,
                                            df.NOT_STARTED_TIMESTEP])
  with pytest.raises(InputError, match="ar_step 0 is too small"):
    df.timestep_matrix(6, timesteps, ar_step=0, num_pre_ready=0, causal_block=1, base_latent=3)


@pytest.mark.parametrize("args,message", [
    (dict(frames=36), "use 4k\\+1 frames"),
    (dict(overlap_history=17), "overlap_history 17 is not shorter than the window of 17"),
    (dict(overlap_history=None), "do not fit one window of 17: give overlap_history"),
    (dict(causal_block=3), "causal blocks of 3 latent frames do not divide a window of 5"),
])
def test_plan_refuses_bad_windows_in_one_line(args, message):
  plan = dict(frames=37, base_frames=17, overlap_history=5, causal_block=1)
  with pytest.raises(InputError, match=message):
    df.plan(**{**plan, **args})
