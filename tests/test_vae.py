"""WanVAE parity with diffusers `AutoencoderKLWan` (random weights, gains perturbed), streaming scan vs
a Python loop, tiling, latent normalisation, sharded decode.

Tolerances: float32 max|Δ| ≤ 1e-4·max|ref| (whole model); bfloat16 compute relative L2 ≤ 2e-2 vs the
float32 reference; the scan and the unrolled loop agree to 1e-6·max (same ops, different fusion).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from a2jax import sharding
from a2jax.configs import MeshConfig, VAEConfig
from a2jax.errors import ConfigError, InputError
from a2jax.models import vae as vae_lib
from convert_weights import vae as convert
from tests.parity import max_rel_err, randomize_torch_, rel_l2_err, state_dict_numpy

F32_TOL = 1e-4
BF16_TOL = 2e-2
H, W = 32, 48

# Two small configs with the release's structure: every resample mode, shortcuts, mid attention.
# B moves the temporal steps, uses 2 res blocks, a decoder width of its own and an odd z_dim.
CONFIGS = {
    "A": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
              temperal_downsample=[False, True, True]),
    "B": dict(base_dim=12, decoder_base_dim=8, z_dim=6, dim_mult=[1, 2, 3, 2], num_res_blocks=2,
              temperal_downsample=[True, False, True]),
}


@functools.lru_cache(maxsize=None)
def reference(name: str):
  """(torch AutoencoderKLWan with random weights, a2jax config, a2jax params)."""
  from diffusers import AutoencoderKLWan
  kw = dict(CONFIGS[name])
  z = kw["z_dim"]
  kw.update(latents_mean=list(np.linspace(-1, 1, z)), latents_std=list(np.linspace(0.5, 2, z)))
  ref = AutoencoderKLWan(**kw).eval()
  randomize_torch_(ref, seed={"A": 1, "B": 2}[name])
  cfg = VAEConfig.from_dict(dict(ref.config))
  params = convert.from_torch(state_dict_numpy(ref), cfg)
  return ref, cfg, jax.tree.map(jnp.asarray, params)


def to_torch(x):  # (B, F, H, W, C) -> torch (B, C, F, H, W)
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x, np.float32), -1, 1)))


def from_torch(x):  # torch (B, C, F, H, W) -> (B, F, H, W, C)
  return np.moveaxis(x.detach().float().numpy(), 1, -1)


def inputs(cfg, frames: int, seed: int = 0, hw=(H, W)):
  rng = np.random.default_rng(seed)
  video = rng.uniform(-1, 1, (2, frames, *hw, 3)).astype(np.float32)
  f = (frames - 1) // 4 + 1
  z = rng.normal(size=(2, f, hw[0] // 8, hw[1] // 8, cfg.z_dim)).astype(np.float32)
  return video, z


def torch_run(ref, video, z):
  with torch.no_grad():
    post = ref.encode(to_torch(video)).latent_dist
    dec = ref.decode(to_torch(z)).sample
  return from_torch(post.mean), from_torch(post.logvar), from_torch(dec)


@functools.partial(jax.jit, static_argnames=("cfg", "unroll"))
def jax_run(params, video, z, cfg, unroll=False):
  vae = vae_lib.WanVAE(cfg)
  mean, logvar = vae.apply({"params": params}, video, unroll, method=vae.encode)
  return mean, logvar, vae.apply({"params": params}, z, unroll, method=vae.decode)


@pytest.mark.parametrize("name,frames", [("A", 1), ("A", 5), ("A", 9), ("A", 13),
                                         ("B", 1), ("B", 5), ("B", 9), ("B", 13)])
def test_parity_float32(name, frames):
  ref, cfg, params = reference(name)
  video, z = inputs(cfg, frames)
  want = torch_run(ref, video, z)
  got = jax_run(params, video, z, cfg)
  for label, g, w in zip(("mean", "logvar", "decode"), got, want):
    assert g.shape == w.shape, label
    err = max_rel_err(g, w)
    assert err <= F32_TOL, f"{label}: max|Δ|/max|ref| = {err:.2e} > {F32_TOL}"


def test_parity_bfloat16():
  ref, cfg, params = reference("A")
  video, z = inputs(cfg, 9, seed=1)
  want = torch_run(ref, video, z)
  got = jax_run(params, video, z, dataclasses.replace(cfg, dtype="bfloat16"))
  for label, g, w in zip(("mean", "logvar", "decode"), got, want):
    err = rel_l2_err(np.asarray(g, np.float32), w)
    assert err <= BF16_TOL, f"{label}: rel L2 = {err:.2e} > {BF16_TOL}"


def test_scan_equals_python_loop():
  _, cfg, params = reference("B")
  video, z = inputs(cfg, 9, seed=2)
  scanned = jax_run(params, video, z, cfg)
  looped = jax_run(params, video, z, cfg, unroll=True)
  for label, s, l in zip(("mean", "logvar", "decode"), scanned, looped):
    assert max_rel_err(s, l) <= 1e-6, label


def test_streaming_decode_equals_whole_decode():
  """decode_first then decode_next per latent frame (one program for every later frame, the cache
  carried between calls) gives `decode`'s video."""
  _, cfg, params = reference("B")
  _, z = inputs(cfg, 13, seed=3)
  vae = vae_lib.WanVAE(cfg)
  first = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode_first))
  step = jax.jit(lambda p, c, z: vae.apply({"params": p}, c, z, method=vae.decode_next))
  out, cache = first(params, z[:, :1])
  chunks = [out]
  for i in range(1, z.shape[1]):
    out, cache = step(params, cache, z[:, i:i + 1])
    chunks.append(out)
  assert [c.shape[1] for c in chunks] == [1, 4, 4, 4]
  whole = jax_run(params, inputs(cfg, 1)[0], z, cfg)[2]
  assert max_rel_err(np.concatenate(chunks, axis=1), whole) <= 1e-5  # same ops, other fusion


def test_tiled_matches_diffusers_tiling():
  """Tiles of 32 px at stride 24 (latent 4 / 3) on 40×56: 2×3 tiles, edge tiles cut short."""
  ref, cfg, params = reference("A")
  tiles = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
               tile_sample_stride_width=24)
  video, z = inputs(cfg, 5, seed=3, hw=(40, 56))
  untiled = torch_run(ref, video, z)
  ref.enable_tiling(**tiles)
  try:
    want = torch_run(ref, video, z)
  finally:
    ref.use_tiling = False
  got = jax_run(params, video, z, dataclasses.replace(cfg, tiling=True, **tiles))
  for label, g, w, u in zip(("mean", "logvar", "decode"), got, want, untiled):
    assert max_rel_err(u, w) > 10 * F32_TOL, f"{label}: tiling changed nothing, the test is void"
    assert g.shape == w.shape, label
    err = max_rel_err(g, w)
    assert err <= F32_TOL, f"tiled {label}: max|Δ|/max|ref| = {err:.2e} > {F32_TOL}"


def test_latent_normalization_round_trip():
  cfg = VAEConfig(z_dim=3, latents_mean=(0.5, -1.0, 2.0), latents_std=(2.0, 0.5, 4.0),
                  base_dim=8, dim_mult=(1, 2, 2, 2))
  z = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 2, 2, 3)), jnp.float32)
  n = vae_lib.normalize_latents(z, cfg)
  np.testing.assert_allclose(n, (z - jnp.array([0.5, -1.0, 2.0])) / jnp.array([2.0, 0.5, 4.0]),
                             rtol=1e-6)
  np.testing.assert_allclose(vae_lib.denormalize_latents(n, cfg), z, rtol=1e-6, atol=1e-6)


def test_input_and_config_errors():
  _, cfg, params = reference("A")
  vae = vae_lib.WanVAE(cfg)
  with pytest.raises(InputError, match="4k \\+ 1 frames"):
    vae.apply({"params": params}, jnp.zeros((1, 3, 16, 16, 3)), method=vae.encode)
  with pytest.raises(ConfigError, match="attn_scales"):
    VAEConfig(attn_scales=(1.0,))


def test_every_parameter_has_logical_axes():
  boxed = vae_lib.init_abstract_boxed(reference("A")[1])
  assert sharding.missing_logical_names(boxed) == []


def test_sharded_decode_equals_unsharded():
  """Height split over `context` (2), batch over fsdp (2), on the simulated CPU devices."""
  _, cfg, params = reference("A")
  _, z = inputs(cfg, 5, seed=4)
  vae = vae_lib.WanVAE(cfg)
  decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))
  want = decode(params, z)
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, context=2, tensor=1), jax.devices()[:4])
  with jax.set_mesh(mesh):
    z_sharded = jax.device_put(z, jax.NamedSharding(
        mesh, sharding.logical_to_spec(vae_lib.VIDEO_AXES, z.shape, mesh)))
    got = decode(params, z_sharded)
  assert max_rel_err(got, want) <= 1e-5
