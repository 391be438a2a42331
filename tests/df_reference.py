"""diffusers' diffusion-forcing pipelines with their noise draws answered by a2jax's, and their
decode: shared by the sampler's and the folder pipeline's parity tests."""

import jax.numpy as jnp
import numpy as np
import torch

from a2jax import diffusion_forcing as df
from a2jax.pipeline import to_uint8


def patch_reference_noise(monkeypatch, module, windows, noise_keys, history_keys, latent_shape):
  """The reference draws its window noise with `randn_tensor` and the history re-noising with
  `torch.randn_like`, in call order: answer both with a2jax's draws from `noise_keys` and
  `history_keys` (B,) PRNG keys (torch layout B, C, f, h, w)."""
  window_draws = iter(range(len(windows)))
  history_calls = {"window": 0, "row": 0}

  def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
    index = next(window_draws)
    history_calls.update(window=index, row=0)
    noise = df.window_noise(noise_keys, index, (windows[index].frames, *latent_shape))
    return torch.from_numpy(np.asarray(noise).transpose(0, 4, 1, 2, 3).copy())

  def randn_like(x, **_):
    row = history_calls["row"]
    history_calls["row"] += 1
    noise = df.history_noise(history_keys, history_calls["window"],
                             jnp.asarray(row), (x.shape[2], x.shape[3], x.shape[4], x.shape[1]))
    return torch.from_numpy(np.asarray(noise).transpose(0, 4, 1, 2, 3).copy()).to(x.dtype)

  monkeypatch.setattr(module, "randn_tensor", randn_tensor)
  monkeypatch.setattr(torch, "randn_like", randn_like)


def decode_torch(vae, latents):
  """The reference pipeline's decode of normalised latents (B, C, f, h, w) → uint8 (B, F, H, W, 3)."""
  mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
  std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
  with torch.no_grad():
    video = vae.decode(latents / std + mean, return_dict=False)[0]
  return np.asarray(to_uint8(video.numpy().transpose(0, 2, 3, 4, 1)))
