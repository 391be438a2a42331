"""Elements-to-video end to end against PyTorch: a tiny random release folder (diffusers / transformers
`save_pretrained`) is converted with `convert_weights release`, sampled by the a2jax pipeline and by
the PyTorch reference pipeline (convert_weights.reference: diffusers / transformers components, the
release's A2Pipeline semantics (DESIGN.md §1 mask rule), from the same initial noise."""

import dataclasses

import jax
import numpy as np
import pytest

from a2jax import configs, sharding
from a2jax.pipeline import A2Pipeline, video_to_uint8
from convert_weights.reference import TorchA2
from parity import rel_l2_err

LATENT_TOL = 1e-4        # relative L2 of the final latents
PIXEL_TOL = 2 / 255      # max |Δ| of decoded frames in [0, 1]
SAMPLING = dict(frames=13, height=32, width=48, steps=3, guidance=5.0, shift=8.0, seed=0)
PROMPT = "A man is holding a teddy bear in the forest."


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(1)
  man = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)          # portrait subject
  bear = rng.integers(0, 256, (36, 50, 4), dtype=np.uint8)         # RGBA object
  forest = rng.integers(0, 256, (60, 90), dtype=np.uint8)          # grayscale background
  return man, bear, forest


CASES = {1: lambda m, b, f: ([m], None), 2: lambda m, b, f: ([m], f), 3: lambda m, b, f: ([m, b], f)}


@pytest.fixture(scope="module")
def torch_a2(release):
  return TorchA2(release[0], PROMPT)


@pytest.fixture(scope="module")
def pipe(release):
  return A2Pipeline.from_folder(release[1])


def run_both(pipe, torch_a2, images, refs):
  references, background = CASES[refs](*images)
  sampling = dataclasses.replace(pipe.cfg.sampling, **SAMPLING)
  f = (sampling.frames - 1) // 4 + 1
  noise = np.random.default_rng(refs).standard_normal(
      (1, f, sampling.height // 8, sampling.width // 8, 16)).astype(np.float32)
  result = pipe(PROMPT, references, background, noise=noise, sampling=sampling, progress=False)
  vae_refs, originals = pipe.reference_images(references, background, sampling.height, sampling.width)
  ref_latents, ref_video = torch_a2(vae_refs, originals, noise, sampling)
  return result, ref_latents, ref_video, sampling


@pytest.mark.parametrize("refs", [1, 2, 3])
def test_pipeline_matches_pytorch(pipe, torch_a2, images, refs):
  result, ref_latents, ref_video, sampling = run_both(pipe, torch_a2, images, refs)
  assert rel_l2_err(result.latents, ref_latents) <= LATENT_TOL
  decoded = np.asarray(pipe.decode(jax.numpy.asarray(result.latents)), np.float32)
  assert np.max(np.abs(decoded - ref_video)) / 2 <= PIXEL_TOL
  # The output drops the 4·N frames that show the references.
  assert result.frames.shape == (1, sampling.frames - 4 * refs, sampling.height, sampling.width, 3)
  np.testing.assert_array_equal(result.frames[0], video_to_uint8(decoded)[0, 4 * refs:])


def test_sharded_pipeline_equals_single_device(release, pipe, images):
  """CFG pair on data, tokens on context, heads on tensor: the same numbers as one device."""
  references, background = CASES[3](*images)
  sampling = dataclasses.replace(pipe.cfg.sampling, **SAMPLING)
  single = pipe(PROMPT, references, background, sampling=sampling, progress=False)
  mesh = sharding.make_mesh(configs.MeshConfig(data=2, fsdp=1, context=2, tensor=2))
  sharded_pipe = A2Pipeline.from_folder(release[1], mesh=mesh)
  q = sharded_pipe.params["transformer"]["blocks"]["attn1"]["to_q"]["kernel"]
  assert len(q.sharding.device_set) == 8
  sharded = sharded_pipe(PROMPT, references, background, sampling=sampling, progress=False)
  assert rel_l2_err(sharded.latents, single.latents) <= 1e-5
  assert np.max(np.abs(sharded.frames.astype(int) - single.frames.astype(int))) <= 1


def test_seed_reproducible_and_noise_shape_checked(pipe, images):
  references, background = CASES[2](*images)
  sampling = dataclasses.replace(pipe.cfg.sampling, **SAMPLING)
  a = pipe(PROMPT, references, background, sampling=sampling, progress=False)
  b = pipe(PROMPT, references, background, sampling=sampling, progress=False)
  np.testing.assert_array_equal(a.frames, b.frames)
  c = pipe(PROMPT, references, background, sampling=dataclasses.replace(sampling, seed=1),
           progress=False)
  assert not np.array_equal(a.latents, c.latents)
  from a2jax.errors import InputError
  with pytest.raises(InputError, match="noise has shape"):
    pipe(PROMPT, references, background, sampling=sampling, noise=np.zeros((1, 2, 2, 2, 16)))
  with pytest.raises(InputError, match="prompt is empty"):
    pipe("  ", references, background, sampling=sampling)


def test_streamed_decode_and_mp4_equal_the_whole_video(pipe, tmp_path):
  """`decode_stream` yields the whole decode's frames chunk by chunk (one latent frame each), and
  `write_mp4` given the chunks writes the same file as given the whole video; an error while the
  chunks come leaves no file."""
  from a2jax import video
  latents = np.random.default_rng(4).standard_normal((1, 5, 4, 6, 16)).astype(np.float32)
  chunks = list(pipe.decode_stream(latents))
  assert [c.shape[1] for c in chunks] == [1, 4, 4, 4, 4] and chunks[0].dtype == np.uint8
  whole = video_to_uint8(pipe.decode(latents))
  streamed = np.concatenate(chunks, axis=1)
  assert np.abs(streamed.astype(int) - whole).max() <= 1  # float rounding at a level boundary
  a = video.write_mp4(tmp_path / "a.mp4", streamed[0], 8)
  b = video.write_mp4(tmp_path / "b.mp4", (c[0] for c in chunks), 8)
  assert a.read_bytes() == b.read_bytes()

  def broken():
    yield chunks[0][0]
    raise RuntimeError("decoder lost")
  with pytest.raises(RuntimeError, match="decoder lost"):
    video.write_mp4(tmp_path / "c.mp4", broken(), 8)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4"]
