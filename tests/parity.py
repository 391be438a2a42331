"""Helpers of the parity tests: randomised torch weights and error measures."""

from __future__ import annotations

import numpy as np

from convert_weights.tiny_release import randomize_


# Random weights everywhere, norm gains around 1 (nothing keeps its default init).
randomize_torch_ = randomize_


def max_rel_err(got, ref) -> float:
  """max|got − ref| / max|ref|."""
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def rel_l2_err(got, ref) -> float:
  """‖got − ref‖₂ / ‖ref‖₂."""
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def state_dict_numpy(module) -> dict[str, np.ndarray]:
  """A torch module's state dict as float32 numpy arrays."""
  return {k: v.detach().float().cpu().numpy() for k, v in module.state_dict().items()}
