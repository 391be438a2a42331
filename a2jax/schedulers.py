"""Flow-matching samplers as pure state transitions: UniPC multistep, Euler and the few-step
distilled sampler.

A scheduler is a frozen, hashable description (steps, shift, solver options). Its tables (sigmas,
the transformer's timesteps, every per-step UniPC coefficient) are fixed once the number of steps is
known, so they are computed here in float32 numpy, op for op as diffusers computes them, and the
step itself is a handful of array ops on an explicit state. The whole denoising loop can then be one
`lax.scan` inside `jit`:

    sched = UniPC(num_steps=50, shift=8.0)
    state = sched.init(latents)
    def body(carry, t):
      x, state = carry
      x, state = sched.step(state, model(x, t), x)
      return (x, state), None
    (latents, _), _ = jax.lax.scan(body, (latents, state), sched.timesteps)

Parity targets: diffusers' `UniPCMultistepScheduler(prediction_type="flow_prediction",
use_flow_sigmas=True, flow_shift=s)` and `FlowMatchEulerDiscreteScheduler(shift=s)`, after every
step. The model predicts the flow velocity v = noise − x0; σ = 1 is pure noise, σ = 0 the sample.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from a2jax.configs import NUM_TRAIN_TIMESTEPS, check_distill_timesteps, check_positive
from a2jax.errors import ConfigError

F32 = np.float32


def shift_sigmas(sigmas, shift: float):
  """The flow time shift σ' = s·σ / (1 + (s − 1)·σ), in the dtype of `sigmas`."""
  return shift * sigmas / (1 + (shift - 1) * sigmas)


# ---------------------------------------------------------------------------------------------
# Reading a diffusers `scheduler_config.json`.


@dataclasses.dataclass(frozen=True)
class _DiffusersKeys:
  """How one diffusers scheduler class's config keys map onto an a2jax scheduler."""

  class_name: str
  fields: dict[str, str]  # diffusers key → a2jax field
  required: dict[str, Any]  # keys whose other values change the math: diffusers key → (value, default)
  ignored: frozenset[str]  # keys without effect on flow sigmas (beta tables, spacing, Karras bounds)


_BOOKKEEPING = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})


def _from_diffusers(cls, keys: _DiffusersKeys, raw: dict[str, Any], num_steps: int, overrides):
  name = raw.get("_class_name", keys.class_name)
  if name != keys.class_name:
    raise ConfigError(f"scheduler config is a {name}, not a {keys.class_name}: use "
                      f"a2jax.schedulers.from_config, which picks the class from _class_name")
  unknown = sorted(set(raw) - _BOOKKEEPING - keys.ignored - set(keys.fields) - set(keys.required))
  if unknown:
    raise ConfigError(f"{keys.class_name} config key {unknown[0]!r} is not supported by "
                      f"a2jax.schedulers.{cls.__name__}: remove it")
  for key, (value, default) in keys.required.items():
    got = raw.get(key, default)
    if (bool(got) if value is None else got != value):
      raise ConfigError(f"{keys.class_name} config {key} = {got!r} is not supported by a2jax "
                        f"(it changes the sampler): set it to {value!r}")
  values = {keys.fields[k]: v for k, v in raw.items() if k in keys.fields}
  values.update(overrides)
  if "disable_corrector" in values:
    values["disable_corrector"] = tuple(values["disable_corrector"])
  return cls(num_steps=num_steps, **values)


# ---------------------------------------------------------------------------------------------
# UniPC multistep (bh1 / bh2, any order, x0 prediction) on flow sigmas.


class UniPCState(NamedTuple):
  """UniPC's state between steps (a pytree; every array float32 of the sample's shape X).

  step_index: int32 (), steps taken so far.
  model_outputs: (solver_order, *X) x0 predictions of the past steps, newest first (zeros before
    they exist; their coefficients are then 0).
  last_sample: (*X) the sample the previous predictor started from, for the corrector.
  """

  step_index: jax.Array
  model_outputs: jax.Array
  last_sample: jax.Array


class _UniTables(NamedTuple):
  """Per-step scalars of x' = ratio·x − c_m0·m0 − c_res·(Σ_k rho_k·(m_k − m0)/rk_k + rho_t·D1_t).

  Rows are steps i = 0..S−1; `rk` and `rho` have solver_order − 1 columns, one per older x0
  prediction m_k (padded with rk = 1, rho = 0 where the step's order uses fewer).
  """

  ratio: np.ndarray
  c_m0: np.ndarray
  c_res: np.ndarray
  rk: np.ndarray
  rho: np.ndarray
  rho_t: np.ndarray


def _uni_coefficients(sigmas: np.ndarray, t: int, s: int, order: int, bh1: bool, corrector: bool):
  """One row of `_UniTables`: the update from sigmas[s] to sigmas[t] of order `order`, with the
  older x0 predictions at sigmas[s − 1], sigmas[s − 2], …

  Mirrors diffusers' `multistep_uni_p_bh_update` (corrector=False) and `multistep_uni_c_bh_update`
  (corrector=True) scalar by scalar in float32; flow sigmas give α = 1 − σ.
  """
  def lam(j):  # log-SNR λ = log α − log σ (σ = 0 gives +inf, as in diffusers)
    return np.log(F32(1) - sigmas[j]) - np.log(sigmas[j])

  h = lam(t) - lam(s)
  rks = np.array([(lam(s - k) - lam(s)) / h for k in range(1, order)] + [F32(1)], F32)
  hh = -h  # x0 prediction
  h_phi_1 = np.expm1(hh)
  h_phi_k = h_phi_1 / hh - 1
  b_h = hh if bh1 else np.expm1(hh)
  rows, b, factorial_i = [], [], 1
  for i in range(1, order + 1):
    rows.append(np.power(rks, i - 1))
    b.append(h_phi_k * factorial_i / b_h)
    factorial_i *= i + 1
    h_phi_k = h_phi_k / hh - 1 / factorial_i
  r, b = np.stack(rows).astype(F32), np.array(b, F32)
  if corrector:
    rhos = np.array([0.5], F32) if order == 1 else np.linalg.solve(r, b).astype(F32)
    rho, rho_t = rhos[:-1], rhos[-1]
  else:
    rho_t = F32(0)
    if order == 1:
      rho = np.zeros(0, F32)
    elif order == 2:  # diffusers' shortcut for order 2
      rho = np.array([0.5], F32)
    else:
      rho = np.linalg.solve(r[:-1, :-1], b[:-1]).astype(F32)
  alpha_t = F32(1) - sigmas[t]
  return sigmas[t] / sigmas[s], alpha_t * h_phi_1, alpha_t * b_h, rks[:-1], rho, rho_t


def _uni_update(x, m0, older, row: _UniTables, d1_t=None):
  """x' = ratio·x − c_m0·m0 − c_res·(Σ_k rho_k·(m_k − m0)/rk_k [+ rho_t·D1_t]), in float32.

  x, m0, d1_t: (*X); older: (K, *X) the older x0 predictions m_1..m_K; `row` one step's scalars.
  """
  expand = (slice(None),) + (None,) * m0.ndim
  res = jnp.tensordot(row.rho, (older - m0) / row.rk[expand], axes=1)
  if d1_t is not None:
    res = res + row.rho_t * d1_t
  return (row.ratio * x - row.c_m0 * m0) - row.c_res * res


class _Schedule:
  """`sigmas` and `timesteps` of a sampler whose `_schedule` is (σ, timesteps): UniPC's timesteps
  are int32 ⌊1000·σ⌋ (as diffusers), the flow samplers' float32 1000·σ."""

  @property
  def sigmas(self) -> np.ndarray:
    """(S + 1,) float32: σ of each step, then the final σ (0 unless configured otherwise)."""
    return self._schedule[0]

  @property
  def timesteps(self) -> np.ndarray:
    """(S,): what the transformer receives at each step."""
    return self._schedule[1]


@dataclasses.dataclass(frozen=True)
class UniPC(_Schedule):
  """UniPC multistep (predictor UniP + corrector UniC, B(h) variant) for flow prediction.

  = diffusers `UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
  flow_shift=shift, predict_x0=True, ...)`; the Wan / SkyReels-A2 release uses solver_order 2,
  bh2, lower_order_final, no disabled corrector steps, final σ = 0.

  Fields: num_steps S; shift s (diffusers' `flow_shift`); solver_order (1, 2, 3, …: the predictor's
  order, ramped up over the first steps and, with lower_order_final, down over the last);
  solver_type "bh1" (B(h) = h) or "bh2" (B(h) = e^h − 1); disable_corrector: step indices whose
  *following* step skips the corrector (diffusers' convention); final_sigmas_type "zero" or
  "sigma_min" (last σ repeated).
  """

  num_steps: int
  shift: float = 1.0
  num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
  solver_order: int = 2
  solver_type: str = "bh2"
  lower_order_final: bool = True
  disable_corrector: tuple[int, ...] = ()
  final_sigmas_type: str = "zero"

  DIFFUSERS: ClassVar[_DiffusersKeys] = _DiffusersKeys(
      class_name="UniPCMultistepScheduler",
      fields={"flow_shift": "shift", "num_train_timesteps": "num_train_timesteps",
              "solver_order": "solver_order", "solver_type": "solver_type",
              "lower_order_final": "lower_order_final", "disable_corrector": "disable_corrector",
              "final_sigmas_type": "final_sigmas_type"},
      required={"prediction_type": ("flow_prediction", "epsilon"),
                "use_flow_sigmas": (True, False), "predict_x0": (True, True),
                "thresholding": (False, False), "solver_p": (None, None),
                "use_karras_sigmas": (False, False), "use_exponential_sigmas": (False, False),
                "use_beta_sigmas": (False, False), "use_dynamic_shifting": (False, False),
                "shift_terminal": (None, None)},
      ignored=frozenset({"beta_start", "beta_end", "beta_schedule", "trained_betas",
                         "timestep_spacing", "steps_offset", "rescale_betas_zero_snr",
                         "dynamic_thresholding_ratio", "sample_max_value", "time_shift_type",
                         "sigma_min", "sigma_max"}))
  # diffusers renames these older solver types to bh2.
  _SOLVER_TYPES: ClassVar[dict[str, str]] = {"bh1": "bh1", "bh2": "bh2", "midpoint": "bh2",
                                             "heun": "bh2", "logrho": "bh2"}

  def __post_init__(self):
    name = type(self).__name__
    check_positive(name, num_steps=self.num_steps, shift=self.shift,
                   num_train_timesteps=self.num_train_timesteps, solver_order=self.solver_order)
    if self.solver_type not in self._SOLVER_TYPES:
      raise ConfigError(f"{name}.solver_type = {self.solver_type!r} is not one of "
                        f"{sorted(self._SOLVER_TYPES)}: use 'bh2' (or 'bh1')")
    object.__setattr__(self, "solver_type", self._SOLVER_TYPES[self.solver_type])
    object.__setattr__(self, "disable_corrector", tuple(int(i) for i in self.disable_corrector))
    if self.final_sigmas_type not in ("zero", "sigma_min"):
      raise ConfigError(f"{name}.final_sigmas_type = {self.final_sigmas_type!r}: use 'zero' or "
                        "'sigma_min'")
    if self.solver_type == "bh1" and self.final_sigmas_type == "zero":
      # B(h) = h = −inf on the step to σ = 0, times a zero residual: NaN (in diffusers too).
      raise ConfigError(f"{name}: solver_type 'bh1' with final_sigmas_type 'zero' ends in NaN: "
                        "use solver_type 'bh2' or final_sigmas_type 'sigma_min'")

  @classmethod
  def from_config(cls, raw: dict[str, Any], num_steps: int, **overrides) -> UniPC:
    """From a diffusers `scheduler_config.json` dict; `overrides` set a2jax fields (shift=8.0).

    Bookkeeping keys and keys without effect on flow sigmas are ignored; any value that would
    change the math away from what this class computes raises ConfigError.
    """
    return _from_diffusers(cls, cls.DIFFUSERS, raw, num_steps, overrides)

  @functools.cached_property
  def _schedule(self) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' `set_timesteps` with use_flow_sigmas: float64 until the float32 cast."""
    n = self.num_train_timesteps
    sigmas = shift_sigmas(np.linspace(1, 1 / n, self.num_steps + 1)[:-1], self.shift)
    if np.fabs(sigmas[0] - 1) < 1e-6:  # keeps log(σ) − log(1 − σ) finite at the first step
      sigmas[0] -= 1e-6
    timesteps = (sigmas * n).astype(np.int64).astype(np.int32)  # truncation, as diffusers
    last = 0.0 if self.final_sigmas_type == "zero" else sigmas[-1]
    return np.concatenate([sigmas, [last]]).astype(F32), timesteps

  def orders(self) -> np.ndarray:
    """(S,) int: the predictor's order at each step (warm-up, then lowered at the end)."""
    i = np.arange(self.num_steps)
    cap = self.num_steps - i if self.lower_order_final else self.solver_order
    return np.minimum(np.minimum(self.solver_order, cap), i + 1)

  @functools.cached_property
  def _tables(self) -> tuple[_UniTables, _UniTables, np.ndarray]:
    """(predictor rows, corrector rows, corrector-on flags), each over steps i = 0..S−1.

    Step i predicts from σ_i to σ_{i+1}; its corrector first refines the sample of step i − 1's
    predictor (σ_{i−1} → σ_i) with x0 at σ_i, at the order step i − 1's predictor used.
    """
    k, bh1, sig = self.solver_order - 1, self.solver_type == "bh1", self.sigmas
    orders = self.orders()
    use_corrector = np.array([i > 0 and i - 1 not in self.disable_corrector
                              for i in range(self.num_steps)])

    def table(rows) -> _UniTables:
      ratio, c_m0, c_res, rk, rho, rho_t = zip(*rows)
      pad = lambda vs, fill: np.array([np.pad(v, (0, k - len(v)), constant_values=fill)
                                       for v in vs], F32).reshape(len(vs), k)
      return _UniTables(np.array(ratio, F32), np.array(c_m0, F32), np.array(c_res, F32),
                        pad(rk, 1), pad(rho, 0), np.array(rho_t, F32))

    off = (F32(0), F32(0), F32(0), np.zeros(0, F32), np.zeros(0, F32), F32(0))
    with np.errstate(divide="ignore", invalid="ignore"):  # σ = 0: λ = inf, as in diffusers
      pred = table([_uni_coefficients(sig, i + 1, i, orders[i], bh1, False)
                    for i in range(self.num_steps)])
      corr = table([_uni_coefficients(sig, i, i - 1, orders[i - 1], bh1, True) if on else off
                    for i, on in enumerate(use_corrector)])
    return pred, corr, use_corrector

  def corrector_on(self) -> np.ndarray:
    """(S,) bool: whether step i starts with the corrector (never step 0)."""
    return self._tables[2]

  def init(self, sample: jax.Array, keys: jax.Array | None = None) -> UniPCState:
    """The state before step 0, for samples shaped like `sample` (*X); `keys` unused."""
    del keys  # deterministic
    zeros = jnp.zeros(sample.shape, jnp.float32)
    return UniPCState(jnp.zeros((), jnp.int32),
                      jnp.zeros((self.solver_order,) + sample.shape, jnp.float32), zeros)

  def step(self, state: UniPCState, model_output: jax.Array,
           sample: jax.Array) -> tuple[jax.Array, UniPCState]:
    """One sampling step: corrector on `sample` (from step 1), then predictor to the next σ.

    model_output: (*X) the velocity the model predicted at `sample` and timesteps[step_index];
    sample: (*X). Returns the next sample (*X, sample's dtype; math in float32) and state.
    """
    i = state.step_index
    pred, corr, use_corrector = jax.tree.map(lambda t: jnp.asarray(t)[i], self._tables)
    x = sample.astype(jnp.float32)
    x0 = x - jnp.asarray(self.sigmas)[i] * model_output.astype(jnp.float32)
    past = state.model_outputs
    corrected = _uni_update(state.last_sample, past[0], past[1:], corr, d1_t=x0 - past[0])
    x = jnp.where(use_corrector, corrected, x)
    past = jnp.concatenate([x0[None], past[:-1]])
    prev = _uni_update(x, past[0], past[1:], pred)
    return prev.astype(sample.dtype), UniPCState(i + 1, past, x)


# ---------------------------------------------------------------------------------------------
# Flow-match Euler.


class EulerState(NamedTuple):
  """Euler's state between steps: step_index int32 (), steps taken so far."""

  step_index: jax.Array


@dataclasses.dataclass(frozen=True)
class Euler(_Schedule):
  """Flow-match Euler x' = x + (σ_{i+1} − σ_i)·v = diffusers `FlowMatchEulerDiscreteScheduler(shift)`.

  Its schedule is not UniPC's: σ = linspace(1, σ_min, S) (S points, both ends kept) where σ_min is
  the shifted σ of training step 1 (shift(1/1000)), then shifted again; timesteps 1000·σ stay float.
  """

  num_steps: int
  shift: float = 1.0
  num_train_timesteps: int = NUM_TRAIN_TIMESTEPS

  DIFFUSERS: ClassVar[_DiffusersKeys] = _DiffusersKeys(
      class_name="FlowMatchEulerDiscreteScheduler",
      fields={"shift": "shift", "num_train_timesteps": "num_train_timesteps"},
      required={"use_dynamic_shifting": (False, False), "invert_sigmas": (False, False),
                "shift_terminal": (None, None), "use_karras_sigmas": (False, False),
                "use_exponential_sigmas": (False, False), "use_beta_sigmas": (False, False),
                "stochastic_sampling": (False, False)},
      ignored=frozenset({"base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len",
                         "time_shift_type"}))

  def __post_init__(self):
    check_positive(type(self).__name__, num_steps=self.num_steps, shift=self.shift,
                   num_train_timesteps=self.num_train_timesteps)

  @classmethod
  def from_config(cls, raw: dict[str, Any], num_steps: int, **overrides) -> Euler:
    """From a diffusers `scheduler_config.json` dict; see `UniPC.from_config`."""
    return _from_diffusers(cls, cls.DIFFUSERS, raw, num_steps, overrides)

  @functools.cached_property
  def _schedule(self) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' `__init__` (float32 training table) then `set_timesteps` (float64 until cast)."""
    n = self.num_train_timesteps
    train = shift_sigmas(np.linspace(1, n, n, dtype=F32)[::-1] / F32(n), self.shift)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    sigmas = np.linspace(sigma_max * n, sigma_min * n, self.num_steps) / n
    sigmas = shift_sigmas(sigmas, self.shift).astype(F32)
    return np.concatenate([sigmas, [F32(0)]]), sigmas * F32(n)

  def init(self, sample: jax.Array, keys: jax.Array | None = None) -> EulerState:
    del sample, keys  # Euler keeps no history and draws no noise
    return EulerState(jnp.zeros((), jnp.int32))

  def step(self, state: EulerState, model_output: jax.Array,
           sample: jax.Array) -> tuple[jax.Array, EulerState]:
    """x' = x + (σ_{i+1} − σ_i)·v in float32; returns (*X in sample's dtype, next state)."""
    sigmas, i = jnp.asarray(self.sigmas), state.step_index
    prev = sample.astype(jnp.float32) + (sigmas[i + 1] - sigmas[i]) * model_output.astype(
        jnp.float32)
    return prev.astype(sample.dtype), EulerState(i + 1)


# ---------------------------------------------------------------------------------------------
# Step-distilled sampling (lightx2v's 4-step recipe).


class DistillState(NamedTuple):
  """step_index int32 (); keys (B, 2) uint32: one PRNG key per batch row (raw key data), split at
  every step for that step's fresh noise."""

  step_index: jax.Array
  keys: jax.Array


@dataclasses.dataclass(frozen=True)
class Distill(_Schedule):
  """Few-step sampling of a step-distilled model: x0 = x − σ·v, then x' = (1 − σ')·x0 + σ'·ε with
  fresh noise ε; the last step returns x0. = diffusers `FlowMatchEulerDiscreteScheduler(shift,
  stochastic_sampling=True)` given these sigmas and timesteps (and the same ε).

  The schedule is lightx2v's: σ = linspace(1, 0, 1001)[:−1] shifted by `shift`, taken at the
  training steps `distill_timesteps` (index 1000 − t); the transformer receives 1000·σ.
  """

  distill_timesteps: tuple[int, ...] = (1000, 750, 500, 250)
  shift: float = 5.0
  num_train_timesteps: int = NUM_TRAIN_TIMESTEPS

  def __post_init__(self):
    name = type(self).__name__
    check_positive(name, shift=self.shift, num_train_timesteps=self.num_train_timesteps)
    object.__setattr__(self, "distill_timesteps", check_distill_timesteps(
        name, self.distill_timesteps, self.num_train_timesteps))

  @property
  def num_steps(self) -> int:
    return len(self.distill_timesteps)

  @functools.cached_property
  def _schedule(self) -> tuple[np.ndarray, np.ndarray]:
    sigmas = shift_sigmas(self.unshifted_sigmas, F32(self.shift)).astype(F32)
    return np.concatenate([sigmas, [F32(0)]]), sigmas * F32(self.num_train_timesteps)

  @property
  def unshifted_sigmas(self) -> np.ndarray:
    """(S,) float32: the schedule's σ before the shift (what diffusers' set_timesteps takes)."""
    n = self.num_train_timesteps
    return np.linspace(1, 0, n + 1)[:-1].astype(F32)[[n - t for t in self.distill_timesteps]]

  def init(self, sample: jax.Array, keys: jax.Array | None = None) -> DistillState:
    """keys (B, 2) uint32 (jax.random.key_data of one key per batch row of `sample`)."""
    if keys is None:
      raise ConfigError("the distill sampler draws fresh noise at every step: give it PRNG keys")
    return DistillState(jnp.zeros((), jnp.int32), keys)

  def step_with_noise(self, state: DistillState, model_output: jax.Array, sample: jax.Array,
                      noise: jax.Array) -> tuple[jax.Array, DistillState]:
    """The update with a given ε (*X); the last step returns x0. Math in float32."""
    sigmas, i = jnp.asarray(self.sigmas), state.step_index
    x0 = sample.astype(jnp.float32) - sigmas[i] * model_output.astype(jnp.float32)
    prev = (1.0 - sigmas[i + 1]) * x0 + sigmas[i + 1] * noise.astype(jnp.float32)
    prev = jnp.where(i + 1 == self.num_steps, x0, prev)
    return prev.astype(sample.dtype), state._replace(step_index=i + 1)

  def step(self, state: DistillState, model_output: jax.Array,
           sample: jax.Array) -> tuple[jax.Array, DistillState]:
    """One step with fresh noise from each row's key; returns (*X in sample's dtype, next state)."""
    keys, noise = jax.vmap(lambda k, x: _next_noise(k, x.shape))(state.keys, sample)
    return self.step_with_noise(state._replace(keys=keys), model_output, sample, noise)


def _next_noise(key_data: jax.Array, shape) -> tuple[jax.Array, jax.Array]:
  """(the row's next key data, standard normal float32 noise of `shape`) from key data (2,)."""
  key, sub = jax.random.split(jax.random.wrap_key_data(key_data))
  return jax.random.key_data(key), jax.random.normal(sub, shape, jnp.float32)


SCHEDULERS = {"unipc": UniPC, "euler": Euler, "distill": Distill}


def for_sampling(sampling) -> UniPC | Euler | Distill:
  """The scheduler of a `SamplingConfig` (steps and shift, or the distill schedule)."""
  if sampling.sampler == "distill":
    return Distill(tuple(sampling.distill_timesteps), sampling.distill_shift)
  return SCHEDULERS[sampling.sampler](num_steps=sampling.steps, shift=sampling.shift)


def from_config(raw: dict[str, Any], num_steps: int, **overrides) -> UniPC | Euler:
  """The a2jax scheduler of a diffusers `scheduler_config.json` dict, picked by its `_class_name`."""
  by_class = {cls.DIFFUSERS.class_name: cls for cls in (UniPC, Euler)}
  name = raw.get("_class_name")
  if name not in by_class:
    raise ConfigError(f"scheduler config _class_name = {name!r} is not one of {sorted(by_class)}: "
                      "a2jax samples with flow UniPC or flow-match Euler")
  return by_class[name].from_config(raw, num_steps, **overrides)
