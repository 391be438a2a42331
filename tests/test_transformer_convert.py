"""The transformer converter end to end: diffusers `save_pretrained` (sharded safetensors) → CLI →
orbax folder → a2jax loads it (also onto a mesh) and computes the reference's numbers; clear errors
and nothing left behind for bad checkpoints."""

import json
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

from a2jax import checkpoints, configs, sharding
from a2jax.errors import ConversionError
from a2jax.models.transformer import A2Transformer, init_abstract_boxed
from convert_weights import cli, common
from convert_weights import transformer as convert
from parity import max_rel_err, randomize_torch_
from test_transformer import CONFIGS, make_inputs, torch_forward

KW = CONFIGS["h3d20"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """A tiny diffusers transformer folder saved as 3+ safetensors shards with an index."""
  model = WanTransformer3DModel(**KW).eval()
  randomize_torch_(model, seed=11)
  folder = tmp_path_factory.mktemp("release") / "transformer"
  model.save_pretrained(folder, max_shard_size="40KB", safe_serialization=True)
  assert len(list(folder.glob("*.safetensors"))) >= 3
  return model, folder


def run_cli(*args):
  return cli.main([*map(str, args), "--no-progress"])


def test_cli_round_trip_matches_reference(release, tmp_path):
  model, folder = release
  out = tmp_path / "a2"
  assert run_cli("transformer", "--src", folder, "--dst", out) == 0
  cfg = checkpoints.read_config(out).transformer
  assert cfg.num_attention_heads == KW["num_attention_heads"]
  abstract = convert.init_abstract(cfg)
  params = checkpoints.load_params(out / "transformer", abstract)
  x, t, text, image = make_inputs(KW, (3, 6, 10), refs=2)
  ref = torch_forward(model, x, t, text, image)
  got = A2Transformer(cfg).apply({"params": params}, x, t.astype(np.float32), text, image)
  assert max_rel_err(got, ref) <= 1e-4

  # Straight onto a mesh: every parameter lands on its sharding.
  mesh = sharding.make_mesh(configs.MeshConfig(fsdp=4, tensor=2))
  abstract, shardings = sharding.unboxed_shardings(init_abstract_boxed(cfg), mesh)
  sharded = checkpoints.load_params(out / "transformer", abstract, shardings)
  jax.tree.map(lambda a, s: (a.sharding == s) or pytest.fail(f"{a.sharding} != {s}"), sharded, shardings)
  jax.tree.map(np.testing.assert_array_equal, sharded, params)

  # A second conversion refuses to overwrite without --force, and succeeds with it.
  assert run_cli("transformer", "--src", folder, "--dst", out) == 2
  assert run_cli("transformer", "--src", folder, "--dst", out, "--force", "--dtype", "bfloat16") == 0
  assert checkpoints.read_config(out).transformer.param_dtype == "bfloat16"


def test_cli_reads_a_single_original_wan_file(release, tmp_path):
  """An original-Wan-named single safetensors file (no config.json) converts with --config."""
  from safetensors.numpy import save_file
  from test_transformer import to_original_names
  model, _ = release
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  src = tmp_path / "wan.safetensors"
  save_file(to_original_names(sd), src)
  preset = tmp_path / "preset.yaml"
  preset.write_text(json.dumps({"transformer": {**KW, "patch_size": list(KW["patch_size"])}}))
  out = tmp_path / "a2"
  assert run_cli("transformer", "--src", src, "--dst", out, "--config", preset) == 0
  cfg = checkpoints.read_config(out).transformer
  params = checkpoints.load_params(out / "transformer", convert.init_abstract(cfg))
  expected = convert.from_torch(sd, cfg)
  jax.tree.map(np.testing.assert_array_equal, params, expected)


def _edit_state_dict(folder: pathlib.Path, edit):
  """Rewrites a release folder as one safetensors file after `edit(state_dict)`."""
  from safetensors.numpy import save_file
  lazy = common.read_state_dict(folder)
  sd = {k: lazy[k] for k in lazy}
  edit(sd)
  for f in folder.glob("*.safetensors*"):
    f.unlink()
  save_file(sd, folder / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("case, message", [
    ("missing", "missing: blocks.1.attn2.add_k_proj.weight"),
    ("extra", "unexpected: blocks.0.attn1.extra.weight"),
    ("shape", r"mis-shaped: proj_out.bias \(65,\) \(expected \(64,\)\)"),
    ("truncated", "truncated"),
])
def test_bad_checkpoints_fail_clearly_and_leave_nothing(release, tmp_path, case, message, capsys):
  _, folder = release
  src = pathlib.Path(shutil.copytree(folder, tmp_path / "transformer"))
  if case == "missing":
    _edit_state_dict(src, lambda sd: sd.pop("blocks.1.attn2.add_k_proj.weight"))
  elif case == "extra":
    _edit_state_dict(src, lambda sd: sd.update({"blocks.0.attn1.extra.weight": np.zeros(3, np.float32)}))
  elif case == "shape":
    _edit_state_dict(src, lambda sd: sd.update({"proj_out.bias": np.zeros(65, np.float32)}))
  else:
    shard = sorted(src.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
  out = tmp_path / "out"
  assert run_cli("transformer", "--src", src, "--dst", out) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
  assert re.search(message, err), err
  assert not out.exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
  with pytest.raises(ConversionError):
    convert.plan(common.read_state_dict(src), configs.TransformerConfig(**KW))


def test_torch_bfloat16_tensors_convert_exactly():
  model = WanTransformer3DModel(**KW).eval().to(torch.bfloat16)
  sd = model.state_dict()
  params = convert.from_torch(sd, configs.TransformerConfig(**KW, param_dtype="bfloat16"))
  q = params["blocks"]["attn1"]["to_q"]["kernel"][0]
  np.testing.assert_array_equal(np.asarray(q, np.float32),
                                sd["blocks.0.attn1.to_q.weight"].float().numpy().T)
