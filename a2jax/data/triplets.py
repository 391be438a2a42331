"""TFDS builder of prompt–reference–video triplets from a folder, written as ArrayRecord.

Source folder: one JSONL manifest per split (`train.jsonl`, `validation.jsonl`, …; the file name
is the split name), one line per clip, paths relative to the folder:
```json
{"video": "clips/a.mp4", "caption": "A man holds a teddy bear in a forest.",
 "references": [{"image": "refs/a_man.png", "role": "subject"},
                {"image": "refs/bear.jpg", "role": "object", "box": [40, 10, 300, 330]},
                {"frame": 0, "role": "subject", "mask": "masks/a_dog.png"},
                {"image": "refs/forest.png", "role": "background"}]}
```
A reference is an image file or a frame of the clip (`"frame": k`). `"mask"` (a grayscale image of
the same size) whites out everything where the mask is dark and crops to the mask's extent;
`"box"` [x0, y0, x1, y1] (pixels, end exclusive) crops. Roles: subject, object, background (at
most one, always placed last, as sampling does). An optional `"name"` names the record (default:
the video path).

Stored per clip (TFDS `Image` / `Video` features need TensorFlow, so encoded bytes are stored and
decoded by the grain pipeline): the mp4 file's bytes, its frame count / fps / size, the caption,
each reference as PNG bytes (RGB, EXIF orientation applied, transparency on white) with its role.

Bad records (unreadable JSON, missing or unreadable video, too few frames, missing or unreadable
reference, an invalid reference entry, no references) are not written; each is named with its
reason in `bad_records.json` beside the data, counted in the dataset's metadata, and summarised on
stdout.

```bash
python -m a2jax.data.triplets --src SRC_DIR --data-dir DATA_DIR --min-frames 81
```
The libraries' log records (TFDS, absl, …) are appended to DATA_DIR/triplets.log (a2jax.logs).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pathlib
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from a2jax import preprocess
from a2jax import video as video_io
from a2jax import logs
from a2jax.errors import InputError
from a2jax.runner import run_main

ROLES = ("subject", "object", "background")
REPORT_FILE = "bad_records.json"
REASONS = ("bad_json", "missing_video", "unreadable_video", "too_few_frames", "no_references",
           "missing_reference", "unreadable_reference", "bad_reference")


class BadRecord(Exception):
  """A manifest line that cannot become a record: `reason` is one of REASONS."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason, self.detail = reason, detail


def encode_png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
  """Stored reference bytes → uint8 (H, W, 3) RGB."""
  with Image.open(io.BytesIO(data)) as image:
    return preprocess.to_rgb(image)


def _file(src: pathlib.Path, rel: Any, missing: str, what: str) -> pathlib.Path:
  if not isinstance(rel, str) or not rel:
    raise BadRecord("bad_reference" if missing == "missing_reference" else missing,
                    f"{what} must be a relative path, got {rel!r}")
  path = src / rel
  if not path.is_file():
    raise BadRecord(missing, f"{what} {rel} does not exist")
  return path


def _image(path: pathlib.Path) -> np.ndarray:
  try:
    return preprocess.load_image(path)
  except InputError as e:
    raise BadRecord("unreadable_reference", str(e)) from None


def cut_reference(image: np.ndarray, mask: np.ndarray | None, box: Any) -> np.ndarray:
  """uint8 (H, W, 3) → the reference: outside the mask (mask < 128) set to white and cropped to the
  mask's extent; then cropped to `box` [x0, y0, x1, y1] when given."""
  h, w, _ = image.shape
  if mask is not None:
    if mask.shape[:2] != (h, w):
      raise BadRecord("bad_reference", f"mask of {mask.shape[0]}×{mask.shape[1]} for an image of "
                                       f"{h}×{w}: use a mask of the image's size")
    inside = mask[..., 0] >= 128
    if not inside.any():
      raise BadRecord("bad_reference", "the mask is empty")
    image = np.where(inside[..., None], image, np.uint8(255))
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    if box is None:
      box = [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]
  if box is not None:
    if (not isinstance(box, (list, tuple)) or len(box) != 4
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in box)):
      raise BadRecord("bad_reference", f"box {box!r} must be four integers [x0, y0, x1, y1]")
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
      raise BadRecord("bad_reference", f"box {box} is empty or outside the {w}×{h} image")
    image = image[y0:y1, x0:x1]
  return np.ascontiguousarray(image)


def load_reference(ref: Any, src: pathlib.Path, video_path: pathlib.Path,
                   num_frames: int) -> tuple[np.ndarray, str]:
  """A manifest reference entry → (uint8 (H, W, 3) image, role); raises BadRecord."""
  if not isinstance(ref, dict):
    raise BadRecord("bad_reference", f"a reference must be an object, got {ref!r}")
  unknown = sorted(set(ref) - {"image", "frame", "role", "box", "mask"})
  role = ref.get("role")
  if unknown or role not in ROLES or ("image" in ref) == ("frame" in ref):
    raise BadRecord("bad_reference", f"{ref}: needs a role in {list(ROLES)} and exactly one of "
                                     f"'image' / 'frame' (unknown keys {unknown})")
  if "image" in ref:
    image = _image(_file(src, ref["image"], "missing_reference", "reference"))
  else:
    k = ref["frame"]
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < num_frames:
      raise BadRecord("bad_reference", f"frame {k!r} is not a frame of the {num_frames}-frame clip")
    image = video_io.read_frames(video_path, [k])[0]
  mask = _image(_file(src, ref["mask"], "missing_reference", "mask")) if "mask" in ref else None
  return cut_reference(image, mask, ref.get("box")), role


def parse_line(line: str, src: pathlib.Path, min_frames: int) -> tuple[str, dict[str, Any]]:
  """One manifest line → (name, example dict of the builder's features); raises BadRecord."""
  try:
    entry = json.loads(line)
  except json.JSONDecodeError as e:
    raise BadRecord("bad_json", f"not JSON ({e.msg})") from None
  if not isinstance(entry, dict) or not isinstance(entry.get("caption"), str):
    raise BadRecord("bad_json", "a line is an object with 'video', 'caption' (a string) and "
                                "'references'")
  name = str(entry.get("name") or entry.get("video"))
  try:
    path = _file(src, entry.get("video"), "missing_video", "video")
    try:
      num_frames, fps, height, width = video_io.probe(path)
    except InputError as e:
      raise BadRecord("unreadable_video", str(e)) from None
    if num_frames < min_frames:
      raise BadRecord("too_few_frames", f"{num_frames} frames, at least {min_frames} needed")
    refs = entry.get("references")
    if not isinstance(refs, list) or not refs:
      raise BadRecord("no_references", "'references' must be a non-empty list")
    loaded = [load_reference(r, src, path, num_frames) for r in refs]
    if sum(role == "background" for _, role in loaded) > 1:
      raise BadRecord("bad_reference", "more than one background reference")
    # Subjects and objects in manifest order, the background last: the sampling order.
    loaded.sort(key=lambda x: x[1] == "background")
  except BadRecord as e:
    e.name = name
    raise
  return name, {
      "name": name, "caption": entry["caption"], "video": path.read_bytes(),
      "num_frames": num_frames, "fps": fps, "height": height, "width": width,
      "references": {"image": [encode_png(img) for img, _ in loaded],
                     "role": [role for _, role in loaded]}}


class Triplets(tfds.core.GeneratorBasedBuilder):
  """Prompt–reference–video triplets (see the module docstring). Written as ArrayRecord.

  `Triplets(src_dir=…, min_frames=…, data_dir=…).download_and_prepare()` builds; `Triplets(
  data_dir=…)` opens a built dataset (`as_data_source()`; `info.metadata` holds `min_frames` and,
  per split, the histogram of reference counts and the number of bad records).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "mp4 bytes, caption, PNG references with roles."}
  # tfds finds a packaged builder's source through `importlib_resources`, which it does not
  # install (ModuleNotFoundError); the path only serves to look for a checksums file beside it.
  code_path = pathlib.Path(__file__)

  def __init__(self, *, src_dir: str | os.PathLike | None = None, min_frames: int = 1, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    self.src_dir = pathlib.Path(src_dir) if src_dir is not None else None
    self.min_frames = min_frames
    self.bad: dict[str, list[dict[str, Any]]] = {}
    super().__init__(**kwargs)

  @property
  def report_file(self) -> pathlib.Path:
    """`bad_records.json` beside the data: each bad record's line, name, reason and detail."""
    return pathlib.Path(self.data_dir, REPORT_FILE)

  def _info(self) -> tfds.core.DatasetInfo:
    # An unregistered builder: DatasetInfo is built here, not from metadata files beside the module.
    return tfds.core.DatasetInfo(
        builder=self,
        description="SkyReels-A2 training triplets: video, caption, reference images with roles.",
        features=tfds.features.FeaturesDict({
            "name": tfds.features.Text(),
            "caption": tfds.features.Text(),
            "video": tfds.features.Tensor(shape=(), dtype=np.object_),   # mp4 bytes
            "num_frames": tfds.features.Tensor(shape=(), dtype=np.int32),
            "fps": tfds.features.Tensor(shape=(), dtype=np.float32),
            "height": tfds.features.Tensor(shape=(), dtype=np.int32),
            "width": tfds.features.Tensor(shape=(), dtype=np.int32),
            "references": tfds.features.Sequence({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # PNG bytes
                "role": tfds.features.Text()}),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    self.info.metadata.update(min_frames=self.min_frames, num_references={}, bad_records={})
    return {m.stem: self._generate_examples(m.stem, m) for m in split_manifests(self.src_dir)}

  def _generate_examples(self, split: str, manifest: pathlib.Path) -> Iterator[tuple[str, dict]]:
    counts: collections.Counter = collections.Counter()
    bad = self.bad.setdefault(split, [])
    for lineno, line in enumerate(manifest.read_text().splitlines(), 1):
      if not line.strip():
        continue
      try:
        name, example = parse_line(line, self.src_dir, self.min_frames)
      except BadRecord as e:
        bad.append({"line": lineno, "name": getattr(e, "name", f"{manifest.name}:{lineno}"),
                    "reason": e.reason, "detail": e.detail})
        continue
      counts[len(example["references"]["role"])] += 1
      yield f"{lineno:09d}", example
    self.info.metadata["num_references"][split] = {str(k): v for k, v in sorted(counts.items())}
    self.info.metadata["bad_records"][split] = len(bad)


def split_manifests(src_dir: pathlib.Path | None) -> list[pathlib.Path]:
  """The `<split>.jsonl` manifests of a source folder, or a one-line InputError."""
  if src_dir is None or not src_dir.is_dir():
    raise InputError(f"source folder {src_dir} does not exist: pass --src, the folder of "
                     "*.jsonl manifests")
  manifests = sorted(src_dir.glob("*.jsonl"))
  if not manifests:
    raise InputError(f"{src_dir} has no *.jsonl manifest (one per split, e.g. train.jsonl)")
  return manifests


def build(src_dir: str | os.PathLike, data_dir: str | os.PathLike, *, min_frames: int = 1,
          verbose: bool = True) -> Triplets:
  """Builds (or reuses) the dataset; writes `bad_records.json` beside it and prints a summary."""
  split_manifests(pathlib.Path(src_dir))  # a bad --src is reported before TFDS touches data_dir
  builder = Triplets(src_dir=src_dir, min_frames=min_frames, data_dir=data_dir)
  if builder.is_prepared():
    if verbose:
      print(f"{builder.data_dir} already exists: reusing it (delete it to rebuild)")
    return builder
  with logs.quiet_tfds():
    builder.download_and_prepare()
  report = {split: {"written": builder.info.splits[split].num_examples, "bad": len(bad),
                    "reasons": dict(collections.Counter(b["reason"] for b in bad)),
                    "bad_records": bad}
            for split, bad in builder.bad.items()}
  builder.report_file.write_text(json.dumps(report, indent=1))
  if verbose:
    for split, r in report.items():
      line = f"{split}: {r['written']} records written, {r['bad']} bad"
      if r["bad"]:
        line += f" {r['reasons']}, first: " + "; ".join(
            f"{b['name']} ({b['reason']})" for b in r["bad_records"][:5])
      print(line)
    print(f"bad records listed in {builder.report_file}")
  return builder


def open_dataset(data_dir: str | os.PathLike) -> Triplets:
  """The built dataset under `data_dir` (the folder given to `build`)."""
  builder = Triplets(data_dir=data_dir)
  if not builder.is_prepared():
    raise InputError(f"no built triplets dataset under {data_dir}: run python -m a2jax.data.triplets "
                     "--src SRC --data-dir DATA_DIR first")
  return builder


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", required=True, help="folder with one <split>.jsonl manifest per split")
  parser.add_argument("--data-dir", required=True, help="where the TFDS dataset is written")
  parser.add_argument("--min-frames", type=int, default=81,
                      help="clips with fewer frames are bad records; (frames − 1)·stride + 1 of "
                           "the training bucket (default 81)")
  args = parser.parse_args(argv)
  with logs.to_file(pathlib.Path(args.data_dir, f"{Triplets.name}.log")):
    build(args.src, args.data_dir, min_frames=args.min_frames)


if __name__ == "__main__":
  raise SystemExit(run_main(main))
