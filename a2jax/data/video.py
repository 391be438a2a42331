"""Reading training clips through imageio-ffmpeg (a static ffmpeg binary from PyPI; no TensorFlow,
no torch): probing, and decoding only the frames a sample needs. Writing is `a2jax.video.write_mp4`.

Frames are uint8 (F, H, W, 3) RGB. ffmpeg reads files, so encoded bytes go through a temporary
file (mp4 keeps its index at either end; a pipe cannot seek).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator, Sequence

import imageio_ffmpeg
import numpy as np

from a2jax.errors import InputError


def probe(path: str | os.PathLike) -> tuple[int, float, int, int]:
  """(frame count, fps, height, width) of a video file; decodes it all, so a corrupt file fails
  here. Raises InputError when ffmpeg cannot read it."""
  try:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    reader.close()
    count, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
  except (OSError, RuntimeError, StopIteration) as e:
    raise InputError(f"ffmpeg cannot read {path}: {str(e).strip().splitlines()[-1] if str(e) else e!r}")
  width, height = meta["size"]
  return int(count), float(meta["fps"]), int(height), int(width)


@contextlib.contextmanager
def _as_file(data: bytes, suffix: str = ".mp4") -> Iterator[str]:
  with tempfile.NamedTemporaryFile(suffix=suffix) as f:
    f.write(data)
    f.flush()
    yield f.name


def read_frames(source: str | os.PathLike | bytes, indices: Sequence[int]) -> np.ndarray:
  """The frames at increasing `indices` → uint8 (len(indices), H, W, 3). Decodes from the start up
  to the last index only. `source` is a path or the file's bytes."""
  if isinstance(source, bytes):
    with _as_file(source) as path:
      return read_frames(path, indices)
  wanted = list(indices)
  if not wanted or wanted != sorted(set(wanted)) or wanted[0] < 0:
    raise InputError(f"frame indices {wanted[:8]}… must be non-negative and increasing")
  reader = imageio_ffmpeg.read_frames(str(source))
  out, decoded = [], 0
  try:
    width, height = next(reader)["size"]
    for raw in reader:
      if decoded == wanted[len(out)]:
        out.append(np.frombuffer(raw, np.uint8).reshape(height, width, 3))
        if len(out) == len(wanted):
          break
      decoded += 1
  except (OSError, RuntimeError, StopIteration) as e:
    raise InputError(f"ffmpeg cannot decode {source}: {e!r}") from None
  finally:
    reader.close()
  if len(out) != len(wanted):
    raise InputError(f"{source} has {decoded} frames; frame {wanted[len(out)]} was asked for")
  return np.stack(out)
