"""Videos: frame counts, reading and writing mp4 files (H.264 through imageio-ffmpeg, a static
ffmpeg binary from PyPI; no TensorFlow, no torch). One module for the data path, the pipeline, the
app and the demo.

Frames are uint8 (F, H, W, 3) RGB. Writing is atomic (the file appears only when complete) and
reproducible (equal frames give equal bytes). ffmpeg reads files, so encoded bytes go through a
temporary file (mp4 keeps its index at either end; a pipe cannot seek).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
import tempfile
import warnings
from typing import Iterable, Iterator, Sequence

import numpy as np

from a2jax.errors import InputError

# The Wan VAE folds 4 pixel frames into a latent frame after the first: F = 4k + 1 pixel frames
# are k + 1 latent frames.
TEMPORAL_STRIDE = 4


def latent_frames(frames: int) -> int:
  """Latent frames of a video of `frames` = 4k+1 pixel frames."""
  if frames < 1 or (frames - 1) % TEMPORAL_STRIDE:
    raise InputError(f"{frames} frames: use 4k+1 frames (e.g. 17, 33, 81)")
  return (frames - 1) // TEMPORAL_STRIDE + 1


def drop_leading(chunks: Iterable[np.ndarray], count: int, axis: int = 0) -> Iterator[np.ndarray]:
  """Chunks of frames (frames on `axis`) with the first `count` frames of the stream left out;
  chunks left empty are skipped."""
  for chunk in chunks:
    n = chunk.shape[axis]
    if count >= n and count:
      count -= n
      continue
    yield chunk if count == 0 else np.take(chunk, range(count, n), axis=axis)
    count = 0


@contextlib.contextmanager
def _atomic(path: pathlib.Path, suffix: str) -> Iterator[pathlib.Path]:
  """A temporary path beside `path` to write to; renamed to `path` when the block ends without an
  error, removed otherwise."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}{suffix}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def _check_frames(frames: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
  frames = np.asarray(frames)
  if (frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames)
      or (size is not None and frames.shape[1:3] != size)):
    want = "(F ≥ 1, H, W, 3)" if size is None else f"(F ≥ 1, {size[0]}, {size[1]}, 3) like the first"
    raise InputError(f"frames of shape {frames.shape} and dtype {frames.dtype}: expected uint8 {want}")
  return frames


def write_mp4(path: str | os.PathLike, frames: np.ndarray | Iterable[np.ndarray],
              fps: int) -> pathlib.Path:
  """Writes uint8 frames (F, H, W, 3) as H.264 mp4; `frames` may also be an iterable of chunks
  (n, H, W, 3), each encoded as it arrives (a long video streamed from its decoder is never
  whole in memory). The file appears only when complete (written under a temporary name, then
  renamed; an error while the chunks come leaves nothing), and equal frames give equal bytes
  (bit-exact flags, no metadata)."""
  import imageio_ffmpeg
  path = pathlib.Path(path)
  chunks = iter([frames] if isinstance(frames, np.ndarray) else frames)
  first = _check_frames(next(chunks, np.zeros((0,), np.uint8)))
  h, w = first.shape[1:3]
  with _atomic(path, path.suffix or ".mp4") as tmp:
    writer = imageio_ffmpeg.write_frames(
        str(tmp), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p", macro_block_size=1,
        quality=None, ffmpeg_log_level="error",
        output_params=["-crf", "17", "-threads", "1", "-fflags", "+bitexact", "-flags:v",
                       "+bitexact", "-map_metadata", "-1", "-f", "mp4"])
    with warnings.catch_warnings():  # ffmpeg runs as a subprocess; JAX's threads are not forked
      warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
      writer.send(None)
    try:
      for chunk in itertools.chain([first], (_check_frames(c, (h, w)) for c in chunks)):
        for frame in chunk:
          writer.send(np.ascontiguousarray(frame))
    finally:
      writer.close()  # ffmpeg ends either way; on an error the partial file is then removed
  return path


def write_arrays(path: str | os.PathLike, **arrays: np.ndarray) -> pathlib.Path:
  """Writes arrays (a video's uint8 frames, its latents) to an uncompressed .npz that appears only
  when complete."""
  path = pathlib.Path(path)
  with _atomic(path, ".npz") as tmp:
    np.savez(tmp, **arrays)
  return path


def read_mp4(path: str | os.PathLike) -> np.ndarray:
  """uint8 frames (F, H, W, 3) of a whole video file."""
  import imageio_ffmpeg
  reader = imageio_ffmpeg.read_frames(str(path))
  meta = next(reader)
  w, h = meta["size"]
  frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]
  if not frames:
    raise InputError(f"{path} holds no frames: is it a video file?")
  return np.stack(frames)


def probe(path: str | os.PathLike) -> tuple[int, float, int, int]:
  """(frame count, fps, height, width) of a video file; decodes it all, so a corrupt file fails
  here. Raises InputError when ffmpeg cannot read it."""
  import imageio_ffmpeg
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
  import imageio_ffmpeg
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
