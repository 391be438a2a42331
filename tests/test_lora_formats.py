"""LoRA files (original Wan / ComfyUI, kohya / musubi, diffusers / PEFT): a2jax's merge equals
diffusers' `load_lora_weights` + `fuse_lora` on the same tiny WanTransformer3DModel; the keys
diffusers drops (`.diff`, `diff_m`) against a hand merge; errors; write_lora round trips."""

import json

import jax
import numpy as np
import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from safetensors.numpy import save_file

from a2jax.configs import TransformerConfig
from a2jax.errors import ConversionError, InputError
from a2jax.models import lora as lora_tree
from convert_weights import lora as lora_files
from convert_weights import transformer as convert
from parity import max_rel_err, randomize_torch_, state_dict_numpy

F32_TOL = 1e-5   # max|Δ| / max|ref| per parameter
BF16_TOL = 1e-2  # bfloat16 parameters (merged in float32, rounded once) against the float32 reference
KW = dict(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=20, in_channels=36,
          out_channels=16, text_dim=32, freq_dim=16, ffn_dim=48, num_layers=3, image_dim=24,
          added_kv_proj_dim=60)
# SkyReels-V3 R2V's transformer: 16 input channels, no image branch.
KW_V3 = {**{k: v for k, v in KW.items() if k not in ("image_dim", "added_kv_proj_dim")},
         "in_channels": 16}
IMAGE_BRANCH = ("attn2.add_k_proj", "attn2.add_v_proj")


def make_base(kw):
  model = WanTransformer3DModel(**kw).eval()
  randomize_torch_(model, seed=5)
  return TransformerConfig(**kw), state_dict_numpy(model)


@pytest.fixture(scope="module")
def base():
  return make_base(KW)


@pytest.fixture(scope="module")
def base_v3():
  return make_base(KW_V3)


def random_entries(cfg, seed, image_branch=True, alphas=True, gaps=True):
  """{diffusers module "blocks.N.attn1.to_q": (down (r, in), up (out, r), alpha | None)} over a
  mix of layers, modules and ranks (with `gaps` layer 2 lacks the feed-forward; ranks 4 and 2)."""
  rng = np.random.default_rng(seed)
  shapes = {t.sources[0].removesuffix(".weight").removeprefix("blocks.0."): t.source_shape
            for t in convert.reference_targets(cfg) if t.stacked and t.path[-1] == "kernel"}
  entries = {}
  for layer in range(cfg.num_layers):
    for module, (out_dim, in_dim) in shapes.items():
      if (not image_branch and module.startswith(("attn2.add_k", "attn2.add_v"))) or (
          gaps and layer == 2 and module.startswith("ffn")):
        continue
      rank = 2 if module.startswith("ffn") else 4
      alpha = float(rng.uniform(0.5, 8)) if alphas else None
      entries[f"blocks.{layer}.{module}"] = (rng.standard_normal((rank, in_dim)).astype(np.float32),
                                             0.1 * rng.standard_normal((out_dim, rank)).astype(np.float32),
                                             alpha)
  return entries


def write_entries(entries, fmt, path, extra=None, metadata=None, down="lora_down", up="lora_up"):
  """Writes test entries with the names of `fmt` (original, kohya, diffusers)."""
  tensors = dict(extra or {})
  for name, (d, u, alpha) in entries.items():
    if fmt == "diffusers":
      prefix, down, up = f"transformer.{name}", "lora_A", "lora_B"
    else:
      original = convert.original_name(name + ".weight").removesuffix(".weight")
      prefix = ("diffusion_model." + original if fmt == "original"
                else "lora_unet_" + original.replace(".", "_"))
    tensors[f"{prefix}.{down}.weight"], tensors[f"{prefix}.{up}.weight"] = d, u
    if alpha is not None:
      tensors[f"{prefix}.alpha"] = np.asarray(alpha, np.float32)
  save_file(tensors, str(path), metadata=metadata)
  return path


def diffusers_fused(sd, path, strength=1.0, kw=KW):
  """The diffusers state dict after load_lora_weights + fuse_lora (float32 numpy)."""
  model = WanTransformer3DModel(**kw).eval()
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
  pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=model, vae=None, scheduler=None)
  pipe.load_lora_weights(str(path))
  pipe.fuse_lora(lora_scale=strength)
  pipe.unload_lora_weights()
  return state_dict_numpy(model)


def errors(got, ref):
  return {"/".join(p): max_rel_err(np.asarray(g, np.float32), r)
          for (p, g), r in zip(_flat(got).items(), _flat(ref).values())}


def _flat(tree):
  from flax import traverse_util
  return traverse_util.flatten_dict(tree)


DIFFUSERS_ALPHA = 2.0
CASES = {
    # ComfyUI / lightx2v: lora_down/up + alpha, biases as .diff_b (diffusers' lora_B.bias)
    "original": dict(seed=1, kw={}, diff_b=True),
    # ai-toolkit spelling of the same format: lora_A/lora_B
    "original_AB": dict(seed=2, kw=dict(down="lora_A", up="lora_B"), diff_b=False),
    "kohya": dict(seed=3, kw={}, diff_b=False),
    # PEFT with diffusers' metadata (alpha 2 ≠ rank) and a T2V LoRA (no image branch)
    "diffusers": dict(seed=4, kw={}, diff_b=False),
}


def peft_metadata(entries):
  """What diffusers' save_lora_weights writes: the PEFT LoraConfig, keys prefixed `transformer.`."""
  config = {"r": 4, "lora_alpha": DIFFUSERS_ALPHA, "target_modules": sorted(entries),
            "rank_pattern": {}, "alpha_pattern": {}}
  return {"format": "pt", "lora_adapter_metadata": json.dumps(
      {f"transformer.{k}": v for k, v in config.items()})}


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")  # T2V LoRA: zeros added
@pytest.mark.parametrize("family", ["a2", "v3_r2v"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_matches_diffusers_fuse_lora(family, case, tmp_path, request):
  """Every format onto A2's transformer and onto SkyReels-V3 R2V's (no image branch)."""
  v3 = family == "v3_r2v"
  cfg, sd = request.getfixturevalue("base_v3" if v3 else "base")
  spec = CASES[case]
  fmt = case.split("_")[0]
  # diffusers reads a musubi file only when every block has every projection
  entries = random_entries(cfg, spec["seed"], image_branch=fmt != "diffusers" and not v3,
                           alphas=fmt != "diffusers", gaps=fmt != "kohya")
  if fmt == "diffusers":  # one alpha for every module, from the metadata; ranks all 4
    entries = {n: (d[:4], u[:, :4], None) for n, (d, u, _) in entries.items() if d.shape[0] == 4}
    spec = dict(spec, kw=dict(metadata=peft_metadata(entries)))
  rng = np.random.default_rng(0)
  extra = {}
  if spec["diff_b"]:
    extra = {"diffusion_model.blocks.1.self_attn.q.diff_b": rng.standard_normal(60).astype(np.float32),
             "diffusion_model.blocks.0.ffn.2.diff_b": rng.standard_normal(60).astype(np.float32)}
  path = write_entries(entries, fmt, tmp_path / f"{case}.safetensors", extra, **spec["kw"])
  strength = 0.7
  ref = convert.from_torch(diffusers_fused(sd, path, strength, KW_V3 if v3 else KW), cfg)
  merged, notes = lora_files.apply_loras(convert.from_torch(sd, cfg), cfg, [(path, strength)])
  errs = errors(merged, ref)
  worst = max(errs, key=errs.get)
  print(f"{case}: float32 max rel err {errs[worst]:.2e} ({worst})")
  assert errs[worst] <= F32_TOL, worst
  assert notes[0].startswith(f"{path.name}: {fmt} LoRA")
  assert any("T2V LoRA" in n for n in notes) == (fmt == "diffusers" and not v3)
  # the LoRA really changed the model: the comparison is not base against base
  assert max_rel_err(merged["blocks"]["attn1"]["to_q"]["kernel"],
                     convert.from_torch(sd, cfg)["blocks"]["attn1"]["to_q"]["kernel"]) > 1e-2

  bf16 = convert.from_torch(sd, cfg, dtype=jax.numpy.bfloat16)
  merged16, _ = lora_files.apply_loras(bf16, cfg, [(path, strength)])
  errs16 = errors(merged16, ref)
  worst16 = max(errs16, key=errs16.get)
  print(f"{case}: bfloat16 max rel err {errs16[worst16]:.2e} ({worst16})")
  assert merged16["blocks"]["attn1"]["to_q"]["kernel"].dtype == jax.numpy.bfloat16
  assert errs16[worst16] <= BF16_TOL, worst16


def test_diffs_that_diffusers_drops_match_a_hand_merge(base, tmp_path):
  """`.diff` (norm weights), `.diff_b` on a norm and `blocks.N.diff_m` (modulation), which
  diffusers skips, against a hand merge: W + strength · diff."""
  cfg, sd = base
  rng = np.random.default_rng(7)
  diffs = {"blocks.0.norm3.diff": ("blocks.0.norm2.weight", 60),
           "blocks.2.self_attn.norm_q.diff": ("blocks.2.attn1.norm_q.weight", 60),
           "blocks.1.norm3.diff_b": ("blocks.1.norm2.bias", 60),
           "head.head.diff_b": ("proj_out.bias", 64)}
  tensors = {f"diffusion_model.{k}": rng.standard_normal(n).astype(np.float32)
             for k, (_, n) in diffs.items()}
  tensors["diffusion_model.blocks.1.diff_m"] = rng.standard_normal((1, 6, 60)).astype(np.float32)
  entries = {"blocks.0.attn1.to_q": (rng.standard_normal((2, 60)).astype(np.float32),
                                     rng.standard_normal((60, 2)).astype(np.float32), 1.0)}
  path = write_entries(entries, "original", tmp_path / "diffs.safetensors", tensors)
  strength = 0.5
  hand = dict(sd)
  for key, (name, _) in diffs.items():
    hand[name] = sd[name] + strength * tensors[f"diffusion_model.{key}"]
  hand["blocks.1.scale_shift_table"] = (sd["blocks.1.scale_shift_table"]
                                        + strength * tensors["diffusion_model.blocks.1.diff_m"])
  d, u, alpha = entries["blocks.0.attn1.to_q"]
  hand["blocks.0.attn1.to_q.weight"] = sd["blocks.0.attn1.to_q.weight"] + strength * alpha / 2 * u @ d
  merged, _ = lora_files.apply_loras(convert.from_torch(sd, cfg), cfg, [(path, strength)])
  errs = errors(merged, convert.from_torch(hand, cfg))
  assert max(errs.values()) <= F32_TOL, errs


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")
@pytest.mark.parametrize("fmt", ["comfyui", "diffusers", "kohya"])
def test_write_lora_round_trips_with_alpha_scaling(base, fmt, tmp_path):
  cfg, sd = base
  params = convert.from_torch(sd, cfg)
  tree = lora_tree.init_lora(params, tuple(lora_tree.TARGET_MODULES), 4, jax.random.key(0))
  tree = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), tree)
  path = lora_files.write_lora(tree, 8.0, tmp_path / "out.safetensors", fmt)
  assert not list(tmp_path.glob(".*partial*"))
  loaded = lora_files.read_lora(path, cfg, strength=1.5)
  assert loaded.format == {"comfyui": "original"}.get(fmt, fmt)
  got = lora_tree.apply_all(params, [loaded])
  want = lora_tree.merge(params, tree, 1.5 * 8.0 / 4)
  errs = errors(got, want)
  assert max(errs.values()) <= F32_TOL, errs
  # and diffusers reads the written file to the same model
  errs = errors(got, convert.from_torch(diffusers_fused(sd, path, 1.5), cfg))
  assert max(errs.values()) <= F32_TOL, errs


def _write(tmp_path, tensors):
  path = tmp_path / "bad.safetensors"
  save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(path))
  return path


@pytest.mark.parametrize("tensors, message", [
    ({"diffusion_model.blocks.0.self_attn.x.lora_down.weight": np.zeros((2, 60)),
      "diffusion_model.blocks.0.self_attn.x.lora_up.weight": np.zeros((60, 2))},
     "'diffusion_model.blocks.0.self_attn.x.lora_(down|up).weight' maps to no parameter"),
    ({"diffusion_model.blocks.3.self_attn.q.lora_down.weight": np.zeros((2, 60)),
      "diffusion_model.blocks.3.self_attn.q.lora_up.weight": np.zeros((60, 2))},
     "blocks.3.self_attn.q.* maps to no parameter"),
    ({"lora_unet_blocks_0_self_attn_q.lora_down.weight": np.zeros((2, 64)),
      "lora_unet_blocks_0_self_attn_q.lora_up.weight": np.zeros((64, 2))},
     r"\(2, 64\) and .*\(64, 2\) do not fit .*\(60, 60\): a LoRA for another model size"),
    ({"transformer.blocks.0.attn1.to_q.lora_A.weight": np.zeros((2, 60))},
     "has no matching lora_up/lora_B"),
    ({"something.else": np.zeros(2)}, "cannot tell the LoRA format"),
])
def test_bad_files_fail_with_one_line_naming_the_key(base, tmp_path, tensors, message):
  with pytest.raises(ConversionError, match=message) as info:
    lora_files.read_lora(_write(tmp_path, tensors), base[0])
  assert "\n" not in str(info.value)


def test_lora_spec_parsing(tmp_path):
  path = _write(tmp_path, {"transformer.blocks.0.attn1.to_q.lora_A.weight": np.zeros((2, 60))})
  assert lora_files.parse_spec(str(path)) == (path, 1.0)
  assert lora_files.parse_spec(f"{path}:0.25") == (path, 0.25)
  with pytest.raises(InputError, match="not a number"):
    lora_files.parse_spec(f"{path}:strong")
  with pytest.raises(InputError, match="no such file"):
    lora_files.parse_spec(str(tmp_path / "missing.safetensors") + ":1")


# ---------------------------------------------------------------------------------------------
# sample.py --lora and merge-lora on the tiny release


@pytest.mark.slow  # two tiny samplings and a merged folder: minutes on a loaded 2-core machine
def test_sample_with_lora_equals_the_merged_folder(release, tmp_path, capsys):
  import sample
  from a2jax import checkpoints, video
  from convert_weights import merge_lora
  folder = release[1]
  cfg = checkpoints.read_config(folder)
  params = checkpoints.load_component(folder, "transformer", cfg.transformer)
  tree = lora_tree.init_lora(params, lora_tree.DEFAULT_TARGETS, 2, jax.random.key(0))
  tree = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(1), x.shape), tree)
  path = lora_files.write_lora(tree, 1.0, tmp_path / "style.safetensors", "comfyui")
  spec = f"{path}:0.8"

  assert merge_lora.main(["--src", str(folder), "--lora", spec, "--dst", str(tmp_path / "merged"),
                          "--no-progress"]) == 0
  assert "lora: style.safetensors: original LoRA, strength 0.8" in capsys.readouterr().err
  merged = checkpoints.load_component(tmp_path / "merged", "transformer", cfg.transformer)
  want = lora_tree.merge(params, tree, 0.8 * 1.0 / 2)
  assert max(errors(merged, want).values()) <= F32_TOL
  assert max_rel_err(merged["blocks"]["attn1"]["to_q"]["kernel"],
                     params["blocks"]["attn1"]["to_q"]["kernel"]) > 1e-2
  assert (tmp_path / "merged" / "config.yaml").read_text() == (folder / "config.yaml").read_text()
  assert merge_lora.main(["--src", str(folder), "--lora", spec, "--dst",
                          str(tmp_path / "merged")]) == 2
  assert "already exists" in capsys.readouterr().err

  flags = ["--prompt", "a bear", "--ref", _picture(tmp_path), "--frames", "5", "--height", "32",
           "--width", "32", "--steps", "2", "--no-progress", "--seed", "3"]
  assert sample.main(["--checkpoint", str(folder), "--lora", spec, *flags,
                      "--out", str(tmp_path / "lora.mp4")]) == 0
  assert "lora: style.safetensors: original LoRA, strength 0.8" in capsys.readouterr().err
  assert sample.main(["--checkpoint", str(tmp_path / "merged"), *flags,
                      "--out", str(tmp_path / "merged.mp4")]) == 0
  np.testing.assert_array_equal(video.read_mp4(tmp_path / "lora.mp4"),
                                video.read_mp4(tmp_path / "merged.mp4"))


def _picture(folder):
  from PIL import Image
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(
      folder / "bear.png")
  return str(folder / "bear.png")


@pytest.mark.parametrize("spec, message", [
    ("missing.safetensors", "no such file"), ("{lora}:loud", "not a number")])
def test_sample_lora_errors_are_one_line_before_loading(release, tmp_path, capsys, spec, message):
  import sample
  path = _write(tmp_path, {"transformer.blocks.0.attn1.to_q.lora_A.weight": np.zeros((2, 60))})
  assert sample.main(["--checkpoint", str(release[1]), "--prompt", "a bear", "--no-progress",
                      "--ref", _picture(tmp_path),
                      "--lora", spec.format(lora=path), "--out", str(tmp_path / "x.mp4")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error:") and message in err and "\n" not in err
