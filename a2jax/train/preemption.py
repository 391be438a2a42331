"""Preemption: SIGTERM, what a TPU VM gets before maintenance or a spot reclaim, makes train.py save
a checkpoint at a step every process agrees on and exit 0; the same command resumes from it.

With several processes the notice goes through JAX's preemption sync manager (the coordination
service catches SIGTERM in any process and picks the first step all processes can still reach:
`multihost_utils.reached_preemption_sync_point`); with one process a SIGTERM handler sets a flag
read at the next step.
"""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils


class PreemptionNotice:
  """Whether a preemption notice has arrived, asked once per step by every process, in step order."""

  def __init__(self):
    self._several = jax.process_count() > 1
    self._received = False
    if not self._several:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    self._received = True

  def reached(self, step: int) -> bool:
    """True at the step where every process saves and stops (once a notice arrived)."""
    if self._several:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._received

  def close(self) -> None:
    if not self._several:
      signal.signal(signal.SIGTERM, self._previous)
