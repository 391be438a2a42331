"""Elements-to-video of any length from A2 and V3 R2V folders (a2jax.long_video.LongElementsPipeline):
windows of the model's length chained by held history, equal to a reference chain built from
diffusers' parts (`convert_weights.reference`: the release's sampling with the history frames
replaced before every step), its noise draws answered by a2jax's; the first window is the short
video; sample.py writes it streamed; bad plans are one line."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

import sample as sample_cli
from a2jax import families, long_video, video
from a2jax.errors import InputError
from a2jax.pipeline import DEFAULT_NEGATIVE_PROMPT, Request, to_uint8
from convert_weights.reference import TorchA2, TorchV3R2V, text_states
from parity import rel_l2_err
from release_util import tiny_converted_release

LATENT_TOL = 1e-4        # relative L2 of the whole video's final latents, float32
PIXEL_TOL = 2            # max |Δ| of the uint8 frames (of 255)
BF16_LATENT_TOL = 5e-2   # relative L2, bfloat16 transformer against the float32 reference
PROMPT = "A man is holding a teddy bear in the forest."
# A2, 2 references: windows of 17 frames (5 latent: 2 reference frames, 3 of scene), 1 latent frame
# of history → 2 new latent frames a window; 37 frames = 10 latent frames = 4 windows.
A2_SAMPLING = dict(frames=37, base_frames=17, overlap_history=1, height=16, width=32, steps=3,
                   seed=3)
# V3 R2V: windows of 9 frames (3 latent), 1 of history → 2 new; 21 frames = 6 latent = 3 windows.
V3_SAMPLING = dict(frames=21, base_frames=9, overlap_history=1, height=32, width=48, steps=3,
                   seed=5)


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(1)
  return rng.integers(0, 256, (40, 30, 3), dtype=np.uint8), rng.integers(0, 256, (60, 90, 3),
                                                                          dtype=np.uint8)


@pytest.fixture(scope="module")
def release_v3(tmp_path_factory):
  return tiny_converted_release(tmp_path_factory, "v3_r2v")


@pytest.fixture(scope="module")
def pipes(release, release_v3):
  return {"a2": long_video.LongElementsPipeline.from_folder(release[1]),
          "v3_r2v": long_video.LongElementsPipeline.from_folder(release_v3[1])}


@pytest.fixture(scope="module")
def reference(pipes, images, release, release_v3):
  """family → (the reference chain's latents, frames), computed once per family."""
  chains = {}

  def get(family):
    if family not in chains:
      pipe, sampling, request = case(family, pipes, images)
      src = (release if family == "a2" else release_v3)[0]
      chains[family] = reference_chain(pipe, sampling, request, src)
    return chains[family]
  return get


def case(family, pipes, images):
  pipe = pipes[family]
  changes = A2_SAMPLING if family == "a2" else V3_SAMPLING
  sampling = dataclasses.replace(pipe.cfg.sampling, **changes)
  man, forest = images
  return pipe, sampling, Request(PROMPT, [man], forest, seed=sampling.seed)


def reference_chain(pipe, sampling, request, src):
  """The chain written with torch from diffusers' parts: window 0 as the release samples it, each
  later window with frames scene_start … + history replaced by (1 − σ)·history + σ·noise before
  every step; a2jax's noise draws. → (latents (1, f, h, w, z), uint8 frames (F', H, W, 3))."""
  plan = pipe.plan(sampling, request.num_refs)
  window = plan.window_sampling(sampling)
  _, noise = pipe.base.prepare([request], window)
  vae_refs, originals = pipe.base.reference_images(request.references, request.background,
                                                   sampling.height, sampling.width)
  if pipe.base.family.name == "a2":
    torch_pipe = TorchA2(src, PROMPT)
    text, negative = torch_pipe.text(PROMPT), torch_pipe.text(DEFAULT_NEGATIVE_PROMPT)
    image = torch_pipe.image_tokens(originals)
    condition, mean, inv_std = torch_pipe.condition(vae_refs, window.frames)
    denoise = lambda x, hold: torch_pipe.denoise(condition, text, negative, image, x, window, hold)
  else:
    torch_pipe = TorchV3R2V(src, PROMPT)
    text, negative = (text_states(torch_pipe.tokenizer, torch_pipe.text_encoder, p)
                      for p in (PROMPT, ""))
    condition, mean, inv_std = torch_pipe.reference_latents(originals, sampling.height,
                                                            sampling.width)
    denoise = lambda x, hold: torch_pipe.denoise(condition, text, negative, x, window, hold)
  s, h = plan.scene_start, plan.history
  video_latents = denoise(noise, None)
  for index in range(1, plan.count):
    fresh, held_noise = long_video.window_noise([sampling.seed], index, noise.shape[1:], h)
    history = video_latents[:, :, -h:].clone()
    held_noise = torch.from_numpy(held_noise).permute(0, 4, 1, 2, 3)

    def hold(x, sigma):
      x[:, :, s:s + h] = (1 - sigma) * history + sigma * held_noise

    out = denoise(fresh, hold)
    video_latents = torch.cat([video_latents, out[:, :, s + h:]], dim=2)
  video_latents = video_latents[:, :, :plan.total]
  with torch.no_grad():
    decoded = torch_pipe.vae.decode(video_latents / inv_std + mean, return_dict=False)[0]
  frames = np.asarray(to_uint8(decoded.clamp(-1, 1).permute(0, 2, 3, 4, 1).numpy()))[0]
  drop = pipe.frames_to_drop(request.num_refs, sampling)
  return video_latents.permute(0, 2, 3, 4, 1).numpy(), frames[drop:]


@pytest.mark.parametrize("family", ["a2", "v3_r2v"])
def test_long_video_equals_the_reference_chain(family, pipes, images, reference):
  pipe, sampling, request = case(family, pipes, images)
  plan = pipe.plan(sampling, request.num_refs)
  assert plan.count >= 3  # window 0, a full later window, and a last one cut short
  result = pipe.generate([request], sampling=sampling, progress=False)
  ref_latents, ref_frames = reference(family)
  err = rel_l2_err(result.latents, ref_latents)
  print(f"{family}: {plan.count} windows, latents rel L2 {err:.2e}, frames max |Δ| "
        f"{np.abs(result.frames[0].astype(int) - ref_frames).max()}")
  assert err <= LATENT_TOL
  assert result.frames.shape[1] == sampling.frames - pipe.frames_to_drop(request.num_refs, sampling)
  assert np.abs(result.frames[0].astype(int) - ref_frames).max() <= PIXEL_TOL
  # The first window is the window-long video, bit for bit.
  short = pipe.base.generate([request], sampling=plan.window_sampling(sampling), progress=False)
  np.testing.assert_array_equal(result.latents[:, :plan.window], short.latents)


def test_bfloat16_chain_close_to_float32_reference(release, pipes, images, reference):
  pipe = long_video.LongElementsPipeline.from_folder(release[1],
                                                     overrides=["transformer.dtype=bfloat16"])
  _, sampling, request = case("a2", pipes, images)
  latents = pipe.latents([request], sampling, progress=False)
  err = rel_l2_err(latents, reference("a2")[0])
  print(f"a2 bfloat16: latents rel L2 {err:.2e}")
  assert err <= BF16_LATENT_TOL


def test_rows_of_a_batch_are_the_videos_alone(pipes, images):
  pipe, sampling, request = case("v3_r2v", pipes, images)
  other = Request("A bear sits.", [images[1]], images[0], seed=11)
  batch = pipe.latents([other, request], sampling, progress=False)
  alone = pipe.latents([request], sampling, progress=False)
  np.testing.assert_allclose(batch[1:], alone, rtol=0, atol=1e-5)


def test_chain_plans():
  plan = long_video.chain_plan(37, 17, 1, scene_start=2)
  assert (plan.window, plan.history, plan.new, plan.count, plan.total) == (5, 1, 2, 4, 10)
  # The default history: 5 latent frames (17 pixel frames), at most half the scene.
  assert long_video.chain_plan(161, 81, None, scene_start=3).history == 5
  assert long_video.chain_plan(61, 17, None, scene_start=2).history == 1
  # A video that fits one window is that window.
  assert long_video.chain_plan(13, 17, None, scene_start=2).count == 1


@pytest.mark.parametrize("frames, window, overlap, start, message", [
    (41, 17, 9, 2, r"overlap_history 9 \(3 latent frames of history\) leaves no new frame in a "
                   r"window of 17 frames, whose scene has 3 latent frames after 2 of references: "
                   r"use at most 5"),
    (41, 9, None, 2, r"the default .* leaves no new frame .* use fewer references"),
])
def test_bad_plans_are_one_line(frames, window, overlap, start, message):
  with pytest.raises(InputError, match=message):
    long_video.chain_plan(frames, window, overlap, start)


def test_per_frame_options_stay_refused_and_history_is_allowed():
  for name in ("a2", "v3_r2v"):
    family = families.FAMILIES[name]
    chained = dataclasses.replace(configs_sampling(), base_frames=17, overlap_history=5, frames=45)
    family.check(chained, 1)
    for option in (dict(ar_step=2), dict(causal_block_size=2), dict(addnoise_condition=20.0)):
      with pytest.raises(InputError, match="trained with one noise level for all frames"):
        family.check(dataclasses.replace(chained, **option), 1)


def configs_sampling():
  from a2jax import configs
  return dataclasses.replace(configs.SamplingConfig(), guidance=1.0)


def test_sample_py_streams_a_long_a2_video(pipes, images, release, tmp_path, capsys):
  pipe, sampling, request = case("a2", pipes, images)
  man, forest = images
  import PIL.Image
  PIL.Image.fromarray(man).save(tmp_path / "man.png")
  PIL.Image.fromarray(forest).save(tmp_path / "forest.png")
  out = tmp_path / "long.mp4"
  argv = ["--checkpoint", str(release[1]), "--prompt", PROMPT, "--ref", str(tmp_path / "man.png"),
          "--background", str(tmp_path / "forest.png"), "--out", str(out), "--frames", "37",
          "--base-frames", "17", "--overlap-history", "1", "--height", "16", "--width", "32",
          "--steps", "3", "--seed", "3", "--save-arrays", "--no-progress"]
  assert sample_cli.main(argv) == 0
  saved = np.load(out.with_suffix(".npz"))
  expected = pipe.generate([request], sampling=sampling, progress=False)
  # sample.py shards over the 8 devices (fsdp), the fixture runs on one: float rounding apart.
  assert rel_l2_err(saved["latents"], expected.latents[0]) <= 1e-5
  assert np.abs(saved["frames"].astype(int) - expected.frames[0]).max() <= 1
  assert video.probe(out)[0] == 37 - 8
  assert "(29 frames, 16×32)" in capsys.readouterr().err
  # --grid needs the whole video; a bad history is refused before anything loads.
  for extra, message in (["--grid"], "--grid is made from a whole video"), (
      ["--overlap-history", "9"], "leaves no new frame"):
    bad = tmp_path / "bad.mp4"
    assert sample_cli.main([*argv[:argv.index("--out") + 1], str(bad), *argv[argv.index(
        "--out") + 2:], *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not bad.exists()
