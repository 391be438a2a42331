"""Writing and reading mp4 videos (H.264 through imageio-ffmpeg), atomically and reproducibly."""

from __future__ import annotations

import os
import pathlib
import warnings

import numpy as np

from a2jax.errors import InputError


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int) -> pathlib.Path:
  """Writes uint8 frames (F, H, W, 3) as H.264 mp4. The file appears only when complete (written
  under a temporary name, then renamed), and equal frames give equal bytes (bit-exact flags, no
  metadata)."""
  import imageio_ffmpeg
  path = pathlib.Path(path)
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
    raise InputError(f"frames of shape {frames.shape} and dtype {frames.dtype}: expected uint8 "
                     "(F ≥ 1, H, W, 3)")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix or '.mp4'}")
  h, w = frames.shape[1:3]
  writer = imageio_ffmpeg.write_frames(
      str(tmp), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p", macro_block_size=1,
      quality=None, ffmpeg_log_level="error",
      output_params=["-crf", "17", "-threads", "1", "-fflags", "+bitexact", "-flags:v",
                     "+bitexact", "-map_metadata", "-1", "-f", "mp4"])
  try:
    with warnings.catch_warnings():  # ffmpeg runs as a subprocess; JAX's threads are not forked
      warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
      writer.send(None)
    for frame in frames:
      writer.send(np.ascontiguousarray(frame))
    writer.close()
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path


def read_mp4(path: str | os.PathLike) -> np.ndarray:
  """uint8 frames (F, H, W, 3) of a video file."""
  import imageio_ffmpeg
  reader = imageio_ffmpeg.read_frames(str(path))
  meta = next(reader)
  w, h = meta["size"]
  frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]
  if not frames:
    raise InputError(f"{path} holds no frames: is it a video file?")
  return np.stack(frames)
