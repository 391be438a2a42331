"""The DiT-only training step: `train_step(state, batch, rng) -> (state, metrics)`.

A batch holds encoded triplets (a2jax/data/encoded.py), leading axis B (the global batch):
  latents    float32 (B, f, h, w, z_dim)      normalised VAE latents of the target video (x0)
  condition  float32 A2: (B, f, h, w, 4 + z_dim) mask ‖ normalised condition latents;
             V3 R2V: (B, 4, h, w, z_dim) normalised reference latents (zeros where dropped)
  text       float32 (B, T, text_dim)         umT5 states (zeros where dropped for CFG)
  image      float32 (B, I, image_dim)        CLIP tokens of the references (zeros where dropped;
                                              A2 only)
The DiT sees the family's input (`transformer_input`: A2 [x_t ‖ condition], 36 channels; V3 R2V
x_t's frames then the 4 clean reference frames) at t = 1000·σ and predicts ε − x0 on the video's
frames only: the output is cropped to x_t's f frames, so the reference frames are context, never
targets (a2jax/train/loss.py). With grad_accum_steps = M the batch is split into M micro-batches scanned
in sequence; micro-batch m takes rows m, M + m, 2M + m, … so that each device's rows of a
batch-sharded array stay on that device.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from a2jax import families, sharding
from a2jax.configs import Config
from a2jax.models.transformer import A2Transformer
from a2jax.train import lora as train_lora
from a2jax.train.loss import flow_matching_loss
from a2jax.train.optimizer import learning_rate_schedule
from a2jax.train.state import TrainState

BATCH_LOGICAL_AXES = {
    "latents": ("batch", "frames", "height", "width", "channels"),
    "condition": ("batch", "frames", "height", "width", "channels"),
    "text": ("batch", "context_tokens", "act_embed"),
    "image": ("batch", "context_tokens", "act_embed"),
}

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def batch_shardings(batch: Batch, mesh: Mesh) -> dict[str, NamedSharding]:
  """NamedShardings of a batch (arrays or ShapeDtypeStructs) by BATCH_LOGICAL_AXES."""
  return {k: NamedSharding(mesh, sharding.logical_to_spec(BATCH_LOGICAL_AXES[k], v.shape, mesh))
          for k, v in batch.items()}


def _micro_batches(batch: Batch, num: int) -> Batch:
  """(B, ...) → (num, B/num, ...), micro-batch m = rows m, num + m, …: no data crosses devices."""
  def split(name, a):
    a = a.reshape(a.shape[0] // num, num, *a.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(a, (None,) + BATCH_LOGICAL_AXES[name])
  return {k: split(k, v) for k, v in batch.items()}


def make_train_step(cfg: Config, tx: optax.GradientTransformation
                    ) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
  """The pure step: rng = fold_in(rng, state.step), per-micro-batch fold_in(rng, m); loss, gradient
  (float32, averaged over micro-batches), clipped AdamW update, EMA. Metrics (float32 scalars): loss,
  grad_norm (before clipping), lr (of this update). With train.lora the gradient is that of the
  adapters (state.params) through the frozen base (state.frozen, passed through unchanged)."""
  train, family = cfg.train, families.of(cfg)
  model = A2Transformer(cfg.transformer)
  schedule = learning_rate_schedule(train)
  accum = train.grad_accum_steps

  lora = train.lora

  def apply(params, frozen, x, t, text, image):
    if lora is None:
      return model.apply({"params": params}, x, t, text, image)
    return train_lora.forward(cfg.transformer, frozen, params, lora.scale, x, t, text, image)

  def loss_fn(params, frozen, batch, key):
    condition = batch["condition"].astype(jnp.float32)

    def predict(x_t, t):
      v = apply(params, frozen, family.transformer_input(x_t, condition), t, batch["text"],
                batch.get("image"))
      return v[:, :x_t.shape[1]]

    loss, _ = flow_matching_loss(
        predict, batch["latents"], key, shift=cfg.sampling.shift, sampling=train.timestep_sampling,
        logit_mean=train.logit_mean, logit_std=train.logit_std, weighting=train.loss_weighting)
    return loss

  grad_fn = jax.value_and_grad(loss_fn)

  def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(rng, state.step)
    if accum == 1:
      loss, grads = grad_fn(state.params, state.frozen, batch, jax.random.fold_in(rng, 0))
    else:
      def body(carry, xs):
        index, micro = xs
        loss, grads = grad_fn(state.params, state.frozen, micro,
                              jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (loss, grads)), None
      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
      (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), _micro_batches(batch, accum)))
      loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      decay = train.ema_decay
      ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "lr": jnp.asarray(schedule(state.step), jnp.float32)}
    return TrainState(state.step + 1, params, opt_state, ema, state.frozen), metrics

  return train_step


def jit_train_step(cfg: Config, tx: optax.GradientTransformation, mesh: Mesh,
                   state_shardings: TrainState, batch_shardings: dict[str, NamedSharding]):
  """`make_train_step` jitted with in/out shardings, the state donated. Trace, lower and call it
  inside `jax.set_mesh(mesh)` (the model's activation constraints read the current mesh)."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(make_train_step(cfg, tx),
                 in_shardings=(state_shardings, batch_shardings, replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)
