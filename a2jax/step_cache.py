"""Step caching inside the compiled sampling loop: reuse the block stack's residual on steps where the
model's output barely changes (docs/sampling.md "Fast sampling", DESIGN.md §12).

Every mode splits the transformer into embed → blocks → head (`A2Transformer.embed`, `run_blocks`,
`head`); embed and head run at every step, and on a skipped step the blocks are replaced by the
cached residual (blocks' output − input of the last step that ran them). The decision is a
`lax.cond` inside the one `lax.scan`, never a host round trip:

- `mag` (MagCache): a skip schedule computed here on the host from a calibrated curve of residual
  magnitude ratios (`mag_schedule`, the curve from `sample.py --calibrate`), a constant of the
  program.
- `teacache` (TeaCache): the relative L1 change of the timestep embedding through a polynomial,
  accumulated to the threshold. It depends on the timesteps alone (a schedule), computed on device
  from the embedding the step computes anyway.
- `fbcache` (first-block cache): block 0 always runs; the other blocks are skipped while block 0's
  residual changed by less than the threshold (relative mean |Δ|) since the last computed step.

The guidance branches share one batch (2B rows), so a step skips only when every branch's own
rule says skip (per-branch state as in the references: MagCache ratios and errors, the first-block
residual); a computed step resets every branch.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from a2jax import sharding
from a2jax.configs import SamplingConfig
from a2jax.errors import ConfigError, InputError

DEFAULT_THRESHOLDS = {"mag": 0.12, "teacache": 0.26, "fbcache": 0.05}
# TeaCache4Wan2.1's rescaling polynomial for I2V 480p on the timestep embedding (highest power
# first); fitted on Wan2.1, not on A2: the threshold is what to tune.
TEACACHE_COEFFICIENTS = (2.57151496e+05, -3.54229917e+04, 1.40286849e+03, -1.35890334e+01,
                         1.32517977e-01)
CALIBRATION_FORMAT = "a2jax-magcache-curve/1"
TOKENS = ("batch", "tokens", "act_embed")


class CacheState(NamedTuple):
  """Carried through the scan. residual (nB, S, D): the cached residual of the blocks that a
  skipped step adds (all blocks, or blocks 1..L−1 for fbcache); head_residual (nB, S, D) fbcache's
  block-0 residual of the last computed step ((0,) otherwise); norms (nB, S) per-token norms of the
  last residual (for the magnitude ratio); temb_prev (nB, D) and accumulated () for teacache;
  computed_any () bool: a step has run the blocks."""

  residual: jax.Array
  head_residual: jax.Array
  norms: jax.Array
  temb_prev: jax.Array
  accumulated: jax.Array
  computed_any: jax.Array


class StepStats(NamedTuple):
  """Per step: blocks_run () the share of the block stack run (1, 0, or 1/L for an fbcache skip);
  mag_ratio (branches,) the mean per-token ratio of residual norms to the previous step's."""

  blocks_run: jax.Array
  mag_ratio: jax.Array


@dataclasses.dataclass(frozen=True)
class StepCache:
  """One sampling config's caching policy. mode "none" runs every step through the split path
  (the calibration run); `skip` is mag's precomputed schedule (S,) (None otherwise)."""

  mode: str
  threshold: float
  num_steps: int
  num_layers: int
  branches: int
  retention: float = 0.2
  skip: tuple[bool, ...] | None = None

  def init(self, tokens_shape: tuple[int, ...], temb_dim: int, dtype) -> CacheState:
    """The state before step 0 for tokens of `tokens_shape` (nB, S, D)."""
    zeros = lambda shape, dt=jnp.float32: jnp.zeros(shape, dt)
    residual = sharding.constrain(zeros(tokens_shape, dtype), TOKENS)
    head = (sharding.constrain(zeros(tokens_shape, dtype), TOKENS) if self.mode == "fbcache"
            else zeros((0,), dtype))
    temb_dim = temb_dim if self.mode == "teacache" else 0
    return CacheState(residual, head, zeros(tokens_shape[:2]), zeros((tokens_shape[0], temb_dim)),
                      zeros(()), jnp.zeros((), bool))

  def blocks(self, run: Callable[[jax.Array, slice], jax.Array], tokens: jax.Array,
             temb: jax.Array, step: jax.Array,
             state: CacheState) -> tuple[jax.Array, CacheState, StepStats]:
    """The block stack at step `step` (traced int): tokens (nB, S, D) → (nB, S, D).

    run(tokens, layers) runs the layers of a slice (slice(None) for all) on tokens.
    """
    tokens = sharding.constrain(tokens, TOKENS)
    if self.mode == "fbcache":
      return self._first_block(run, tokens, step, state)
    if self.mode == "mag":
      skip = jnp.asarray(np.array(self.skip, bool))[step]
    elif self.mode == "teacache":
      skip, state = self._teacache_skip(temb, step, state)
    else:
      skip = jnp.zeros((), bool)

    def compute(residual):
      del residual
      return run(tokens, slice(None)) - tokens

    residual = jax.lax.cond(skip & state.computed_any, lambda r: r, compute, state.residual)
    residual = sharding.constrain(residual, TOKENS)
    computed = ~(skip & state.computed_any)
    return self._finish(tokens + residual, residual, computed, computed.astype(jnp.float32), state)

  def _finish(self, out, residual, computed, blocks_run, state: CacheState):
    norms = jnp.linalg.norm(residual.astype(jnp.float32), axis=-1)  # (nB, S)
    ratio = jnp.where(state.computed_any, norms / jnp.maximum(state.norms, 1e-12), 1.0)
    ratio = ratio.mean(axis=1).reshape(self.branches, -1).mean(axis=1)
    state = state._replace(residual=residual, norms=jnp.where(computed, norms, state.norms),
                           computed_any=jnp.ones((), bool))
    return out, state, StepStats(blocks_run, jnp.where(computed, ratio, 1.0))

  def _teacache_skip(self, temb, step, state: CacheState):
    """TeaCache's rule: skip while the accumulated poly(rel. L1 change of temb) < threshold."""
    temb = temb.astype(jnp.float32)
    prev = state.temb_prev
    change = jnp.abs(temb - prev).mean() / jnp.maximum(jnp.abs(prev).mean(), 1e-12)
    accumulated = state.accumulated + jnp.polyval(jnp.asarray(TEACACHE_COEFFICIENTS, jnp.float32),
                                                  change)
    always = (step < self.always_computed) | (step == self.num_steps - 1)
    skip = ~always & (accumulated < self.threshold) & (self.threshold > 0)
    state = state._replace(temb_prev=temb, accumulated=jnp.where(skip, accumulated, 0.0))
    return skip, state

  def _first_block(self, run, tokens, step, state: CacheState):
    """First-block cache: block 0 runs; the rest are skipped while its residual changed little."""
    del step
    first = run(tokens, slice(0, 1))
    head_residual = first - tokens
    def branch_mean(a):
      return jnp.abs(a.astype(jnp.float32)).reshape(self.branches, -1).mean(axis=1)
    change = branch_mean(head_residual - state.head_residual) / jnp.maximum(
        branch_mean(state.head_residual), 1e-12)
    skip = state.computed_any & jnp.all(change <= self.threshold)
    if self.threshold == 0:  # threshold 0 never skips (diffusers: compute while change > threshold)
      skip = jnp.zeros((), bool)

    def compute(residual):
      del residual
      return run(first, slice(1, None)) - first

    residual = jax.lax.cond(skip, lambda r: r, compute, state.residual)
    residual = sharding.constrain(residual, TOKENS)
    state = state._replace(head_residual=jnp.where(skip, state.head_residual, head_residual))
    blocks_run = jnp.where(skip, 1.0 / self.num_layers, 1.0)
    return self._finish(first + residual, residual, ~skip, blocks_run, state)

  @property
  def always_computed(self) -> int:
    """Steps at the start that always run (the retention share; at least the first)."""
    return max(1, int(self.retention * self.num_steps))


def mag_schedule(curve: np.ndarray, threshold: float, max_skips: int, retention: float) -> np.ndarray:
  """MagCache's skip decisions (S,) bool from a calibrated curve (branches, S) of magnitude ratios.

  Per branch, after the first `retention` share of steps: multiply the step's ratio into a running
  ratio, add |1 − running ratio| to an error, and skip while error < threshold and the run of skips
  ≤ max_skips. One batch holds every branch: a step skips when all branches would; a computed step
  resets all.
  """
  branches, steps = curve.shape
  skip = np.zeros(steps, bool)
  ratio, error, run = np.ones(branches), np.zeros(branches), 0
  for i in range(max(1, int(retention * steps)), steps):
    next_ratio = ratio * curve[:, i]
    next_error = error + np.abs(1 - next_ratio)
    if np.all(next_error < threshold) and run + 1 <= max_skips:
      skip[i], ratio, error, run = True, next_ratio, next_error, run + 1
    else:
      ratio, error, run = np.ones(branches), np.zeros(branches), 0
  return skip


def write_calibration(path: str | pathlib.Path, mag_ratio: np.ndarray, sampling: SamplingConfig) -> None:
  """Writes the curve (S, branches) of a full run as JSON (temp name, then rename)."""
  path = pathlib.Path(path)
  data = {"format": CALIBRATION_FORMAT, "steps": int(mag_ratio.shape[0]),
          "shift": sampling.shift, "sampler": sampling.sampler, "guidance": sampling.guidance,
          "mag_ratio": np.asarray(mag_ratio, float).T.round(6).tolist()}
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(data, indent=1))
  tmp.replace(path)


def read_calibration(path: str | pathlib.Path, steps: int, branches: int) -> np.ndarray:
  """The curve (branches, S) of a calibration file, checked against this run's steps / branches."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise InputError(f"MagCache calibration {path} does not exist: write it with "
                     f"sample.py --checkpoint FOLDER --prompt ... --calibrate {path}")
  try:
    data = json.loads(path.read_text())
    curve = np.asarray(data["mag_ratio"], np.float64)
  except (ValueError, KeyError, TypeError):
    raise InputError(f"{path} is not a MagCache calibration of sample.py --calibrate") from None
  if data.get("format") != CALIBRATION_FORMAT or curve.ndim != 2:
    raise InputError(f"{path} is not a MagCache calibration of sample.py --calibrate")
  if curve.shape[1] != steps:
    raise InputError(f"{path} was calibrated at {curve.shape[1]} steps; this run has {steps}: "
                     "calibrate at the same steps (and shift)")
  if curve.shape[0] < branches:
    raise InputError(f"{path} holds {curve.shape[0]} guidance branch(es); this run has {branches}: "
                     "calibrate with the same guidance")
  return curve[:branches]


def for_sampling(sampling: SamplingConfig, num_steps: int, num_layers: int,
                 branches: int) -> StepCache:
  """The caching policy of a sampling config (reads mag's calibration file)."""
  mode = sampling.cache
  threshold = (DEFAULT_THRESHOLDS.get(mode, 0.0) if sampling.cache_threshold is None
               else sampling.cache_threshold)
  if mode == "fbcache" and num_layers < 2:
    raise ConfigError("sampling.cache = 'fbcache' needs a transformer of at least 2 layers")
  skip = None
  if mode == "mag":
    curve = read_calibration(sampling.cache_calibration, num_steps, branches)
    skip = tuple(bool(s) for s in mag_schedule(curve, threshold, sampling.cache_max_skips,
                                               sampling.cache_retention))
  return StepCache(mode, float(threshold), num_steps, num_layers, branches,
                   sampling.cache_retention, skip)
