"""LoRA fine-tuning on configs/tiny_train.yaml's transformer: the config, the training forward
(step 0 is the base; per-layer merging equals the whole merge), the adapters' gradient against the
merged model's, an overfit with the base left bit for bit, the sharded step, train.py killed and
resumed bit for bit, and `export-lora` loaded by diffusers.
"""

import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2jax import configs, sharding
from a2jax.errors import CheckpointError, ConfigError
from a2jax.models import lora as lora_format
from a2jax.models.transformer import A2Transformer, init_params
from a2jax.train import batches, checkpointing, optimizer
from a2jax.train import lora as train_lora
from parity import max_rel_err
from test_train_run import data_dir, env  # noqa: F401  (fixtures)
from test_train_run import flat, read_metrics, read_state, run, run_args, write_driver
from test_train_step import compiled_step, first_step_on_one_device, overfit

# every target (the FFN too), rank 4 on the tiny widths; the tiny step's overfit settings
LORA = ["train.lora.rank=16", "train.lora.alpha=16",
        f"train.lora.targets=[{','.join(sorted(lora_format.TARGET_MODULES))}]"]
OVERRIDES = ["train.batch_size=8", "train.grad_accum_steps=2", "train.ema_decay=0.9",
             "train.learning_rate=3.0e-2", "train.warmup_steps=0", "train.steps=150", *LORA]
OVERFIT_STEPS = 150
SHARDED_TOL = 1e-5   # max|Δ| ≤ SHARDED_TOL · max|single| per array (float32)
# Adapters after one step: max|Δ| ≤ UPDATE_TOL · lr. Adam's first update is lr · g / (|g| + ε), so a
# gradient whose summation-order noise δ is near ε moves by up to lr · δ / ε (measured 1.2e-4 · lr on
# fsdp 4 × tensor 2); the Adam moments, linear in g, are held to SHARDED_TOL.
UPDATE_TOL = 1e-3
GRAD_TOL = 1e-5      # adapters' gradient vs s·dW·Bᵀ, s·Aᵀ·dW (max relative, float32)
EXPORT_TOL = 1e-5    # diffusers with the exported LoRA fused vs a2jax (max relative, float32)


@pytest.fixture(scope="module")
def setup():
  cfg = configs.load("tiny_train", OVERRIDES)
  tx = optimizer.make_optimizer(cfg.train)
  shapes = batches.record_shapes(cfg)
  triplets = [batches.synthetic_record(shapes, cfg.data.synthetic_refs, [7], i) for i in range(4)]
  batch = {k: np.stack([t[k] for t in triplets for _ in range(2)]) for k in triplets[0]}
  return cfg, tx, batch


def test_config_defaults_and_validation():
  assert configs.load("tiny_train").train.lora is None  # a full fine-tune unless set
  lora = configs.load("tiny_train", ["train.lora.rank=8"]).train.lora
  assert (lora.rank, lora.alpha, lora.scale) == (8, 32.0, 4.0)
  assert set(lora.targets) == set(lora_format.DEFAULT_TARGETS)
  assert configs.load("a2_14b_lora").train.lora.targets == lora.targets
  with pytest.raises(ConfigError, match=r"attn1\.to_x is unknown.*attn1\.to_k"):
    configs.load("tiny_train", ["train.lora.targets=[attn1.to_x]"])
  with pytest.raises(ConfigError, match="unknown key config.train.lora.dropout"):
    configs.load("tiny_train", ["train.lora.dropout=0.1"])


def model_inputs(cfg, batch):
  x = np.concatenate([batch["latents"], batch["condition"]], axis=-1)
  return x, np.linspace(50.0, 950.0, len(x)).astype(np.float32), batch["text"], batch["image"]


def random_adapters(cfg, key):
  """Adapters with b random too (init gives b = 0), so that they change the model."""
  adapters = train_lora.init(cfg.transformer, cfg.train.lora, key, None)
  return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.fold_in(key, x.size),
                                                              x.shape), adapters)


def test_step0_is_the_base_and_per_layer_merge_equals_the_whole_merge(setup):
  cfg, _, batch = setup
  t, lora = cfg.transformer, cfg.train.lora
  base = init_params(t, jax.random.key(0))
  inputs = model_inputs(cfg, batch)
  want = jax.jit(lambda p: A2Transformer(t).apply({"params": p}, *inputs))(base)
  forward = jax.jit(lambda b, a: train_lora.forward(t, b, a, lora.scale, *inputs))
  start = train_lora.init(t, lora, jax.random.key(1), None)
  # b = 0: every merged kernel is the base kernel bit for bit, and so is the output
  first_layer = jax.tree.map(lambda x: x[0], (base["blocks"], start["blocks"]))
  for (path, got), kernel in zip(
      jax.tree_util.tree_leaves_with_path(train_lora.merge_layer(*first_layer, lora.scale)),
      jax.tree.leaves(first_layer[0])):
    np.testing.assert_array_equal(got, kernel, err_msg=jax.tree_util.keystr(path))
  np.testing.assert_array_equal(forward(base, start), want)

  adapters = random_adapters(cfg, jax.random.key(2))
  merged = lora_format.merge(base, adapters, lora.scale)
  got, ref = forward(base, adapters), A2Transformer(t).apply({"params": merged}, *inputs)
  assert max_rel_err(got, want) > 1e-2  # the adapters do change the output
  assert max_rel_err(got, ref) < 1e-6


def test_adapter_gradient_equals_the_merged_kernels_gradient(setup):
  """dL/dA = s·(dL/dW)·Bᵀ and dL/dB = s·Aᵀ·(dL/dW), dL/dW from the full model at the merged W."""
  cfg, _, batch = setup
  t, lora = cfg.transformer, cfg.train.lora
  base = init_params(t, jax.random.key(0))
  adapters = random_adapters(cfg, jax.random.key(3))
  inputs = model_inputs(cfg, batch)
  weights = jax.random.normal(jax.random.key(4), (len(inputs[0]), 2, 4, 4, t.out_channels))
  loss = lambda out: jnp.sum(out.astype(jnp.float32) * weights)
  got = jax.jit(jax.grad(lambda a: loss(train_lora.forward(t, base, a, lora.scale, *inputs))))(
      adapters)
  merged = lora_format.merge(base, adapters, lora.scale)
  d_merged = jax.jit(jax.grad(lambda p: loss(A2Transformer(t).apply({"params": p}, *inputs))))(
      merged)
  worst = 0.0
  for module in train_lora.targeted_modules(adapters["blocks"]):
    node = lambda tree: tree["blocks"][module[0]][module[1]]
    d_w, factors, grads = node(d_merged)["kernel"], node(adapters), node(got)
    want_a = lora.scale * d_w @ jnp.swapaxes(factors["lora_b"], 1, 2)
    want_b = lora.scale * jnp.swapaxes(factors["lora_a"], 1, 2) @ d_w
    for g, w in ((grads["lora_a"], want_a), (grads["lora_b"], want_b)):
      worst = max(worst, max_rel_err(g, w))
  print(f"LoRA gradient vs merged-kernel gradient: max relative error {worst:.2e}")
  assert worst < GRAD_TOL


@pytest.fixture(scope="module")
def single(setup):
  return first_step_on_one_device(*setup)


def test_state_holds_float32_adapters_and_the_frozen_base(setup, single):
  cfg, *_ = setup
  state0 = single[4]
  assert set(flat(state0.params)) == {f"['blocks']['{m}']['{p}']['{f}']" for m, p in (
      name.split(".") for name in cfg.train.lora.targets) for f in ("lora_a", "lora_b")}
  assert all(v.dtype == np.float32 for v in flat(state0.params).values())
  assert all(not v.any() for k, v in flat(state0.params).items() if "lora_b" in k)
  base = flat(init_params(cfg.transformer, jax.random.key(0)))
  assert flat(state0.frozen).keys() == base.keys()
  for k, v in base.items():
    np.testing.assert_array_equal(flat(state0.frozen)[k], v, err_msg=k)
  # the optimizer state mirrors the adapters only
  assert sum(x.size for x in jax.tree.leaves(state0.opt_state)) < 3 * sum(
      x.size for x in jax.tree.leaves(state0.params)) + 10


def test_overfits_four_triplets_and_leaves_the_base_bit_for_bit(setup, single):
  """As tests/test_train_step.py: the step counter held at 0 draws the same noise every step."""
  state0 = single[4]
  state, losses = overfit(setup[2], single, OVERFIT_STEPS)
  assert np.all(np.isfinite(losses))
  first, last = np.mean(losses[:3]), np.mean(losses[-10:])
  print(f"LoRA overfit: loss {first:.4f} → {last:.4f} ({first / last:.0f}×) in {OVERFIT_STEPS} steps")
  # the patch embedding, modulation and head stay frozen: the loss falls ~3× to a plateau near 1
  # (300 steps: 1.03), where the full fine-tune of tests/test_train_step.py goes past 5×
  assert last * 2.5 <= first
  state = jax.device_get(state)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(state.frozen),
                               jax.tree.leaves(state0.frozen)):
    np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))


def test_sharded_step_equals_single_device(setup, single):
  """fsdp 4 × tensor 2: a (layers, in, None) and b (layers, None, out) sharded like their kernels."""
  cfg, tx, batch = setup
  *_, state0, (want_state, want_metrics) = single
  mesh = sharding.make_mesh(configs.MeshConfig(fsdp=4, tensor=2))
  step, shardings, b_shardings, _ = compiled_step(cfg, tx, batch, mesh)
  with jax.set_mesh(mesh):
    assert sum(not s.is_fully_replicated for s in jax.tree.leaves(shardings.params)) > 10
    state, metrics = step(sharding.put(state0, shardings), sharding.put(batch, b_shardings),
                          jax.random.key(1))
  state, metrics = jax.device_get((state, metrics))
  for k in ("loss", "grad_norm", "lr"):
    np.testing.assert_allclose(metrics[k], want_metrics[k], rtol=SHARDED_TOL)
  # Adam's first update g / (|g| + ε) magnifies float32 summation-order noise in gradients near ε:
  # the adapters and their EMA are compared against the size of one update (lr) instead.
  lr = float(want_metrics["lr"])
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(state),
                               jax.tree.leaves(want_state)):
    name = jax.tree_util.keystr(path)
    atol = (UPDATE_TOL * lr if name.startswith((".params", ".ema_params"))
            else SHARDED_TOL * np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)


# --- train.py and export-lora ------------------------------------------------------------------

RUN_LORA = ["train.lora.rank=4", "train.lora.alpha=8", "ema_decay=0.5"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """(random diffusers WanTransformer3DModel folder of tiny_train's widths, its a2jax conversion)."""
  from diffusers import WanTransformer3DModel
  from convert_weights import tiny_release
  from convert_weights.component import convert_component
  t = configs.load("tiny_train").transformer
  widths = dict(tiny_release.TRANSFORMER, attention_head_dim=t.attention_head_dim,
                image_dim=t.image_dim, added_kv_proj_dim=t.added_kv_proj_dim)
  root = tmp_path_factory.mktemp("base")
  model = WanTransformer3DModel(**widths).eval()
  tiny_release.randomize_(model, seed=0)
  model.save_pretrained(root / "diffusers")
  convert_component("transformer", root / "diffusers", root / "converted", progress=False)
  return root / "diffusers", root / "converted"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, env, data_dir, base):
  """A straight LoRA run from `base`'s converted transformer: (run folder, metrics, converted
  folder)."""
  _, converted = base
  out = tmp_path_factory.mktemp("lora_runs")
  proc = run(env, run_args(out, data_dir, "straight", f"init_from={converted}", *RUN_LORA))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"starting from {converted} with LoRA adapters (rank 4, alpha 8" in proc.stdout
  return out / "straight", read_metrics(out / "straight"), converted


def test_train_py_lora_resume_after_sigkill_is_bit_for_bit(tmp_path, env, data_dir, lora_run):
  """Checkpoints hold the adapters, their Adam state and EMA, not the base; killed during step 5
  and resumed from step 3 (the base read again from init_from), the run equals the straight one."""
  run_dir, want, converted = lora_run
  state = flat(read_state(run_dir / "checkpoints" / "6"))
  assert state and all("lora_" in k for k in state if "params" in k and "step" not in k)
  assert not any("frozen" in k for k in state)
  out = tmp_path / "runs"
  args = run_args(out, data_dir, "resumed", f"init_from={converted}", *RUN_LORA)
  ckpt3 = out / "resumed" / "checkpoints" / "3"
  killed = run(env, ["kill", "5", str(ckpt3), *args], write_driver(tmp_path))
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  other_base = run(env, [*args, "seed=1", "init_from=null"])
  assert other_base.returncode == 2 and "Traceback" not in other_base.stderr
  assert f"was trained on the base train.init_from = '{converted}'" in other_base.stderr
  resumed = run(env, args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step 3" in resumed.stdout
  got = read_metrics(out / "resumed")
  for key in ("loss", "grad_norm", "lr"):
    assert [m[key] for m in got] == [m[key] for m in want], key
  a, b = state, flat(read_state(ckpt3.parent / "6"))
  assert a.keys() == b.keys() and any("opt_state" in k for k in a)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_trained_lora(lora_run):
  run_dir, _, _ = lora_run
  state = flat(read_state(run_dir / "checkpoints" / "3"))
  for ema in (True, False):
    adapters, cfg = checkpointing.trained_lora(run_dir / "checkpoints", 3, ema=ema)
    assert (cfg.rank, cfg.alpha) == (4, 8.0)
    for k, v in flat(adapters).items():
      np.testing.assert_array_equal(v, state[("['ema_params']" if ema else "['params']") + k])
  with pytest.raises(CheckpointError, match="is a LoRA run"):
    checkpointing.trained_params(run_dir / "checkpoints")


@pytest.mark.parametrize("fmt", ["comfyui", "diffusers"])
def test_export_lora_loads_in_diffusers(tmp_path, lora_run, base, fmt):
  """The exported file through diffusers' load_lora_weights + fuse_lora on the release's
  WanTransformer3DModel gives a2jax's output with the same adapters merged (float32)."""
  import torch
  from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
  from convert_weights import export_lora
  run_dir, _, converted = lora_run
  src, _ = base
  dst = tmp_path / f"lora_{fmt}.safetensors"
  assert export_lora.main(["--src", str(run_dir / "checkpoints"), "--dst", str(dst),
                           "--format", fmt]) == 0
  adapters, lora_cfg = checkpointing.trained_lora(run_dir / "checkpoints")

  reference = WanTransformer3DModel.from_pretrained(src).eval()
  pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                                 image_processor=None, image_encoder=None, transformer=reference)
  pipe.load_lora_weights(str(dst))
  pipe.fuse_lora()

  cfg = configs.load(converted / "config.yaml")
  from a2jax import checkpoints
  base = checkpoints.load_params(checkpoints.component_path(converted, "transformer"),
                                 init_params_abstract(cfg.transformer))
  merged = lora_format.merge(base, adapters, lora_cfg.scale)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 5, 8, 8, 36)).astype(np.float32)
  t = np.array([700.0], np.float32)
  text = np.zeros((1, 512, cfg.transformer.text_dim), np.float32)  # diffusers splits at 512
  text[:, :7] = rng.standard_normal((7, cfg.transformer.text_dim))
  image = rng.standard_normal((1, 257, cfg.transformer.image_dim)).astype(np.float32)
  ours = np.asarray(A2Transformer(cfg.transformer).apply({"params": merged}, x, t, text, image))
  plain = np.asarray(A2Transformer(cfg.transformer).apply({"params": base}, x, t, text, image))
  with torch.no_grad():
    theirs = reference(torch.from_numpy(x).permute(0, 4, 1, 2, 3), torch.from_numpy(t),
                       torch.from_numpy(text), encoder_hidden_states_image=torch.from_numpy(image),
                       return_dict=False)[0].permute(0, 2, 3, 4, 1).numpy()
  err = max_rel_err(ours, theirs)
  print(f"export-lora {fmt}: diffusers vs a2jax max relative error {err:.2e} "
        f"(LoRA's own effect {max_rel_err(plain, ours):.2e})")
  assert max_rel_err(plain, ours) > 100 * EXPORT_TOL  # the trained LoRA changes the output
  assert err < EXPORT_TOL


def init_params_abstract(cfg):
  from a2jax.models.transformer import init_abstract_boxed
  import flax.linen as nn
  return nn.meta.unbox(init_abstract_boxed(cfg))
