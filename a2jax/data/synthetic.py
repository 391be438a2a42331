"""Synthetic elements-to-video data: the TFDS builder `synthetic_elements`, where the truth is known.

Each clip is a procedural background (gradient, stripes, checks or a smooth noise texture, in one
of several muted colours) with one or two elements (circle, square, triangle, star, ring; solid or
striped; small or large; saturated colours) moving in straight lines, and a caption that names
each element, its colour and its motion:

    "a small red star moves left and a large blue striped ring moves right across a gray
     checkered background"

The references are each element alone on white at its size in the video (W×H canvas), then the
background alone: the A2 conditioning order. Everything is a function of a `Clip` spec (stored as
JSON with every example), so `render_frames(clip)` reproduces the video exactly and the evaluation
(`a2jax.eval.fidelity`) knows every element's colour, shape and path.

Motion: an element crosses the frame along its lane, from one margin to the other over the clip
(linear). One element moves on the middle lane; two move along the same axis on the lanes at 1/4
and 3/4 of the other axis, so they never overlap.

Splits: `train` and `heldout`. An (element, background) pair — element = (shape, colour),
background = (kind, colour) — is held out by a seeded hash; every pair of a `heldout` clip is held
out and every pair of a `train` clip is not, so held-out clips compose elements and backgrounds
never seen together in training (each one alone is seen: the held-out share of pairs is small).

```bash
python -m a2jax.data.synthetic --data-dir DATA [--config demo] [--export-triplets DIR]
```
(the libraries' log records, TFDS's and absl's, are appended to DATA/synthetic_elements.log).
Stored per clip (no TensorFlow needed): name, caption, `spec` (the Clip as JSON), the frames as
PNG bytes (lossless), frame count / fps / size, and the references as PNG bytes with their roles
(the features of `a2jax.data.triplets`, with PNG frames instead of mp4). `export_triplets` writes
a split in the triplet manifest format (mp4 + PNG + JSONL) for `python -m a2jax.data.triplets`;
`encoder_example` turns a record into what `a2jax.data.encode.Encoder` consumes, losslessly.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pathlib
import zlib
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from a2jax import conditioning, preprocess, video
from a2jax import logs
from a2jax.errors import InputError
from a2jax.runner import run_main

SHAPES = ("circle", "square", "triangle", "star", "ring")
# Saturated element colours; backgrounds use their own muted palette (distinct names and tones).
COLOURS = {"red": (225, 35, 35), "orange": (250, 140, 0), "yellow": (245, 225, 20),
           "green": (30, 185, 50), "cyan": (0, 215, 230), "blue": (35, 70, 235),
           "purple": (150, 40, 210), "pink": (255, 90, 200)}
BACKGROUND_KINDS = ("gradient", "striped", "checkered", "noisy")
BACKGROUND_COLOURS = {"gray": (140, 140, 140), "beige": (210, 195, 160), "brown": (130, 95, 70),
                      "teal": (70, 130, 125), "lavender": (175, 160, 205), "olive": (120, 125, 70)}
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SIZES = {"small": 0.28, "large": 0.38}      # diameter / min(H, W); two fit beside each other
PATTERNS = ("solid", "striped")
STRIPE_SHADE = 0.5                          # the stripes of a striped element: its colour × 0.5
MIN_CONTRAST = 70.0                         # RGB distance between any element tone and background
MARGIN = 0.04                               # of the frame, between an element and the border
SUPERSAMPLE = 4                             # anti-aliasing of the element edges
SPLITS = ("train", "heldout")
WHITE = (255, 255, 255)


# ---------------------------------------------------------------------------------------------
# Clip specs.


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


@dataclasses.dataclass(frozen=True)
class Element:
  shape: str
  colour: str
  pattern: str
  size: str
  direction: str

  @property
  def identity(self) -> str:
    """What the held-out split is keyed on: shape and colour."""
    return f"{self.colour} {self.shape}"

  @property
  def rgb(self) -> tuple[int, int, int]:
    return COLOURS[self.colour]

  @property
  def tones(self) -> list[tuple[int, int, int]]:
    """Every colour the element shows: its colour, and the stripe shade when striped."""
    main = np.asarray(self.rgb, np.float64)
    return [self.rgb] + ([tuple(int(v) for v in np.round(main * STRIPE_SHADE))]
                         if self.pattern == "striped" else [])

  @property
  def phrase(self) -> str:
    pattern = "striped " if self.pattern == "striped" else ""
    return f"a {self.size} {self.colour} {pattern}{self.shape} moves {self.direction}"


@dataclasses.dataclass(frozen=True)
class Background:
  kind: str
  colour: str
  orientation: str = "horizontal"   # gradient / stripes: horizontal, vertical, diagonal
  period: int = 8                    # stripes and checks: pixels at 64×64, scaled up with the frame
  seed: int = 0                      # noise texture

  @property
  def identity(self) -> str:
    return f"{self.colour} {self.kind}"

  @property
  def phrase(self) -> str:
    return f"{_article(self.colour)} {self.colour} {self.kind} background"


@dataclasses.dataclass(frozen=True)
class Clip:
  """Everything about one clip; JSON round-trips through `to_json` / `from_json`."""

  frames: int
  height: int
  width: int
  fps: int
  background: Background
  elements: tuple[Element, ...]

  @property
  def caption(self) -> str:
    return " and ".join(e.phrase for e in self.elements) + f" across {self.background.phrase}"

  def diameter(self, k: int) -> float:
    return SIZES[self.elements[k].size] * min(self.height, self.width)

  def path(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) centre (x, y) in pixels of element k (pixel centres at integer + 0.5)."""
    e, n = self.elements[k], len(self.elements)
    dx, dy = DIRECTIONS[e.direction]
    r = self.diameter(k) / 2
    lane = 0.5 if n == 1 else 0.25 + 0.5 * k / (n - 1)
    if dy == 0:   # horizontal motion on a horizontal lane
      lane = self.height * lane
      lo, hi = MARGIN * self.width + r, self.width * (1 - MARGIN) - r
      xs = (lo, hi) if dx > 0 else (hi, lo)
      return np.array([xs[0], lane]), np.array([xs[1], lane])
    lane = self.width * lane
    lo, hi = MARGIN * self.height + r, self.height * (1 - MARGIN) - r
    ys = (lo, hi) if dy > 0 else (hi, lo)
    return np.array([lane, ys[0]]), np.array([lane, ys[1]])

  def centres(self, k: int) -> np.ndarray:
    """(frames, 2) centre (x, y) of element k in every frame: linear from start to end."""
    start, end = self.path(k)
    s = np.linspace(0.0, 1.0, self.frames)[:, None]
    return (1 - s) * start + s * end

  def speed(self, k: int) -> float:
    """Pixels per frame of element k."""
    start, end = self.path(k)
    return float(np.linalg.norm(end - start) / max(self.frames - 1, 1))

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str | bytes) -> "Clip":
    raw = json.loads(text)
    return cls(**{**raw, "background": Background(**raw["background"]),
                  "elements": tuple(Element(**e) for e in raw["elements"])})


def vocabulary() -> list[str]:
  """Every word a caption can use (a tokenizer built from it covers every clip)."""
  return sorted({"a", "an", "and", "across", "background", "moves", "striped", *SIZES, *COLOURS,
                 *SHAPES, *DIRECTIONS, *BACKGROUND_COLOURS, *BACKGROUND_KINDS})


# ---------------------------------------------------------------------------------------------
# Rendering (numpy + PIL; uint8 RGB).


def _tone(rgb: Sequence[float], factor: float) -> np.ndarray:
  return np.clip(np.asarray(rgb, np.float64) * factor, 0, 255)


def render_background(bg: Background, height: int, width: int) -> np.ndarray:
  """uint8 (H, W, 3): the background alone (static over the clip)."""
  base = np.asarray(BACKGROUND_COLOURS[bg.colour], np.float64)
  y, x = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
  scale = max(min(height, width) / 64, 1.0)   # smaller frames keep stripes a VAE can draw
  along = {"horizontal": x / width, "vertical": y / height,
           "diagonal": (x / width + y / height) / 2}[bg.orientation]
  if bg.kind == "gradient":
    t = along[..., None]
    image = (1 - t) * _tone(base, 1.2) + t * _tone(base, 0.7)
  elif bg.kind == "striped":
    coord = {"horizontal": x, "vertical": y, "diagonal": (x + y) / np.sqrt(2)}[bg.orientation]
    dark = (np.floor(coord / (bg.period * scale / 2)) % 2).astype(bool)
    image = np.where(dark[..., None], _tone(base, 0.75), base)
  elif bg.kind == "checkered":
    cell = bg.period * scale
    dark = ((np.floor(x / cell) + np.floor(y / cell)) % 2).astype(bool)
    image = np.where(dark[..., None], _tone(base, 0.78), base)
  elif bg.kind == "noisy":
    # A smooth luminance texture: coarse Gaussian noise, bicubically upsampled, ±18% of the colour.
    rng = np.random.default_rng(bg.seed)
    coarse = rng.standard_normal((max(height // 8, 2), max(width // 8, 2))).astype(np.float32)
    fine = np.asarray(Image.fromarray(coarse).resize((width, height),
                                                                Image.Resampling.BICUBIC))
    image = base * (1 + 0.18 * np.clip(fine, -2.0, 2.0)[..., None] / 2)
  else:
    raise InputError(f"background kind {bg.kind!r} is not one of {list(BACKGROUND_KINDS)}")
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
  if shape == "square":
    a = 0.8 * r
    return [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
  if shape == "triangle":   # equilateral, pointing up, circumradius r
    angles = np.deg2rad([-90, 30, 150])
  elif shape == "star":     # five points, inner radius 0.45 r
    angles = np.deg2rad(-90 + 36 * np.arange(10))
  else:
    raise InputError(f"shape {shape!r} is not one of {list(SHAPES)}")
  radii = np.where(np.arange(len(angles)) % 2, 0.45 * r, r) if shape == "star" else np.full(3, r)
  return list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))


def shape_coverage(shape: str, centre: Sequence[float], diameter: float, height: int,
                   width: int) -> np.ndarray:
  """float32 (H, W) in [0, 1]: the share of each pixel covered by `shape` centred at (x, y)."""
  s = SUPERSAMPLE
  canvas = Image.new("L", (width * s, height * s), 0)
  draw = ImageDraw.Draw(canvas)
  cx, cy, r = centre[0] * s, centre[1] * s, diameter * s / 2
  if shape in ("circle", "ring"):
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    if shape == "ring":
      ri = 0.55 * r
      draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
  else:
    draw.polygon(_polygon(shape, cx, cy, r), fill=255)
  small = canvas.resize((width, height), Image.Resampling.BOX)
  return np.asarray(small, np.float32) / 255.0


def _fill(element: Element, centre: Sequence[float], diameter: float, height: int,
          width: int) -> np.ndarray:
  """float (H, W, 3): the element's paint (its colour, with shade stripes moving with it)."""
  tones = np.asarray(element.tones, np.float64)
  if element.pattern == "solid":
    return np.broadcast_to(tones[0], (height, width, 3))
  y, x = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
  u = (x - centre[0]) - (y - centre[1])          # stripes at 45°, fixed to the element
  stripe = (np.floor(u / max(diameter / 5, 1.0)) % 2).astype(bool)
  return np.where(stripe[..., None], tones[1], tones[0])


def _paint(image: np.ndarray, element: Element, centre: Sequence[float], diameter: float) -> None:
  h, w, _ = image.shape
  alpha = shape_coverage(element.shape, centre, diameter, h, w)[..., None]
  image[...] = (1 - alpha) * image + alpha * _fill(element, centre, diameter, h, w)


def render_frames(clip: Clip) -> np.ndarray:
  """uint8 (F, H, W, 3): the video."""
  bg = render_background(clip.background, clip.height, clip.width).astype(np.float64)
  centres = [clip.centres(k) for k in range(len(clip.elements))]
  frames = np.empty((clip.frames, clip.height, clip.width, 3), np.uint8)
  for t in range(clip.frames):
    image = bg.copy()
    for k, element in enumerate(clip.elements):
      _paint(image, element, centres[k][t], clip.diameter(k))
    frames[t] = np.clip(np.round(image), 0, 255).astype(np.uint8)
  return frames


def render_reference(clip: Clip, k: int) -> np.ndarray:
  """uint8 (H, W, 3): element k alone on white, centred, at its size in the video."""
  image = np.full((clip.height, clip.width, 3), 255.0)
  _paint(image, clip.elements[k], (clip.width / 2, clip.height / 2), clip.diameter(k))
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def render_references(clip: Clip) -> list[np.ndarray]:
  """The references in conditioning order: each element on white, then the background."""
  return ([render_reference(clip, k) for k in range(len(clip.elements))]
          + [render_background(clip.background, clip.height, clip.width)])


# ---------------------------------------------------------------------------------------------
# Sampling clips and the held-out split.


def heldout_pair(element: Element, background: Background, fraction: float, seed: int) -> bool:
  """Whether the (element identity, background identity) pair belongs to the held-out split."""
  key = f"{seed}|{element.identity}|{background.identity}".encode()
  return zlib.crc32(key) % 10_000 < fraction * 10_000


def contrast(element: Element, background_pixels: np.ndarray) -> float:
  """Smallest RGB distance between the element's tones and any background pixel."""
  pixels = background_pixels.reshape(-1, 3).astype(np.float64)
  return min(float(np.min(np.linalg.norm(pixels - np.asarray(t, np.float64), axis=1)))
             for t in element.tones)


def _distinct(a: Element, b: Element) -> bool:
  """Two elements of a clip are told apart by colour: every tone of one far from the other's."""
  return a.colour != b.colour and all(
      np.linalg.norm(np.subtract(ta, tb, dtype=np.float64)) >= MIN_CONTRAST
      for ta in a.tones for tb in b.tones)


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """A variant of the dataset: clip size, element counts, patterns, split sizes, seed."""

  frames: int = 33
  height: int = 128
  width: int = 128
  fps: int = 8
  min_elements: int = 1
  max_elements: int = 2
  patterns: tuple[str, ...] = PATTERNS
  train_examples: int = 2000
  heldout_examples: int = 200
  heldout_fraction: float = 0.15
  seed: int = 0

  def __post_init__(self):
    video.latent_frames(self.frames)
    if self.height % 16 or self.width % 16 or min(self.height, self.width) < 32:
      raise InputError(f"{self.height}×{self.width}: use multiples of 16, at least 32")
    if not 1 <= self.min_elements <= self.max_elements <= 2:
      raise InputError(f"elements {self.min_elements}…{self.max_elements}: one or two per clip")
    conditioning.check_reference_count(self.max_elements + 1, self.frames)
    if not self.patterns or set(self.patterns) - set(PATTERNS):
      raise InputError(f"patterns {self.patterns}: a non-empty subset of {list(PATTERNS)}")
    if not 0 < self.heldout_fraction < 1:
      raise InputError(f"heldout_fraction = {self.heldout_fraction} must be in (0, 1)")


def sample_clip(cfg: SyntheticConfig, split: str, index: int) -> Clip:
  """Clip `index` of `split`: a function of (cfg.seed, split, index) only.

  Elements and background are drawn until every (element, background) pair is on the split's
  side of the held-out partition, every element tone contrasts with every background pixel, and
  two elements differ in colour.
  """
  if split not in SPLITS:
    raise InputError(f"split {split!r} is not one of {list(SPLITS)}")
  heldout = split == "heldout"
  rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
  n = int(rng.integers(cfg.min_elements, cfg.max_elements + 1))
  for _ in range(10_000):
    bg = Background(
        kind=str(rng.choice(BACKGROUND_KINDS)), colour=str(rng.choice(list(BACKGROUND_COLOURS))),
        orientation=str(rng.choice(("horizontal", "vertical", "diagonal"))),
        period=int(rng.choice((8, 12, 16))), seed=int(rng.integers(1 << 31)))
    pixels = render_background(bg, cfg.height, cfg.width)
    horizontal = bool(rng.integers(2))
    elements: list[Element] = []
    for _ in range(200):
      if len(elements) == n:
        break
      e = Element(shape=str(rng.choice(SHAPES)), colour=str(rng.choice(list(COLOURS))),
                  pattern=str(rng.choice(cfg.patterns)), size=str(rng.choice(list(SIZES))),
                  direction=str(rng.choice(("left", "right") if horizontal else ("up", "down"))))
      if (heldout_pair(e, bg, cfg.heldout_fraction, cfg.seed) == heldout
          and contrast(e, pixels) >= MIN_CONTRAST and all(_distinct(e, o) for o in elements)):
        elements.append(e)
    if len(elements) == n:
      return Clip(cfg.frames, cfg.height, cfg.width, cfg.fps, bg, tuple(elements))
  raise InputError(f"no {split} clip found for {cfg.name}: raise heldout_fraction")


# ---------------------------------------------------------------------------------------------
# The TFDS builder.


def encode_png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"))


def example(clip: Clip, name: str) -> dict[str, Any]:
  """The stored features of one clip."""
  refs = render_references(clip)
  return {"name": name, "caption": clip.caption, "spec": clip.to_json(),
          "frames": [encode_png(f) for f in render_frames(clip)],
          "num_frames": clip.frames, "fps": float(clip.fps), "height": clip.height,
          "width": clip.width,
          "references": {"image": [encode_png(r) for r in refs],
                         "role": ["object"] * len(clip.elements) + ["background"]}}


class SyntheticElements(tfds.core.GeneratorBasedBuilder):
  """Synthetic elements-to-video clips (module docstring). Written as ArrayRecord.

  `SyntheticElements(config="demo", data_dir=…).download_and_prepare()` builds; the same call
  without `download_and_prepare` opens it (`as_data_source()["train" | "heldout"]`).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "PNG frames, caption, JSON spec, PNG references with roles."}
  BUILDER_CONFIGS = [
      SyntheticConfig(name="default", description="33 frames of 128×128, one or two elements"),
      SyntheticConfig(name="demo", frames=17, height=32, width=32, min_elements=1, max_elements=1,
                      patterns=("solid",), train_examples=320, heldout_examples=16,
                      description="make demo: 17 frames of 32×32, one solid element"),
  ]
  DEFAULT_CONFIG_NAME = "default"
  code_path = pathlib.Path(__file__)   # see a2jax.data.triplets.Triplets

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    blob = tfds.features.Tensor(shape=(), dtype=np.object_)
    return tfds.core.DatasetInfo(
        builder=self,
        description="Procedural elements-to-video clips with known truth (a2jax.data.synthetic).",
        features=tfds.features.FeaturesDict({
            "name": tfds.features.Text(),
            "caption": tfds.features.Text(),
            "spec": tfds.features.Text(),                 # Clip JSON
            "frames": tfds.features.Sequence(blob),        # PNG bytes per frame
            "num_frames": tfds.features.Tensor(shape=(), dtype=np.int32),
            "fps": tfds.features.Tensor(shape=(), dtype=np.float32),
            "height": tfds.features.Tensor(shape=(), dtype=np.int32),
            "width": tfds.features.Tensor(shape=(), dtype=np.int32),
            "references": tfds.features.Sequence({"image": blob, "role": tfds.features.Text()}),
        }),
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    counts = {"train": cfg.train_examples, "heldout": cfg.heldout_examples}
    return {split: self._generate_examples(split, n) for split, n in counts.items()}

  def _generate_examples(self, split: str, count: int) -> Iterator[tuple[str, dict]]:
    for i in range(count):
      name = f"{split}_{i:06d}"
      yield name, example(sample_clip(self.builder_config, split, i), name)


def builder(data_dir: str | os.PathLike, config: str | SyntheticConfig = "demo") -> SyntheticElements:
  return SyntheticElements(config=config, data_dir=os.fspath(data_dir))


def build(data_dir: str | os.PathLike, config: str | SyntheticConfig = "demo",
          verbose: bool = True) -> SyntheticElements:
  """Builds the dataset under `data_dir` (or reuses a complete build); returns the builder."""
  b = builder(data_dir, config)
  if b.is_prepared():
    if verbose:
      print(f"{b.data_dir} already exists: reusing it (delete it to rebuild)")
    return b
  with logs.quiet_tfds():
    b.download_and_prepare()
  if verbose:
    print(f"{b.data_dir}: " + ", ".join(f"{s} {b.info.splits[s].num_examples}" for s in SPLITS))
  return b


def open_dataset(data_dir: str | os.PathLike, config: str | SyntheticConfig = "demo"):
  """The built dataset of `config` (a name, or a SyntheticConfig) under `data_dir`, read from its
  own metadata, so a custom config opens by name too."""
  name = config if isinstance(config, str) else config.name
  path = pathlib.Path(data_dir, SyntheticElements.name, name, str(SyntheticElements.VERSION))
  if not (path / "dataset_info.json").is_file():
    raise InputError(f"no built synthetic_elements/{name} under {data_dir}: run python -m "
                     f"a2jax.data.synthetic --data-dir {data_dir} --config {name} first")
  return tfds.builder_from_directory(os.fspath(path))


def _text(value: Any) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def record_clip(record: dict[str, Any]) -> Clip:
  return Clip.from_json(_text(record["spec"]))


def record_frames(record: dict[str, Any]) -> np.ndarray:
  """uint8 (F, H, W, 3) of a stored record."""
  return np.stack([decode_png(b) for b in record["frames"]])


def record_references(record: dict[str, Any]) -> list[np.ndarray]:
  return [decode_png(b) for b in record["references"]["image"]]


def encoder_example(record: dict[str, Any], clip_processor: preprocess.ClipImageProcessor
                    ) -> dict[str, Any]:
  """A stored record → the example `a2jax.data.encode.Encoder` takes (as the triplet pipeline's
  `decode_example` builds it, without an mp4 round trip): video (F, H, W, 3) in [−1, 1],
  references (N, H, W, 3) in [−1, 1] (`conditioning.reference_pixels`), clip pixels, caption."""
  refs = record_references(record)
  h, w = int(record["height"]), int(record["width"])
  return {"video": preprocess.to_vae_pixels(record_frames(record)),
          "references": conditioning.reference_pixels(refs[:-1], refs[-1], h, w),
          "clip": preprocess.clip_reference_pixels(refs, clip_processor),
          "caption": _text(record["caption"]), "name": _text(record["name"])}


def export_triplets(data_dir: str | os.PathLike, dst: str | os.PathLike, *,
                    config: str | SyntheticConfig = "demo", splits: Sequence[str] = SPLITS) -> None:
  """Writes splits in the triplet manifest format (`a2jax.data.triplets`): clips/<name>.mp4,
  refs/<name>_<k>.png and <split>.jsonl, for `python -m a2jax.data.triplets --src DST`."""
  b = open_dataset(data_dir, config)
  dst = pathlib.Path(dst)
  (dst / "clips").mkdir(parents=True, exist_ok=True)
  (dst / "refs").mkdir(exist_ok=True)
  for split in splits:
    lines = []
    for record in b.as_data_source()[split]:
      name = _text(record["name"])
      video.write_mp4(dst / "clips" / f"{name}.mp4", record_frames(record), int(record["fps"]))
      refs = []
      for k, (data, role) in enumerate(zip(record["references"]["image"],
                                           record["references"]["role"])):
        (dst / "refs" / f"{name}_{k}.png").write_bytes(data)
        refs.append({"image": f"refs/{name}_{k}.png", "role": _text(role)})
      lines.append(json.dumps({"name": name, "video": f"clips/{name}.mp4",
                               "caption": _text(record["caption"]), "references": refs}))
    (dst / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data-dir", required=True, help="where the TFDS dataset is written")
  parser.add_argument("--config", default="demo",
                      choices=[c.name for c in SyntheticElements.BUILDER_CONFIGS])
  parser.add_argument("--export-triplets", default=None, metavar="DIR",
                      help="also write both splits in the triplet manifest format to DIR")
  args = parser.parse_args(argv)
  with logs.to_file(pathlib.Path(args.data_dir, f"{SyntheticElements.name}.log")):
    build(args.data_dir, args.config)
    if args.export_triplets:
      export_triplets(args.data_dir, args.export_triplets, config=args.config)
      print(f"triplet manifests in {args.export_triplets}: python -m a2jax.data.triplets --src "
            f"{args.export_triplets} --data-dir …")


if __name__ == "__main__":
  raise SystemExit(run_main(main))
