"""Adam's moments stored in bfloat16 (`train.moments_dtype: bfloat16`, a2jax/train/optimizer.py):
the state's dtypes and shardings, the update against optax.adamw on random trees, the stochastic
rounding that keeps nu decaying, and the tiny training run against the float32 path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from a2jax import configs, sharding
from a2jax.models.transformer import init_params
from a2jax.train import batches, checkpointing, optimizer
from a2jax.train.state import abstract_state, init_state
from a2jax.train.step import batch_shardings, jit_train_step

# Parameter updates of the bfloat16-moment optimizer vs optax.adamw (float32), over UPDATE_STEPS
# steps: max|Δ| ≤ UPDATE_TOL · max|optax's update|. A stochastically rounded moment is off by up
# to one bfloat16 ulp (2⁻⁷ relative) and the update is mu/sqrt(nu): ≤ 1.5 ulp; measured 6.9e-3.
UPDATE_STEPS = 5
UPDATE_TOL = 2e-2
# Tiny training run: TRAIN_STEPS steps each way, the losses compared as means over windows of
# TRAIN_WINDOW steps: |bfloat16 − float32| ≤ TRAIN_MARGIN · float32 per window (measured 5.6e-5).
TRAIN_STEPS = 300
TRAIN_WINDOW = 50
TRAIN_MARGIN = 1e-3


def train_config(moments_dtype):
  return configs.load("tiny_train", [f"train.moments_dtype={moments_dtype}",
                                     f"train.steps={TRAIN_STEPS}", "train.warmup_steps=20"]).train


def random_tree(seed):
  rng = np.random.default_rng(seed)
  return {"block": {"kernel": rng.standard_normal((64, 48), np.float32),
                    "bias": rng.standard_normal((48,), np.float32)},
          "norm": {"scale": 1 + rng.standard_normal((48,), np.float32)}}


def adam_state(opt_state):
  """The ScaleByAdamState (count, mu, nu) inside an optax state."""
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  return next(x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x))


def test_bfloat16_update_equals_adamw():
  """The same gradients through optax.adamw (float32 moments, as moments_dtype: float32 builds it)
  and through the bfloat16-moment optimizer: every update agrees to bfloat16 precision."""
  cfg = train_config("bfloat16")
  want_tx, got_tx = (optimizer.make_optimizer(dataclasses.replace(cfg, moments_dtype=dtype))
                     for dtype in ("float32", "bfloat16"))
  params = random_tree(0)
  want_state, got_state = want_tx.init(params), got_tx.init(params)
  worst = 0.0
  for step in range(UPDATE_STEPS):
    grads = jax.tree.map(lambda g: 0.1 * g, random_tree(step + 1))  # under max_grad_norm
    want, want_state = jax.jit(want_tx.update)(grads, want_state, params)
    got, got_state = jax.jit(got_tx.update)(grads, got_state, params)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      worst = max(worst, float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))))
  print(f"bfloat16 moments vs optax.adamw: max relative update error {worst:.2e}")
  assert worst <= UPDATE_TOL
  assert worst > 0  # the moments were rounded


def test_stochastic_rounding_keeps_nu_decaying():
  """With zero gradients nu decays by b2 = 0.999 a step: under round-to-nearest bfloat16 it would
  never move (0.1% is under half an ulp); rounded at random, its mean follows float32's."""
  cfg = train_config("bfloat16")
  tx = optimizer.make_optimizer(dataclasses.replace(cfg, max_grad_norm=0.0))
  params = {"w": jnp.zeros((100_000,), jnp.float32)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  _, state = update({"w": jnp.ones((100_000,), jnp.float32)}, state, params)
  for _ in range(199):
    _, state = update({"w": jnp.zeros((100_000,), jnp.float32)}, state, params)
  nu = adam_state(state).nu["w"]
  want = (1 - cfg.adam_b2) * cfg.adam_b2**199
  mean = float(jnp.mean(nu.astype(jnp.float32)))
  print(f"nu after 200 steps: mean {mean:.6g}, float32 {want:.6g}, "
        f"round-to-nearest {1 - cfg.adam_b2:.6g}")
  assert nu.dtype == jnp.bfloat16
  assert abs(mean - want) <= 0.01 * want                 # the round-to-nearest value is 22% off
  assert len(np.unique(nu.astype(np.float32))) > 1       # elements rounded both ways


def test_stochastic_rounding_is_unbiased():
  """A value between two bfloat16 neighbours lands on either, on average on itself; a negative
  value rounds like its magnitude; inf and NaN stay."""
  x = jnp.full((200_000,), 1 + 2**-10, jnp.float32)  # 1/8 of the way from 1 to the next bfloat16
  rounded = optimizer.stochastic_round_to_bfloat16(x, jax.random.key(0)).astype(jnp.float32)
  assert set(np.unique(rounded).tolist()) == {1.0, 1 + 2**-7}
  assert float(jnp.mean(rounded)) == pytest.approx(1 + 2**-10, abs=2**-7 * 0.01)
  negative = optimizer.stochastic_round_to_bfloat16(-x, jax.random.key(0))
  np.testing.assert_array_equal(negative, -rounded.astype(jnp.bfloat16))
  special = jnp.array([jnp.inf, -jnp.inf, jnp.nan, jax.lax.bitcast_convert_type(
      jnp.uint32(0x7FFFFFFF), jnp.float32)] * 1000)   # the last: NaN with every payload bit set
  got = np.asarray(optimizer.stochastic_round_to_bfloat16(special, jax.random.key(1)), np.float32)
  np.testing.assert_array_equal(got, np.asarray(special, np.float32))  # NaN equals NaN here


def run(cfg, moments_dtype, params, batch, checkpoint_dir=None):
  """(losses, final state) of TRAIN_STEPS steps on one device from host `params` and `batch` (the
  step's own rng draws the noise and σ anew each step). With `checkpoint_dir`, the state of the
  middle step is also checkpointed, restored, and run to the end: (losses, final state) of that
  resumed run come third."""
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, moments_dtype=moments_dtype))
  tx = optimizer.make_optimizer(cfg.train)
  mesh = sharding.make_mesh(configs.MeshConfig(fsdp=1), jax.devices()[:1])
  abstract, shardings = abstract_state(cfg.transformer, tx, mesh, ema=False)
  with jax.set_mesh(mesh):
    state = init_state(cfg.transformer, tx, mesh, ema=False,
                       params=sharding.put(params, shardings.params))
    b_shardings = batch_shardings(batch, mesh)
    step = jit_train_step(cfg, tx, mesh, shardings, b_shardings)
    batch = sharding.put(batch, b_shardings)

    def steps(state, count):
      losses = []
      for _ in range(count):
        state, metrics = step(state, batch, jax.random.key(1))
        losses.append(metrics["loss"])
      return np.asarray(jax.device_get(losses)), state

    if checkpoint_dir is None:
      return steps(state, TRAIN_STEPS)
    first, state = steps(state, TRAIN_STEPS // 2)
    ckpt = checkpointing.Checkpoints(checkpoint_dir, every=1, keep=1, async_save=False)
    ckpt.save(TRAIN_STEPS // 2, state, cfg)
    restored, _ = ckpt.restore(TRAIN_STEPS // 2, abstract, shardings)
    ckpt.close()
    second, state = steps(state, TRAIN_STEPS - TRAIN_STEPS // 2)
    resumed, restored = steps(restored, TRAIN_STEPS - TRAIN_STEPS // 2)
  return np.concatenate([first, second]), state, (resumed, restored)


def test_bfloat16_moments_sharded_like_params():
  """On fsdp 8 each stored moment takes its parameter's sharding (a2jax.train.state), bfloat16."""
  cfg = configs.load("tiny_train", ["train.moments_dtype=bfloat16", "mesh.data=1", "mesh.fsdp=8"])
  tx = optimizer.make_optimizer(cfg.train)
  mesh = sharding.make_mesh(cfg.mesh)
  abstract, shardings = abstract_state(cfg.transformer, tx, mesh, ema=False)
  params = jax.tree.leaves(shardings.params)
  assert sum(not s.is_fully_replicated for s in params) > 10
  for moment in ("mu", "nu"):
    assert jax.tree.leaves(getattr(adam_state(shardings.opt_state), moment)) == params
    assert {x.dtype for x in jax.tree.leaves(getattr(adam_state(abstract.opt_state), moment))} == {
        jnp.dtype(jnp.bfloat16)}


def test_bfloat16_moments_train_like_float32(tmp_path):
  """configs/tiny_train.yaml on 8 fixed synthetic triplets: TRAIN_STEPS steps with bfloat16
  moments give the float32 path's losses (window means within TRAIN_MARGIN); the state stores
  bfloat16 moments beside float32 parameters; checkpointed halfway and resumed, the run ends bit
  for bit as the uninterrupted one (the rounding's random bits come from the step count)."""
  cfg = configs.load("tiny_train", [f"train.steps={TRAIN_STEPS}", "train.warmup_steps=20"])
  shapes = batches.record_shapes(cfg)
  records = [batches.synthetic_record(shapes, cfg.data.synthetic_refs, 7, i) for i in range(8)]
  batch = {k: np.stack([r[k] for r in records]) for k in records[0]}
  params = jax.device_get(init_params(cfg.transformer, jax.random.key(0)))
  want, _ = run(cfg, "float32", params, batch)
  got, state, (resumed, resumed_state) = run(cfg, "bfloat16", params, batch, tmp_path)
  adam = adam_state(state.opt_state)
  assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  want_windows = want.reshape(-1, TRAIN_WINDOW).mean(1)
  got_windows = got.reshape(-1, TRAIN_WINDOW).mean(1)
  gaps = np.abs(got_windows - want_windows) / want_windows
  print("window losses float32", np.round(want_windows, 4), "bfloat16", np.round(got_windows, 4),
        f"max relative gap {gaps.max():.2e}")
  assert np.all(np.isfinite(got))
  assert want_windows[-1] < 0.8 * want_windows[0]    # it trained
  assert np.all(gaps <= TRAIN_MARGIN)
  np.testing.assert_array_equal(resumed, got[TRAIN_STEPS // 2:])
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(resumed_state)),
                          jax.tree.leaves(jax.device_get(state))):
    assert a.dtype == b.dtype and np.array_equal(a, b), jax.tree_util.keystr(path)
