"""A tiny random SkyReels-A2, SkyReels-V3 R2V or SkyReels-V2 DF release folder in the release's own
(diffusers) layout, built with the PyTorch reference classes: for tests, `make demo` and trying the
converter without the 14B weights.

`python -m convert_weights.tiny_release --dst DIR [--seed 0] [--family a2|v3_r2v|v2_df]` writes
`model_index.json`, `transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/` and, for
A2, `image_encoder/` and `image_processor/`, all with `save_pretrained`. A V3 R2V transformer is
diffusers' `WanTransformer3DModel` without the image branch, its config naming the release's class
`SkyReelsA2WanI2v3DModel` (whose weights and forward it equals); a V2 DF one is diffusers'
`SkyReelsV2Transformer3DModel` with the fps embedding, as the `…-DF-…-Diffusers` folders hold.
Every weight is random (seeded): the video it samples is noise-like; it proves the plumbing, not
the model. Needs the `test` extra (torch, diffusers).
"""

from __future__ import annotations

import argparse
import json
import pathlib

from a2jax import text

# Widths small enough for a 2-core CPU, every structural feature of the release kept: I2V image
# branch, several heads and layers, the full VAE structure, a CLIP tower read at its penultimate layer.
TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24,
                   in_channels=36, out_channels=16, text_dim=32, freq_dim=16, ffn_dim=64,
                   num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                   image_dim=32, added_kv_proj_dim=48, rope_max_seq_len=1024)
VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
           temperal_downsample=[False, True, True])
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            image_size=28, patch_size=14, hidden_act="gelu", projection_dim=16)
CLIP_PROCESSOR = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                      do_center_crop=True, do_normalize=True, do_rescale=True, do_resize=True)
UMT5 = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
            num_heads=4, relative_attention_num_buckets=32, relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False)
# SkyReels-V3 R2V: 16 input channels (the reference latents come as frames, not channels), no
# image branch.
V3_TRANSFORMER = {**{k: v for k, v in TRANSFORMER.items() if k not in ("image_dim", "added_kv_proj_dim")},
                  "in_channels": 16}
V3_TRANSFORMER_CLASS = "SkyReelsA2WanI2v3DModel"
PIPELINE_CLASSES = {"a2": "SkyReelsA2Pipeline", "v3_r2v": "WanSkyReelsA2WanT2VPipeline",
                    "v2_df": "SkyReelsV2DiffusionForcingPipeline"}
# SkyReels-V2 diffusion forcing: the V3-like text-to-video layout with the fps embedding.
DF_TRANSFORMER = {**V3_TRANSFORMER, "inject_sample_info": True}
SCHEDULER = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                 flow_shift=8.0, solver_order=2, predict_x0=True, solver_type="bh2",
                 lower_order_final=True)
TOKENIZER_SENTENCES = (
    "A man is holding a teddy bear in the forest.",
    "A red circle moves left across a blue striped background.",
    "A woman in a red coat walks her dog through a snowy park at dusk.",
    "The camera slowly pans across a quiet lake surrounded by pine trees.",
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images.",
    "Worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers.",
    "Poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers.",
    "Still picture, messy background, three legs, many people in the background, walking backwards.",
)


def randomize_(module, seed: int, scale: float = 0.2) -> None:
  """Random weights everywhere (norm gains around 1), so nothing keeps its default init."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      p.copy_(1.0 + 0.1 * noise if (p.ndim == 1 and name.endswith("weight")) else scale * noise)


def build_tokenizer(folder: pathlib.Path, vocab_size: int, sentences=TOKENIZER_SENTENCES):
  """A unigram sentencepiece T5 tokenizer with umT5's special ids, trained on a few sentences."""
  return text.train_tokenizer(folder, tuple(sentences) * 4, vocab_size, model_type="unigram",
                              hard_vocab_limit=False, character_coverage=1.0)


def build(dst: str | pathlib.Path, seed: int = 0, family: str = "a2") -> pathlib.Path:
  """Writes the tiny release folder of `family` ("a2" | "v3_r2v" | "v2_df"); returns its path."""
  import torch
  import transformers
  from diffusers import (AutoencoderKLWan, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler,
                         WanTransformer3DModel)

  dst = pathlib.Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  torch.manual_seed(seed)
  v3, df = family == "v3_r2v", family == "v2_df"
  if df:
    transformer = SkyReelsV2Transformer3DModel(**DF_TRANSFORMER).eval()
  else:
    transformer = WanTransformer3DModel(**(V3_TRANSFORMER if v3 else TRANSFORMER)).eval()
  randomize_(transformer, seed)
  transformer.save_pretrained(dst / "transformer", max_shard_size="200KB")
  if v3:  # the release's class name (its weights and forward are diffusers')
    config = dst / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "_class_name": V3_TRANSFORMER_CLASS}, indent=2))
  vae = AutoencoderKLWan(**VAE).eval()
  randomize_(vae, seed + 1, scale=0.1)
  vae.save_pretrained(dst / "vae")
  index = {"transformer": ["diffusers", type(transformer).__name__ if not v3 else V3_TRANSFORMER_CLASS],
           "vae": ["diffusers", "AutoencoderKLWan"]}
  if family == "a2":
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP)).eval()
    randomize_(clip, seed + 2)
    clip.save_pretrained(dst / "image_encoder")
    transformers.CLIPImageProcessor(**CLIP_PROCESSOR).save_pretrained(dst / "image_processor")
    index.update(image_encoder=["transformers", "CLIPVisionModel"],
                 image_processor=["transformers", "CLIPImageProcessor"])
  umt5 = transformers.UMT5EncoderModel(transformers.UMT5Config(**UMT5)).eval()
  randomize_(umt5, seed + 3)
  umt5.save_pretrained(dst / "text_encoder")
  build_tokenizer(dst / "tokenizer", UMT5["vocab_size"])
  UniPCMultistepScheduler(**SCHEDULER).save_pretrained(dst / "scheduler")
  (dst / "model_index.json").write_text(json.dumps({
      "_class_name": PIPELINE_CLASSES[family], **index,
      "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
      "scheduler": ["diffusers", "UniPCMultistepScheduler"]}, indent=2))
  return dst


def write_example_references(folder: str | pathlib.Path) -> dict[str, pathlib.Path]:
  """Three small reference pictures (a subject, an object, a background) drawn procedurally."""
  from PIL import Image, ImageDraw
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  subject = Image.new("RGB", (96, 128), "white")
  ImageDraw.Draw(subject).ellipse((16, 24, 80, 104), fill=(220, 40, 40))
  obj = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
  ImageDraw.Draw(obj).rectangle((20, 20, 76, 76), fill=(40, 80, 220, 255))
  background = Image.new("RGB", (160, 96), (120, 200, 120))
  draw = ImageDraw.Draw(background)
  for x in range(0, 160, 20):
    draw.rectangle((x, 0, x + 9, 96), fill=(60, 140, 60))
  paths = {"subject": folder / "subject.png", "object": folder / "object.png",
           "background": folder / "background.png"}
  for (name, path), image in zip(paths.items(), (subject, obj, background)):
    image.save(path)
  return paths


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m convert_weights.tiny_release", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dst", required=True)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--family", choices=tuple(PIPELINE_CLASSES), default="a2",
                 help="a2 (SkyReels-A2), v3_r2v (SkyReels-V3 reference-to-video) or v2_df "
                 "(SkyReels-V2 diffusion forcing)")
  p.add_argument("--examples", default=None, help="also write three example reference pictures here")
  args = p.parse_args(argv)
  build(args.dst, args.seed, args.family)
  if args.examples:
    write_example_references(args.examples)
  print(f"wrote a tiny random release folder to {args.dst}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
