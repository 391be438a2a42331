"""The PyTorch references of elements-to-video sampling, assembled from diffusers / transformers
components: `TorchA2` with the A2 release's A2Pipeline semantics (DESIGN.md §1, with its mask
rule), `TorchV3R2V` with SkyReels-V3's reference-to-video pipeline. They are what a2jax's pipeline
is checked against (tests/test_pipeline.py, tests/test_v3_r2v.py) and timed against
(benchmarks/sample_cpu.py). TorchA2 takes a2jax's preprocessed references, so that preprocessing
(tested on its own) is not compared twice; TorchV3R2V fits the references itself, as its release.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_wan import prompt_clean as diffusers_prompt_clean
from PIL import Image

from a2jax import preprocess
from a2jax.pipeline import DEFAULT_NEGATIVE_PROMPT
from convert_weights import common


def load_diffusers(cls, folder):
  """from_pretrained without `accelerate` (which diffusers needs for fp32-kept modules)."""
  model = cls.from_config(cls.load_config(folder)).eval()
  weights = common.read_state_dict(folder)
  model.load_state_dict({k: torch.from_numpy(np.array(weights[k])) for k in weights}, strict=True)
  return model


@torch.no_grad()
def text_states(tokenizer, text_encoder, prompt: str) -> torch.Tensor:
  """umT5 states (1, 512, D) of the cleaned prompt, zero after its tokens (both releases)."""
  out = tokenizer([diffusers_prompt_clean(prompt)], padding="max_length", max_length=512,
                  truncation=True, add_special_tokens=True, return_attention_mask=True,
                  return_tensors="pt")
  states = text_encoder(out.input_ids, out.attention_mask).last_hidden_state
  states[:, int(out.attention_mask.sum()):] = 0
  return states


class TorchA2:
  """The reference: diffusers / transformers components with the release's sampling semantics."""

  def __init__(self, src, prompt: str):
    self.prompt = prompt
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(src / "tokenizer")
    self.text_encoder = transformers.UMT5EncoderModel.from_pretrained(src / "text_encoder").eval()
    self.image_encoder = transformers.CLIPVisionModel.from_pretrained(src / "image_encoder").eval()
    self.processor = transformers.CLIPImageProcessor.from_pretrained(src / "image_processor")
    self.vae = load_diffusers(AutoencoderKLWan, src / "vae")
    self.transformer = load_diffusers(WanTransformer3DModel, src / "transformer")
    self.scheduler = UniPCMultistepScheduler.from_pretrained(src / "scheduler")

  def text(self, prompt):
    return text_states(self.tokenizer, self.text_encoder, prompt)

  @torch.no_grad()
  def image_tokens(self, originals):
    padded = [Image.fromarray(preprocess.pad_to_square_white(o)) for o in originals]
    pixels = self.processor(images=padded, return_tensors="pt").pixel_values
    hidden = self.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
    return hidden.reshape(1, -1, hidden.shape[-1])

  @torch.no_grad()
  def condition(self, vae_refs, frames):
    """The release's layout, written here independently of a2jax.conditioning."""
    n = len(vae_refs)
    video = torch.zeros(1, 3, frames, *vae_refs.shape[1:3])
    refs = torch.from_numpy(vae_refs).permute(0, 3, 1, 2)
    video[:, :, 0] = refs[0]
    for k in range(1, n):
      video[:, :, 4 * k - 3: 4 * k + 1] = refs[k][:, None]
    latents = self.vae.encode(video).latent_dist.mode()
    mean = torch.tensor(self.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, -1, 1, 1, 1)
    latents = (latents - mean) * inv_std
    mask = torch.zeros(1, 4, *latents.shape[2:])
    mask[:, :, :n] = 1.0
    return torch.cat([mask, latents], dim=1), mean, inv_std

  @torch.no_grad()
  def denoise(self, condition, text, negative, image, noise: np.ndarray, sampling, hold=None):
    """CFG denoising from `noise` (1, f, h, w, z) channels-last → latents (1, z, f, h, w);
    `hold(latents, σ)`, when given, edits the latents in place before every step."""
    latents = torch.from_numpy(noise).permute(0, 4, 1, 2, 3).contiguous()
    self.scheduler.set_timesteps(sampling.steps)
    for i, t in enumerate(self.scheduler.timesteps):
      if hold is not None:
        hold(latents, self.scheduler.sigmas[i])
      x = torch.cat([latents, condition], dim=1)
      ts = t.expand(1)
      v_cond = self.transformer(x, ts, text, image, return_dict=False)[0]
      v_uncond = self.transformer(x, ts, negative, image, return_dict=False)[0]
      v = v_uncond + sampling.guidance * (v_cond - v_uncond)
      latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
    return latents

  @torch.no_grad()
  def decode(self, latents, mean, inv_std):
    """Normalised latents (1, z, f, h, w) → video (1, z, F, H, W) in [−1, 1]."""
    return self.vae.decode(latents / inv_std + mean, return_dict=False)[0].clamp(-1, 1)

  @torch.no_grad()
  def __call__(self, vae_refs, originals, noise, sampling):
    """→ (final latents (1, f, h, w, z), decoded video (1, F, H, W, 3)), channels-last numpy."""
    text, negative = self.text(self.prompt), self.text(DEFAULT_NEGATIVE_PROMPT)
    image = self.image_tokens(originals)
    condition, mean, inv_std = self.condition(vae_refs, sampling.frames)
    latents = self.denoise(condition, text, negative, image, noise, sampling)
    video = self.decode(latents, mean, inv_std)
    return latents.permute(0, 2, 3, 4, 1).numpy(), video.permute(0, 2, 3, 4, 1).numpy()


def fit_reference_like_release(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """SkyReels-V3 R2V's reference resize, written after its `resize_ref_images`: keep the aspect
  ratio (the other side truncated), LANCZOS, then `ImageOps.expand` with white, the odd pixel of
  padding right / below."""
  from PIL import ImageOps
  img = Image.fromarray(image).convert("RGB")
  if img.width / img.height > width / height:
    size = (width, int(width / (img.width / img.height)))
  else:
    size = (int(height * (img.width / img.height)), height)
  img = img.resize(size, Image.Resampling.LANCZOS)
  dw, dh = width - img.size[0], height - img.size[1]
  return np.array(ImageOps.expand(img, (dw // 2, dh // 2, dw - dw // 2, dh - dh // 2),
                                  fill=(255, 255, 255)))


class TorchV3R2V:
  """SkyReels-V3 R2V's sampling (its WanSkyReelsA2WanT2VPipeline with the scheduler and defaults of
  its ReferenceToVideoPipeline) from diffusers / transformers components, in float32; the reference
  latents are the posterior mean (a2jax's default; the release draws a sample)."""

  MAX_REFERENCES = 4

  def __init__(self, src, prompt: str):
    self.prompt = prompt
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(src / "tokenizer")
    self.text_encoder = transformers.UMT5EncoderModel.from_pretrained(src / "text_encoder").eval()
    self.vae = load_diffusers(AutoencoderKLWan, src / "vae")
    self.transformer = load_diffusers(WanTransformer3DModel, src / "transformer")
    self.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                             num_train_timesteps=1000, flow_shift=5.0)

  @torch.no_grad()
  def reference_latents(self, originals, height: int, width: int):
    """Each reference fitted, encoded alone as a one-frame video, normalised; zero latents up to
    4 → (1, z, 4, h, w)."""
    mean = torch.tensor(self.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, -1, 1, 1, 1)
    latents = []
    for image in originals:
      pixels = torch.from_numpy(fit_reference_like_release(image, height, width)).float()
      pixels = (pixels.permute(2, 0, 1) / 255.0 - 0.5) / 0.5
      latent = self.vae.encode(pixels[None, :, None]).latent_dist.mode()
      latents.append((latent - mean) * inv_std)
    while len(latents) < self.MAX_REFERENCES:
      latents.append(torch.zeros_like(latents[0]))
    return torch.cat(latents, dim=2), mean, inv_std

  @torch.no_grad()
  def denoise(self, condition, text, negative, noise: np.ndarray, sampling, hold=None):
    """From `noise` (1, f, h, w, z) channels-last → latents (1, z, f, h, w); `hold` as in
    `TorchA2.denoise`."""
    latents = torch.from_numpy(noise).permute(0, 4, 1, 2, 3).contiguous()
    image_guidance = 1.0 if sampling.image_guidance is None else sampling.image_guidance
    self.scheduler.set_timesteps(sampling.steps)
    for i, t in enumerate(self.scheduler.timesteps):
      if hold is not None:
        hold(latents, self.scheduler.sigmas[i])
      ts, f = t.expand(1), latents.shape[2]
      def velocity(context, refs):
        x = torch.cat([latents, refs], dim=2)
        return self.transformer(x, ts, context, return_dict=False)[0][:, :, :f]
      v = velocity(text, condition)
      if sampling.guidance > 1:
        uncond_text = velocity(negative, condition)
        uncond_all = velocity(negative, torch.zeros_like(condition))
        v = uncond_all + image_guidance * (uncond_text - uncond_all) + sampling.guidance * (v - uncond_text)
      latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
    return latents

  @torch.no_grad()
  def __call__(self, originals, noise, sampling):
    """RGB references (uint8 HWC) → (final latents (1, f, h, w, z), decoded video (1, F, H, W, 3)),
    channels-last numpy."""
    negative = "" if sampling.negative_prompt is None else sampling.negative_prompt
    text, negative = (text_states(self.tokenizer, self.text_encoder, p) for p in (self.prompt, negative))
    condition, mean, inv_std = self.reference_latents(originals, sampling.height, sampling.width)
    latents = self.denoise(condition, text, negative, noise, sampling)
    video = self.vae.decode(latents / inv_std + mean, return_dict=False)[0].clamp(-1, 1)
    return latents.permute(0, 2, 3, 4, 1).numpy(), video.permute(0, 2, 3, 4, 1).numpy()
