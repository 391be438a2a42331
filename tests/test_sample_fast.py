"""Fast sampling (docs/sampling.md "Fast sampling"): guidance 1 as one branch, the distill sampler and step
caching (mag, teacache, fbcache) inside the one compiled loop: exactness where they promise it,
transformer passes counted by the program, sharded runs equal to single-device runs, and the
`sample.py` flags end to end (calibrate, then sample with MagCache).

Tiny random transformer (3 layers), batch 1, latents 2×4×6, 8 UniPC steps at guidance 5 as the
baseline. Distances are relative L2 of the final latents against the baseline."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2jax import configs, pipeline, schedulers, sharding, step_cache
from a2jax.errors import ConfigError, InputError
from a2jax.models.transformer import A2Transformer, init_params
from parity import rel_l2_err

STEPS = 8
EXACT_TOL = 1e-5   # relative L2: same math, other batching / fusion
SHARDED_TOL = 1e-5
CFG = configs.load("tiny", overrides=["transformer.num_layers=3"])
BASE = dataclasses.replace(CFG.sampling, steps=STEPS, guidance=5.0, shift=8.0)
# Positive thresholds at which each cache skips on this random model (mag reads the curve of the
# baseline run; teacache's polynomial, fitted on Wan2.1, gives this model's embedding large values).
SKIPPING = {"mag": dict(cache_threshold=0.3), "teacache": dict(cache_threshold=5e4),
            "fbcache": dict(cache_threshold=0.3)}


@pytest.fixture(scope="module")
def inputs():
  t = CFG.transformer
  rng = np.random.default_rng(0)
  f, h, w = 2, 4, 6
  arrays = (rng.standard_normal((1, f, h, w, 16)), rng.standard_normal((1, 7, t.text_dim)),
            rng.standard_normal((1, 7, t.text_dim)), rng.standard_normal((1, 257, t.image_dim)),
            rng.standard_normal((1, f, h, w, t.in_channels - 16)))
  return tuple(np.asarray(a, np.float32) for a in arrays) + (pipeline.step_noise_keys(0, 1),)


@pytest.fixture(scope="module")
def params():
  return init_params(CFG.transformer, jax.random.key(0))


def sample(params, inputs, mesh=None, **changes):
  """(latents, transformer passes) of one run of the denoising program with `changes`."""
  sampling = dataclasses.replace(BASE, **changes)
  program = jax.jit(pipeline.denoise_fn(CFG, sampling, with_stats=True))
  if mesh is None:
    x, stats = program(params, *inputs)
  else:
    with jax.set_mesh(mesh):
      x, stats = program(params, *inputs)
  return np.asarray(x), pipeline.transformer_passes(stats, pipeline.guidance_branches(sampling))


@pytest.fixture(scope="module")
def baseline(params, inputs, tmp_path_factory):
  """(latents, passes, MagCache calibration file) of the full 2-branch run."""
  sampling = BASE
  x, stats = jax.jit(pipeline.denoise_fn(CFG, sampling, with_stats=True))(params, *inputs)
  curve = tmp_path_factory.mktemp("calibration") / "curve.json"
  step_cache.write_calibration(curve, np.asarray(stats.mag_ratio), sampling)
  return np.asarray(x), pipeline.transformer_passes(stats, 2), str(curve)


def cache_changes(mode, baseline, **extra):
  changes = dict(cache=mode, **extra)
  if mode == "mag":
    changes["cache_calibration"] = baseline[2]
  return changes


def test_split_path_equals_the_full_forward(params, inputs, baseline):
  """embed → run_blocks → head (the stats path) = A2Transformer.__call__ (the default program)."""
  plain = jax.jit(pipeline.denoise_fn(CFG, BASE))(params, *inputs)
  assert rel_l2_err(baseline[0], plain) <= EXACT_TOL
  assert baseline[1] == 2 * STEPS


def test_guidance_one_runs_one_branch(params, inputs, baseline):
  """Equal to the 2-branch batch combined at guidance 1, with half the transformer passes."""
  x, passes = sample(params, inputs, guidance=1.0)
  assert passes == STEPS == baseline[1] / 2
  noise, text, negative, image, condition, _ = map(jnp.asarray, inputs)
  model, sched = A2Transformer(CFG.transformer), schedulers.UniPC(STEPS, shift=BASE.shift)

  @jax.jit
  def two_branches(params, x):
    state = sched.init(x)
    for t in sched.timesteps:
      x_in = jnp.concatenate([jnp.concatenate([x, x]), jnp.concatenate([condition] * 2)], -1)
      v = model.apply({"params": params}, x_in, jnp.full((2,), t, jnp.float32),
                      jnp.concatenate([text, negative]), jnp.concatenate([image] * 2))
      x, state = sched.step(state, v[1:] + 1.0 * (v[:1] - v[1:]), x)
    return x

  assert rel_l2_err(x, two_branches(params, noise)) <= EXACT_TOL


@pytest.mark.parametrize("mode", ["mag", "teacache", "fbcache"])
def test_cache_with_threshold_zero_is_exact(params, inputs, baseline, mode):
  x, passes = sample(params, inputs, **cache_changes(mode, baseline, cache_threshold=0.0))
  assert passes == baseline[1]
  assert rel_l2_err(x, baseline[0]) <= EXACT_TOL


@pytest.mark.parametrize("mode", ["mag", "teacache", "fbcache"])
def test_cache_with_positive_threshold_skips_and_stays_close(params, inputs, baseline, mode):
  x, passes = sample(params, inputs, **cache_changes(mode, baseline, **SKIPPING[mode]))
  distance = rel_l2_err(x, baseline[0])
  print(f"{mode}: {passes:.2f} of {baseline[1]} passes, relative L2 {distance:.3f}")
  assert passes < baseline[1]
  assert distance <= 0.5  # measured: mag 0.18 (4 passes), teacache 0.006, fbcache 0.009 (12)


def test_mag_schedule_follows_magcache_rule():
  """Per branch: the running ratio's error accumulates; skips stop at the error threshold or after
  max_skips in a row; the retention share always runs; a step skips only if every branch would."""
  flat = np.ones((2, 10))
  np.testing.assert_array_equal(step_cache.mag_schedule(flat, 0.1, 2, 0.2),
                                [0, 0, 1, 1, 0, 1, 1, 0, 1, 1])
  drift = flat.copy()
  drift[1] = 0.95  # branch 1's error: 0.05, then 0.05 + 0.0975 > 0.1
  np.testing.assert_array_equal(step_cache.mag_schedule(drift, 0.1, 9, 0.2),
                                [0, 0, 1, 0, 1, 0, 1, 0, 1, 0])
  assert not step_cache.mag_schedule(flat, 0.0, 9, 0.2).any()


def test_distill_sampler_four_steps(params, inputs):
  """lightx2v's recipe: 4 steps at guidance 1 = 4 passes; the keys drive the fresh noise."""
  x, passes = sample(params, inputs, sampler="distill", guidance=1.0)
  assert passes == 4 and np.isfinite(x).all()
  other_keys = inputs[:-1] + (pipeline.step_noise_keys(1, 1),)
  y, _ = sample(params, other_keys, sampler="distill", guidance=1.0)
  assert not np.allclose(x, y)


MODES = {"guidance1": dict(guidance=1.0), "distill": dict(sampler="distill", guidance=1.0),
         **{m: dict(cache=m, **SKIPPING[m]) for m in ("mag", "teacache", "fbcache")}}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_sharded_equals_single_device(params, inputs, baseline, mode):
  """CFG pair on data, tokens on context, heads on tensor (8 simulated devices): the cached
  residual carries the activations' sharding; the same latents and the same skips."""
  changes = dict(MODES[mode])
  if mode == "mag":
    changes["cache_calibration"] = baseline[2]
  single, passes = sample(params, inputs, **changes)
  mesh = sharding.make_mesh(configs.MeshConfig(data=2, fsdp=1, context=2, tensor=2))
  sharded_params = init_params(CFG.transformer, jax.random.key(0), mesh)
  sharded, sharded_passes = sample(sharded_params, inputs, mesh, **changes)
  assert sharded_passes == passes
  assert rel_l2_err(sharded, single) <= SHARDED_TOL


@pytest.mark.parametrize("bad", [dict(cache="deja"), dict(cache_threshold=-0.1),
                                 dict(cache_retention=1.5), dict(cache_max_skips=0),
                                 dict(cache="mag"), dict(sampler="distill", distill_timesteps=(250, 500)),
                                 dict(distill_shift=0.0)])
def test_sampling_config_rejects_bad_values(bad):
  with pytest.raises(ConfigError):
    configs.build(configs.SamplingConfig, {**configs.to_dict(BASE), **bad}, "sampling")


def test_calibration_file_checked(baseline, tmp_path):
  with pytest.raises(InputError, match="calibrated at 8 steps"):
    step_cache.read_calibration(baseline[2], steps=50, branches=2)
  with pytest.raises(InputError, match="does not exist"):
    step_cache.read_calibration(tmp_path / "none.json", steps=8, branches=2)
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(InputError, match="not a MagCache calibration"):
    step_cache.read_calibration(tmp_path / "bad.json", steps=8, branches=2)


@pytest.mark.slow  # six sample.py runs, each loading and compiling (~70 s)
def test_sample_py_calibrate_then_every_mode(release, tmp_path, capsys):
  """As a user: --calibrate writes the curve; each mode writes a video through A2Pipeline."""
  import sample
  from PIL import Image
  from a2jax import video
  rng = np.random.default_rng(3)
  Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(tmp_path / "man.png")
  common = ["--checkpoint", str(release[1]), "--prompt", "A man is holding a teddy bear.",
            "--ref", str(tmp_path / "man.png"), "--frames", "9", "--height", "32", "--width", "48",
            "--steps", "4", "--no-progress"]
  curve = tmp_path / "curve.json"
  assert sample.main([*common, "--calibrate", str(curve)]) == 0
  assert "wrote" in capsys.readouterr().err and curve.is_file()
  for name, flags in {"mag": ["--cache", "mag", "--cache-calibration", str(curve),
                              "--cache-threshold", "0.5"],
                      "teacache": ["--cache", "teacache"], "fbcache": ["--cache", "fbcache"],
                      "distill": ["--sampler", "distill", "--guidance", "1",
                                  "--distill-timesteps", "1000,500", "--distill-shift", "5"]}.items():
    out = tmp_path / f"{name}.mp4"
    assert sample.main([*common, *flags, "--out", str(out)]) == 0, name
    assert video.read_mp4(out).shape == (9 - 4, 32, 48, 3)
  assert sample.main([*common, "--cache", "mag", "--out", str(tmp_path / "x.mp4")]) == 2
  assert "cache_calibration" in capsys.readouterr().err
