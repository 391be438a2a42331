"""Training SkyReels-V3 R2V (a2jax/families.py) with the code that trains A2: the encoder writes
the reference latent frames a V3 folder needs from the same triplets; the step sees the video's
noisy frames then the clean reference frames and is scored on the video's frames only; it
overfits 4 triplets (full and LoRA); train.py resumes bit for bit after a SIGKILL, and 2 processes
train like one.

The V3 config is configs/tiny_train.yaml's with V3's transformer (16 input channels, no image
branch): V3_OVERRIDES."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2jax import checkpoints, configs, text
from a2jax.data import encode, encoded, pipeline, triplets
from a2jax.models import umt5 as umt5_model
from a2jax.models import vae as vae_model
from a2jax.models.transformer import A2Transformer
from a2jax.train import batches, optimizer
from a2jax.train.loss import flow_matching_loss
from data_util import make_source
from test_data_encode import OVERRIDES as ENCODE_OVERRIDES, write_encoder_folder
from test_train_run import (STEPS, env, flat, read_metrics, read_state, run,  # noqa: F401
                            run_args, write_driver)
from test_train_step import OVERRIDES as STEP_OVERRIDES, first_step_on_one_device, overfit

import multiprocess

V3_OVERRIDES = ["family=v3_r2v", "transformer.in_channels=16", "transformer.image_dim=null",
                "transformer.added_kv_proj_dim=null", "sampling.shift=5"]
ENCODE_TOL = 1e-5  # max|Δ| ≤ ENCODE_TOL · max|ref|: sharded (fsdp 4 × tensor 2) vs one device


@pytest.fixture(scope="module")
def v3_folder(tmp_path_factory):
  """Triplets and a V3 R2V encoder folder (config, vae/, umt5/, tokenizer/: no CLIP)."""
  root = tmp_path_factory.mktemp("encode_v3")
  triplets.build(make_source(root / "src"), root / "data", min_frames=9, verbose=False)
  folder = root / "ckpt"
  write_encoder_folder(folder, configs.load("tiny", overrides=[*V3_OVERRIDES, *ENCODE_OVERRIDES]),
                       {"vae": vae_model, "umt5": umt5_model})
  return root, folder


def test_encoder_writes_reference_latent_frames(v3_folder):
  """`python -m a2jax.data.encode` on a V3 folder: records without CLIP tokens whose condition is
  each reference encoded alone, normalised, zero latents after them; CFG dropout of the references
  zeroes those frames (the sampler's third branch)."""
  root, folder = v3_folder
  out = root / "encoded"
  encode.main(["--src", str(root / "data"), "--checkpoint", str(folder), "--dst", str(out),
               "--batch-size", "2", *ENCODE_OVERRIDES])
  spec = encoded.read_spec(out)
  assert {k: v["shape"] for k, v in spec["features"].items()} == {
      "latents": [3, 4, 6, 16], "condition": [4, 4, 6, 16], "text": [16, 32]}
  source = encoded.EncodedSource(out)
  record = source[0]
  cfg = checkpoints.read_config(folder, ENCODE_OVERRIDES)
  example = next(iter(pipeline.triplet_dataset(root / "data", frames=9, height=32, width=48,
                                               seed=cfg.data.seed, num_references=2, num_epochs=1,
                                               shuffle=False, family="v3_r2v").to_iter_dataset()))
  assert "clip" not in example and example["references"].shape == (2, 32, 48, 3)
  vae = vae_model.WanVAE(cfg.vae)
  params = {name: checkpoints.load_component(folder, name, getattr(cfg, name))
            for name in ("vae", "umt5")}
  encode_one = lambda v: vae.apply({"params": params["vae"]}, jnp.asarray(v[None]),
                                   method=vae.encode)[0][0]
  refs = [vae_model.normalize_latents(encode_one(r[None]), cfg.vae)[0] for r in example["references"]]
  tokenizer = text.load_tokenizer(folder / "tokenizer")
  states, _ = text.encode_prompt(params["umt5"], cfg.umt5, tokenizer, [example["caption"]])
  want = {"latents": vae_model.normalize_latents(encode_one(example["video"]), cfg.vae),
          "condition": np.concatenate([np.stack(refs), np.zeros((2, 4, 6, 16), np.float32)]),
          "text": states[0]}
  for k, v in want.items():
    v = np.asarray(v)
    assert np.max(np.abs(record[k] - v)) <= ENCODE_TOL * np.max(np.abs(v)), k
  assert not record["condition"][2:].any() and record["condition"][:2].any()
  dropped = next(encoded.encoded_loader(out, batch_size=2, seed=0, ref_dropout=1.0))
  assert not dropped["condition"].any() and dropped["text"].any() and "image" not in dropped


@pytest.fixture(scope="module")
def setup():
  cfg = configs.load("tiny_train", [*V3_OVERRIDES, *STEP_OVERRIDES])
  tx = optimizer.make_optimizer(cfg.train)
  shapes = batches.record_shapes(cfg)
  records = [batches.synthetic_record(shapes, cfg.data.synthetic_refs, [7], i, cfg.family)
             for i in range(4)]
  batch = {k: np.stack([r[k] for r in records for _ in range(2)]) for k in records[0]}
  return cfg, tx, batch


@pytest.fixture(scope="module")
def single(setup):
  return first_step_on_one_device(*setup)


def test_step_scores_the_video_frames_with_the_references_as_context(setup, single):
  """The first step's loss equals flow matching on the DiT's video frames of [x_t ; references]
  (frames in time), built here from the model directly; the references change it."""
  cfg, _, batch = setup
  *_, state0, (_, metrics) = single
  model = A2Transformer(cfg.transformer)
  # the step's keys: fold_in(rng, step 0), then micro-batch m; its loss is the micro-batches' mean
  rng = jax.random.fold_in(jax.random.key(1), 0)
  micro = cfg.train.grad_accum_steps

  def loss_of(condition):
    losses = []
    for m in range(micro):
      rows = {k: v[m::micro] for k, v in batch.items()}
      cond = condition[m::micro]

      def predict(x_t, t):
        x = jnp.concatenate([x_t, cond], axis=1)
        return model.apply({"params": state0.params}, x, t, rows["text"], None)[:, :x_t.shape[1]]

      loss, _ = flow_matching_loss(predict, rows["latents"], jax.random.fold_in(rng, m),
                                   shift=cfg.sampling.shift, sampling=cfg.train.timestep_sampling,
                                   logit_mean=cfg.train.logit_mean, logit_std=cfg.train.logit_std,
                                   weighting=cfg.train.loss_weighting)
      losses.append(loss)
    return float(np.mean(losses))

  assert metrics["loss"] == pytest.approx(loss_of(batch["condition"]), rel=1e-5)
  assert abs(loss_of(np.zeros_like(batch["condition"])) - metrics["loss"]) > 1e-4


def test_overfits_four_triplets(setup, single):
  _, losses = overfit(setup[2], single, 150)
  first, last = np.mean(losses[:3]), np.mean(losses[-10:])
  print(f"V3 R2V overfit: loss {first:.4f} → {last:.4f} ({first / last:.0f}×) in 150 steps")
  assert np.all(np.isfinite(losses)) and last * 5 <= first


@pytest.fixture(scope="module")
def v3_data(tmp_path_factory):
  """16 synthetic V3 R2V records of tiny_train's bucket."""
  cfg = configs.load("tiny_train", V3_OVERRIDES)
  shapes = batches.record_shapes(cfg)
  out = tmp_path_factory.mktemp("encoded_v3") / "train"
  encoded.write_encoded((batches.synthetic_record(shapes, cfg.data.synthetic_refs, [3], i, cfg.family)
                         for i in range(16)), out, num_shards=2)
  return out


def v3_args(out, data_dir, name, *extra):
  return [*run_args(out, data_dir, name, *extra), *V3_OVERRIDES]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, env, v3_data):
  out = tmp_path_factory.mktemp("v3_straight")
  proc = run(env, v3_args(out, v3_data, "straight"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out / "straight"


def assert_same_final_state(got_dir, want_dir, rtol=0.0):
  a = flat(read_state(want_dir / "checkpoints" / str(STEPS)))
  b = flat(read_state(got_dir / "checkpoints" / str(STEPS)))
  assert a.keys() == b.keys() and any("opt_state" in k for k in a)
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=rtol, atol=1e-6 if rtol else 0, err_msg=k)


def test_train_py_resumes_bit_for_bit_after_sigkill(tmp_path, env, v3_data, straight):
  out = tmp_path / "runs"
  args = v3_args(out, v3_data, "resumed")
  ckpt3 = out / "resumed" / "checkpoints" / "3"
  killed = run(env, ["kill", "5", str(ckpt3), *args], write_driver(tmp_path))
  assert killed.returncode < 0, killed.stderr[-3000:]
  resumed = run(env, args)
  assert resumed.returncode == 0 and "resumed from step 3" in resumed.stdout, resumed.stderr[-3000:]
  for key in ("loss", "grad_norm", "lr"):
    assert [m[key] for m in read_metrics(out / "resumed")] == [
        m[key] for m in read_metrics(straight)], key
  assert_same_final_state(out / "resumed", straight)


def test_two_processes_train_like_one(tmp_path, env, v3_data, straight):
  """2 processes × 4 devices log what 1 × 8 does, to gloo's reduction order."""
  multiprocess.run(["train.py", *v3_args(tmp_path, v3_data, "two")], timeout=600,
                   log_dir=tmp_path, env=env)
  got, want = read_metrics(tmp_path / "two"), read_metrics(straight)
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want], rtol=1e-5,
                               err_msg=key)
  assert_same_final_state(tmp_path / "two", straight, rtol=1e-5)


def test_lora_run_trains_the_adapters_only(tmp_path, env, v3_data):
  """train.py with train.lora on V3: the default targets less the image branch V3 lacks train
  (finite losses), and the checkpoints hold the adapters alone."""
  proc = run(env, v3_args(tmp_path, v3_data, "lora", "train.lora.rank=4", "train.lora.alpha=8",
                          "learning_rate=3.0e-2"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "LoRA adapters (rank 4, alpha 8" in proc.stdout
  state = flat(read_state(tmp_path / "lora" / "checkpoints" / str(STEPS)))
  params = [k for k in state if k.startswith("['params']")]
  assert params and all("lora_" in k for k in params) and not any("add_k_proj" in k for k in params)
  losses = [m["loss"] for m in read_metrics(tmp_path / "lora")]
  assert np.all(np.isfinite(losses))
