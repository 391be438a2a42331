"""What a user sees on a machine without an accelerator: the entry points print their own lines and
nothing from JAX's TPU and CUDA plugins (a2jax/platforms.py), run from a plain shell (none of the
test environment's JAX_PLATFORMS / XLA_FLAGS / TF_CPP_MIN_LOG_LEVEL); and the public model API of
DESIGN.md §3 works as written."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import a2jax
from a2jax import configs, platforms

REPO = pathlib.Path(__file__).resolve().parents[1]
PLUGIN_NOISE = ("cuda", "CUDA", "TPU", "libtpu", "Traceback", "absl", "plugin")


def plain_shell_run(*args: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL", platforms.CUDA_AOT_ENV)}
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120)


@pytest.mark.skipif(platforms.has_nvidia_gpu() or platforms.has_tpu(),
                    reason="checks the output on a machine without an accelerator")
@pytest.mark.parametrize("args, expected", [
    (["-c", "import a2jax, jax, jax.numpy as jnp; print(jax.devices()[0].platform, "
            "float(jnp.ones(3).sum()))"], "cpu 3.0"),
    (["sample.py", "--checkpoint", "/nonexistent-a2jax", "--prompt", "a cat", "--ref", "/no.png"],
     "error: checkpoint folder /nonexistent-a2jax does not exist"),
    (["train.py", "configs/tiny.yaml", "trian.learning_rate=1e-4"], "error: unknown key config.trian"),
    (["-m", "convert_weights", "transformer", "--src", "/nonexistent-src", "--dst", "/tmp/x"],
     "error: --src /nonexistent-src does not exist"),
    (["-m", "convert_weights", "export", "--src", "/nonexistent-a2jax", "--dst", "/tmp/x",
      "--format", "diffusers"], "error: "),
    (["-m", "a2jax.app", "--checkpoint", "/nonexistent-a2jax"],
     "error: checkpoint folder /nonexistent-a2jax does not exist"),
    (["-m", "a2jax.data.encode", "--src", "/nonexistent-data", "--checkpoint", "/nonexistent-ckpt",
      "--dst", "/tmp/a2jax-never-written"], "error: /nonexistent-ckpt has no config.yaml"),
    (["-m", "a2jax.data.triplets", "--src", "/nonexistent-raw", "--data-dir",
      "/tmp/a2jax-never-written"], "error: source folder /nonexistent-raw does not exist"),
])
def test_commands_print_no_plugin_noise(args, expected):
  proc = plain_shell_run(*args)
  out = proc.stdout + proc.stderr
  assert out.lstrip().startswith(expected), out
  if expected.startswith("error:"):
    assert proc.returncode == 2 and len(out.strip().splitlines()) == 1, out
  assert not os.path.exists("/tmp/a2jax-never-written")
  noise = [line for line in out.splitlines() if any(word in line for word in PLUGIN_NOISE)]
  assert not noise, out


def test_cuda_plugin_blocked_only_without_gpu():
  # This test process imported a2jax (conftest / the imports above) on a machine without a GPU.
  assert a2jax.platforms.cuda_plugin_blocked() == (not platforms.has_nvidia_gpu())



def test_cpu_thread_pools_grow_with_simulated_devices():
  """8 threads per simulated CPU device (XLA_FLAGS or JAX_NUM_CPU_DEVICES) unless a pool size is set:
  fewer let a sharded program's collectives hold every thread (a2jax/platforms.py)."""
  def sized(**environ):
    platforms.size_cpu_thread_pools(environ)
    return environ.get("PJRT_NPROC")
  cores = os.cpu_count()
  flags = "--xla_cpu_multi_thread_eigen=true --xla_force_host_platform_device_count=8"
  assert sized(XLA_FLAGS=flags) == str(max(cores, 64))
  assert sized(JAX_NUM_CPU_DEVICES="4") == str(max(cores, 32))
  assert sized(XLA_FLAGS=flags, NPROC="16") is None and sized(XLA_FLAGS=flags, PJRT_NPROC="9") == "9"
  assert sized() is None and sized(XLA_FLAGS="--xla_force_host_platform_device_count=1") is None
  assert os.environ["PJRT_NPROC"] == str(max(cores, 64))  # this process: conftest's 8 devices

def test_public_model_api_as_in_the_design():
  """DESIGN.md §3's calls on the tiny config, traced for shapes (jax.eval_shape: no compute)."""
  cfg = configs.load("tiny")
  key = jax.random.key(0)
  shape = lambda fn, *args: jax.eval_shape(fn, *args).shape

  model = a2jax.models.A2Transformer(cfg.transformer)
  x = jnp.zeros((1, 2, 4, 4, cfg.transformer.in_channels))
  t, text = jnp.array([500.0]), jnp.zeros((1, 7, cfg.transformer.text_dim))
  image = jnp.zeros((1, 257, cfg.transformer.image_dim))
  p = jax.eval_shape(model.init, key, x, t, text, image)["params"]
  assert shape(lambda p: model.apply({"params": p}, x, t, text, image), p) == (1, 2, 4, 4, 16)

  vae = a2jax.models.WanVAE(cfg.vae)
  video = jnp.zeros((1, 5, 16, 16, 3))
  vp = jax.eval_shape(vae.init, key, video)["params"]
  mean, logvar = jax.eval_shape(lambda p: vae.apply({"params": p}, video, method=vae.encode), vp)
  assert mean.shape == logvar.shape == (1, 2, 2, 2, cfg.vae.z_dim)
  latents = jnp.zeros(mean.shape)
  assert shape(lambda p: vae.apply({"params": p}, latents, method=vae.decode), vp) == (1, 5, 16, 16, 3)

  clip = a2jax.models.CLIPVisionEncoder(cfg.clip)
  pixels = jnp.zeros((1, cfg.clip.image_size, cfg.clip.image_size, 3))
  cp = jax.eval_shape(clip.init, key, pixels)["params"]
  tokens = 1 + (cfg.clip.image_size // cfg.clip.patch_size) ** 2
  assert shape(lambda p: clip.apply({"params": p}, pixels), cp) == (1, tokens, cfg.clip.hidden_size)

  t5 = a2jax.models.UMT5Encoder(cfg.umt5)
  ids = jnp.ones((1, 6), jnp.int32)
  tp = jax.eval_shape(t5.init, key, ids, ids)["params"]
  assert shape(lambda p: t5.apply({"params": p}, ids, ids), tp) == (1, 6, cfg.umt5.d_model)
