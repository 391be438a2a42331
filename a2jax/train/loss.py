"""Rectified-flow loss, in the sampler's conventions (a2jax.schedulers).

Convention (the one sampling integrates; σ = 1 is pure noise, σ = 0 the data):
    x_t = (1 − σ)·x0 + σ·ε,   ε ~ N(0, I)
    target velocity v = ε − x0            (what the DiT predicts; dx_t/dσ)
    timestep t = 1000·σ                   (what the DiT's sinusoidal embedding receives)
    σ = shift·u / (1 + (shift − 1)·u)     (`schedulers.shift_sigmas`, with `sampling.shift`)
where u ~ U[0, 1) or u = sigmoid(N(logit_mean, logit_std)) (logit-normal). The shift is the one
flow shift of the config: the sampler's schedule is shifted by the same function with the same value.

loss = mean_b w(σ_b) · mean_elements (v̂_b − v_b)², in float32. The per-sample weight w depends on σ_b
alone (never on a batch statistic), so the loss is finite at batch size 1.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from a2jax.errors import ConfigError
from a2jax.schedulers import shift_sigmas

TIMESTEP_SAMPLING = ("uniform", "logit_normal")
LOSS_WEIGHTING = ("none", "cosmap")
NUM_TRAIN_TIMESTEPS = 1000


def sample_sigmas(key: jax.Array, batch: int, *, shift: float, sampling: str = "uniform",
                  logit_mean: float = 0.0, logit_std: float = 1.0) -> jax.Array:
  """Noise levels σ (batch,) float32 in [0, 1), drawn from the sampler's shifted schedule."""
  if sampling == "uniform":
    u = jax.random.uniform(key, (batch,), jnp.float32)
  elif sampling == "logit_normal":
    u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (batch,), jnp.float32))
  else:
    raise ConfigError(f"timestep sampling {sampling!r} is not one of {TIMESTEP_SAMPLING}")
  return shift_sigmas(u, shift)


def loss_weights(sigma: jax.Array, weighting: str = "none") -> jax.Array:
  """Per-sample weights (B,) from σ alone.

  none: 1. cosmap (SD3): 2 / (π·(1 − 2σ + 2σ²)), the density of the cosine map over σ; it integrates
  to 1 over σ ∈ [0, 1] and stays within [2/π, 4/π], so no division can blow up.
  """
  if weighting == "none":
    return jnp.ones_like(sigma)
  if weighting == "cosmap":
    return 2.0 / (math.pi * (1.0 - 2.0 * sigma + 2.0 * sigma**2))
  raise ConfigError(f"loss weighting {weighting!r} is not one of {LOSS_WEIGHTING}")


def add_noise(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
  """x_t = (1 − σ)·x0 + σ·ε with σ (B,) broadcast over the sample dims; float32."""
  s = sigma.reshape(-1, *(1,) * (x0.ndim - 1))
  return (1.0 - s) * x0.astype(jnp.float32) + s * noise.astype(jnp.float32)


def flow_matching_loss(predict: Callable[[jax.Array, jax.Array], jax.Array], x0: jax.Array,
                       key: jax.Array, *, shift: float, sampling: str = "uniform",
                       logit_mean: float = 0.0, logit_std: float = 1.0,
                       weighting: str = "none") -> tuple[jax.Array, dict[str, jax.Array]]:
  """The loss of `predict(x_t, t) -> v̂` (both (B, ...)) on clean samples x0 (B, ...).

  Returns (scalar loss float32, {"sigma": (B,), "per_sample": (B,) unweighted MSE}).
  """
  sigma_key, noise_key = jax.random.split(key)
  sigma = sample_sigmas(sigma_key, x0.shape[0], shift=shift, sampling=sampling,
                        logit_mean=logit_mean, logit_std=logit_std)
  noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
  x_t = add_noise(x0, noise, sigma)
  target = noise - x0.astype(jnp.float32)
  v = predict(x_t, NUM_TRAIN_TIMESTEPS * sigma).astype(jnp.float32)
  per_sample = jnp.mean(jnp.square(v - target), axis=tuple(range(1, x0.ndim)))
  loss = jnp.mean(loss_weights(sigma, weighting) * per_sample)
  return loss, {"sigma": sigma, "per_sample": per_sample}
