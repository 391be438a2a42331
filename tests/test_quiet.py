"""The entry points print their own lines and progress bars; the libraries' log records (absl,
orbax, TFDS, grain, JAX) land in the run's log file (a2jax.logs). The commands run from a plain
shell: PATH, HOME and JAX_PLATFORMS=cpu, none of the Makefile's XLA_FLAGS / TF_CPP_MIN_LOG_LEVEL.
The demo's own run is checked by tests/test_demo.py's short training, which runs it so."""

import logging
import os
import pathlib
import re
import subprocess
import sys

from a2jax import logs

REPO = pathlib.Path(__file__).resolve().parents[1]
PLAIN_SHELL = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], "JAX_PLATFORMS": "cpu"}
# What the libraries wrote to the terminal before: records through the root logger's
# basicConfig handler (`WARNING:absl:…`), TFDS's notes and progress bars, Python warnings.
NOISE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL):|Downloading and preparing|"
                   r"downloaded and prepared|Generating splits|Shuffling|dataset_info|Warning:",
                   re.MULTILINE)


def plain_shell_run(*args: str) -> str:
  proc = subprocess.run([sys.executable, *args], cwd=REPO, env=PLAIN_SHELL, capture_output=True,
                        text=True, timeout=1800)
  output = proc.stdout + proc.stderr
  assert proc.returncode == 0, output
  return output.replace("\r", "\n")     # a progress bar's updates, one a line


def test_to_file_routes_library_records_and_restores_the_loggers(tmp_path, caplog):
  """Inside the block the records of the libraries and of a2jax's modules reach the file and not
  the root logger's handlers (the terminal); a caller's own logger is left alone; afterwards the
  loggers are as before."""
  caplog.set_level(logging.INFO)
  absl_logger = logging.getLogger("absl")
  before = (absl_logger.level, absl_logger.propagate, list(absl_logger.handlers))
  with logs.to_file(tmp_path / "run" / "x.log") as path:
    absl_logger.warning("a library warning")
    logging.getLogger("jax._src.somewhere").info("a library note")
    logging.getLogger("a2jax.data.pipeline").warning("a2jax's note")
    logging.getLogger("user.code").warning("the caller's own")
  assert (absl_logger.level, absl_logger.propagate, list(absl_logger.handlers)) == before
  text = path.read_text()
  assert "WARNING absl" in text and "a library warning" in text and "a library note" in text
  assert "a2jax's note" in text
  assert "the caller's own" not in text
  assert [r.getMessage() for r in caplog.records] == ["the caller's own"]


def test_synthetic_builder_prints_its_summary_only(tmp_path):
  """TFDS's warning, notes and progress bars go to DATA/synthetic_elements.log."""
  output = plain_shell_run("-m", "a2jax.data.synthetic", "--data-dir", str(tmp_path))
  assert output.split("\n")[:-1] == [
      f"{tmp_path}/synthetic_elements/demo/1.0.0: train 320, heldout 16"], output
  log = (tmp_path / "synthetic_elements.log").read_text()
  assert "WARNING absl" in log and "has no dataset_info.json" in log
  assert "Downloading and preparing dataset" in log
