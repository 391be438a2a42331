"""The training step on configs/tiny_train.yaml's transformer: it overfits 4 fixed triplets, and one
step sharded over 8 simulated devices equals the single-device step.

Each compile of the tiny train step costs ~20–60 s on this CPU, so the module compiles it three
times in all: once on one device (shared by both tests) and once per sharded mesh.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2jax import configs, sharding
from a2jax.train import batches, optimizer
from a2jax.train.state import abstract_state, init_state
from a2jax.train.step import batch_shardings, jit_train_step

# 8 rows = 4 triplets twice, in 2 micro-batches of 4 (rows m, 2 + m, …): both micro-batches hold
# all 4 triplets; EMA on, so every part of the step runs.
OVERRIDES = ["train.batch_size=8", "train.grad_accum_steps=2", "train.ema_decay=0.9",
             "train.learning_rate=3.0e-3", "train.warmup_steps=10", "train.steps=150"]
OVERFIT_STEPS = 150
SHARDED_TOL = 1e-5  # max|Δ| ≤ SHARDED_TOL · max|single| per array (float32)


@pytest.fixture(scope="module")
def setup():
  cfg = configs.load("tiny_train", OVERRIDES)
  tx = optimizer.make_optimizer(cfg.train)
  shapes = batches.record_shapes(cfg)
  triplets = [batches.synthetic_record(shapes, cfg.data.synthetic_refs, [7], i) for i in range(4)]
  batch = {k: np.stack([t[k] for t in triplets for _ in range(2)]) for k in triplets[0]}
  return cfg, tx, batch


def compiled_step(cfg, tx, batch, mesh):
  """(jitted step, shardings, batch shardings, host copy of the initial state) on `mesh` (the
  LoRA step when the config has train.lora)."""
  ema, lora = cfg.train.ema_decay is not None, cfg.train.lora
  _, shardings = abstract_state(cfg.transformer, tx, mesh, ema, lora)
  with jax.set_mesh(mesh):
    state = init_state(cfg.transformer, tx, mesh, ema, key=jax.random.key(0), lora=lora)
  b_shardings = batch_shardings(batch, mesh)
  step = jit_train_step(cfg, tx, mesh, shardings, b_shardings)
  return step, shardings, b_shardings, jax.device_get(state)


def first_step_on_one_device(cfg, tx, batch):
  """(mesh, step, shardings, batch shardings, initial state, (state, metrics) after one step) on
  one device."""
  mesh = sharding.make_mesh(configs.MeshConfig(fsdp=1), jax.devices()[:1])
  step, shardings, b_shardings, state0 = compiled_step(cfg, tx, batch, mesh)
  with jax.set_mesh(mesh):
    state, metrics = step(sharding.put(state0, shardings), sharding.put(batch, b_shardings),
                          jax.random.key(1))
  return mesh, step, shardings, b_shardings, state0, jax.device_get((state, metrics))


@pytest.fixture(scope="module")
def single(setup):
  return first_step_on_one_device(*setup)


def overfit(batch, single, steps: int):
  """(final state, losses) of `steps` steps on `batch` from the state of `single`
  (`first_step_on_one_device`), the step counter held at 0: the same noise and σ every step."""
  mesh, step, shardings, b_shardings, state0, _ = single
  losses = []
  with jax.set_mesh(mesh):
    state, batch = sharding.put(state0, shardings), sharding.put(batch, b_shardings)
    for _ in range(steps):
      state, metrics = step(state.replace(step=jnp.zeros((), jnp.int32)), batch, jax.random.key(1))
      losses.append(float(metrics["loss"]))
  return state, losses


def test_overfits_four_triplets(setup, single):
  """The step counter seeds the noise (rng = fold_in(rng, step)); holding it at 0 draws the same
  noise and σ every step, so the loss can fall to ~0 by memorising the 8 (x_t, t) → v pairs."""
  _, losses = overfit(setup[2], single, OVERFIT_STEPS)
  assert np.all(np.isfinite(losses))
  first, last = np.mean(losses[:3]), np.mean(losses[-10:])
  print(f"overfit: loss {first:.4f} → {last:.4f} ({first / last:.0f}×) in {OVERFIT_STEPS} steps")
  assert last * 5 <= first


@pytest.mark.parametrize("mesh_sizes", [dict(fsdp=4, tensor=2), dict(fsdp=2, context=2, tensor=2)],
                         ids=str)
def test_sharded_step_equals_single_device(setup, single, mesh_sizes):
  assert len(jax.devices()) == 8, "tests run with 8 simulated CPU devices"
  cfg, tx, batch = setup
  *_, state0, (want_state, want_metrics) = single
  mesh = sharding.make_mesh(configs.MeshConfig(**{"fsdp": 1, **mesh_sizes}))
  step, shardings, b_shardings, _ = compiled_step(cfg, tx, batch, mesh)
  with jax.set_mesh(mesh):
    placed = sharding.put(state0, shardings)
    assert sum(len(s.device_set) > 1 and not s.is_fully_replicated
               for s in jax.tree.leaves(shardings.params)) > 10
    state, metrics = step(placed, sharding.put(batch, b_shardings), jax.random.key(1))
  state, metrics = jax.device_get((state, metrics))
  for k in ("loss", "grad_norm", "lr"):
    np.testing.assert_allclose(metrics[k], want_metrics[k], rtol=SHARDED_TOL)
  assert int(state.step) == int(want_state.step) == 1
  # params, Adam's mu (the gradient) and nu, the EMA: leaf by leaf
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(state),
                               jax.tree.leaves(want_state)):
    np.testing.assert_allclose(got, want, rtol=0, atol=SHARDED_TOL * np.abs(want).max(),
                               err_msg=jax.tree_util.keystr(path))


SPLASH_GRAD_TOL = 1e-5  # max|Δ| ≤ SPLASH_GRAD_TOL · max|ref| per gradient, float32


@pytest.mark.parametrize("length", [600, 200])  # self-attention (pads 600 → 1024), cross (→ 256)
def test_splash_gradients_match_xla_in_interpret_mode(monkeypatch, length):
  """The training step differentiates the splash kernel (the a2_14b_train preset's attention): its
  fused backward, padding masked, equals the plain attention's gradients, unsharded and under
  shard_map on fsdp 2 × context 4 (the Pallas kernels interpreted on the CPU)."""
  import functools
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from a2jax import attention
  monkeypatch.setattr(sk, "make_splash_mha", functools.partial(sk.make_splash_mha, interpret=True))
  rng = np.random.default_rng(0)
  q, g = (rng.standard_normal((2, 600, 4, 128)).astype(np.float32) for _ in range(2))
  k, v = (rng.standard_normal((2, length, 4, 128)).astype(np.float32) for _ in range(2))

  def grads(backend):
    loss = lambda q, k, v: jnp.sum(attention.attention(q, k, v, backend=backend) * g)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  ref = grads("xla")
  outs = {"unsharded": grads("splash")}
  with jax.set_mesh(sharding.make_mesh(configs.MeshConfig(fsdp=2, context=4))):
    outs["fsdp 2 × context 4"] = grads("splash")
  for name, out in outs.items():
    for which, a, b in zip("qkv", out, ref):
      err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
      assert err <= SPLASH_GRAD_TOL, (name, which, err)
