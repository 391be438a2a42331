"""A SkyReels-V2 diffusion-forcing release folder end to end: converted by `convert_weights release`,
sampled by a2jax.long_video and by sample.py, equal to diffusers' SkyReelsV2DiffusionForcingPipeline
and its image-to-video variant loaded from the same folder (tiny random weights, the reference's
noise draws answered by a2jax's). Bad input is refused in one line."""

import dataclasses
import json
import re
import shutil

import jax
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (SkyReelsV2DiffusionForcingImageToVideoPipeline,
                       SkyReelsV2DiffusionForcingPipeline)
from diffusers.pipelines.skyreels_v2 import pipeline_skyreels_v2_diffusion_forcing as t2v_module
from diffusers.pipelines.skyreels_v2 import pipeline_skyreels_v2_diffusion_forcing_i2v as i2v_module

import sample as sample_cli
from a2jax import checkpoints, configs, families
from a2jax import diffusion_forcing as df
from a2jax import long_video
from a2jax.errors import ConfigError, ConversionError, InputError
from df_reference import decode_torch, patch_reference_noise
from parity import rel_l2_err
from release_util import tiny_converted_release

LATENT_TOL = 1e-4        # relative L2 of the whole video's final latents, float32
PIXEL_TOL = 2            # max |Δ| of the decoded uint8 frames (of 255)
BF16_LATENT_TOL = 5e-2   # relative L2, bfloat16 transformer against the float32 reference
# 3 windows of 17 frames chained by 5 frames of history (the last one shorter), history re-noised.
SAMPLING = dict(frames=37, base_frames=17, overlap_history=5, height=16, width=32, steps=3,
                guidance=5.0, addnoise_condition=20.0, seed=3)
PROMPT = "A red circle moves left across a blue striped background."
OTHER_PROMPT = "A man is holding a teddy bear in the forest."


@pytest.fixture(scope="module")
def release_df(tmp_path_factory):
  return tiny_converted_release(tmp_path_factory, "v2_df")


@pytest.fixture(scope="module")
def pipe(release_df):
  return long_video.DiffusionForcingPipeline.from_folder(release_df[1])


def sampling_of(pipe, **changes):
  return dataclasses.replace(pipe.cfg.sampling, **{**SAMPLING, **changes})


def reference(cls, module, src, monkeypatch, sampling, seed, **inputs):
  """diffusers' pipeline from the release folder, its draws answered by a2jax's for `seed`: final
  normalised latents (1, f, h, w, z) and uint8 frames (1, F, H, W, 3)."""
  pipe = cls.from_pretrained(src)
  windows = df.plan(sampling.frames, sampling.base_frames, sampling.overlap_history,
                    sampling.causal_block_size, first_frame="image" in inputs)
  noise_keys, history_keys = long_video.seed_keys([seed])
  patch_reference_noise(monkeypatch, module, windows, noise_keys,
                        jax.random.wrap_key_data(history_keys),
                        (sampling.height // 8, sampling.width // 8, 16))
  with torch.no_grad():
    latents = pipe(prompt=PROMPT, height=sampling.height, width=sampling.width,
                   num_frames=sampling.frames, num_inference_steps=sampling.steps,
                   guidance_scale=sampling.guidance, overlap_history=sampling.overlap_history,
                   addnoise_condition=sampling.addnoise_condition,
                   base_num_frames=sampling.base_frames, ar_step=sampling.ar_step,
                   causal_block_size=sampling.causal_block_size, fps=sampling.fps,
                   output_type="latent", return_dict=False, **inputs)[0]
  return latents.numpy().transpose(0, 2, 3, 4, 1), decode_torch(pipe.vae, latents)


def test_converted_folder_records_family_and_reference_defaults(release_df):
  cfg = checkpoints.read_config(release_df[1])
  assert cfg.family == "v2_df" and cfg.transformer.inject_sample_info
  s = cfg.sampling
  assert (s.frames, s.height, s.width, s.steps, s.guidance, s.fps, s.negative_prompt,
          s.base_frames, s.causal_block_size, s.shift, s.sampler) == (
              97, 544, 960, 50, 6.0, 24, "", 97, 1, 8.0, "unipc")
  assert not (release_df[1] / "clip").exists()


def test_text_to_video_matches_diffusers(pipe, release_df, monkeypatch):
  """Row 0 of a batch of two equals diffusers' run of that request alone."""
  sampling = sampling_of(pipe)
  requests = [long_video.VideoRequest(PROMPT, seed=3), long_video.VideoRequest(OTHER_PROMPT, seed=4)]
  result = pipe.generate(requests, sampling=sampling, progress=False)
  want, want_frames = reference(SkyReelsV2DiffusionForcingPipeline, t2v_module, release_df[0],
                                monkeypatch, sampling, seed=3)
  err = rel_l2_err(result.latents[:1], want)
  levels = np.abs(result.frames[:1].astype(int) - want_frames).max()
  print(f"text-to-video from the folder: latents relative L2 {err:.2e}, frames max {levels}/255")
  assert result.frames.shape == (2, 37, 16, 32, 3)
  assert err <= LATENT_TOL and levels <= PIXEL_TOL
  assert not np.allclose(result.latents[0], result.latents[1])


def test_image_to_video_matches_diffusers(pipe, release_df, monkeypatch):
  """The first frame resized to the video as diffusers resizes it (40×60 → 16×32, Lanczos)."""
  sampling = sampling_of(pipe, frames=41, fps=16)  # 3 whole windows (see test_diffusion_forcing)
  image = np.random.default_rng(5).integers(0, 256, (40, 60, 3), dtype=np.uint8)
  latents = pipe.latents([long_video.VideoRequest(PROMPT, image=image, seed=3)], sampling,
                         progress=False)
  want, want_frames = reference(SkyReelsV2DiffusionForcingImageToVideoPipeline, i2v_module,
                                release_df[0], monkeypatch, sampling, seed=3,
                                image=PIL.Image.fromarray(image))
  frames = np.concatenate(list(pipe.decode_stream(latents)), axis=1)
  err = rel_l2_err(latents, want)
  levels = np.abs(frames.astype(int) - want_frames).max()
  print(f"image-to-video from the folder: latents relative L2 {err:.2e}, frames max {levels}/255")
  assert err <= LATENT_TOL and levels <= PIXEL_TOL


def test_bfloat16_transformer_close_to_float32_reference(release_df, monkeypatch):
  pipe = long_video.DiffusionForcingPipeline.from_folder(
      release_df[1], overrides=["transformer.dtype=bfloat16"])
  sampling = sampling_of(pipe)
  latents = pipe.latents([long_video.VideoRequest(PROMPT, seed=3)], sampling, progress=False)
  want, _ = reference(SkyReelsV2DiffusionForcingPipeline, t2v_module, release_df[0], monkeypatch,
                      sampling, seed=3)
  err = rel_l2_err(latents, want)
  print(f"bfloat16 transformer: latents relative L2 {err:.2e}")
  assert err <= BF16_LATENT_TOL


def test_sample_py_streams_the_video_the_pipeline_makes(pipe, release_df, tmp_path, capsys):
  """sample.py on the converted folder: the mp4 written as decoded, its latents and uint8 frames
  (--save-arrays) those of the Python API with the same seed; progress over the windows' rows and
  the decode on stderr."""
  out = tmp_path / "long.mp4"
  s = SAMPLING
  rc = sample_cli.main(["--checkpoint", str(release_df[1]), "--prompt", PROMPT, "--out", str(out),
                        "--frames", str(s["frames"]), "--base-frames", str(s["base_frames"]),
                        "--overlap-history", str(s["overlap_history"]), "--ar-step", "0",
                        "--addnoise-condition", str(s["addnoise_condition"]),
                        "--height", str(s["height"]), "--width", str(s["width"]),
                        "--steps", str(s["steps"]), "--guidance", str(s["guidance"]),
                        "--seed", str(s["seed"]), "--save-arrays"])
  assert rc == 0, capsys.readouterr().err
  err = capsys.readouterr().err
  assert "denoise" in err and "decode" in err and f"wrote {out}" in err
  assert out.is_file() and out.stat().st_size > 0
  want = pipe.generate([long_video.VideoRequest(PROMPT)], sampling=sampling_of(pipe),
                       progress=False)
  saved = np.load(out.with_suffix(".npz"))
  # sample.py shards over the config's mesh (8 devices here), the fixture runs on one device.
  assert rel_l2_err(saved["latents"], want.latents[0]) <= 1e-5
  assert np.abs(saved["frames"].astype(int) - want.frames[0]).max() <= 1


@pytest.mark.parametrize("args,message", [
    (["--ref", "{image}"], "takes no reference images: give a prompt, and a first frame with --image"),
    (["--grid"], "--grid acts on the references beside the video"),
    (["--frames", "37", "--base-frames", "17"], "do not fit one window of 17: give overlap_history"),
    (["--frames", "37", "--base-frames", "17", "--overlap-history", "17"],
     "overlap_history 17 is not shorter than the window of 17 frames"),
    (["--frames", "37", "--base-frames", "17", "--overlap-history", "5", "--causal-block-size", "3"],
     "causal blocks of 3 latent frames do not divide a window of 5"),
    (["--frames", "36"], "must be 4k\\+1"),
    (["--cache", "fbcache"], "cache 'fbcache': diffusion forcing steps every frame"),
])
def test_sample_py_refuses_bad_long_video_options_in_one_line(release_df, tmp_path, capsys, args,
                                                              message):
  image = tmp_path / "image.png"
  PIL.Image.new("RGB", (8, 8)).save(image)
  out = tmp_path / "x.mp4"
  argv = ["--checkpoint", str(release_df[1]), "--prompt", PROMPT, "--out", str(out),
          *[a.format(image=image) for a in args]]
  assert sample_cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err  # one line, no trace
  assert re.search(message, err), err
  assert not out.exists()




def test_training_and_encoding_refuse_a_df_config():
  cfg = configs.load("v2_df_14b")
  with pytest.raises(ConfigError, match="SkyReels-V2 diffusion-forcing model .* sample the DF model"):
    families.require_references(cfg, "v2_df_14b")
  import train
  from a2jax.runner import run_main
  assert run_main(train.main, ["v2_df_14b"]) == 2


def test_converter_refuses_a_non_diffusion_forcing_skyreels_v2_folder(release_df, tmp_path):
  src = tmp_path / "v2_t2v"
  shutil.copytree(release_df[0] / "transformer", src / "transformer")
  (src / "model_index.json").write_text(json.dumps({"_class_name": "SkyReelsV2Pipeline"}))
  from convert_weights.release import convert_release
  with pytest.raises(ConversionError, match="SkyReels-V2 SkyReelsV2Pipeline folder; a2jax converts "
                     "SkyReels-V2's diffusion-forcing folders"):
    convert_release(src, tmp_path / "out", progress=False)
  assert not (tmp_path / "out").exists()
