"""`python -m convert_weights export`: a2jax folders back to diffusers / transformers / ComfyUI files,
loaded by the PyTorch reference classes, and converted back bit-identically."""

import dataclasses
import inspect
import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import transformers
from diffusers import (AutoencoderKLWan, SkyReelsV2Transformer3DModel, WanImageToVideoPipeline,
                       WanTransformer3DModel)

from a2jax import checkpoints, configs
from convert_weights import cli, common, component, export, release as release_mod, tiny_release
from convert_weights import transformer as transformer_convert
from parity import max_rel_err, state_dict_numpy
from test_transformer import jax_forward, make_inputs, to_original_names, torch_forward

SUBFOLDER_CLASSES = {"transformer": WanTransformer3DModel, "vae": AutoencoderKLWan,
                     "image_encoder": transformers.CLIPVisionModel,
                     "text_encoder": transformers.UMT5EncoderModel}


@pytest.fixture(scope="module")
def exported(release, tmp_path_factory):
  """(release, a2jax folder, its diffusers export with small shards, its comfyui file)."""
  src, converted = release
  root = tmp_path_factory.mktemp("export")
  assert export.main(["--src", str(converted), "--dst", str(root / "diffusers"), "--format",
                      "diffusers", "--max-shard-size", "100KB", "--no-progress"]) == 0
  assert export.main(["--src", str(converted), "--dst", str(root / "wan.safetensors"), "--format",
                      "comfyui", "--no-progress"]) == 0
  return src, converted, root / "diffusers", root / "wan.safetensors"


def load_release_model(folder, sub):
  return SUBFOLDER_CLASSES[sub].from_pretrained(folder / sub, local_files_only=True).eval()


def test_original_name_inverts_the_original_wan_table_on_the_full_model():
  cfg = configs.load("a2_14b").transformer
  names = [n for t in transformer_convert.reference_targets(cfg) for n in t.sources]
  original = [transformer_convert.original_name(n) for n in names]
  # the independent hand-written inverse of test_transformer, and back through the converter's rules
  assert original == list(to_original_names(dict.fromkeys(names)))
  assert [transformer_convert._original_to_diffusers(o) for o in original] == names
  assert len(set(original)) == len(names) == 1303
  assert "blocks.39.cross_attn.k_img.weight" in original and "head.modulation" in original


@pytest.mark.parametrize("sub", sorted(SUBFOLDER_CLASSES))
def test_diffusers_export_loads_with_exactly_the_release_weights(exported, sub):
  src, _, out, _ = exported
  got, want = state_dict_numpy(load_release_model(out, sub)), state_dict_numpy(load_release_model(src, sub))
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("sub", sorted(SUBFOLDER_CLASSES))
def test_exported_configs_read_back_equal(exported, sub):
  src, converted, out, _ = exported
  name = {v: k for k, v in release_mod.SUBFOLDERS.items()}[sub]
  raw = json.loads((out / sub / "config.json").read_text())
  original = json.loads((src / sub / "config.json").read_text())
  assert {k: original[k] for k in raw if k != "transformers_version"} == {
      k: v for k, v in raw.items() if k != "transformers_version"}
  module = component.component_module(name)
  assert module.CONFIG_CLASS.from_dict(raw) == getattr(checkpoints.read_config(converted), name)


def reference_config_keys(sub) -> set[str]:
  cls = SUBFOLDER_CLASSES[sub]
  init_keys = lambda c: set(inspect.signature(c.__init__).parameters) - {"self"}
  if sub == "transformer":  # the A2/V3 DiT, or SkyReels-V2's diffusion-forcing one
    return init_keys(cls) | init_keys(SkyReelsV2Transformer3DModel)
  if sub == "vae":
    return init_keys(cls)
  return set(cls.config_class().to_dict())


@pytest.mark.parametrize("sub", sorted(SUBFOLDER_CLASSES))
def test_every_config_field_is_the_reference_s_or_listed_as_a2jax_s(sub):
  """A field added to an a2jax config must be a reference config key or in A2JAX_FIELDS."""
  name = {v: k for k, v in release_mod.SUBFOLDERS.items()}[sub]
  module = component.component_module(name)
  fields = {f.name for f in dataclasses.fields(module.CONFIG_CLASS)}
  reference = reference_config_keys(sub)
  assert fields - set(module.A2JAX_FIELDS) <= reference
  # transformers' own `dtype` (torch storage) and `max_length` (generation) mean other things
  assert not set(module.A2JAX_FIELDS) & reference - {"dtype", "max_length"}


def test_diffusers_export_transformer_forward_equals_a2jax(exported):
  _, converted, out, _ = exported
  cfg = checkpoints.read_config(converted).transformer
  params = checkpoints.load_component(converted, "transformer", cfg)
  x, t, text, image = make_inputs(tiny_release.TRANSFORMER, (3, 4, 4), refs=1, batch=1)
  got = torch_forward(load_release_model(out, "transformer"), x, t, text, image)
  want = jax_forward(cfg, params, x, t, text, image)
  assert max_rel_err(got, want) < 1e-5


def test_comfyui_file_has_original_names_and_loads_with_from_single_file(exported):
  src, _, out, wan_file = exported
  names = list(common.read_safetensors([wan_file]))
  assert "blocks.0.self_attn.q.weight" in names and "head.head.weight" in names
  assert "head.modulation" in names and not any(n.startswith("model.") for n in names)
  # config= a local diffusers folder: no hub lookup for the config
  model = WanTransformer3DModel.from_single_file(str(wan_file), config=str(out / "transformer"),
                                                 local_files_only=True).eval()
  got, want = state_dict_numpy(model), state_dict_numpy(load_release_model(src, "transformer"))
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_bfloat16_comfyui_export_is_the_rounded_weights(exported, tmp_path):
  _, converted, _, wan_file = exported
  out = tmp_path / "wan_bf16.safetensors"
  assert export.main(["--src", str(converted), "--dst", str(out), "--format", "comfyui",
                      "--dtype", "bfloat16", "--no-progress"]) == 0
  got, full = common.read_safetensors([out]), common.read_safetensors([wan_file])
  assert list(got) == list(full)
  for k in full:
    assert got[k].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got[k], full[k].astype(ml_dtypes.bfloat16), err_msg=k)


def test_exported_release_loads_as_a_pipeline_and_converts_back_bit_identically(exported, tmp_path):
  _, converted, out, _ = exported
  pipe = WanImageToVideoPipeline.from_pretrained(out, local_files_only=True)
  assert isinstance(pipe.transformer, WanTransformer3DModel) and pipe.image_encoder is not None
  back = tmp_path / "back"
  assert cli.main(["release", "--src", str(out), "--dst", str(back), "--no-progress"]) == 0
  assert checkpoints.read_config(back) == checkpoints.read_config(converted)
  for name in checkpoints.COMPONENTS:
    want = dict(checkpoints.iter_params(converted / name))
    got = dict(checkpoints.iter_params(back / name))
    assert got.keys() == want.keys()
    for path in want:
      assert got[path].dtype == want[path].dtype
      np.testing.assert_array_equal(got[path], want[path], err_msg="/".join(path))
  for sub in release_mod.COPIED:
    for f in (converted / sub).iterdir():
      assert (back / sub / f.name).read_bytes() == f.read_bytes()


def test_iter_params_equals_load_component(release):
  _, converted = release
  cfg = checkpoints.read_config(converted).clip
  loaded = checkpoints.load_component(converted, "clip", cfg)
  streamed = dict(checkpoints.iter_params(converted / "clip"))
  flat = {tuple(str(k.key) for k in kp): v for kp, v in jax.tree_util.tree_leaves_with_path(loaded)}
  assert streamed.keys() == flat.keys()
  for path in flat:
    np.testing.assert_array_equal(streamed[path], np.asarray(flat[path]))


def test_shards_respect_the_size_and_the_index_lists_every_tensor(exported):
  _, _, out, _ = exported
  index = json.loads((out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 1
  sizes = {f: (out / "transformer" / f).stat().st_size for f in files}
  tensors = common.read_safetensors([out / "transformer" / f for f in files])
  assert sorted(index["weight_map"]) == sorted(tensors)
  largest = max(np.prod(tensors.shape(k)) * 4 for k in tensors)
  assert all(s <= max(100_000, largest) + 20_000 for s in sizes.values())  # + the header


def one_line_error(capsys):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


@pytest.mark.parametrize("case", ["missing", "not_a2jax", "no_transformer", "empty_transformer",
                                  "damaged_leaf", "exists", "format", "dtype", "comfyui_name"])
def test_bad_arguments_are_one_line_errors_and_leave_nothing(case, release, tmp_path, capsys):
  _, converted = release
  src, dst = converted, tmp_path / "out"
  extra = ["--format", "diffusers"]
  if case == "missing":
    src = tmp_path / "nowhere"
  elif case == "not_a2jax":
    src = tmp_path / "empty"
    src.mkdir()
  elif case == "no_transformer":
    src = tmp_path / "partial"
    src.mkdir()
    (src / "config.yaml").write_bytes((converted / "config.yaml").read_bytes())
  elif case in ("empty_transformer", "damaged_leaf"):
    src = tmp_path / "partial"
    shutil.copytree(converted, src)
    if case == "empty_transformer":
      shutil.rmtree(src / "transformer")
      (src / "transformer").mkdir()
    else:  # every data file of the transformer checkpoint cut to half
      for f in (src / "transformer").rglob("d/*"):
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  elif case == "exists":
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
  elif case == "format":
    extra = ["--format", "onnx"]
  elif case == "dtype":
    extra += ["--dtype", "int8"]
  elif case == "comfyui_name":
    extra = ["--format", "comfyui"]
  before = sorted(p.name for p in tmp_path.iterdir())
  assert export.main(["--src", str(src), "--dst", str(dst), *extra, "--no-progress"]) == 2
  line = one_line_error(capsys)
  assert sorted(p.name for p in tmp_path.iterdir()) == before, line
  if case == "exists":
    assert "--force" in line and (dst / "keep.txt").read_text() == "mine"


def test_clip_with_projection_exports_as_clip_vision_model_with_projection(release, tmp_path):
  """A CLIP converted with its projection (clip.with_projection) exports under transformers'
  `vision_model.` names beside `visual_projection.weight`."""
  src, converted = release
  model = transformers.CLIPVisionModelWithProjection(
      transformers.CLIPVisionConfig(**tiny_release.CLIP)).eval()
  tiny_release.randomize_(model, seed=5)
  model.save_pretrained(tmp_path / "image_encoder")
  folder = tmp_path / "a2jax"
  shutil.copytree(converted, folder, ignore=shutil.ignore_patterns("clip"))
  component.convert_component("clip", tmp_path / "image_encoder", None, into=folder, progress=False,
                              overrides=["clip.with_projection=true"], copy_extras=False)
  cfg = checkpoints.read_config(folder)
  checkpoints.write_config(folder, configs.Config(**{
      **{f: getattr(cfg, f) for f in ("transformer", "vae", "umt5", "sampling")},
      "clip": configs.CLIPConfig.from_dict(json.loads((tmp_path / "image_encoder" / "config.json")
                                                      .read_text()), with_projection=True)}))
  out = tmp_path / "out"
  assert export.main(["--src", str(folder), "--dst", str(out), "--format", "diffusers",
                      "--no-progress"]) == 0
  assert json.loads((out / "model_index.json").read_text())["image_encoder"][1] == \
      "CLIPVisionModelWithProjection"
  loaded = transformers.CLIPVisionModelWithProjection.from_pretrained(out / "image_encoder",
                                                                      local_files_only=True)
  got, want = state_dict_numpy(loaded), state_dict_numpy(model)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
