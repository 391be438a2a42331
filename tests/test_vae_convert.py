"""VAE converter: diffusers and original-Wan names, the CLI round trip, error cases, full-size count."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from a2jax import checkpoints
from a2jax.configs import VAEConfig
from a2jax.errors import ConversionError
from a2jax.models import vae as vae_lib
from convert_weights import cli, component
from convert_weights import vae as convert
from tests.parity import max_rel_err, randomize_torch_, state_dict_numpy

KW = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=2,
          temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


@pytest.fixture(scope="module")
def ref():
  from diffusers import AutoencoderKLWan
  model = AutoencoderKLWan(**KW).eval()
  randomize_torch_(model, seed=3)
  return model


@pytest.fixture(scope="module")
def cfg(ref):
  return VAEConfig.from_dict(dict(ref.config))


# diffusers -> original Wan2.1 names: the inverse of convert_weights.vae's rules, written out here
# for num_res_blocks = 2 and four levels (decoder levels of 3 resnets + 1 upsampler, flat).
_RESIDUAL = (("norm1.gamma", "residual.0.gamma"), ("conv1.", "residual.2."),
             ("norm2.gamma", "residual.3.gamma"), ("conv2.", "residual.6."),
             ("conv_shortcut.", "shortcut."))


def to_original(name: str) -> str:
  rules = [
      (r"(encoder|decoder)\.conv_in\.(\w+)", r"\1.conv1.\2"),
      (r"quant_conv\.(\w+)", r"conv1.\1"),
      (r"post_quant_conv\.(\w+)", r"conv2.\1"),
      (r"(encoder|decoder)\.norm_out\.gamma", r"\1.head.0.gamma"),
      (r"(encoder|decoder)\.conv_out\.(\w+)", r"\1.head.2.\2"),
      (r"(encoder|decoder)\.mid_block\.resnets\.0\.(.+)", r"\1.middle.0.\2"),
      (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", r"\1.middle.1.\2"),
      (r"(encoder|decoder)\.mid_block\.resnets\.1\.(.+)", r"\1.middle.2.\2"),
      (r"encoder\.down_blocks\.(\d+)\.(.+)", r"encoder.downsamples.\1.\2"),
  ]
  for pattern, repl in rules:
    if re.fullmatch(pattern, name):
      name = re.sub(pattern, repl, name)
      break
  m = re.fullmatch(r"decoder\.up_blocks\.(\d)\.(resnets\.(\d)|upsamplers\.0)\.(.+)", name)
  if m:
    flat = 4 * int(m.group(1)) + (int(m.group(3)) if m.group(3) else 3)
    name = f"decoder.upsamples.{flat}.{m.group(4)}"
  if ".resample." not in name and ".time_conv." not in name and "middle.1." not in name:
    for new, old in _RESIDUAL:
      head, sep, tail = name.rpartition("." + new)
      if sep and name.startswith(("encoder.downsamples.", "decoder.upsamples.", "encoder.middle.",
                                  "decoder.middle.")):
        name = f"{head}.{old}{tail}"
        break
  return name


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_original_names_give_the_same_params(ref, cfg):
  sd = state_dict_numpy(ref)
  original = {to_original(k): v for k, v in sd.items()}
  assert len(original) == len(sd)
  assert any(k.startswith("decoder.upsamples.") for k in original)  # the inverse really renamed
  assert "decoder.upsamples.3.resample.1.weight" in original and "conv2.weight" in original
  assert_trees_equal(convert.from_torch(original, cfg), convert.from_torch(sd, cfg))


def test_abstract_matches_converted(ref, cfg):
  params = convert.from_torch(state_dict_numpy(ref), cfg)
  abstract = convert.init_abstract(cfg)
  assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, params)


@pytest.mark.parametrize("mutate,match", [
    (lambda sd: sd.pop("decoder.conv_in.bias"), "missing: decoder.conv_in.bias"),
    (lambda sd: sd.__setitem__("encoder.extra.weight", torch.zeros(2)), "unexpected: encoder.extra"),
    (lambda sd: sd.__setitem__("quant_conv.bias", torch.zeros(3)), "mis-shaped: quant_conv.bias"),
    (lambda sd: sd.__setitem__("encoder.norm_out.gamma", torch.ones(32)), "mis-shaped: encoder.norm"),
])
def test_from_torch_errors(ref, cfg, mutate, match):
  sd = dict(ref.state_dict())
  mutate(sd)
  with pytest.raises(ConversionError, match=re.escape(match)):
    convert.from_torch(sd, cfg)


def test_cli_round_trip(ref, cfg, tmp_path):
  src, dst = tmp_path / "vae", tmp_path / "out"
  ref.save_pretrained(src)
  assert cli.main(["vae", "--src", str(src), "--dst", str(dst), "--no-progress"]) == 0
  loaded_cfg = checkpoints.read_config(dst).vae
  assert loaded_cfg == cfg
  params = checkpoints.load_params(checkpoints.component_path(dst, "vae"),
                                   convert.init_abstract(loaded_cfg))
  assert_trees_equal(params, convert.from_torch(state_dict_numpy(ref), cfg))
  # same outputs as the reference from the loaded folder
  z = np.random.default_rng(0).normal(size=(1, 1, 4, 6, cfg.z_dim)).astype(np.float32)
  vae = vae_lib.WanVAE(loaded_cfg)
  got = vae.apply({"params": params}, jnp.asarray(z), method=vae.decode)
  with torch.no_grad():
    want = ref.decode(torch.from_numpy(np.moveaxis(z, -1, 1).copy())).sample.numpy()
  assert max_rel_err(got, np.moveaxis(want, 1, -1)) <= 1e-4


@pytest.mark.parametrize("kind", ["missing", "extra", "shape", "truncated"])
def test_cli_errors_leave_nothing_behind(ref, tmp_path, kind, capsys):
  src, dst = tmp_path / "vae", tmp_path / "out"
  ref.save_pretrained(src)
  weights = src / "diffusion_pytorch_model.safetensors"
  if kind == "truncated":
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
  else:
    from safetensors.torch import save_file
    sd = {k: v.clone().contiguous() for k, v in ref.state_dict().items()}
    if kind == "missing":
      del sd["encoder.conv_in.weight"]
    elif kind == "extra":
      sd["decoder.surplus"] = torch.zeros(3)
    else:
      sd["post_quant_conv.weight"] = torch.zeros(4, 4, 1, 1, 2)
    save_file(sd, weights)
  with pytest.raises(ConversionError):
    component.convert_component("vae", src, dst, progress=False)
  assert cli.main(["vae", "--src", str(src), "--dst", str(dst), "--no-progress"]) == 2
  assert "error:" in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]


def test_full_size_parameter_count():
  """The release config (126.9M parameters) via eval_shape equals diffusers on the meta device."""
  from diffusers import AutoencoderKLWan
  cfg = VAEConfig()
  with torch.device("meta"):
    ref = AutoencoderKLWan()
  want = sum(p.numel() for p in ref.parameters())
  got = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(convert.init_abstract(cfg)))
  assert got == want
  assert abs(got - 126.9e6) < 0.05e6
