"""Reference-image preprocessing: image loading, the release's pad / crop layouts, VAE pixels, and
CLIP preprocessing against transformers' `CLIPImageProcessor` (PIL backend).

Tolerance: CLIP pixels within 1/255 of transformers' in [0, 1] units (|Δ|·std ≤ 1/255 after
normalisation).
"""

import json

import numpy as np
import pytest
import transformers
from PIL import Image

from a2jax import preprocess
from a2jax.errors import ConfigError, InputError

RNG = np.random.default_rng(0)


def noise(h, w, c):
  return RNG.integers(0, 256, size=(h, w, c) if c else (h, w), dtype=np.uint8)


def sample_images():
  """PIL images of odd sizes and aspect ratios, in RGB, RGBA, LA, L and transparent-palette modes."""
  palette = Image.fromarray(noise(61, 45, 0) // 16).convert("P")
  palette.info["transparency"] = 3
  return [
      Image.fromarray(noise(37, 91, 3)),                  # wide, upsampled
      Image.fromarray(noise(301, 199, 4), "RGBA"),        # tall, alpha of every value
      Image.fromarray(noise(513, 257, 0), "L"),           # grayscale
      Image.fromarray(noise(224, 224, 3)),                # exactly the size
      Image.fromarray(noise(97, 1003, 2), "LA"),          # very wide, gray + alpha
      palette,                                            # palette with a transparent colour
  ]


@pytest.fixture(scope="module")
def release_processor(tmp_path_factory):
  """The ViT-H CLIPImageProcessor as the release saves it, and a2jax's read from the same file."""
  folder = tmp_path_factory.mktemp("image_processor")
  ref = transformers.CLIPImageProcessor(size={"shortest_edge": 224},
                                        crop_size={"height": 224, "width": 224})
  ref.save_pretrained(folder)
  return ref, preprocess.ClipImageProcessor.from_folder(folder)


def clip_pixel_err(got, ref, processor) -> float:
  """max |Δ| in [0, 1] pixel units."""
  return float(np.max(np.abs(got - ref) * np.asarray(processor.image_std)))


def test_clip_processor_matches_transformers(release_processor):
  ref, ours = release_processor
  assert ours == preprocess.ClipImageProcessor()  # the file holds the release's settings
  images = sample_images()
  expected = ref(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  got = ours(images)
  assert got.shape == (len(images), 224, 224, 3) and got.dtype == np.float32
  assert clip_pixel_err(got, expected, ours) <= 1 / 255


def test_clip_processor_other_settings(tmp_path):
  """Non-default settings are read from the file: exact size, another crop, bilinear, int sizes."""
  images = sample_images()[:3]
  for kwargs in (dict(size={"height": 50, "width": 70}, crop_size={"height": 40, "width": 64},
                      resample=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
                 dict(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30},
                      do_normalize=False)):
    ref = transformers.CLIPImageProcessor(**kwargs)
    ref.save_pretrained(tmp_path)
    ours = preprocess.ClipImageProcessor.from_folder(tmp_path)
    expected = ref(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    assert clip_pixel_err(ours(images), expected, ours) <= 1 / 255
  legacy = json.loads((tmp_path / preprocess.PREPROCESSOR_CONFIG).read_text())
  legacy.update(size=224, crop_size=224, feature_extractor_type="CLIPFeatureExtractor")
  assert preprocess.ClipImageProcessor.from_dict(legacy).shortest_edge == 224
  with pytest.raises(ConfigError, match="unsupported key 'do_pad'"):
    preprocess.ClipImageProcessor.from_dict({**legacy, "do_pad": True})
  with pytest.raises(ConfigError, match="does not exist"):
    preprocess.ClipImageProcessor.from_folder(tmp_path / "nowhere")


def test_clip_reference_pixels(release_processor):
  ref, ours = release_processor
  refs = [preprocess.to_rgb(image) for image in sample_images()[:3]]
  got = preprocess.clip_reference_pixels(refs, ours)
  squares = [Image.fromarray(preprocess.pad_to_square_white(r)) for r in refs]
  assert all(s.size == (512, 512) for s in squares)
  expected = ref(images=squares, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  assert got.shape == (3, 224, 224, 3)
  assert clip_pixel_err(got, expected, ours) <= 1 / 255


def test_load_image_modes(tmp_path):
  rgba = np.zeros((5, 7, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:, :3, 3] = 255  # opaque red-ish on the left, fully transparent on the right
  Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
  gray = noise(9, 4, 0)
  Image.fromarray(gray, "L").save(tmp_path / "gray.png")
  rgb = noise(6, 11, 3)
  Image.fromarray(rgb).save(tmp_path / "rgb.png")

  img = preprocess.load_image(tmp_path / "rgba.png")
  assert img.shape == (5, 7, 3) and img.dtype == np.uint8
  np.testing.assert_array_equal(img[:, :3], np.broadcast_to([200, 0, 0], (5, 3, 3)))
  np.testing.assert_array_equal(img[:, 3:], 255)  # transparent → white
  img = preprocess.load_image(tmp_path / "gray.png")
  np.testing.assert_array_equal(img, np.repeat(gray[..., None], 3, axis=-1))
  np.testing.assert_array_equal(preprocess.load_image(tmp_path / "rgb.png"), rgb)
  (tmp_path / "bad.png").write_bytes(b"not an image")
  with pytest.raises(InputError, match="cannot read image"):
    preprocess.load_image(tmp_path / "bad.png")


def solid(h, w, color=(200, 0, 0)):
  return np.broadcast_to(np.asarray(color, np.uint8), (h, w, 3)).copy()


def test_fit_subject_pads_white_and_centres():
  # A wide subject into a square: white bands above and below, the subject in the middle.
  out = preprocess.pad_to_square_white(solid(50, 200), 100)
  assert out.shape == (100, 100, 3) and out.dtype == np.uint8
  assert (out[:30] == 255).all() and (out[-30:] == 255).all()
  np.testing.assert_array_equal(out[42:58], solid(16, 100))
  np.testing.assert_array_equal(out, out[::-1])  # centred: symmetric
  # A tall subject into a wide frame: bands left and right.
  out = preprocess.fit_subject(solid(300, 100), 48, 80)
  assert out.shape == (48, 80, 3)
  assert (out[:, :20] == 255).all() and (out[:, -20:] == 255).all()
  np.testing.assert_array_equal(out[:, 35:45], solid(48, 10))
  # The same aspect ratio: no padding, a plain bicubic resize.
  img = noise(60, 104, 3)
  np.testing.assert_array_equal(
      preprocess.fit_subject(img, 30, 52),
      np.asarray(Image.fromarray(img).resize((52, 30), Image.Resampling.BICUBIC)))


def test_crop_background_center_crops():
  columns = np.broadcast_to(np.arange(400, dtype=np.uint8)[None, :, None] // 2, (100, 400, 3)).copy()
  out = preprocess.crop_background(columns, 50, 50)  # keeps columns 150..249 (values 75..124)
  assert out.shape == (50, 50, 3)
  assert 74 <= out.min() and out.max() <= 125 and abs(out.mean() - 99.5) < 1
  rows = columns.transpose(1, 0, 2)  # tall: keeps rows 150..249
  out = preprocess.crop_background(rows, 30, 60)  # crop of int(100/60·30) = 50 rows
  assert out.shape == (30, 60, 3) and 86 <= out.min() and out.max() <= 113
  with pytest.raises(InputError, match="expected uint8"):
    preprocess.crop_background(columns.astype(np.float32), 50, 50)


def test_vae_pixels():
  px = preprocess.to_vae_pixels(np.array([[[0, 255, 51]]], np.uint8))
  assert px.dtype == np.float32
  np.testing.assert_allclose(px, [[[-1.0, 1.0, 51 / 255 * 2 - 1]]], rtol=0, atol=1e-7)
