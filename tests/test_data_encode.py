"""Offline encoding end to end on tiny random models sharded over 8 CPU devices: the records match
the contract and an independent unsharded computation, and an interrupted run resumes."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2jax import checkpoints, conditioning, configs, text
from a2jax.data import encode, encoded, pipeline, triplets
from a2jax.errors import InputError
from a2jax.models import clip as clip_model
from a2jax.models import umt5 as umt5_model
from a2jax.models import vae as vae_model
from data_util import make_source
from tokenizer_util import build_tiny_tokenizer

import multiprocess

OVERRIDES = ["data.frames=9", "data.height=32", "data.width=48", "umt5.max_length=16",
             "mesh.fsdp=4", "mesh.tensor=2"]
CLIP = {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}}


def random_params(boxed, seed: int):
  """Random weights of the abstract tree without compiling an init: norm gains around 1."""
  abstract = nn.meta.unbox(boxed)
  leaves, tree = jax.tree.flatten_with_path(abstract)
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    is_gain = jax.tree_util.keystr(path).endswith("['scale']")
    out.append(1.0 + 0.1 * noise if is_gain else 0.1 * noise)
  return jax.tree.unflatten(tree, out)


def write_encoder_folder(folder, cfg, modules):
  """An encoder folder: `cfg`, random weights of {component: model module} (seeded by position),
  the tiny tokenizer."""
  folder.mkdir()
  checkpoints.write_config(folder, cfg)
  for i, (name, module) in enumerate(modules.items()):
    boxed = module.init_abstract_boxed(getattr(cfg, name))
    checkpoints.save_params(folder / name, random_params(boxed, i))
  build_tiny_tokenizer(folder / "tokenizer", cfg.umt5.vocab_size)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("encode")
  triplets.build(make_source(root / "src"), root / "data", min_frames=9, verbose=False)
  folder = root / "ckpt"
  write_encoder_folder(folder, configs.load("tiny", overrides=OVERRIDES),
                       {"vae": vae_model, "clip": clip_model, "umt5": umt5_model})
  (folder / "image_processor").mkdir()
  (folder / "image_processor" / "preprocessor_config.json").write_text(json.dumps(CLIP))
  return root, encode.Encoder.from_folder(folder)


def read_all(out):
  source = encoded.EncodedSource(out)
  return [source[i] for i in range(len(source))]


def test_encode_contract_and_values(setup):
  root, encoder = setup
  assert dict(encoder.mesh.shape) == {"data": 1, "fsdp": 4, "context": 1, "tensor": 2}
  encode.main(["--src", str(root / "data"), "--checkpoint", str(root / "ckpt"),
               "--dst", str(root / "cli"), "--records-per-shard", "3", "--batch-size", "2",
               *OVERRIDES])
  spec = encoded.read_spec(root / "cli")
  cfg = encoder.cfg
  # 4 clips with 2 references (the most common count); f = 3, 32×48 / 8, I = 2 · (2² + 1)
  assert spec["num_records"] == 4 and len(spec["shards"]) == 2
  assert {k: v["shape"] for k, v in spec["features"].items()} == {
      "latents": [3, 4, 6, 16], "condition": [3, 4, 6, 20], "text": [16, 32], "image": [10, 24]}
  assert spec["metadata"]["num_references"] == 2 and spec["metadata"]["frames"] == 9
  records = read_all(root / "cli")
  # recompute the first record unsharded, from the pipeline's example of the same position
  ds = pipeline.triplet_dataset(root / "data", frames=9, height=32, width=48, seed=cfg.data.seed,
                                num_references=2, num_epochs=1, shuffle=False,
                                clip_processor=encoder.clip_processor)
  example = next(iter(ds.to_iter_dataset()))
  params = {k: jax.device_put(v, jax.devices()[0]) for k, v in encoder.params.items()}
  vae = vae_model.WanVAE(cfg.vae)
  x = jnp.asarray(np.stack([example["video"],
                            conditioning.condition_video(example["references"], 9)]))
  mean, _ = vae.apply({"params": params["vae"]}, x, method=vae.encode)
  z = vae_model.normalize_latents(mean, cfg.vae)
  states, _ = text.encode_prompt(params["umt5"], cfg.umt5, encoder.tokenizer, [example["caption"]])
  image = clip_model.encode_references(params["clip"], cfg.clip, jnp.asarray(example["clip"][None]))
  want = {"latents": z[0], "condition": conditioning.with_mask(z[1], 2, 9), "text": states[0],
          "image": image[0]}
  # float32, sharded (fsdp 4 × tensor 2) vs one device: max|Δ| ≤ 1e-5 · max|ref|
  for k, v in want.items():
    v = np.asarray(v)
    assert np.max(np.abs(records[0][k] - v)) <= 1e-5 * np.max(np.abs(v)), k
  for r in records:
    np.testing.assert_array_equal(r["condition"][..., :4], np.broadcast_to(
        np.array([1, 1, 0], np.float32)[:, None, None, None], (3, 4, 6, 4)))
    assert r["text"].any() and not r["text"][-1].any()          # zero past the caption
  batch = next(encoded.encoded_loader(root / "cli", batch_size=2, seed=0))
  assert batch["condition"].shape == (2, 3, 4, 6, 20)


def test_encode_resumes_after_interruption(setup, monkeypatch):
  root, encoder = setup
  kwargs = dict(records_per_shard=2, batch_size=2, progress=False)
  encode.encode_dataset(root / "data", encoder, root / "clean", **kwargs)
  calls = []
  real = encode.Encoder.__call__

  def interrupted(self, examples, positions):
    calls.append(positions)
    if len(calls) == 2:     # the second shard's batch
      raise KeyboardInterrupt
    return real(self, examples, positions)

  monkeypatch.setattr(encode.Encoder, "__call__", interrupted)
  out = root / "resumed"
  with pytest.raises(KeyboardInterrupt):
    encode.encode_dataset(root / "data", encoder, out, **kwargs)
  first = out / encoded.shard_name(0, 3)
  assert first.is_file() and not (out / encoded.SPEC_FILE).exists()
  assert not (out / encoded.shard_name(1, 3)).exists() and not list(out.glob("*.tmp"))
  written = first.stat().st_mtime_ns
  monkeypatch.setattr(encode.Encoder, "__call__", real)
  encode.encode_dataset(root / "data", encoder, out, **kwargs)
  assert first.stat().st_mtime_ns == written                     # kept, not re-encoded
  assert encoded.read_spec(out)["shards"] == encoded.read_spec(root / "clean")["shards"]
  for a, b in zip(read_all(out), read_all(root / "clean")):
    for k in encoded.FEATURES:
      np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(InputError, match="complete"):
    encode.encode_dataset(root / "data", encoder, out, **kwargs)
  (root / "other").mkdir()
  (root / "other" / encode.RUN_FILE).write_text(json.dumps({"seed": 123}))
  with pytest.raises(InputError, match="other settings"):
    encode.encode_dataset(root / "data", encoder, root / "other", **kwargs)


def test_two_processes_encode_what_one_does(setup, tmp_path):
  """`--distributed` in 2 processes × 4 devices (the models sharded over both, process 0 writing)
  writes the dataset one process writes, to gloo's reduction order (rtol 1e-5); alone, it refuses."""
  root, encoder = setup
  one, two = tmp_path / "one", tmp_path / "two"
  encode.encode_dataset(root / "data", encoder, one, records_per_shard=2, batch_size=2,
                        progress=False)
  args = ["-m", "a2jax.data.encode", "--src", root / "data", "--checkpoint", root / "ckpt",
          "--records-per-shard", "2", "--batch-size", "2", "--distributed"]
  multiprocess.run([*args, "--dst", two], timeout=400, log_dir=tmp_path)
  spec_one, spec_two = encoded.read_spec(one), encoded.read_spec(two)
  assert spec_two["shards"] == spec_one["shards"] and spec_two["features"] == spec_one["features"]
  for a, b in zip(read_all(two), read_all(one), strict=True):
    for k in encoded.FEATURES:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  with pytest.raises(InputError, match="no other process was found"):
    encode.main([*map(str, args[2:]), "--dst", str(tmp_path / "alone")])
  assert not (tmp_path / "alone").exists()
