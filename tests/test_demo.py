"""make demo's pieces (a2jax.demo): the inflated VAE, the caption tokenizer, the demo config, and a
short training through the real paths (VAE, encoding, train.py, the sampling pipeline) that beats
an untrained transformer on held-out combinations."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2jax import checkpoints, configs, demo, text
from a2jax.runner import run_main
from a2jax.data import synthetic
from a2jax.models.vae import WanVAE
from test_quiet import NOISE, plain_shell_run


def test_inflated_vae_video_path_is_its_image_path():
  """After `inflate`, latent frame k of a video is the image encoding of frame 4k, and each latent
  frame decodes to its image decoding repeated over its chunk — whatever the spatial weights."""
  cfg = configs.load(demo.CONFIG).vae
  vae = WanVAE(cfg)
  video = jax.random.uniform(jax.random.key(1), (1, 9, 16, 16, 3), minval=-1, maxval=1)
  params = jax.tree_util.tree_map_with_path(
      demo.inflate, nn.meta.unbox(vae.init(jax.random.key(0), video)["params"]))
  encode = jax.jit(lambda x: vae.apply({"params": params}, x, method=vae.encode)[0])
  decode = jax.jit(lambda z: vae.apply({"params": params}, z, method=vae.decode))
  latents = encode(video)
  assert latents.shape == (1, 3, 4, 4, cfg.z_dim)
  for k in range(3):
    np.testing.assert_allclose(latents[:, k], encode(video[:, 4 * k:4 * k + 1])[:, 0],
                               rtol=1e-5, atol=1e-5)
  frames = decode(latents)
  for k in range(3):
    image = decode(latents[:, k:k + 1])[:, 0]
    for t in range(max(4 * k - 3, 0), 4 * k + 1):
      np.testing.assert_allclose(frames[:, t], image, rtol=1e-5, atol=1e-5)


def test_caption_tokenizer(tmp_path):
  tokenizer = demo.build_tokenizer(tmp_path, synthetic.vocabulary())
  cfg = configs.load(demo.CONFIG)
  assert len(tokenizer) <= cfg.umt5.vocab_size
  reloaded = text.load_tokenizer(tmp_path)
  data = synthetic.SyntheticElements.builder_configs[demo.DATASET]
  clips = [synthetic.sample_clip(data, "heldout", i) for i in range(8)]
  ids, mask = text.tokenize(reloaded, [c.caption for c in clips], cfg.umt5.max_length)
  words = [len(c.caption.split()) for c in clips]
  assert list(mask.sum(1)) == [n + 1 for n in words]      # one token per word, then </s>
  assert not np.any(ids == reloaded.unk_token_id)


def test_demo_config_fits_together():
  """The transformer reads the frozen encoders' widths; the dataset's clips fit the sampling."""
  cfg = configs.load(demo.CONFIG)
  data = synthetic.SyntheticElements.builder_configs[demo.DATASET]
  assert cfg.transformer.text_dim == cfg.umt5.d_model
  assert cfg.transformer.image_dim == cfg.clip.hidden_size
  assert cfg.transformer.in_channels == 2 * cfg.vae.z_dim + 4
  assert (cfg.sampling.frames, cfg.sampling.height, cfg.sampling.width) == (
      data.frames, data.height, data.width) == (cfg.data.frames, cfg.data.height, cfg.data.width)


# The short run: 32×32 clips of one element, every stage of the demo at a fraction of its size.
SHORT = synthetic.SyntheticConfig(name="short", frames=17, height=32, width=32, min_elements=1,
                                  max_elements=1, patterns=("solid",), train_examples=64,
                                  heldout_examples=4, seed=5)
OVERRIDES = ["sampling.height=32", "sampling.width=32", "data.height=32", "data.width=32",
             "train.steps=150", "train.warmup_steps=10", "train.checkpoint_every=150",
             "train.log_every=50"]
MARGIN = 0.08


@pytest.mark.slow
def test_short_training_beats_an_untrained_transformer_and_prints_its_own_lines(tmp_path):
  """`python -m a2jax.demo` from a plain shell on SHORT (built beforehand under the demo's dataset
  name, which the demo then reuses): VAE (300 steps) + encoding + train.py (150 steps), then
  sampling. The trained transformer's mean fidelity on held-out combinations exceeds the untrained
  one's (same VAE, same noise) by at least MARGIN (a short run learns the background; the elements
  take the demo's full training). No library line reaches the
  terminal: orbax's warnings land in OUT/demo.log, train.py's records in OUT/runs/dit/train.log."""
  paths = demo.Paths(tmp_path)
  synthetic.build(paths.data, SHORT, verbose=False)
  folder = paths.data / synthetic.SyntheticElements.name
  (folder / SHORT.name).rename(folder / demo.DATASET)   # TFDS refuses a custom config named so
  output = plain_shell_run("-m", "a2jax.demo", "--out", str(tmp_path), "--vae-steps", "300",
                           *OVERRIDES)
  assert not NOISE.search(output), NOISE.search(output).group(0) + "\n" + output
  assert "already exists: reusing it" in output and "[demo] dit:" in output
  assert "E2V fidelity" in output
  assert "Given directory is read only" in paths.log.read_text()   # orbax reading the checkpoint
  assert "checkpoint" in (paths.runs / "dit" / "train.log").read_text()
  cfg = configs.load(demo.CONFIG, OVERRIDES)
  assert checkpoints.read_config(paths.model).vae.latents_std != cfg.vae.latents_std
  summary = json.loads((paths.samples / "scores.json").read_text())["mean"]
  print({name: round(scores["fidelity"], 3) for name, scores in summary.items()})
  assert summary["trained"]["fidelity"] >= summary["untrained"]["fidelity"] + MARGIN, summary
  assert (paths.samples / "demo.png").is_file()
  assert len(list(paths.samples.glob("*.mp4"))) == demo.SAMPLED


def test_bad_input_is_one_line(tmp_path, capsys):
  """An unknown override, no VAE steps, or overrides / --vae-steps for an already trained model
  end with one line, exit 2."""
  assert run_main(demo.main, ["--out", str(tmp_path), "train.stepz=3"]) == 2
  assert capsys.readouterr().err.strip().startswith("error: unknown key config.train.stepz")
  assert run_main(demo.main, ["--out", str(tmp_path), "--vae-steps", "0"]) == 2
  assert capsys.readouterr().err.strip().startswith("error: --vae-steps 0: train the VAE")
  (tmp_path / "model" / "vae").mkdir(parents=True)
  for args in (["train.steps=300"], ["--vae-steps", "5"]):
    assert run_main(demo.main, ["--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: overrides and --vae-steps apply to a new training"), err
    assert "\n" not in err
