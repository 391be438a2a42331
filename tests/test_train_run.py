"""train.py end to end on configs/tiny_train.yaml over encoded records (a2jax.data.encoded), each run
a subprocess on 8 simulated devices: a smoke run, a run killed with SIGKILL after its step-3
checkpoint and resumed (bit for bit the straight run), and a non-finite loss that stops the run.

The runs share one persistent compilation cache, so only the first compiles the train step.
"""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from a2jax import configs
from a2jax.data.encoded import write_encoded
from a2jax.errors import CheckpointError
from a2jax.train import batches, checkpointing

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 6

# Runs train.main with one hook on the batch of a given step (fresh runs: call k = step k):
#   kill N CKPT  at step N, wait until checkpoint folder CKPT is committed, then SIGKILL itself;
#   nan N        feed NaN latents at step N.
DRIVER = """
import os, pathlib, signal, sys, time
import numpy as np
sys.path.insert(0, {repo!r})
import train
from a2jax.errors import run_main
from a2jax.train import batches

mode, at, *argv = sys.argv[1:]
at, calls, real = int(at), [0], batches.global_batch
if mode == "kill":
  ckpt, *argv = argv

def hooked(local, *args):
  calls[0] += 1
  if calls[0] == at and mode == "kill":
    deadline = time.time() + 120
    while not pathlib.Path(ckpt).is_dir() and time.time() < deadline:
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)
  if calls[0] == at and mode == "nan":
    local = dict(local, latents=np.full_like(local["latents"], np.nan))
  return real(local, *args)

batches.global_batch = hooked
sys.exit(run_main(train.main, argv))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """16 encoded records of tiny_train's bucket, written with the data module's writer."""
  cfg = configs.load("tiny_train")
  shapes = batches.record_shapes(cfg)
  out = tmp_path_factory.mktemp("encoded") / "train"
  write_encoded((batches.synthetic_record(shapes, cfg.data.synthetic_refs, [3], i)
                 for i in range(16)), out, num_shards=2)
  return out


def run_args(output_dir, data_dir, run_name, *extra):
  return [str(REPO / "configs" / "tiny_train.yaml"), f"output_dir={output_dir}",
          f"run_name={run_name}", f"steps={STEPS}", "checkpoint_every=3", "log_every=1",
          "data.source=encoded", f"data.data_dir={data_dir}", "data.text_dropout=0.25",
          "data.ref_dropout=0.25", *extra]


def run(env, args, driver=None, timeout=400):
  cmd = [sys.executable, str(driver), *args] if driver else [sys.executable, "train.py", *args]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def write_driver(tmp_path):
  path = tmp_path / "driver.py"
  path.write_text(DRIVER.format(repo=str(REPO)))
  return path


def read_metrics(run_dir):
  lines = (run_dir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def read_state(step_dir):
  """The checkpoint's `state` item as host numpy arrays (no target: as saved)."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(step_dir / "state")


def flat(tree):
  import jax
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_parse_args_maps_bare_train_keys():
  spec = importlib.util.spec_from_file_location("train_script", REPO / "train.py")
  train = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(train)
  path, overrides = train.parse_args(["configs/tiny_train.yaml", "run_name=a", "output_dir=/x",
                                      "learning_rate=0.5", "mesh.fsdp=2"])
  assert path == "configs/tiny_train.yaml"
  assert overrides == ["train.run_name=a", "train.output_dir=/x", "train.learning_rate=0.5",
                       "mesh.fsdp=2"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, env, data_dir):
  """A straight 6-step run from random parameters: (run folder, its metrics)."""
  out = tmp_path_factory.mktemp("straight")
  proc = run(env, run_args(out, data_dir, "straight"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"step {STEPS}/{STEPS}  loss" in proc.stdout and "starting from random" in proc.stdout
  return out / "straight", read_metrics(out / "straight")


def test_smoke_run_writes_config_checkpoints_and_metrics(straight):
  run_dir, metrics = straight
  assert configs.load(run_dir / "config.yaml").train.run_name == "straight"
  assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["3", "6"]
  assert {p.name for p in (run_dir / "checkpoints" / "6").iterdir()} >= {"state", "data", "config"}
  assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
  assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
  assert all(np.isfinite(m["loss"]) and m["step_time_s"] > 0 and m["lr"] > 0 for m in metrics)


def test_trained_params_for_sampling(straight, tmp_path):
  """A run gives for sampling its chosen (default: newest) checkpoint's EMA parameters, or its
  parameters when it keeps no EMA (the straight run)."""
  ckpts = straight[0] / "checkpoints"
  for step in (None, 3):
    state = flat(read_state(ckpts / str(step or STEPS)))
    got = flat(checkpointing.trained_params(ckpts, step))
    assert got
    for k, v in got.items():
      np.testing.assert_array_equal(v, state["['params']" + k], err_msg=k)
  ema_run = tmp_path / "ema"
  with ocp.CheckpointManager(ema_run, item_names=("state",)) as manager:
    manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(
        {"step": np.int32(7), "params": {"w": np.zeros(3)}, "ema_params": {"w": np.ones(3)}})))
  np.testing.assert_array_equal(checkpointing.trained_params(ema_run)["w"], np.ones(3))
  with pytest.raises(CheckpointError, match="no complete checkpoint of step 4"):
    checkpointing.trained_params(ckpts, 4)
  with pytest.raises(CheckpointError, match="no complete checkpoint"):
    checkpointing.trained_params(tmp_path / "nothing")
  assert not (tmp_path / "nothing").exists()


def test_resume_after_sigkill_is_bit_for_bit(tmp_path, env, data_dir, straight):
  run_dir, want = straight
  out = tmp_path / "runs"
  # Killed: SIGKILL during step 5, once the step-3 checkpoint is committed.
  driver = write_driver(tmp_path)
  ckpt3 = out / "resumed" / "checkpoints" / "3"
  killed = run(env, ["kill", "5", str(ckpt3), *run_args(out, data_dir, "resumed")], driver)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert sorted(p.name for p in ckpt3.parent.iterdir() if p.name.isdigit()) == ["3"]

  # Resumed: from step 3 to 6.
  resumed = run(env, run_args(out, data_dir, "resumed"))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step 3" in resumed.stdout
  got = read_metrics(out / "resumed")
  assert [m["step"] for m in got] == list(range(1, STEPS + 1))
  for key in ("loss", "grad_norm", "lr"):
    assert [m[key] for m in got] == [m[key] for m in want], key

  a, b = flat(read_state(run_dir / "checkpoints" / "6")), flat(read_state(ckpt3.parent / "6"))
  assert a.keys() == b.keys() and any("opt_state" in k for k in a)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  data_state = lambda d: (d / "checkpoints" / "6" / "data" / "process_0-of-1.json").read_text()
  assert data_state(run_dir) == data_state(out / "resumed")


def test_bad_override_is_one_line(env):
  proc = run(env, [str(REPO / "configs" / "tiny_train.yaml"), "train.stepz=3"], timeout=120)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "error: unknown key config.train.stepz" in proc.stderr, proc.stderr[-3000:]


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, env, data_dir):
  out = tmp_path / "runs"
  driver = write_driver(tmp_path)
  proc = run(env, ["nan", "5", *run_args(out, data_dir, "nan", "checkpoint_every=2")], driver)
  assert proc.returncode == 2
  assert "error: step 5: loss = nan" in proc.stderr and "Traceback" not in proc.stderr, \
      proc.stderr[-3000:]
  assert "the last good checkpoint is step 4" in proc.stderr
  ckpts = out / "nan" / "checkpoints"
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [2, 4]
  state = flat(read_state(ckpts / "4"))
  assert all(np.all(np.isfinite(v)) for v in state.values())


def test_init_from_a_converted_folder(tmp_path, env, data_dir, straight):
  """Parameters saved as a converted folder's transformer/ are the ones the run starts from: saved
  from the same random draw as a fresh run, the two runs' trajectories are identical. (This run
  also traces steps 2–3 with the profiler.)"""
  import jax
  from a2jax import checkpoints
  from a2jax.models.transformer import init_params
  cfg = configs.load("tiny_train")
  init_key = jax.random.split(jax.random.key(cfg.train.seed))[0]  # train.py's draw
  folder = tmp_path / "converted"
  checkpoints.save_params(folder / "transformer", jax.device_get(init_params(cfg.transformer, init_key)))
  checkpoints.write_config(folder, cfg)
  proc = run(env, run_args(tmp_path / "runs", data_dir, "init", f"init_from={folder}",
                           "profile_start_step=2", "profile_steps=2"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert list((tmp_path / "runs" / "init" / "tensorboard" / "plugins" / "profile").rglob("*.xplane.pb"))
  assert f"starting from {folder}" in proc.stdout
  got, want = read_metrics(tmp_path / "runs" / "init"), straight[1]
  assert [m["loss"] for m in got] == [m["loss"] for m in want]


def test_peak_flops_table_and_analytic_step_flops():
  from a2jax import aot
  from a2jax.train import metrics
  assert metrics.peak_flops("TPU v5 lite") == 197e12 and metrics.peak_flops("TPU v5") == 459e12
  assert metrics.peak_flops("TPU v6 lite") == 918e12
  assert metrics.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert metrics.peak_flops("cpu") is None
  cfg = configs.load("a2_14b")
  shapes = {"latents": (2, 21, 60, 104, 16), "text": (2, 512, 4096), "image": (2, 771, 1280)}
  forward = aot.transformer_flops(cfg.transformer, aot.VideoShape())["total"]  # one 81×480×832 sample
  assert metrics.step_flops(cfg, shapes) == 3 * 2 * forward
