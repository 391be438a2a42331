"""The SkyReels-V3 reference-to-video (R2V) conditioning layout, shared by sampling, data encoding
and training (docs/models.md "SkyReels-V3 R2V").

What its release does (`skyreels_v3/pipelines/reference_to_video_pipeline.py`):
- each of the 1–4 references (any order; a background is one of them) is resized keeping its aspect
  ratio (LANCZOS, sizes truncated to ints) and padded with white, centred, to the video size;
- each is VAE-encoded alone as a one-frame video and normalised with the VAE's latent mean / std;
- the reference latents are padded with zero latents to MAX_REFERENCES frames and concatenated in
  time after the video's latents: the DiT sees f + 4 latent frames at 16 channels, all at the
  video's timestep, and its output is cropped back to the f video frames;
- the video size: the first reference's aspect ratio, the closest entry of the 480P / 540P / 720P
  table (`skyreels_v3/config.py`), floored to multiples of 16.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image

from a2jax import configs, preprocess
from a2jax.errors import InputError

MAX_REFERENCES = configs.REFERENCE_FRAMES["v3_r2v"]  # reference slots, one latent frame each

# height / width → (height, width) per resolution: the release's table (skyreels_v3/config.py).
_RATIOS = ("0.38", "0.43", "0.48", "0.50", "0.53", "0.54", "0.56", "0.62", "0.67", "0.75", "1.00",
           "1.33", "1.50", "1.78", "1.89", "2.00", "2.08")
ASPECT_RATIOS = {
    "480P": dict(zip(_RATIOS, [(392, 1046), (420, 980), (444, 925), (452, 904), (466, 880),
                               (470, 870), (480, 854), (506, 810), (522, 784), (554, 738),
                               (640, 640), (740, 555), (784, 522), (854, 480), (880, 466),
                               (906, 454), (924, 444)])),
    "540P": {"0.34": (416, 1216), "0.38": (464, 1216), "0.40": (464, 1152), "0.43": (496, 1152),
             "0.48": (496, 1024), "0.50": (512, 1024), "0.53": (512, 960), "0.57": (544, 960),
             "0.60": (544, 912), "0.63": (576, 912), "0.67": (576, 864), "0.72": (624, 864),
             "0.75": (624, 832), "0.79": (656, 832), "0.84": (656, 784), "0.92": (720, 784),
             "1.00": (720, 720), "1.09": (784, 720), "1.26": (784, 624), "1.33": (832, 624),
             "1.40": (832, 592), "1.49": (880, 592), "1.62": (880, 544), "1.78": (960, 544),
             "1.88": (960, 512), "2.00": (1024, 512), "2.13": (1024, 480)},
    "720P": dict(zip(_RATIOS, [(588, 1568), (628, 1466), (666, 1388), (678, 1356), (698, 1318),
                               (706, 1306), (720, 1280), (758, 1212), (784, 1176), (832, 1110),
                               (960, 960), (1108, 832), (1176, 784), (1280, 720), (1320, 698),
                               (1358, 680), (1386, 666)])),
}
RESOLUTIONS = tuple(ASPECT_RATIOS)


def video_size(reference: np.ndarray, resolution: str) -> tuple[int, int]:
  """(height, width) of a video at `resolution` ("480P" | "540P" | "720P") for the aspect ratio of
  `reference` (H, W, C): the table's closest ratio, floored to multiples of 16."""
  if resolution not in ASPECT_RATIOS:
    raise InputError(f"resolution {resolution!r} is not one of {list(RESOLUTIONS)}")
  table = ASPECT_RATIOS[resolution]
  ratio = reference.shape[0] / reference.shape[1]
  height, width = table[min(table, key=lambda r: abs(float(r) - ratio))]
  return height // 16 * 16, width // 16 * 16


def check_reference_count(num_refs: int) -> None:
  if num_refs < 1:
    raise InputError("no reference images: pass at least one --ref (or a --background)")
  if num_refs > MAX_REFERENCES:
    raise InputError(f"{num_refs} reference images: SkyReels-V3 R2V takes at most "
                     f"{MAX_REFERENCES} (the background counts): pass fewer")


def fit_reference(img: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 (h, w, 3) → (height, width, 3): resized with LANCZOS to fit inside keeping its aspect
  ratio (the other side truncated to an int), then padded with white, centred (the odd pixel of
  padding after the image)."""
  img = preprocess.to_rgb(img)
  h, w, _ = img.shape
  if w / h > width / height:  # wider than the video
    new_w, new_h = width, int(width / (w / h))
  else:
    new_w, new_h = int(height * (w / h)), height
  if min(new_w, new_h) < 1:
    raise InputError(f"a reference of {w}×{h} pixels is too thin to fit a {width}×{height} video")
  resized = np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.Resampling.LANCZOS))
  top, left = (height - new_h) // 2, (width - new_w) // 2
  canvas = np.full((height, width, 3), 255, np.uint8)
  canvas[top:top + new_h, left:left + new_w] = resized
  return canvas


def reference_pixels(references: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
  """References (uint8 HWC, any of RGB, RGBA, grayscale) → (N, H, W, 3) float32 in [−1, 1], each to
  be VAE-encoded alone as a one-frame video."""
  check_reference_count(len(references))
  return preprocess.to_vae_pixels(np.stack([fit_reference(r, height, width) for r in references]))


def reference_latents(latents: jnp.ndarray) -> jnp.ndarray:
  """Normalised reference latents (B, N, h, w, z) → (B, MAX_REFERENCES, h, w, z) float32: the
  missing slots are zero latents."""
  b, n, h, w, z = latents.shape
  pad = jnp.zeros((b, MAX_REFERENCES - n, h, w, z), jnp.float32)
  return jnp.concatenate([latents.astype(jnp.float32), pad], axis=1)
