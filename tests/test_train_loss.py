"""The training loss's conventions (noising, target, timestep, shifted σ), per-sample weights at batch
size 1, the optimizer's weight-decay mask and schedule; and the end-to-end convention check: a toy
2-D velocity field trained with this loss and run through the a2jax samplers reproduces its data."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from a2jax import configs, schedulers
from a2jax.models.layers import timestep_embedding
from a2jax.models.transformer import init_abstract_boxed
from a2jax.train import loss as loss_lib
from a2jax.train import optimizer

# --- conventions -----------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_sigmas_follow_the_samplers_shift(sampling):
  """σ = shift(u) with the sampler's own shift function: un-shifting the draws recovers u's law."""
  shift = 5.0
  sigma = np.asarray(loss_lib.sample_sigmas(jax.random.key(0), 200_000, shift=shift,
                                            sampling=sampling, logit_mean=0.3, logit_std=0.8))
  assert sigma.min() >= 0 and sigma.max() < 1
  u = sigma / (shift - (shift - 1) * sigma)  # inverse of schedulers.shift_sigmas
  np.testing.assert_allclose(schedulers.shift_sigmas(u, shift), sigma, rtol=1e-5, atol=1e-6)
  q = np.linspace(0.05, 0.95, 19)
  if sampling == "uniform":
    expected = q
  else:  # logit-normal: quantiles of sigmoid(N(0.3, 0.8))
    from statistics import NormalDist
    expected = 1 / (1 + np.exp(-np.array([NormalDist(0.3, 0.8).inv_cdf(p) for p in q])))
  np.testing.assert_allclose(np.quantile(u, q), expected, atol=5e-3)  # 200k draws: ~1e-3 noise


def test_noising_target_and_timestep():
  """x_t = (1 − σ)x0 + σε, target ε − x0, t = 1000σ: check against the draws the loss made."""
  x0 = jax.random.normal(jax.random.key(1), (3, 2, 4, 4, 5))
  seen = {}

  def predict(x_t, t):
    seen.update(x_t=x_t, t=t)
    return jnp.zeros_like(x_t)

  key = jax.random.key(2)
  loss, aux = loss_lib.flow_matching_loss(predict, x0, key, shift=3.0)
  sigma_key, noise_key = jax.random.split(key)
  sigma = loss_lib.sample_sigmas(sigma_key, 3, shift=3.0)
  noise = jax.random.normal(noise_key, x0.shape)
  np.testing.assert_array_equal(aux["sigma"], sigma)
  np.testing.assert_allclose(seen["t"], 1000 * sigma, rtol=1e-6)
  s = sigma[:, None, None, None, None]
  np.testing.assert_allclose(seen["x_t"], (1 - s) * x0 + s * noise, rtol=1e-6, atol=1e-6)
  # predicting zero costs exactly the target's mean square
  np.testing.assert_allclose(loss, jnp.mean((noise - x0) ** 2), rtol=1e-6)


@pytest.mark.parametrize("weighting", loss_lib.LOSS_WEIGHTING)
def test_loss_is_finite_at_batch_size_one(weighting):
  x0 = jax.random.normal(jax.random.key(0), (1, 2, 4, 4, 3))
  for seed in range(8):
    loss, _ = loss_lib.flow_matching_loss(lambda x, t: x, x0, jax.random.key(seed), shift=8.0,
                                          sampling="logit_normal", weighting=weighting)
    assert np.isfinite(float(loss))
  # weights depend on σ alone: the same σ gives the same weight whatever else is in the batch
  sigma = jnp.array([0.0, 0.3, 1.0])
  w = loss_lib.loss_weights(sigma, weighting)
  np.testing.assert_array_equal(loss_lib.loss_weights(sigma[1:2], weighting), w[1:2])
  assert np.all(np.isfinite(w)) and np.all(w > 0)


# --- optimizer -------------------------------------------------------------------------------


def test_weight_decay_mask_spares_norms_biases_tables_and_embeddings():
  cfg = configs.load("tiny").transformer
  params = nn.meta.unbox(init_abstract_boxed(cfg))
  flat = {"/".join(str(k.key) for k in path): decays
          for path, decays in jax.tree_util.tree_leaves_with_path(optimizer.weight_decay_mask(params))}
  assert flat["blocks/attn1/to_q/kernel"] and flat["blocks/ffn/net_0/kernel"]
  assert flat["blocks/attn2/add_k_proj/kernel"] and flat["proj_out/kernel"]
  for name in ("blocks/attn1/to_q/bias", "blocks/attn1/norm_q/scale", "blocks/norm2/scale",
               "blocks/scale_shift_table", "scale_shift_table", "patch_embedding/kernel",
               "condition_embedder/time_embedder/linear_1/kernel",
               "condition_embedder/text_embedder/linear_2/kernel",
               "condition_embedder/image_embedder/ff/net_0/kernel"):
    assert not flat[name], name


def test_schedule_warms_up_then_decays_to_the_floor():
  """Evaluated at the optimizer count (0 for the first update, which ends step 1)."""
  cfg = configs.TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-3, min_lr_ratio=0.1)
  lr = lambda step: float(optimizer.learning_rate_schedule(cfg)(step - 1))
  assert lr(1) == pytest.approx(1e-4)
  assert lr(5) == pytest.approx(5e-4)
  assert lr(10) == pytest.approx(1e-3)
  assert lr(55) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-5)  # half-way down the cosine
  assert lr(100) == pytest.approx(1e-4)
  no_warmup = optimizer.learning_rate_schedule(dataclasses.replace(cfg, warmup_steps=0))
  assert float(no_warmup(0)) == pytest.approx(1e-3, rel=1e-3)


# --- the convention end to end ---------------------------------------------------------------

TOY_WEIGHTS = np.array([0.3, 0.7])
TOY_MEANS = np.array([[-2.0, -1.0], [1.5, 1.5]])
TOY_STD = 0.3
TOY_SHIFT = 3.0
# Tolerances on 4,000 samples (sampling noise of a weight: ±0.007; of a mean: ±0.01).
WEIGHT_TOL, MEAN_TOL, STD_TOL = 0.03, 0.08, 0.05


class _Field(nn.Module):
  """v(x, t): a small MLP on x (B, 2) and the sinusoidal embedding of t (B,)."""

  @nn.compact
  def __call__(self, x, t):
    h = jnp.concatenate([x, timestep_embedding(t, 32)], axis=-1)
    for _ in range(3):
      h = nn.silu(nn.Dense(128)(h))
    return nn.Dense(2)(h)


def _toy_data(key, n):
  mode_key, noise_key = jax.random.split(key)
  mode = jax.random.bernoulli(mode_key, TOY_WEIGHTS[1], (n,)).astype(jnp.int32)
  return jnp.asarray(TOY_MEANS, jnp.float32)[mode] + TOY_STD * jax.random.normal(noise_key, (n, 2))


def _train_toy(timestep_of, steps=2000):
  """Trains the field with flow_matching_loss (σ from the shifted schedule); the model sees
  `timestep_of(t)` where the loss hands it t = 1000σ."""
  field = _Field()
  params = field.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))
  tx = optax.adam(optax.cosine_decay_schedule(2e-3, steps))

  def loss_fn(p, key):
    data_key, loss_key = jax.random.split(key)
    predict = lambda x, t: field.apply(p, x, timestep_of(t))
    return loss_lib.flow_matching_loss(predict, _toy_data(data_key, 512), loss_key,
                                       shift=TOY_SHIFT)[0]

  def body(carry, key):
    p, opt = carry
    grads = jax.grad(loss_fn)(p, key)
    updates, opt = tx.update(grads, opt, p)
    return (optax.apply_updates(p, updates), opt), None

  run = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)),
                                       jax.random.split(jax.random.key(1), steps))[0][0])
  return field, run(params)


def _sample(field, params, sched, n=4000):
  x = jax.random.normal(jax.random.key(2), (n, 2))

  def body(carry, t):
    x, state = carry
    v = field.apply(params, x, jnp.full((n,), t, jnp.float32))
    return sched.step(state, v, x), None

  run = jax.jit(lambda x, s: jax.lax.scan(body, (x, s), jnp.asarray(sched.timesteps))[0][0])
  return np.asarray(run(x, sched.init(x)))


def _mixture_errors(x):
  """(max |weight error|, max |mean error|, max |std error|) with samples assigned to the nearest mode."""
  mode = ((x[:, None, :] - TOY_MEANS[None]) ** 2).sum(-1).argmin(1)
  weights = np.array([(mode == k).mean() for k in range(2)])
  means = np.array([x[mode == k].mean(0) for k in range(2)])
  stds = np.array([x[mode == k].std(0) for k in range(2)])
  return (np.abs(weights - TOY_WEIGHTS).max(), np.abs(means - TOY_MEANS).max(),
          np.abs(stds - TOY_STD).max())


def test_trained_velocity_field_reproduces_the_data_through_the_samplers():
  field, params = _train_toy(lambda t: t)
  for sched in (schedulers.UniPC(num_steps=20, shift=TOY_SHIFT),
                schedulers.Euler(num_steps=50, shift=TOY_SHIFT)):
    w_err, m_err, s_err = _mixture_errors(_sample(field, params, sched))
    assert w_err < WEIGHT_TOL and m_err < MEAN_TOL and s_err < STD_TOL, (sched, w_err, m_err, s_err)

  # Negative control (the known bug of a training timestep shifted apart from the noise level):
  # the model fed 1000·u, the unshifted draw, instead of 1000·σ does not reproduce the data.
  unshift = lambda t: 1000 * (t / 1000) / (TOY_SHIFT - (TOY_SHIFT - 1) * t / 1000)
  field, params = _train_toy(unshift)
  w_err, m_err, _ = _mixture_errors(_sample(field, params, schedulers.UniPC(20, TOY_SHIFT)))
  assert w_err > 2 * WEIGHT_TOL or m_err > 2 * MEAN_TOL, (w_err, m_err)
