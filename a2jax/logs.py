"""The libraries' log records go to a log file, so that a command's terminal shows its own lines.

absl, orbax, TensorFlow Datasets, grain and JAX log through Python `logging` (absl and the
libraries built on it through the "absl" logger). absl's first record adds a stderr handler to the
root logger (`logging.basicConfig`), which is how lines such as `WARNING:absl:…` reached the
terminal between a command's own. Each entry point (python -m a2jax.demo, train.py,
python -m a2jax.data.synthetic / triplets / encode) runs inside `to_file(path)`: the records of
those libraries, and of a2jax's modules (for library use; an entry point prints what its user
needs), INFO and up, are appended to its log file instead, with their time and source. Other
loggers (the caller's) are left alone, and leaving the block restores these as they were.

TFDS also prints: its progress bars and two notes ("Downloading and preparing dataset …",
"Dataset … downloaded and prepared to …") are written to the terminal, not logged. The a2jax
builders prepare their datasets inside `quiet_tfds()`, which turns the bars off and logs the notes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pathlib
from typing import Iterator

import jax

LOGGERS = ("absl", "orbax", "tensorflow_datasets", "grain", "jax", "jaxlib", "a2jax")
FORMAT = "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"


def process_file(folder: str | os.PathLike, stem: str) -> pathlib.Path:
  """`folder/stem.log`; in a multi-process run, `folder/stem.process_<i>.log` for process i, as
  every process logs its own libraries' records (after `jax.distributed` has started)."""
  suffix = "" if jax.process_count() == 1 else f".process_{jax.process_index()}"
  return pathlib.Path(folder, f"{stem}{suffix}.log")


class _FileOnFirstRecord(logging.FileHandler):
  """Opens its file, and makes its folder, at the first record: a command that fails on bad input
  before any library logs leaves nothing behind."""

  def _open(self):
    pathlib.Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
    return super()._open()


@contextlib.contextmanager
def to_file(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Inside the block, the records of LOGGERS, INFO and up, are appended to `path` (file and
  folder made at the first record) and not shown on the terminal."""
  path = pathlib.Path(path)
  handler = _FileOnFirstRecord(path, encoding="utf-8", delay=True)
  handler.setFormatter(logging.Formatter(FORMAT))
  loggers = [logging.getLogger(name) for name in LOGGERS]
  saved = [(logger.level, logger.propagate) for logger in loggers]
  for logger in loggers:
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False     # the root logger's handler is the terminal
  try:
    yield path
  finally:
    for logger, (level, propagate) in zip(loggers, saved):
      logger.removeHandler(handler)
      logger.setLevel(level)
      logger.propagate = propagate
    handler.close()


class _Lines(io.TextIOBase):
  """A text stream whose lines become INFO records of `logger`."""

  def __init__(self, logger: logging.Logger):
    self.logger, self.pending = logger, ""

  def writable(self) -> bool:
    return True

  def write(self, text: str) -> int:
    *lines, self.pending = (self.pending + text).split("\n")
    for line in lines:
      if line.strip():
        self.logger.info(line)
    return len(text)

  def flush(self) -> None:
    if self.pending.strip():
      self.logger.info(self.pending)
    self.pending = ""


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
  """Inside the block TFDS shows no progress bars, and what it prints (to stdout) becomes INFO
  records of the "tensorflow_datasets" logger: in the file under `to_file`, else wherever the
  caller's logging sends INFO records (by default nowhere)."""
  # imported here: train.py uses this module and not TFDS (seconds to import)
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.utils import tqdm_utils
  shown = tqdm_utils._active      # no public getter; restored so a caller's choice stands
  tfds.display_progress_bar(False)
  lines = _Lines(logging.getLogger("tensorflow_datasets"))
  try:
    with contextlib.redirect_stdout(lines):
      yield
  finally:
    lines.flush()
    tfds.display_progress_bar(shown)
