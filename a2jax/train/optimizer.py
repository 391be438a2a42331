"""AdamW with linear warmup + cosine decay, global-norm clipping, and weight decay on matmul kernels.

The optimizer sees float32 master parameters (the transformer's `param_dtype`) and float32
gradients; the forward and backward run in the config's compute dtype (bfloat16 for the 14B preset).
Gradient accumulation is a scan over micro-batches in `a2jax.train.step`, not an optax wrapper, so
every optimizer step is one `train_step` call and the schedule counts optimizer steps.

Adam's two moments are stored in `train.moments_dtype`: float32 (optax's AdamW as is) or bfloat16,
which halves their memory (what lets the 14B's full fine-tune fit a v5p-8: docs/training.md "Training").
The bfloat16 update is computed in float32 (see `bfloat16_moments`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from a2jax.configs import TrainConfig

# Parameters under these module names are embeddings (of patches, timesteps, text and image
# tokens): exempt from weight decay, like norms, biases and the modulation tables (`scale_shift_table`),
# which are not matmul kernels.
EMBEDDING_MODULES = ("patch_embedding", "condition_embedder")


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
  """lr of the update that ends step n = count + 1 (count: optimizer steps taken before it):
  linear warmup reaching learning_rate at step warmup_steps, then a cosine to
  learning_rate·min_lr_ratio at step `steps`. The first update already has a nonzero lr."""
  base = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.steps, end_value=cfg.learning_rate * cfg.min_lr_ratio)
  return lambda count: base(count + 1)


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def decays(path) -> bool:
  """Whether weight decay applies to the parameter at `path`: matmul kernels outside embeddings."""
  names = _path_names(path)
  return names[-1] == "kernel" and not set(names) & set(EMBEDDING_MODULES)


def weight_decay_mask(params: Any) -> Any:
  """Tree of bools like `params`: True where weight decay applies (see `decays`)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: decays(p), params)


def stochastic_round_to_bfloat16(x: jax.Array, key: jax.Array) -> jax.Array:
  """float32 `x` rounded to bfloat16 up or down at random, in proportion to the distance to each
  neighbour (E[result] = x): 16 random bits added to the 16 low bits bfloat16 drops, then
  truncated. Signs are sign-magnitude, so negative values round symmetrically; inf stays inf, NaN
  NaN (a NaN's payload could carry into the sign bit, so it is cast instead)."""
  x = x.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  noise = jax.random.bits(key, x.shape, jnp.uint16).astype(jnp.uint32)
  high = ((bits + noise) >> 16).astype(jnp.uint16)
  return jnp.where(jnp.isnan(x), x.astype(jnp.bfloat16),
                   jax.lax.bitcast_convert_type(high, jnp.bfloat16))


def bfloat16_moments(adam: optax.GradientTransformation, seed: int) -> optax.GradientTransformation:
  """`adam` (optax.scale_by_adam) with its moments mu and nu stored in bfloat16.

  Each update widens the stored moments to float32, runs `adam`'s float32 arithmetic (moment
  EMAs, bias correction, mu / (sqrt(nu) + eps)) and rounds the new moments back to bfloat16. The
  state keeps optax's ScaleByAdamState layout (count, mu, nu), so its shardings follow the
  parameters like float32 moments do (a2jax.train.state) and a checkpoint resumes exactly.

  Why stochastic rounding: with round-to-nearest, an EMA with b2 = 0.999 stalls in bfloat16
  (8 significant bits): nu moves by (1 − b2)·(g² − nu), under half an ulp (≥ 2⁻⁹ of nu) unless g²
  is several times nu, so nu could rise but never decay, and the steps shrink. Rounding at random
  keeps every stored moment an unbiased estimate of the float32 one (Zamirai et al. 2020,
  "Revisiting BFloat16 Training"); the noise it adds to nu is a few percent, far below the
  gradient's own. nu's dynamic range is no concern: bfloat16 has float32's 8 exponent bits, so g²
  underflows only for |g| < 1e-19, where eps (added to sqrt(nu) in float32, as before) dominates
  the denominator anyway. The random bits come from fold_in(key(seed), count) and the leaf's
  index: deterministic, so a resumed run repeats them bit for bit, and independent of the mesh
  (partitionable threefry).
  """
  def init(params):
    state = adam.init(params)
    return state._replace(mu=optax.tree.cast(state.mu, jnp.bfloat16),
                          nu=optax.tree.cast(state.nu, jnp.bfloat16))

  def update(updates, state, params=None):
    wide = state._replace(mu=optax.tree.cast(state.mu, jnp.float32),
                          nu=optax.tree.cast(state.nu, jnp.float32))
    updates, new = adam.update(updates, wide, params)
    key = jax.random.fold_in(jax.random.key(seed), state.count)

    def narrow(tree, moment):
      leaves, treedef = jax.tree.flatten(tree)
      keys = jax.random.split(jax.random.fold_in(key, moment), max(len(leaves), 1))
      return treedef.unflatten([stochastic_round_to_bfloat16(x, k) for x, k in zip(leaves, keys)])
    return updates, new._replace(mu=narrow(new.mu, 0), nu=narrow(new.nu, 1))

  return optax.GradientTransformation(init, update)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """clip_by_global_norm(max_grad_norm) → AdamW(schedule, b1, b2, eps, weight_decay on kernels),
  the moments stored in cfg.moments_dtype (optax.adamw's state layout either way)."""
  adam = optax.scale_by_adam(b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps)
  if cfg.moments_dtype == "bfloat16":
    adam = bfloat16_moments(adam, cfg.seed)
  adamw = optax.chain(adam, optax.add_decayed_weights(cfg.weight_decay, weight_decay_mask),
                      optax.scale_by_learning_rate(learning_rate_schedule(cfg)))
  if cfg.max_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
  return adamw
