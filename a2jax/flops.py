"""The analytic FLOP model of the DiT: one forward of one sample by part, and a training step (full
or LoRA). Counted from the shapes (2 FLOPs per multiply-add), not by XLA's cost analysis, which
counts a scanned layer loop once and Pallas kernels not at all. a2jax.aot reports it beside each
compile; a2jax.train.metrics turns it into throughput and MFU.

A training step is 3 forwards per sample (forward + backward); rematerialisation is not counted,
so MFU is model FLOPs utilisation, comparable across remat policies. A LoRA step computes no weight
gradient for the frozen kernels: it counts 2 forwards (forward, gradient of the activations) plus
the weight gradients of the targeted projections (through which the adapters' gradients flow); the
adapters' own rank-r matmuls are left out (< 0.5%).
"""

from __future__ import annotations

import dataclasses

from a2jax import configs
from a2jax.configs import Config, TransformerConfig

FORWARDS_PER_STEP = 3


@dataclasses.dataclass(frozen=True)
class VideoShape:
  """Pixel-space sampling shape: frames × height × width, CFG batch, context lengths."""

  frames: int = 81
  height: int = 480
  width: int = 832
  batch: int = 2          # conditional + unconditional (CFG) as one batch
  text_len: int = 512
  image_len: int = 771    # 257 CLIP tokens per reference, 3 references
  vae_stride: tuple[int, int, int] = (4, 8, 8)
  reference_frames: int = 0  # latent frames after the video's (V3 R2V: 4, configs.REFERENCE_FRAMES)

  @property
  def latent_grid(self) -> tuple[int, int, int]:
    """(f, h, w) latent frames / height / width: f = (F − 1)/4 + 1, h = H/8, w = W/8."""
    st, sh, sw = self.vae_stride
    return (self.frames - 1) // st + 1, self.height // sh, self.width // sw


def transformer_flops(cfg: TransformerConfig, video: VideoShape) -> dict[str, float]:
  """Analytic FLOPs (2 per multiply-add) of one forward of one sample, by part.

  Per layer: self-attention projections 4·2·S·D², its QK and PV 2·2·S²·D; cross-attention q/out
  projections 2·2·S·D², text and image k/v projections 2·2·(T + I)·D², QK and PV 2·2·S·(T + I)·D;
  FFN 2·2·S·D·F. Outside the layers: patch embedding, text / image / time embedders, output head.
  Elementwise work (norms, RoPE, softmax, modulation) is left out: it is < 1%.
  """
  f, h, w = video.latent_grid
  pt, ph, pw = cfg.patch_size
  s = ((f + video.reference_frames) // pt) * (h // ph) * (w // pw)
  d, ffn, n = cfg.inner_dim, cfg.ffn_dim, cfg.num_layers
  tl, il = video.text_len, video.image_len if cfg.image_dim else 0
  per_layer = {
      "projections_ffn": 4 * 2 * s * d * d + 2 * 2 * s * d * d + 2 * 2 * s * d * ffn,
      "self_attention": 2 * 2 * s * s * d,
      "cross_attention": 2 * 2 * (tl + il) * d * d + 2 * 2 * s * (tl + il) * d,
  }
  patch = 2 * s * (cfg.in_channels * pt * ph * pw) * d
  text = 2 * tl * (cfg.text_dim * d + d * d)
  image = 2 * il * (cfg.image_dim * cfg.image_dim + cfg.image_dim * d) if cfg.image_dim else 0
  time_ = 2 * (cfg.freq_dim * d + d * d + d * 6 * d)
  head = 2 * s * d * cfg.out_channels * pt * ph * pw
  out = {f"{k}_per_layer": float(v) for k, v in per_layer.items()}
  out["embed_and_head"] = float(patch + text + image + time_ + head)
  out["tokens"] = float(s)
  out["total"] = float(n * sum(per_layer.values()) + out["embed_and_head"])
  return out


def step_flops(cfg: Config, batch_shapes: dict[str, tuple[int, ...]]) -> float:
  """Analytic model FLOPs of one training step on a global batch of these shapes."""
  b, f, h, w, _ = batch_shapes["latents"]
  st, ss = cfg.vae.scale_factor_temporal, cfg.vae.scale_factor_spatial
  video = VideoShape(frames=(f - 1) * st + 1, height=h * ss, width=w * ss, batch=b,
                     text_len=batch_shapes["text"][1],
                     image_len=batch_shapes["image"][1] if "image" in batch_shapes else 0,
                     reference_frames=configs.REFERENCE_FRAMES[cfg.family])
  forward = transformer_flops(cfg.transformer, video)
  if cfg.train.lora is None:
    return FORWARDS_PER_STEP * b * forward["total"]
  return b * ((FORWARDS_PER_STEP - 1) * forward["total"]
              + cfg.transformer.num_layers * lora_weight_gradient_flops(cfg, video, forward["tokens"]))


def lora_weight_gradient_flops(cfg: Config, video: VideoShape, tokens: float) -> float:
  """FLOPs of one sample's weight gradients (x^T · dy, 2 per multiply-add) of the LoRA targets of
  one layer: the same count as the projection's forward matmul."""
  t = cfg.transformer
  d, text, image = t.inner_dim, video.text_len, video.image_len if t.image_dim else 0
  rows = {"attn2.to_k": text, "attn2.to_v": text, "attn2.add_k_proj": image,
          "attn2.add_v_proj": image}
  width = {"ffn.net_0": t.ffn_dim, "ffn.net_2": t.ffn_dim}
  return sum(2 * rows.get(name, tokens) * d * width.get(name, d) for name in cfg.train.lora.targets)
