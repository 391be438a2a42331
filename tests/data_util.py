"""A generated folder of tiny triplets (mp4 clips, reference images, a manifest) for the data tests."""

import json
import pathlib

import numpy as np
from PIL import Image

from a2jax.video import write_mp4


def clip_frames(i: int, n: int) -> np.ndarray:
  """A moving gradient: frames differ (so the frame sampling is visible) and survive H.264."""
  y, x = np.mgrid[:48, :64]
  t = np.arange(n)[:, None, None]
  base = (x[None] * 3 + y[None] * 2 + 12 * t + 40 * i) % 256
  return np.stack([base, np.roll(base, 7, -1), 255 - base], -1).astype(np.uint8)


def make_source(src: pathlib.Path) -> pathlib.Path:
  """Five good clips (four with 2 references, one with 1) and seven bad records of each kind."""
  (src / "clips").mkdir(parents=True)
  (src / "refs").mkdir()
  rng = np.random.default_rng(0)
  for i in range(5):
    write_mp4(src / f"clips/c{i}.mp4", clip_frames(i, 12 + 2 * i), fps=8)
  write_mp4(src / "clips/short.mp4", clip_frames(9, 5), fps=8)
  (src / "clips/broken.mp4").write_bytes(b"not an mp4" * 40)
  Image.fromarray(rng.integers(0, 255, (30, 20, 3), np.uint8)).save(src / "refs/man.png")
  Image.fromarray(rng.integers(0, 255, (40, 60, 3), np.uint8)).save(src / "refs/forest.jpg")
  rgba = rng.integers(0, 255, (24, 24, 4), np.uint8)
  rgba[:, :12, 3] = 0   # half transparent: composited on white
  Image.fromarray(rgba).save(src / "refs/bear.png")
  mask = np.zeros((48, 64), np.uint8)
  mask[10:20, 5:30] = 255
  Image.fromarray(mask).save(src / "refs/dog_mask.png")
  man = {"image": "refs/man.png", "role": "subject"}
  lines = [
      {"video": "clips/c0.mp4", "caption": "zero",
       "references": [{"image": "refs/forest.jpg", "role": "background"}, man]},
      {"video": "clips/c1.mp4", "caption": "one",
       "references": [{"frame": 3, "role": "object", "mask": "refs/dog_mask.png"},
                      {"image": "refs/bear.png", "role": "object", "box": [2, 3, 15, 20]}]},
      {"video": "clips/c2.mp4", "caption": "two", "references": [man]},
      {"video": "clips/c3.mp4", "caption": "three", "name": "third",
       "references": [man, {"image": "refs/bear.png", "role": "object"}]},
      {"video": "clips/c4.mp4", "caption": "four",
       "references": [man, {"image": "refs/forest.jpg", "role": "background"}]},
      {"video": "clips/short.mp4", "caption": "short", "references": [man]},
      {"video": "clips/broken.mp4", "caption": "broken", "references": [man]},
      {"video": "clips/gone.mp4", "caption": "gone", "references": [man]},
      {"video": "clips/c0.mp4", "caption": "lost ref", "name": "lost",
       "references": [{"image": "refs/nope.png", "role": "subject"}]},
      {"video": "clips/c0.mp4", "caption": "bad box", "name": "badbox",
       "references": [{"image": "refs/man.png", "role": "subject", "box": [0, 0, 99, 5]}]},
      {"video": "clips/c0.mp4", "caption": "no refs", "name": "norefs", "references": []},
  ]
  text = "\n".join(json.dumps(line) for line in lines) + "\n{not json\n"
  (src / "train.jsonl").write_text(text)
  return src


def write_reference_pictures(root: pathlib.Path, seed: int, forest: str = "forest.png") -> pathlib.Path:
  """Random references in three layouts: man.png (RGB), bear.png (RGBA), `forest` (grayscale)."""
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(root / "man.png")
  Image.fromarray(rng.integers(0, 256, (36, 50, 4), dtype=np.uint8)).save(root / "bear.png")
  Image.fromarray(rng.integers(0, 256, (60, 90), dtype=np.uint8)).save(root / forest)
  return root
