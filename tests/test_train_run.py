"""train.py end to end on configs/tiny_train.yaml over encoded records (a2jax.data.encoded), each run
a subprocess: in one process on 8 simulated devices (a smoke run, a non-finite loss that stops the
run, init_from), and as 2 processes × 4 devices (tests/multiprocess.py, DESIGN.md §9): the same
losses as one process, preemption by SIGTERM and SIGKILL of both processes resumed bit for bit, a
lost process, and the checkpoint restored onto 8, 4 and 1 devices.

The runs share the session's persistent compilation cache (tests/conftest.py), so only the first
of each device count compiles the train step.
"""

import importlib.util
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from a2jax import configs
from a2jax.data.encoded import write_encoded
from a2jax.errors import CheckpointError
from a2jax.train import batches, checkpointing

import multiprocess

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 6

# Runs train.main with one hook on the batch of a given call (fresh runs: call k = step k):
#   kill N CKPT  at call N, wait until checkpoint folder CKPT is committed, then SIGKILL itself;
#   term N       at call N, send itself SIGTERM (a preemption notice);
#   die N        at call N, SIGKILL itself;
#   nan N        feed NaN latents at call N;
#   none 0       no hook (the other processes of a multi-process run).
DRIVER = """
import os, pathlib, signal, sys, time
import numpy as np
sys.path.insert(0, {repo!r})
import train
from a2jax.runner import run_main
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
  if calls[0] == at and mode == "die":
    os.kill(os.getpid(), signal.SIGKILL)
  if calls[0] == at and mode == "term":
    os.kill(os.getpid(), signal.SIGTERM)
  if calls[0] == at and mode == "nan":
    local = dict(local, latents=np.full_like(local["latents"], np.nan))
  return real(local, *args)

batches.global_batch = hooked
sys.exit(run_main(train.main, argv))
"""


@pytest.fixture(scope="module")
def env():
  """The runs' environment: the session's (tests/conftest.py: CPU, its compilation cache)."""
  return dict(os.environ, JAX_PLATFORMS="cpu")


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
  """The checkpoint's `state` item as arrays, whatever topology wrote it."""
  return checkpointing.read_checkpoint(step_dir.parent, int(step_dir.name))[0]


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
  assert {p.name for p in (run_dir / "checkpoints" / "6").iterdir()} >= {"state", "config"}
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


def two_process_args(mode_of, *train_args, driver):
  """argv of process i of a 2-process train.py run through the driver, `mode_of(i)` its hook."""
  return lambda i: [driver, *mode_of(i), *train_args]


def assert_same_run(got_dir, want_dir, metrics=("loss", "grad_norm", "lr")):
  """Every logged value and the final state bit for bit equal."""
  got, want = read_metrics(got_dir), read_metrics(want_dir)
  assert [m["step"] for m in got] == list(range(1, STEPS + 1))
  for key in metrics:
    assert [m[key] for m in got] == [m[key] for m in want], key
  a = flat(read_state(want_dir / "checkpoints" / str(STEPS)))
  b = flat(read_state(got_dir / "checkpoints" / str(STEPS)))
  assert a.keys() == b.keys() and any("opt_state" in k for k in a)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, env, data_dir):
  """The straight run as 2 processes × 4 devices: (run folder, logs)."""
  out = tmp_path_factory.mktemp("two")
  finished = multiprocess.run(["train.py", *run_args(out, data_dir, "two")], timeout=600,
                              log_dir=out, env=env)
  return out / "two", [f.log for f in finished]


def test_two_processes_train_like_one(two_processes, straight):
  """One global mesh over 2 processes: each reads its rows of the same global batches, and the
  run logs what one process with 8 devices logs, to gloo's reduction order (measured: ≤ 2e-7
  relative on the losses, parameters to 1e-6)."""
  run_dir, logs = two_processes
  assert f"step {STEPS}/{STEPS}  loss" in logs[0] and "  loss " not in logs[1]
  got, want = read_metrics(run_dir), straight[1]
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want], rtol=1e-5, err_msg=key)
  a = flat(read_state(straight[0] / "checkpoints" / str(STEPS)))
  b = flat(read_state(run_dir / "checkpoints" / str(STEPS)))
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_preemption_and_sigkill_of_both_processes_resume_bit_for_bit(tmp_path, env, data_dir,
                                                                     two_processes):
  """SIGTERM to process 1 at step 2: both save at the step the coordination service picks and
  exit 0; resumed, both are SIGKILLed at the second step after it; resumed again, the run ends bit
  for bit as the uninterrupted 2-process run."""
  out, driver = tmp_path / "runs", write_driver(tmp_path)
  args = run_args(out, data_dir, "stopped")
  ckpts = out / "stopped" / "checkpoints"
  steps_saved = lambda: sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())

  first = multiprocess.run(two_process_args(lambda i: ["term", "2"] if i else ["none", "0"],
                                            *args, driver=driver),
                           timeout=400, log_dir=tmp_path, env=env)
  [preempted] = re.findall(r"preempted \(SIGTERM\): saved step (\d+)", first[0].log)
  preempted = int(preempted)
  assert 2 <= preempted < STEPS and steps_saved()[-1] == preempted, first[0].log

  after = ckpts / str(preempted)  # the kill waits for it: it is the one the resume starts from
  with multiprocess.Processes(two_process_args(lambda i: ["kill", "2", str(after)], *args,
                                               driver=driver),
                              log_dir=tmp_path, env=env) as procs:
    killed = procs.wait(400)
  assert all(f.returncode < 0 for f in killed), procs.all_logs()
  assert "resumed from step" in killed[0].log

  last = multiprocess.run(["train.py", *args], timeout=400, log_dir=tmp_path, env=env)
  assert "resumed from step" in last[0].log
  assert_same_run(out / "stopped", two_processes[0])


def test_a_lost_process_stops_the_other_with_one_line(tmp_path, env, data_dir):
  """Process 1 SIGKILLed mid-run: process 0 ends within the heartbeat timeout with one line naming
  it (exit status 3), no abort."""
  out, driver = tmp_path / "runs", write_driver(tmp_path)
  heartbeat = 10
  args = run_args(out, data_dir, "lost", "steps=100000", "checkpoint_every=1000",
                  f"distributed.heartbeat_timeout={heartbeat}")
  with multiprocess.Processes(two_process_args(lambda i: ["die", "3"] if i else ["none", "0"],
                                               *args, driver=driver),
                              log_dir=tmp_path, env=env) as procs:
    procs.wait_for(lambda: procs.procs[1].poll() is not None, 300, "process 1 killing itself")
    died = time.monotonic()
    finished = procs.wait(heartbeat + 30)
    stopped_after = time.monotonic() - died
  assert stopped_after < heartbeat, stopped_after
  assert finished[1].returncode == -signal.SIGKILL, procs.all_logs()
  assert finished[0].returncode == 3, procs.all_logs()
  last = finished[0].log.strip().splitlines()[-1]
  assert last.startswith("error: lost process 1 of 2") and "restart every process" in last, last


def test_checkpoint_restores_onto_other_topologies(tmp_path, env, two_processes, data_dir):
  """The 2-process run's checkpoint: trained_params here (8 devices) and in a 1-device process,
  whose folder starts a 1-device run (init_from); its step-3 checkpoint resumed by one process with
  4 devices logs the 2-process run's steps 4–6 (to 1e-5)."""
  import shutil
  run_dir = two_processes[0]
  want = flat(read_state(run_dir / "checkpoints" / str(STEPS)))
  got = flat(checkpointing.trained_params(run_dir / "checkpoints"))
  for k, v in got.items():
    np.testing.assert_array_equal(v, want["['params']" + k], err_msg=k)

  folder = tmp_path / "converted"
  export = ("import sys; sys.path.insert(0, {repo!r}); import a2jax; from a2jax import checkpoints, "
            "configs; from a2jax.train import checkpointing; "
            "checkpoints.save_params({folder!r} + '/transformer', "
            "checkpointing.trained_params({ckpts!r})); "
            "checkpoints.write_config({folder!r}, configs.load({config!r}))").format(
                repo=str(REPO), folder=str(folder), ckpts=str(run_dir / "checkpoints"),
                config=str(run_dir / "config.yaml"))
  one_device = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-c", export], cwd=REPO, env=one_device,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = run(one_device, run_args(tmp_path / "runs", data_dir, "init", f"init_from={folder}",
                                  "steps=3"))
  assert proc.returncode == 0 and f"starting from {folder}" in proc.stdout, proc.stderr[-3000:]

  moved = tmp_path / "moved"
  shutil.copytree(run_dir, moved / "two")
  shutil.rmtree(moved / "two" / "checkpoints" / str(STEPS))
  four = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = run(four, run_args(moved, data_dir, "two"))
  assert proc.returncode == 0 and "resumed from step 3" in proc.stdout, proc.stderr[-3000:]
  resumed, original = read_metrics(moved / "two"), read_metrics(run_dir)
  np.testing.assert_allclose([m["loss"] for m in resumed], [m["loss"] for m in original], rtol=1e-5)


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
  from a2jax import flops
  from a2jax.train import metrics
  assert metrics.peak_flops("TPU v5 lite") == 197e12 and metrics.peak_flops("TPU v5") == 459e12
  assert metrics.peak_flops("TPU v6 lite") == 918e12
  assert metrics.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert metrics.peak_flops("cpu") is None
  cfg = configs.load("a2_14b")
  shapes = {"latents": (2, 21, 60, 104, 16), "text": (2, 512, 4096), "image": (2, 771, 1280)}
  forward = flops.transformer_flops(cfg.transformer, flops.VideoShape())["total"]  # one 81×480×832 sample
  assert flops.step_flops(cfg, shapes) == 3 * 2 * forward
