"""A damaged converted folder ends each command that reads it with status 2 and one `error:` line,
the whole of stderr, run from a plain shell (PATH, HOME and JAX_PLATFORMS only: none of the
Makefile's quieting, so orbax's warnings or a tensorstore traceback would show): every data file of
the transformer cut in half, its metadata file deleted, a parameter this a2jax does not know (a
folder from a newer a2jax), an empty folder; for sample.py, export, merge-lora and train.py
init_from=. Each command fails before it compiles anything but train.py's key split.
In-process: a damaged folder whose metadata still reads fails on its data the same way."""

import concurrent.futures
import dataclasses
import gc
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from a2jax import checkpoints
from a2jax.errors import CheckpointError
from a2jax.models import lora as lora_tree
from convert_weights import lora as lora_files, tiny_release, transformer as transformer_convert

REPO = pathlib.Path(__file__).resolve().parents[1]
DAMAGES = ("truncated", "no_metadata", "newer", "empty")
COMMANDS = ("sample", "export", "merge-lora", "train")
NEW_LEAF = ("blocks", "attn1", "gate", "scale")
REDO = ("copy the folder again, or convert it again with python -m convert_weights release --src "
        "RELEASE --dst FOLDER --force")


def truncate(files):
  for f in files:
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


def damaged_copy(converted: pathlib.Path, folder: pathlib.Path, damage: str) -> pathlib.Path:
  if damage == "empty":
    folder.mkdir()
    return folder
  shutil.copytree(converted, folder)
  transformer = folder / "transformer"
  if damage == "truncated":  # an interrupted copy: the tree and the arrays cannot be read
    truncate(transformer.rglob("d/*"))
  elif damage == "no_metadata":
    (transformer / "state" / "_METADATA").unlink()
  elif damage == "newer":  # everything this a2jax's config asks for, and one parameter more
    cfg = checkpoints.read_config(converted).transformer
    params = checkpoints.load_component(converted, "transformer", cfg)
    params["blocks"]["attn1"]["gate"] = {"scale": np.ones((cfg.num_layers, 8), np.float32)}
    shutil.rmtree(transformer)
    checkpoints.save_params(transformer, params)
  return folder


def expected(damage: str, command: str) -> str:
  """What the one line says after `error: {folder}`."""
  if damage == "empty":  # the first file each command looks for
    return {"sample": " lacks config.yaml, transformer, vae, clip, umt5",
            "export": " has no config.yaml", "merge-lora": " has no config.yaml",
            "train": " has no transformer/ checkpoint"}[command]
  return "/transformer " + {
      "truncated": f"is damaged (its parameter metadata cannot be read): {REDO}",
      "no_metadata": f"is damaged (state/_METADATA is missing): {REDO}",
      "newer": f"holds {'/'.join(NEW_LEAF)}, a parameter this a2jax does not know: it was written "
               "by a newer a2jax; upgrade a2jax, or convert the weights again with this one"}[damage]


def command_line(command: str, folder: pathlib.Path, inputs: dict, out: pathlib.Path) -> list[str]:
  return {
      "sample": ["sample.py", "--checkpoint", str(folder), "--prompt", "a bear", "--ref",
                 str(inputs["picture"]), "--out", str(out / "video.mp4"), "--no-progress"],
      "export": ["-m", "convert_weights", "export", "--src", str(folder), "--dst", str(out / "export"),
                 "--format", "diffusers", "--no-progress"],
      "merge-lora": ["-m", "convert_weights", "merge-lora", "--src", str(folder), "--lora",
                     str(inputs["lora"]), "--dst", str(out / "merged"), "--no-progress"],
      "train": ["train.py", str(inputs["config"]), f"init_from={folder}", f"output_dir={out}",
                "run_name=run"],
  }[command]


@pytest.fixture(scope="module")
def runs(release, tmp_path_factory):
  """{(damage, command): (damaged folder, the command's output folder, its CompletedProcess)}, the
  16 commands run two at a time."""
  _, converted = release
  root = tmp_path_factory.mktemp("damaged")
  cfg = checkpoints.read_config(converted).transformer
  lora = lora_tree.init_lora(transformer_convert.init_abstract(cfg), lora_tree.DEFAULT_TARGETS, 2,
                             jax.random.key(0))
  inputs = {"picture": tiny_release.write_example_references(root / "pictures")["subject"],
            "lora": lora_files.write_lora(lora, 2.0, root / "style.safetensors", "comfyui"),
            "config": shutil.copy(converted / checkpoints.CONFIG_FILE, root / "train.yaml")}
  folders = {d: damaged_copy(converted, root / d, d) for d in DAMAGES}
  env = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], "JAX_PLATFORMS": "cpu"}

  def run(damage, command):
    out = root / "out" / damage / command
    out.mkdir(parents=True)
    proc = subprocess.run([sys.executable, *command_line(command, folders[damage], inputs, out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return folders[damage], out, proc

  cases = [(d, c) for d in DAMAGES for c in COMMANDS]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    return dict(zip(cases, pool.map(lambda case: run(*case), cases)))


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_folder_is_one_error_line_and_nothing_else(runs, damage, command):
  folder, out, proc = runs[damage, command]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(proc.stderr.splitlines()) == 1, proc.stderr[-3000:]
  assert proc.stderr.startswith(f"error: {folder}{expected(damage, command)}"), proc.stderr
  if command in ("export", "merge-lora"):
    assert not any(out.iterdir()), "left behind: " + ", ".join(p.name for p in out.iterdir())


def test_unreadable_data_is_a_checkpoint_error_and_nothing_else(release, tmp_path, monkeypatch,
                                                                capfd, caplog):
  """The largest data file of the transformer (array chunks) cut in half, its tree still readable:
  loading every leaf at once (sample.py, train.py) and one leaf at a time (export, merge-lora) fail
  on the data, and nothing reaches stderr, the unraisable hook (where tensorstore's calls into a
  closed event loop end) or the log, late reports included."""
  folder = shutil.copytree(release[1], tmp_path / "a2jax")
  path = folder / "transformer"
  truncate([max(path.rglob("d/*"), key=lambda f: f.stat().st_size)])
  cfg = checkpoints.read_config(folder).transformer
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  capfd.readouterr()
  with pytest.raises(CheckpointError, match="its parameter data cannot be read"):
    checkpoints.load_component(folder, "transformer", cfg)
  with pytest.raises(CheckpointError, match=r"its leaf \S+ cannot be read"):
    list(checkpoints.iter_params(path))
  time.sleep(0.5)  # reads left in flight would end on tensorstore's threads by now
  gc.collect()  # and a task left behind reports when it is collected
  assert capfd.readouterr().err == "" and not unraisable
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_folder_of_another_config_does_not_fit(release):
  _, converted = release
  cfg = checkpoints.read_config(converted).transformer
  other = transformer_convert.init_abstract(dataclasses.replace(cfg, num_layers=3))
  with pytest.raises(CheckpointError, match=r"transformer does not fit the config \(\d+ differences, "
                     r"first: blocks/\S+ \(2, .*\) ≠ \(3, .*\)\): load it with the config it was "
                     "converted with"):
    checkpoints.check_leaves(converted / "transformer", other)


def test_a_device_error_while_loading_is_not_a_damaged_folder(release, monkeypatch):
  """Out of device memory placing the arrays (orbax wraps it in its own error) stays itself."""
  _, converted = release

  def out_of_memory(*args, **kwargs):
    try:
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory")
    except jax.errors.JaxRuntimeError as e:
      raise Exception("Encountered error while reading array index") from e

  monkeypatch.setattr(checkpoints.ocp, "load_pytree", out_of_memory)
  cfg = checkpoints.read_config(converted).transformer
  with pytest.raises(Exception, match="Encountered error") as raised:
    checkpoints.load_component(converted, "transformer", cfg)
  assert not isinstance(raised.value, CheckpointError)
