"""Reference images: loading, the release's pad / crop layouts, VAE pixels and CLIP preprocessing.

Numpy and PIL only (no torch). Images are uint8 (H, W, 3) RGB arrays until they become model inputs:
- `load_image(path)`: RGB, RGBA / LA / transparent palette (composited on white) and grayscale files.
- `fit_subject(img, H, W)`: white padding to the H:W aspect ratio, centred, then a bicubic resize
  (the release's `_crop_and_resize_pad`); `pad_to_square_white(img, 512)` is its square case, the
  CLIP branch's first step.
- `crop_background(img, H, W)`: center crop to the H:W aspect ratio, then a bicubic resize (the
  release's `_crop_and_resize`).
- `to_vae_pixels`: [0, 255] → [−1, 1] float32, the VAE branch's input (diffusers' VideoProcessor).
- `ClipImageProcessor`: transformers' `CLIPImageProcessor` (PIL backend) read from the release's
  `image_processor/preprocessor_config.json`: resize (short side, PIL bicubic), center crop,
  rescale, normalise → (N, 224, 224, 3) float32 for `CLIPVisionEncoder`.

The sizes follow the release exactly (its integer truncations included), so pixels equal the
release's up to PIL itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from a2jax.errors import ConfigError, InputError

PREPROCESSOR_CONFIG = "preprocessor_config.json"
CLIP_PAD_SIZE = 512  # the release pads every reference to a 512² white square before CLIP


def to_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
  """uint8 (H, W, 3) RGB of a PIL image or a uint8 array (H, W), (H, W, 1|3|4).

  Transparency (an alpha band, or a palette's transparent colour) is composited onto white, like
  transformers' `convert_to_rgb`; grayscale is repeated to three channels.
  """
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3, 4))):
      raise InputError(f"image array of shape {image.shape} and dtype {image.dtype}: expected uint8 "
                       "(H, W) or (H, W, 1|3|4)")
    image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
  return np.asarray(image.convert("RGB"))


def load_image(path: str | os.PathLike) -> np.ndarray:
  """An image file → uint8 (H, W, 3) RGB, EXIF orientation applied (as diffusers' `load_image`)."""
  try:
    with Image.open(path) as image:
      image = ImageOps.exif_transpose(image)
      return to_rgb(image)
  except (OSError, ValueError) as e:
    raise InputError(f"cannot read image {path} ({e}): pass a PNG / JPEG / WebP file") from None


def _resize(img: np.ndarray, height: int, width: int, resample=Image.Resampling.BICUBIC) -> np.ndarray:
  return np.asarray(Image.fromarray(img).resize((width, height), resample=resample))


def _check(img: np.ndarray) -> np.ndarray:
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
    raise InputError(f"image of shape {img.shape} and dtype {img.dtype}: expected uint8 (H, W, 3) "
                     "RGB (use load_image or to_rgb)")
  return img


def fit_subject(img: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 (h, w, 3) → (height, width, 3): white bands (equal on both sides) bring the image to the
  target aspect ratio, then a bicubic resize. Subjects and objects of the VAE branch."""
  img = _check(img)
  h, w, _ = img.shape
  if h / w < height / width:  # too wide: pad above and below
    pad = int(((height / width) * w - h) / 2.0)
    canvas = np.full((h + 2 * pad, w, 3), 255, np.uint8)
    canvas[pad:pad + h] = img
  else:  # too tall (or exact): pad left and right
    pad = int(((width / height) * h - w) / 2.0)
    canvas = np.full((h, w + 2 * pad, 3), 255, np.uint8)
    canvas[:, pad:pad + w] = img
  return _resize(canvas, height, width)


def pad_to_square_white(img: np.ndarray, size: int = CLIP_PAD_SIZE) -> np.ndarray:
  """uint8 (h, w, 3) → (size, size, 3) with white padding: every reference's CLIP branch."""
  return fit_subject(img, size, size)


def crop_background(img: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 (h, w, 3) → (height, width, 3): center crop to the target aspect ratio, then a bicubic
  resize. The background reference of the VAE branch."""
  img = _check(img)
  h, w, _ = img.shape
  if h / w < height / width:  # too wide: keep the middle columns
    crop = int(h / height * width)
    left = (w - crop) // 2
    img = img[:, left:left + crop]
  else:
    crop = int(w / width * height)
    top = (h - crop) // 2
    img = img[top:top + crop]
  return _resize(img, height, width)


def to_vae_pixels(img: np.ndarray) -> np.ndarray:
  """uint8 (..., H, W, 3) → float32 in [−1, 1] (x / 255 · 2 − 1, as diffusers' VideoProcessor)."""
  return np.asarray(img, np.float32) / 255.0 * 2.0 - 1.0


def _size_pair(value: Any, key: str) -> tuple[int, int]:
  if isinstance(value, int):
    return value, value
  if isinstance(value, dict) and set(value) == {"height", "width"}:
    return int(value["height"]), int(value["width"])
  raise ConfigError(f"{PREPROCESSOR_CONFIG}: {key} = {value!r}: expected an int or "
                    "{'height': …, 'width': …}")


@dataclasses.dataclass(frozen=True)
class ClipImageProcessor:
  """transformers' `CLIPImageProcessor` (PIL backend), channels-last, numpy only.

  Defaults are the release's settings; `from_folder` / `from_dict` read them from
  `preprocessor_config.json`. Either `shortest_edge` (resize the short side, keep the aspect ratio)
  or `size` (height, width) sets the resize.
  """

  do_resize: bool = True
  shortest_edge: int | None = 224
  size: tuple[int, int] | None = None
  resample: int = int(Image.Resampling.BICUBIC)
  do_center_crop: bool = True
  crop_size: tuple[int, int] = (224, 224)
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
  image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

  # Keys of preprocessor_config.json that do not change the result here: the output is always RGB
  # (the encoder takes 3 channels), and the rest is bookkeeping.
  IGNORED_KEYS = frozenset({"do_convert_rgb", "image_processor_type", "feature_extractor_type",
                            "processor_class", "_processor_class", "default_to_square"})

  @classmethod
  def from_dict(cls, raw: dict[str, Any]) -> "ClipImageProcessor":
    """From the dict of a `preprocessor_config.json` (old int sizes accepted)."""
    unknown = sorted(set(raw) - cls.IGNORED_KEYS - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ConfigError(f"{PREPROCESSOR_CONFIG}: unsupported key {unknown[0]!r}; a2jax reads "
                        "CLIPImageProcessor settings only")
    kept = {k: v for k, v in raw.items() if k not in cls.IGNORED_KEYS}
    size = kept.pop("size", {"shortest_edge": cls.shortest_edge})
    if isinstance(size, int) or (isinstance(size, dict) and set(size) == {"shortest_edge"}):
      # An int size means the short side (transformers' default_to_square=False for CLIP).
      kept["shortest_edge"], kept["size"] = (size if isinstance(size, int) else size["shortest_edge"]), None
    else:
      kept["shortest_edge"], kept["size"] = None, _size_pair(size, "size")
    if "crop_size" in kept:
      kept["crop_size"] = _size_pair(kept["crop_size"], "crop_size")
    for key in ("image_mean", "image_std"):
      if key in kept:
        value = kept[key]
        kept[key] = tuple(float(v) for v in (value if isinstance(value, list) else [value] * 3))
    return cls(**kept)

  @classmethod
  def from_folder(cls, path: str | os.PathLike) -> "ClipImageProcessor":
    """From `<path>/preprocessor_config.json` (the release's `image_processor/`, copied beside
    converted weights), or from that file's path."""
    path = pathlib.Path(path)
    file = path / PREPROCESSOR_CONFIG if path.is_dir() else path
    if not file.is_file():
      raise ConfigError(f"{file} does not exist: pass the release's image_processor/ folder")
    return cls.from_dict(json.loads(file.read_text()))

  def output_size(self, height: int, width: int) -> tuple[int, int]:
    """(height, width) after the resize, with transformers' integer truncation."""
    if self.size is not None:
      return self.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(self.shortest_edge * long / short)
    return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)

  def preprocess_one(self, image: Image.Image | np.ndarray) -> np.ndarray:
    """One image (PIL or uint8 array, any mode) → float32 (crop_h, crop_w, 3)."""
    img = to_rgb(image)
    if self.do_resize:
      img = _resize(img, *self.output_size(*img.shape[:2]), resample=Image.Resampling(self.resample))
    if self.do_center_crop:
      (h, w), (ch, cw) = img.shape[:2], self.crop_size
      top, left = (h - ch) // 2, (w - cw) // 2
      if top < 0 or left < 0:
        raise InputError(f"image of {h}×{w} after resizing is smaller than the {ch}×{cw} crop: "
                         "resize it to at least the crop size")
      img = img[top:top + ch, left:left + cw]
    # transformers rescales in float64 and casts to float32, then normalises in float32.
    out = (img.astype(np.float64) * self.rescale_factor if self.do_rescale else img).astype(np.float32)
    if self.do_normalize:
      out = (out - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
    return out

  def __call__(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
    """Images → float32 (N, crop_h, crop_w, 3), channels-last (the CLIPVisionEncoder input)."""
    return np.stack([self.preprocess_one(image) for image in images])


def clip_reference_pixels(references: Sequence[np.ndarray], processor: ClipImageProcessor,
                          pad_size: int = CLIP_PAD_SIZE) -> np.ndarray:
  """The release's CLIP branch for N references: white-padded 512² squares, then CLIP
  preprocessing → float32 (N, 224, 224, 3), in reference order."""
  return processor([pad_to_square_white(r, pad_size) for r in references])
