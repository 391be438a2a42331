"""sample.py as a user runs it: an mp4 of the right size that decodes, byte-identical for one seed,
batch jobs, the grid; and every validation error as one line, before any model is loaded."""

import json
import re
import shutil

import pytest

import sample
from data_util import write_reference_pictures
from a2jax import video

FLAGS = ["--frames", "13", "--height", "32", "--width", "48", "--steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
  root = write_reference_pictures(tmp_path_factory.mktemp("pictures"), 3, forest="forest.jpg")
  (root / "broken.png").write_bytes(b"not an image")
  return root


def run(*args):
  return sample.main([str(a) for a in args])


def test_writes_reproducible_mp4_and_grid(release, pictures, tmp_path, capsys):
  common = ["--checkpoint", release[1], "--prompt", "A man is holding a teddy bear in the forest.",
            "--ref", pictures / "man.png", "--ref", pictures / "bear.png",
            "--background", pictures / "forest.jpg", *FLAGS]
  assert run(*common, "--out", tmp_path / "a.mp4", "--grid", "--seed", "7") == 0
  assert "timings:" in capsys.readouterr().err
  frames = video.read_mp4(tmp_path / "a.mp4")
  assert frames.shape == (13 - 4 * 3, 32, 48, 3)
  assert video.read_mp4(tmp_path / "a_grid.mp4").shape == (1, 32, 48 * 4, 3)
  assert run(*common, "--out", tmp_path / "b.mp4", "--seed", "7") == 0
  assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
  assert not list(tmp_path.glob(".*partial*"))


def test_jobs_file_runs_every_job(release, pictures, tmp_path):
  jobs = tmp_path / "jobs.jsonl"
  shutil.copy(pictures / "man.png", tmp_path / "man.png")
  shutil.copy(pictures / "forest.jpg", tmp_path / "forest.jpg")
  jobs.write_text("\n".join(json.dumps(j) for j in [
      {"prompt": "A man walks.", "refs": ["man.png"], "background": "forest.jpg", "out": "one.mp4"},
      {"prompt": "A man runs.", "refs": ["man.png"], "out": "two.mp4", "seed": 3},
  ]))
  assert run("--checkpoint", release[1], "--jobs", jobs, *FLAGS, "--keep-reference-frames") == 0
  assert video.read_mp4(tmp_path / "one.mp4").shape == (13, 32, 48, 3)
  assert video.read_mp4(tmp_path / "two.mp4").shape == (13, 32, 48, 3)


@pytest.mark.parametrize("args, message", [
    (["--frames", "12"], "must be 4k\\+1"),
    (["--height", "40"], "multiples of 16"),
    (["--steps", "0"], "must be positive"),
    (["--prompt", "   "], "empty prompt"),
    (["--ref", "{p}/missing.png"], "does not exist"),
    (["--ref", "{p}/broken.png"], "cannot read image"),
    (["--no-refs"], "no reference images"),
    (["--frames", "5"], "references need at least"),
    (["--out", "{t}/x.gif"], "must be an .mp4"),
    (["--checkpoint", "{t}/nowhere"], "does not exist: convert the release"),
    (["--incomplete"], "lacks vae"),
    (["--mesh", "rows=2"], "use axis=size pairs"),
    (["sampling.bogus=1"], "unknown key"),
])
def test_validation_errors_are_one_line(release, pictures, tmp_path, capsys, args, message):
  args = [a.format(p=pictures, t=tmp_path) for a in args]
  checkpoint = release[1]
  refs = ["--ref", str(pictures / "man.png"), "--ref", str(pictures / "bear.png")]
  prompt = ["--prompt", "A man."]
  if args == ["--no-refs"]:
    args, refs = [], []
  if args == ["--incomplete"]:
    checkpoint = tmp_path / "incomplete"
    shutil.copytree(release[1], checkpoint)
    shutil.rmtree(checkpoint / "vae")
    args = []
  if "--prompt" in args:
    prompt = []
  if "--ref" in args:
    refs = []
  base = ["--checkpoint", str(checkpoint), *prompt, *refs, "--out", str(tmp_path / "o.mp4"),
          "--frames", "13", "--height", "32", "--width", "48"]
  if "--checkpoint" in args:
    base = base[2:]
  assert run(*base, *args) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and len(err.splitlines()) == 1, err
  assert re.search(message, err), err
  assert not (tmp_path / "o.mp4").exists()
