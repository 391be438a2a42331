"""AdamW with linear warmup + cosine decay, global-norm clipping, and weight decay on matmul kernels.

The optimizer sees float32 master parameters (the transformer's `param_dtype`) and float32
gradients; the forward and backward run in the config's compute dtype (bfloat16 for the 14B preset).
Gradient accumulation is a scan over micro-batches in `a2jax.train.step`, not an optax wrapper, so
every optimizer step is one `train_step` call and the schedule counts optimizer steps.
"""

from __future__ import annotations

from typing import Any

import jax
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


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """clip_by_global_norm(max_grad_norm) → AdamW(schedule, b1, b2, eps, weight_decay on kernels)."""
  adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                      weight_decay=cfg.weight_decay, mask=weight_decay_mask)
  if cfg.max_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
  return adamw
