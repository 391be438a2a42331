"""Parity of a2jax's flow UniPC and Euler samplers with diffusers, step by step.

Both sides run their own trajectory through the same "model" v = tanh(A·x) + c·t/1000 + b (a fixed
random function of the sample and the timestep, so that earlier steps' errors would compound), and
the latents after every step must agree within 1e-5 relative: max|Δ| ≤ 1e-5·max|ref|.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from a2jax import schedulers
from a2jax.errors import ConfigError
from tests.parity import max_rel_err

TOL = 1e-5  # max|Δ| / max|ref| per step, float32
SHAPE = (2, 4, 3, 5, 6)  # (B, C, F, H, W): non-square, several channels
STEPS = (1, 2, 3, 10, 50)
SHIFTS = (1.0, 3.0, 8.0)

# The Wan2.1 / SkyReels-A2 release's `scheduler/scheduler_config.json` settings (flow_shift varies
# by release and resolution; the a2jax pipeline overrides it).
WAN_UNIPC = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                 solver_order=2, predict_x0=True, solver_type="bh2", lower_order_final=True,
                 disable_corrector=[], final_sigmas_type="zero")


def _model():
  """v(x, t) = tanh(A·x over channels) + c·t/1000 + b: a fixed random velocity field."""
  rng = np.random.default_rng(0)
  c = SHAPE[1]
  a = jnp.asarray(rng.normal(size=(c, c)) / np.sqrt(c), jnp.float32)
  b = jnp.asarray(0.3 * rng.normal(size=SHAPE), jnp.float32)
  coef = jnp.asarray(rng.normal(size=(1, c, 1, 1, 1)), jnp.float32)

  def model(x, t):
    return jnp.tanh(jnp.einsum("dc,bc...->bd...", a, x)) + coef * (t / 1000.0) + b
  return model


MODEL = _model()
NOISE = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)


def _diffusers_trajectory(ref, num_steps):
  """Latents after every step of the diffusers scheduler `ref`, (S, *SHAPE)."""
  ref.set_timesteps(num_steps)
  x, out = torch.from_numpy(NOISE.copy()), []
  for t in ref.timesteps:
    v = torch.from_numpy(np.array(MODEL(jnp.asarray(x.numpy()), float(t))))
    x = ref.step(v, t, x, return_dict=False)[0]
    out.append(x.numpy().copy())
  return np.stack(out)


def _a2jax_trajectory(sched):
  """Latents after every step of an a2jax scheduler, in a Python loop, (S, *SHAPE)."""
  x = jnp.asarray(NOISE)
  state, out = sched.init(x), []
  for t in sched.timesteps:
    x, state = sched.step(state, MODEL(x, float(t)), x)
    out.append(np.asarray(x))
  return np.stack(out)


def _scan_trajectory(sched):
  """The same loop as one jitted `lax.scan` over the timesteps."""
  @jax.jit
  def run(x):
    def body(carry, t):
      x, state = carry
      x, state = sched.step(state, MODEL(x, t.astype(jnp.float32)), x)
      return (x, state), x
    return jax.lax.scan(body, (x, sched.init(x)), jnp.asarray(sched.timesteps))[1]
  return np.asarray(run(jnp.asarray(NOISE)))


def _assert_steps_match(got, ref):
  assert got.shape == ref.shape
  errs = [max_rel_err(g, r) for g, r in zip(got, ref)]
  assert np.all(np.isfinite(got))
  assert max(errs) <= TOL, f"per-step max rel err {max(errs):.2e} at step {int(np.argmax(errs))}"


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("num_steps", STEPS)
def test_unipc_matches_diffusers_every_step(num_steps, shift):
  ref = UniPCMultistepScheduler(**WAN_UNIPC, flow_shift=shift)
  sched = schedulers.UniPC(num_steps=num_steps, shift=shift)
  ref_traj = _diffusers_trajectory(ref, num_steps)
  np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())
  assert sched.timesteps.dtype == np.int32
  np.testing.assert_array_equal(sched.sigmas, ref.sigmas.numpy())
  _assert_steps_match(_a2jax_trajectory(sched), ref_traj)


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("num_steps", STEPS)
def test_euler_matches_diffusers_every_step(num_steps, shift):
  ref = FlowMatchEulerDiscreteScheduler(shift=shift)
  sched = schedulers.Euler(num_steps=num_steps, shift=shift)
  ref_traj = _diffusers_trajectory(ref, num_steps)
  np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())
  np.testing.assert_array_equal(sched.sigmas, ref.sigmas.numpy())
  _assert_steps_match(_a2jax_trajectory(sched), ref_traj)


@pytest.mark.parametrize("options", [
    dict(solver_order=1),
    dict(solver_order=3),
    dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(disable_corrector=[0, 3, 4]),
    dict(final_sigmas_type="sigma_min", lower_order_final=False),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_unipc_solver_options_match_diffusers(options):
  num_steps, shift = 12, 5.0
  ref = UniPCMultistepScheduler(**{**WAN_UNIPC, **options}, flow_shift=shift)
  sched = schedulers.UniPC.from_config(dict(ref.config), num_steps)
  assert sched.shift == shift
  _assert_steps_match(_a2jax_trajectory(sched), _diffusers_trajectory(ref, num_steps))


def test_unipc_first_timestep_nudged():
  """σ'(1) = 1 is nudged down by 1e-6, so the first timestep the transformer sees is 999."""
  sched = schedulers.UniPC(num_steps=50, shift=8.0)
  assert sched.timesteps[0] == 999 and sched.sigmas[0] == np.float32(1 - 1e-6)
  assert sched.sigmas[-1] == 0 and sched.sigmas.dtype == np.float32


@pytest.mark.parametrize("make", [lambda: schedulers.UniPC(num_steps=10, shift=8.0),
                                  lambda: schedulers.UniPC(num_steps=7, shift=3.0, solver_order=3),
                                  lambda: schedulers.Euler(num_steps=10, shift=8.0)])
def test_jit_scan_equals_python_loop(make):
  """The whole loop as one jitted lax.scan gives the eager loop's latents (1e-6 relative)."""
  sched = make()
  loop, scan = _a2jax_trajectory(sched), _scan_trajectory(sched)
  assert max(max_rel_err(s, l) for s, l in zip(scan, loop)) <= 1e-6


def test_step_keeps_sample_dtype_and_upcasts_model_output():
  """A bfloat16 model output is upcast: the float32 carry of a scan keeps its dtype."""
  sched = schedulers.UniPC(num_steps=4, shift=8.0)
  x = jnp.asarray(NOISE)
  state = sched.init(x)
  v = MODEL(x, 999.0)
  x32, _ = sched.step(state, v, x)
  x16, state16 = sched.step(state, v.astype(jnp.bfloat16), x)
  assert x16.dtype == jnp.float32 and state16.model_outputs.dtype == jnp.float32
  assert max_rel_err(x16, x32) <= 1e-2


def _saved_config(ref, tmp_path):
  """The dict that `save_pretrained` writes as scheduler_config.json."""
  ref.save_config(tmp_path)
  return json.loads((tmp_path / "scheduler_config.json").read_text())


def test_from_config_of_saved_release_configs(tmp_path):
  unipc = _saved_config(UniPCMultistepScheduler(**WAN_UNIPC, flow_shift=3.0), tmp_path / "u")
  sched = schedulers.from_config(unipc, num_steps=50)
  assert sched == schedulers.UniPC(num_steps=50, shift=3.0)
  assert schedulers.from_config(unipc, 50, shift=8.0) == schedulers.UniPC(50, shift=8.0)
  euler = _saved_config(FlowMatchEulerDiscreteScheduler(shift=5.0), tmp_path / "e")
  assert schedulers.from_config(euler, 30) == schedulers.Euler(num_steps=30, shift=5.0)


@pytest.mark.parametrize("change", [
    dict(prediction_type="epsilon"),
    dict(use_flow_sigmas=False),
    dict(predict_x0=False),
    dict(thresholding=True),
    dict(use_karras_sigmas=True),
    dict(use_dynamic_shifting=True),
    dict(shift_terminal=0.1),
    dict(solver_type="bh3"),
    dict(final_sigmas_type="one"),
    dict(some_new_option=1),
    dict(_class_name="DDIMScheduler"),
])
def test_from_config_rejects_math_changes(change, tmp_path):
  raw = _saved_config(UniPCMultistepScheduler(**WAN_UNIPC, flow_shift=3.0), tmp_path)
  with pytest.raises(ConfigError):
    schedulers.from_config({**raw, **change}, num_steps=10)


def test_from_config_ignores_keys_without_effect(tmp_path):
  raw = _saved_config(UniPCMultistepScheduler(**WAN_UNIPC, flow_shift=3.0), tmp_path)
  raw.update(beta_schedule="scaled_linear", timestep_spacing="trailing", steps_offset=1,
             _diffusers_version="0.0.0")
  assert schedulers.from_config(raw, 10) == schedulers.UniPC(num_steps=10, shift=3.0)
  # A missing prediction_type means diffusers' default, epsilon: not a flow sampler.
  del raw["prediction_type"]
  with pytest.raises(ConfigError, match="prediction_type"):
    schedulers.from_config(raw, 10)


@pytest.mark.parametrize("change", [dict(invert_sigmas=True), dict(stochastic_sampling=True),
                                    dict(use_dynamic_shifting=True)])
def test_euler_from_config_rejects_math_changes(change, tmp_path):
  raw = _saved_config(FlowMatchEulerDiscreteScheduler(shift=5.0), tmp_path)
  with pytest.raises(ConfigError):
    schedulers.Euler.from_config({**raw, **change}, num_steps=10)


def test_bh1_to_zero_sigma_is_rejected_because_it_ends_in_nan():
  ref = UniPCMultistepScheduler(**{**WAN_UNIPC, "solver_type": "bh1"}, flow_shift=3.0)
  assert np.isnan(_diffusers_trajectory(ref, 3)[-1]).all()
  with pytest.raises(ConfigError, match="bh1"):
    schedulers.UniPC.from_config(dict(ref.config), 3)


@pytest.mark.parametrize("bad", [dict(num_steps=0), dict(shift=0.0), dict(solver_order=0)])
def test_invalid_fields(bad):
  with pytest.raises(ConfigError):
    schedulers.UniPC(**{"num_steps": 10, **bad})


# -- step-distilled sampling (lightx2v's 4-step recipe) vs FlowMatchEuler(stochastic_sampling) ----

DISTILL_SCHEDULES = [((1000, 750, 500, 250), 5.0), ((1000, 500), 3.0), ((999, 800, 640, 300, 40), 8.0)]


@pytest.mark.parametrize("timesteps,shift", DISTILL_SCHEDULES)
def test_distill_matches_diffusers_stochastic_euler_every_step(timesteps, shift, monkeypatch):
  """diffusers given the unshifted sigmas (it shifts them itself) and the same ε at every step."""
  import diffusers.schedulers.scheduling_flow_match_euler_discrete as fm
  sched = schedulers.Distill(timesteps, shift)
  ref = FlowMatchEulerDiscreteScheduler(shift=shift, stochastic_sampling=True)
  ref.set_timesteps(sigmas=list(sched.unshifted_sigmas))
  np.testing.assert_allclose(ref.sigmas.numpy(), sched.sigmas, rtol=1e-6, atol=0)
  np.testing.assert_allclose(ref.timesteps.numpy(), sched.timesteps, rtol=1e-6, atol=0)
  # lightx2v's table: σ of training step t = shift(t/1000).
  expected = schedulers.shift_sigmas(np.array(timesteps) / 1000, shift)
  np.testing.assert_allclose(sched.sigmas[:-1], expected, rtol=1e-6)

  eps = np.random.default_rng(2).normal(size=(len(timesteps), *SHAPE)).astype(np.float32)
  step_eps = iter(eps)
  monkeypatch.setattr(fm, "randn_tensor", lambda *a, **k: torch.from_numpy(next(step_eps)))
  x, ref_traj = torch.from_numpy(NOISE.copy()), []
  for t in ref.timesteps:
    v = torch.from_numpy(np.array(MODEL(jnp.asarray(x.numpy()), float(t))))
    x = ref.step(v, t, x, return_dict=False)[0]
    ref_traj.append(x.numpy().copy())

  x = jnp.asarray(NOISE)
  state, got = sched.init(x, jnp.zeros((SHAPE[0], 2), jnp.uint32)), []
  for t, e in zip(sched.timesteps, eps):
    x, state = sched.step_with_noise(state, MODEL(x, float(t)), x, jnp.asarray(e))
    got.append(np.asarray(x))
  _assert_steps_match(np.stack(got), np.stack(ref_traj))
  # The last step returns x0 (σ' = 0), no noise.
  last_x0 = ref_traj[-2] if len(ref_traj) > 1 else NOISE
  v_last = np.asarray(MODEL(jnp.asarray(last_x0), float(sched.timesteps[-1])))
  assert max_rel_err(got[-1], last_x0 - sched.sigmas[-2] * v_last) <= TOL


def test_distill_scan_draws_fresh_noise_per_row_from_the_keys():
  """In one jitted scan with the keys in the carry: reproducible per key, rows independent, and
  equal to the eager loop."""
  sched = schedulers.Distill()
  keys = jax.random.key_data(jax.random.split(jax.random.key(0), SHAPE[0]))

  def run(keys):
    def body(carry, t):
      x, state = carry
      x, state = sched.step(state, MODEL(x, t), x)
      return (x, state), x
    x = jnp.asarray(NOISE)
    return jax.lax.scan(body, (x, sched.init(x, keys)), jnp.asarray(sched.timesteps))[1]

  scan = np.asarray(jax.jit(run)(keys))
  np.testing.assert_array_equal(scan, np.asarray(jax.jit(run)(keys)))
  other = np.asarray(jax.jit(run)(keys.at[1].set(keys[0] + 1)))
  np.testing.assert_array_equal(other[:-1, 0], scan[:-1, 0])  # row 0 keeps its key
  assert not np.allclose(other[:-1, 1], scan[:-1, 1])
  x, state, eager = jnp.asarray(NOISE), sched.init(jnp.asarray(NOISE), keys), []
  for t in sched.timesteps:
    x, state = sched.step(state, MODEL(x, float(t)), x)
    eager.append(np.asarray(x))
  assert max(max_rel_err(s, e) for s, e in zip(scan, eager)) <= 1e-6


@pytest.mark.parametrize("bad", [dict(distill_timesteps=()), dict(distill_timesteps=(500, 750)),
                                 dict(distill_timesteps=(1001, 500)), dict(distill_timesteps=(0,)),
                                 dict(shift=0.0)])
def test_distill_invalid_fields(bad):
  with pytest.raises(ConfigError):
    schedulers.Distill(**bad)
