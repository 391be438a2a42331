"""Classifier-free guidance shared by the samplers (a2jax.pipeline, a2jax.diffusion_forcing): the
text states of the guidance branches, batched, and their combination.

Shapes: B videos, nB = branches · B rows, T text tokens, D text width.
"""

from __future__ import annotations

import jax.numpy as jnp


def branch_count(guidance: float) -> int:
  """Rows per video of prompt / negative-prompt guidance: 2, or 1 at guidance 1, where the second
  adds nothing."""
  return 1 if guidance == 1.0 else 2


def classifier_free(v: jnp.ndarray, batch: int, guidance: float) -> jnp.ndarray:
  """Velocities of a prompt branch then a negative-prompt branch (2B, …) → u + s·(c − u) (B, …);
  one branch (B, …) is returned as it is."""
  if v.shape[0] == batch:
    return v
  cond, uncond = v[:batch], v[batch:]
  return uncond + guidance * (cond - uncond)


def branch_contexts(text: jnp.ndarray, negative_text: jnp.ndarray, branches: int) -> jnp.ndarray:
  """Text states of the branches (nB, T, D): the prompt, then the negative prompt for the others."""
  return jnp.concatenate([text, *[negative_text] * (branches - 1)], axis=0)
