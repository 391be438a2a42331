"""Helpers of the parity tests: randomised torch weights and error measures."""

from __future__ import annotations

import numpy as np


def randomize_torch_(module, seed: int = 0, scale: float = 0.2) -> None:
  """Overwrites every parameter and buffer-free weight of `module` with random values.

  Weights ~ N(0, scale²); norm gains ~ 1 + N(0, 0.1²) (their names end in 'norm*.weight' or the
  tensor is 1-D and named 'weight'), biases and tables ~ N(0, scale²). Nothing keeps its default init.
  """
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if p.ndim == 1 and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_(scale * noise)


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
