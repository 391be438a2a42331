"""SkyReels-V3 reference-to-video end to end against PyTorch: a tiny random V3 R2V release folder
(diffusers / transformers `save_pretrained`, the transformer's config naming the release's class) is
converted with `convert_weights release`, sampled by the a2jax pipeline and by the PyTorch reference
(convert_weights.reference.TorchV3R2V: diffusers' WanTransformer3DModel, UniPCMultistepScheduler
and AutoencoderKLWan following the release's R2V pipeline) from the same initial noise."""

import dataclasses

import jax
import numpy as np
import pytest

from a2jax import checkpoints, conditioning_v3, configs, families
from a2jax.errors import ConfigError, InputError
from a2jax.pipeline import A2Pipeline, video_to_uint8
from convert_weights.reference import TorchV3R2V, fit_reference_like_release
from parity import rel_l2_err
from release_util import tiny_converted_release

LATENT_TOL = 1e-4        # relative L2 of the final latents, float32
PIXEL_TOL = 2 / 255      # max |Δ| of decoded frames in [0, 1], float32
BF16_LATENT_TOL = 5e-2   # relative L2 of the final latents, bfloat16 transformer vs float32 reference
SAMPLING = dict(frames=9, height=32, width=48, steps=3, seed=0)
PROMPT = "A man is holding a teddy bear in the forest."


@pytest.fixture(scope="module")
def release_v3(tmp_path_factory):
  return tiny_converted_release(tmp_path_factory, "v3_r2v")


@pytest.fixture(scope="module")
def pipe(release_v3):
  return A2Pipeline.from_folder(release_v3[1])


@pytest.fixture(scope="module")
def torch_v3(release_v3):
  return TorchV3R2V(release_v3[0], PROMPT)


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(1)
  return [rng.integers(0, 256, shape, dtype=np.uint8)
          for shape in ((40, 30, 3), (36, 50, 3), (60, 90, 3), (21, 77, 3))]


def sampling_of(pipe, **changes):
  return dataclasses.replace(pipe.cfg.sampling, **{**SAMPLING, **changes})


def noise_for(sampling, seed):
  f = (sampling.frames - 1) // 4 + 1
  return np.random.default_rng(seed).standard_normal(
      (1, f, sampling.height // 8, sampling.width // 8, 16)).astype(np.float32)


def test_converted_folder_records_family_and_release_defaults(release_v3):
  cfg = checkpoints.read_config(release_v3[1])
  assert cfg.family == "v3_r2v"
  assert cfg.transformer.image_dim is None and cfg.transformer.in_channels == 16
  s = cfg.sampling
  assert (s.steps, s.guidance, s.image_guidance, s.shift, s.sampler, s.negative_prompt,
          s.frames, s.fps) == (8, 1.0, 1.0, 5.0, "unipc", "", 121, 24)
  assert not (release_v3[1] / "clip").exists() and not (release_v3[1] / "image_processor").exists()


@pytest.mark.parametrize("refs,guidance,image_guidance", [
    (1, 1.0, 1.0), (2, 1.0, 1.0), (4, 1.0, 1.0), (1, 5.0, 3.0), (2, 5.0, 3.0), (4, 5.0, 3.0)])
def test_pipeline_matches_pytorch(pipe, torch_v3, images, refs, guidance, image_guidance):
  sampling = sampling_of(pipe, guidance=guidance, image_guidance=image_guidance)
  noise = noise_for(sampling, refs)
  references = images[:refs]
  result = pipe(PROMPT, references, noise=noise, sampling=sampling, progress=False)
  ref_latents, ref_video = torch_v3(references, noise, sampling)
  assert rel_l2_err(result.latents, ref_latents) <= LATENT_TOL
  decoded = np.asarray(pipe.decode(jax.numpy.asarray(result.latents)), np.float32)
  assert np.max(np.abs(decoded - ref_video)) / 2 <= PIXEL_TOL
  # The output is the video's frames only: the reference frames are cropped, none dropped.
  assert result.latents.shape == noise.shape
  assert result.frames.shape == (1, sampling.frames, sampling.height, sampling.width, 3)
  np.testing.assert_array_equal(result.frames[0], video_to_uint8(decoded)[0])


def test_bfloat16_transformer_close_to_float32_reference(release_v3, torch_v3, images):
  pipe = A2Pipeline.from_folder(release_v3[1], overrides=["transformer.dtype=bfloat16"])
  sampling = sampling_of(pipe, guidance=5.0, image_guidance=3.0)
  noise = noise_for(sampling, 7)
  result = pipe(PROMPT, images[:2], noise=noise, sampling=sampling, progress=False)
  ref_latents, _ = torch_v3(images[:2], noise, sampling)
  assert rel_l2_err(result.latents, ref_latents) <= BF16_LATENT_TOL


def test_missing_reference_slots_are_zero_latents(pipe, images):
  sampling = sampling_of(pipe)
  keys = [jax.random.key(0)]
  from a2jax.pipeline import Request
  image, condition = pipe.condition([Request(PROMPT, images[:2])], sampling, keys)
  assert image is None
  assert condition.shape == (1, conditioning_v3.MAX_REFERENCES, 4, 6, 16)
  assert np.all(np.asarray(condition[:, 2:]) == 0)
  assert np.all(np.abs(np.asarray(condition[:, :2])).max(axis=(2, 3, 4)) > 0)


@pytest.mark.parametrize("shape", [(40, 30), (36, 50), (21, 77), (77, 21), (32, 48), (33, 47)])
def test_reference_fit_equals_release(shape):
  rng = np.random.default_rng(shape[0])
  image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
  for height, width in ((32, 48), (48, 32), (720, 1280)):
    np.testing.assert_array_equal(conditioning_v3.fit_reference(image, height, width),
                                  fit_reference_like_release(image, height, width))


def test_video_size_follows_release_table():
  assert conditioning_v3.video_size(np.zeros((720, 1280, 3), np.uint8), "720P") == (720, 1280)
  assert conditioning_v3.video_size(np.zeros((1280, 720, 3), np.uint8), "720P") == (1280, 720)
  # 0.75 → (554, 738) at 480P, floored to multiples of 16.
  assert conditioning_v3.video_size(np.zeros((300, 400, 3), np.uint8), "480P") == (544, 736)
  assert conditioning_v3.video_size(np.zeros((500, 500, 3), np.uint8), "540P") == (720, 720)
  with pytest.raises(InputError, match="resolution"):
    conditioning_v3.video_size(np.zeros((4, 4, 3), np.uint8), "1080P")


def test_bad_input_is_one_clear_error(pipe, images):
  sampling = sampling_of(pipe)
  with pytest.raises(InputError, match="at most 4"):
    pipe(PROMPT, images[:4], background=images[0], sampling=sampling, progress=False)
  with pytest.raises(InputError, match="needs guidance > 1"):
    pipe(PROMPT, images[:1], sampling=dataclasses.replace(sampling, image_guidance=3.0),
         progress=False)
  with pytest.raises(InputError, match="use 1 or more"):
    pipe(PROMPT, images[:1], sampling=dataclasses.replace(sampling, guidance=0.5), progress=False)
  with pytest.raises(ConfigError, match="4k"):
    sampling_of(pipe, frames=10)
  with pytest.raises(ConfigError, match="multiples of 16"):
    sampling_of(pipe, height=40)


def test_image_guidance_is_refused_for_a2(release):
  with pytest.raises(ConfigError, match="image_guidance"):
    checkpoints.read_config(release[1], ["sampling.image_guidance=2"])
  a2 = A2Pipeline.from_folder(release[1])
  sampling = dataclasses.replace(a2.cfg.sampling, **SAMPLING, image_guidance=2.0)
  with pytest.raises(InputError, match="image_guidance"):
    a2("A man walks.", [np.zeros((8, 8, 3), np.uint8)], sampling=sampling, progress=False)
  with pytest.raises(ConfigError, match="family"):
    configs.Config(family="v4")


def test_lora_files_merge_into_a_v3_folder_and_sample(release_v3, tmp_path):
  """A LoRA file (original Wan names) on the V3 R2V transformer: `merge-lora` writes a folder
  whose transformer is the in-memory merge, and sampling it equals sampling the base with
  `loras=` (sample.py --lora); the LoRA does change the video."""
  from convert_weights import cli
  from convert_weights import lora as lora_files
  from test_lora_formats import random_entries, write_entries
  folder = release_v3[1]
  cfg = checkpoints.read_config(folder).transformer
  lora_file = write_entries(random_entries(cfg, 0), "original", tmp_path / "v3_lora.safetensors")
  merged_folder = tmp_path / "merged"
  assert cli.main(["merge-lora", "--src", str(folder), "--dst", str(merged_folder), "--lora",
                   f"{lora_file}:0.8", "--no-progress"]) == 0
  base = checkpoints.load_component(folder, "transformer", cfg)
  want, _ = lora_files.apply_loras(base, cfg, [(lora_file, 0.8)])
  got = checkpoints.load_component(merged_folder, "transformer", cfg)
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=str(path))
  sampling = dataclasses.replace(checkpoints.read_config(folder).sampling, **{**SAMPLING, "steps": 2})
  noise = noise_for(sampling, 0)
  run = lambda pipe: pipe(PROMPT, [np.full((20, 30, 3), 90, np.uint8)], noise=noise,
                          sampling=sampling, progress=False).latents
  loaded = lora_files.read_loras([(lora_file, 0.8)], cfg)
  with_lora = run(A2Pipeline.from_folder(folder, loras=loaded))
  np.testing.assert_array_equal(run(A2Pipeline.from_folder(merged_folder)), with_lora)
  assert rel_l2_err(with_lora, run(A2Pipeline.from_folder(folder))) > 1e-3


def test_sample_py_runs_a_v3_folder_with_jobs_and_fast_paths(release_v3, tmp_path, capsys):
  """sample.py as a user runs it on a V3 R2V folder: a jobs file with 1 and 3 references (the
  background one of them), the video's frames only; int8 weights and the first-block cache with
  three-branch guidance; the family's options refused on an A2 folder are tested below."""
  import json
  import sample
  from data_util import write_reference_pictures
  from a2jax import video
  pictures = write_reference_pictures(tmp_path, 3)
  jobs = tmp_path / "jobs.jsonl"
  jobs.write_text("\n".join(json.dumps(j) for j in [
      {"prompt": "A man walks.", "refs": ["man.png"], "out": "one.mp4"},
      {"prompt": "A man and a bear.", "refs": ["man.png", "bear.png"], "background": "forest.png",
       "out": "two.mp4", "seed": 3}]))
  flags = ["--frames", "9", "--height", "32", "--width", "48", "--steps", "2", "--no-progress"]
  assert sample.main(["--checkpoint", str(release_v3[1]), "--jobs", str(jobs), *flags]) == 0
  for name in ("one.mp4", "two.mp4"):
    assert video.read_mp4(pictures / name).shape == (9, 32, 48, 3)
  assert sample.main(["--checkpoint", str(release_v3[1]), "--prompt", "A man walks.",
                      "--ref", str(pictures / "man.png"), "--out", str(tmp_path / "fast.mp4"),
                      "--weights", "int8", "--cache", "fbcache", "--guidance", "4",
                      "--image-guidance", "2", *flags]) == 0
  assert video.read_mp4(tmp_path / "fast.mp4").shape == (9, 32, 48, 3)
  assert "timings:" in capsys.readouterr().err


def test_resolution_sizes_each_job_from_its_first_reference(tmp_path):
  import sample
  from PIL import Image
  Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(tmp_path / "wide.png")
  Image.fromarray(np.zeros((400, 300, 3), np.uint8)).save(tmp_path / "tall.png")
  job = lambda first: sample.Job("p", [tmp_path / first, tmp_path / "wide.png"], None,
                                 tmp_path / "o.mp4", None, None)
  base = configs.SamplingConfig()
  assert sample.video_size(job("wide.png"), "480P", base) == (544, 736)
  assert sample.video_size(job("tall.png"), "480P", base) == (736, 544)
  assert sample.video_size(job("tall.png"), None, base) == (base.height, base.width)
  # the rule: --resolution, else V3's default 720P unless --height / --width are given; A2: none
  args = lambda *flags: sample.parse_args(["--checkpoint", "x", "--prompt", "p", *flags])
  v3, a2 = families.FAMILIES["v3_r2v"], families.FAMILIES["a2"]
  assert sample.size_rule(args(), v3) == "720P"
  assert sample.size_rule(args("--resolution", "480P"), v3) == "480P"
  assert sample.size_rule(args("--height", "32", "--width", "48"), v3) is None
  assert sample.size_rule(args(), a2) is None


@pytest.mark.parametrize("args, message", [
    (["--resolution", "480P"], "--resolution is a SkyReels-V3 R2V option"),
    (["--image-guidance", "2"], "--image-guidance is a SkyReels-V3 R2V option"),
])
def test_v3_options_on_an_a2_folder_are_one_line(release, tmp_path, capsys, args, message):
  import sample
  from data_util import write_reference_pictures
  pictures = write_reference_pictures(tmp_path, 3)
  assert sample.main(["--checkpoint", str(release[1]), "--prompt", "A man.", "--ref",
                      str(pictures / "man.png"), "--out", str(tmp_path / "o.mp4"), *args]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and len(err.splitlines()) == 1 and message in err, err


def test_web_app_generates_from_a_v3_folder(pipe, tmp_path):
  """The app's request path on a V3 R2V folder: the family's checks, its empty negative prompt,
  the references as the V3 fitting shows them, and the video's frames only."""
  from data_util import write_reference_pictures
  from a2jax import app as web_app
  from a2jax import video
  pictures = write_reference_pictures(tmp_path, 3)
  app = web_app.App(pipe, tmp_path / "out")
  options = dict(seed=1, frames=9, height=32, width=48, steps=2)
  path, seen, status = app.generate([str(pictures / "man.png"), None], str(pictures / "forest.png"),
                                    PROMPT, "", options)
  assert video.read_mp4(path).shape == (9, 32, 48, 3)
  assert [s.shape for s in seen] == [(32, 48, 3)] * 2 and "9 frames of 32×48" in status
  refs = [str(pictures / name) for name in ("man.png", "bear.png", "man.png", "bear.png")]
  with pytest.raises(InputError, match="at most 4"):
    app.generate(refs, str(pictures / "forest.png"), PROMPT, "", options)


def test_export_writes_what_the_v3_release_loads_and_converts_back_bit_identically(release_v3,
                                                                                  tmp_path):
  """`convert_weights export` of a V3 R2V folder: the diffusers layout the release's R2V code loads
  (its transformer class named in config.json and model_index.json; the weights those of the
  release, read by diffusers' WanTransformer3DModel), the ComfyUI file under the original Wan names,
  and the diffusers export converted back equal leaf for leaf."""
  import json
  from diffusers import WanTransformer3DModel
  from convert_weights import cli, common
  from convert_weights.reference import load_diffusers
  from parity import state_dict_numpy
  src, converted = release_v3
  out, wan_file = tmp_path / "diffusers", tmp_path / "v3.safetensors"
  assert cli.main(["export", "--src", str(converted), "--dst", str(out), "--format", "diffusers",
                   "--no-progress"]) == 0
  assert cli.main(["export", "--src", str(converted), "--dst", str(wan_file), "--format", "comfyui",
                   "--no-progress"]) == 0
  index = json.loads((out / "model_index.json").read_text())
  assert index["_class_name"] == "WanSkyReelsA2WanT2VPipeline"
  assert index["transformer"] == ["diffusers", "SkyReelsA2WanI2v3DModel"]
  assert "image_encoder" not in index and not (out / "image_encoder").exists()
  raw = json.loads((out / "transformer" / "config.json").read_text())
  original = json.loads((src / "transformer" / "config.json").read_text())
  assert {k: original[k] for k in raw} == raw
  want = state_dict_numpy(load_diffusers(WanTransformer3DModel, src / "transformer"))
  for got in (state_dict_numpy(load_diffusers(WanTransformer3DModel, out / "transformer")),
              state_dict_numpy(WanTransformer3DModel.from_single_file(
                  str(wan_file), config=str(out / "transformer"), local_files_only=True))):
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert "blocks.0.self_attn.q.weight" in common.read_safetensors([wan_file])
  back = tmp_path / "back"
  assert cli.main(["release", "--src", str(out), "--dst", str(back), "--no-progress"]) == 0
  assert checkpoints.read_config(back) == checkpoints.read_config(converted)
  for name in ("transformer", "vae", "umt5"):
    want = dict(checkpoints.iter_params(converted / name))
    got = dict(checkpoints.iter_params(back / name))
    assert got.keys() == want.keys()
    for path in want:
      np.testing.assert_array_equal(got[path], want[path], err_msg="/".join(path))


def test_an_a2_lora_on_a_v3_folder_is_one_line(release, release_v3, tmp_path, capsys):
  """A LoRA with image-branch keys (A2 / Wan I2V) given to a V3 R2V folder, in every format."""
  import sample
  from data_util import write_reference_pictures
  from test_lora_formats import random_entries, write_entries
  a2 = checkpoints.read_config(release[1]).transformer
  pictures = write_reference_pictures(tmp_path, 3)
  for fmt in ("original", "kohya", "diffusers"):
    lora_file = write_entries(random_entries(a2, 0), fmt, tmp_path / f"a2_{fmt}.safetensors")
    assert sample.main(["--checkpoint", str(release_v3[1]), "--prompt", "A man.", "--ref",
                        str(pictures / "man.png"), "--out", str(tmp_path / "o.mp4"),
                        "--lora", str(lora_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "image branch (an A2 / Wan I2V LoRA)" in err and "use a LoRA trained" in err, err
  assert not (tmp_path / "o.mp4").exists()


def test_clip_benchmark_refuses_a_v3_folder_in_one_line(release_v3, tmp_path, capsys):
  """`python -m a2jax.eval bench` scores with the folder's CLIP encoder, which V3 R2V lacks."""
  from a2jax.eval import __main__ as eval_cli
  jobs = tmp_path / "jobs.jsonl"
  jobs.write_text('{"prompt": "A man.", "refs": ["man.png"], "out": "a.mp4"}\n')
  assert eval_cli.main(["bench", "--checkpoint", str(release_v3[1]), "--jobs", str(jobs)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "no CLIP image encoder" in err, err


def test_fast_paths_run_three_branches(pipe, images, tmp_path):
  """The step caches at V3's 3 branches — MagCache calibrated on a V3 run (one curve column per
  branch), TeaCache at threshold 0 equal to the exact path to float32 rounding (its split block
  path fuses differently), the first-block cache in test_sample_py_runs_a_v3_folder… — and the
  distill sampler at guidance 1."""
  from a2jax import step_cache
  base = sampling_of(pipe, guidance=5.0, image_guidance=3.0, steps=4)
  noise = noise_for(base, 3)
  run = lambda **changes: pipe(PROMPT, images[:2], noise=noise, progress=False,
                               sampling=dataclasses.replace(base, **changes)).latents
  exact = run()
  assert rel_l2_err(run(cache="teacache", cache_threshold=0.0), exact) <= 1e-5
  curve = pipe.calibrate(PROMPT, images[:2], sampling=base)
  assert curve.shape == (4, 3)
  path = tmp_path / "curve.json"
  step_cache.write_calibration(path, curve, base)
  for got in (run(cache="mag", cache_calibration=str(path)),
              run(sampler="distill", guidance=1.0, image_guidance=1.0)):
    assert got.shape == exact.shape and np.all(np.isfinite(got))


def test_two_processes_sample_v3_like_one(release_v3, pipe, tmp_path):
  """sample.py over 2 processes × 4 devices (rows on the data axis across them) on a V3 folder:
  process 0 writes each video once, with the latents and frames of each job run alone in one
  process, to within the cross-topology guarantee (docs/sampling.md "Many videos at once": what is
  reproducible)."""
  import json
  import multiprocess
  from data_util import write_reference_pictures
  from test_sample_batch import LATENT_RTOL, assert_frames_close, as_request
  pictures = write_reference_pictures(tmp_path, 5)
  jobs = {"a": {"prompt": "A man walks in the forest.", "refs": ["man.png"],
                "background": "forest.png", "seed": 1},
          "b": {"prompt": "A bear and a man.", "refs": ["bear.png", "man.png"], "seed": 2}}
  with open(tmp_path / "jobs.jsonl", "w") as f:
    for name, job in jobs.items():
      f.write(json.dumps({**job, "out": f"{name}.mp4",
                          "refs": [str(pictures / r) for r in job["refs"]],
                          **({"background": str(pictures / job["background"])}
                             if "background" in job else {})}) + "\n")
  (tmp_path / "logs").mkdir()
  finished = multiprocess.run(
      ["sample.py", "--checkpoint", release_v3[1], "--jobs", tmp_path / "jobs.jsonl", "--batch",
       "2", "--mesh", "data=2,fsdp=4", "--save-arrays", "--frames", "9", "--height", "32",
       "--width", "48", "--steps", "2"], timeout=400, log_dir=tmp_path / "logs")
  assert " wrote " not in finished[1].log
  sampling = sampling_of(pipe, steps=2)
  for name, job in jobs.items():
    single = pipe.generate([as_request(job, pictures)], sampling=sampling, progress=False)
    with np.load(tmp_path / f"{name}.npz") as saved:
      assert rel_l2_err(saved["latents"], single.latents[0]) <= LATENT_RTOL, name
      assert_frames_close(saved["frames"], single.frames[0])
