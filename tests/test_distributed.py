"""How processes join (a2jax.distributed): the config's `distributed` section, filled by the JAX_*
environment variables, validated before anything starts. (Several real processes: test_train_run,
test_data_encode, test_sample_batch.)"""

import os
import subprocess
import sys

import pytest

from a2jax import configs, distributed
from a2jax.errors import ConfigError
import multiprocess
from multiprocess import REPO

ENV = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}


def section(**fields) -> configs.DistributedConfig:
  return configs.build(configs.DistributedConfig, fields, "distributed")


def test_environment_fills_what_the_config_leaves_null():
  got = distributed.resolve(section(), ENV)
  assert (got.coordinator_address, got.num_processes, got.process_id) == ("10.0.0.2:1234", 4, 3)
  got = distributed.resolve(section(process_id=1, heartbeat_timeout=7), ENV)
  assert (got.process_id, got.num_processes, got.heartbeat_timeout) == (1, 4, 7)
  assert distributed.resolve(section(), {}) == section()
  assert distributed.resolve(section(num_processes=1), {}).num_processes == 1


@pytest.mark.parametrize("fields, environ, match", [
    ({"coordinator_address": "10.0.0.2:1234"}, {}, "given without num_processes, process_id"),
    ({}, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "given without coordinator_address"),
    ({}, {**ENV, "JAX_PROCESS_ID": "4"}, r"process_id = 4 must be in \[0, num_processes = 4\)"),
    ({"num_processes": 2, "process_id": 2}, {}, r"process_id = 2 must be in \[0"),
    ({}, {**ENV, "JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not a non-negative"),
    ({}, {**ENV, "JAX_COORDINATOR_ADDRESS": "10.0.0.2"}, "is not host:port"),
    ({"heartbeat_timeout": 0}, {}, "heartbeat_timeout = 0 must be positive"),
])
def test_half_given_or_impossible_settings_are_one_line_errors(fields, environ, match):
  with pytest.raises(ConfigError, match=match):
    distributed.resolve(section(**fields), environ)


def test_unknown_key_is_an_error():
  with pytest.raises(ConfigError, match="unknown key"):
    configs.load("tiny_train", ["distributed.coordinator=1.2.3.4:5"])


def test_launcher_environment():
  saved = dict(os.environ)
  try:
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", *ENV):
      os.environ.pop(key, None)
    assert not distributed.multi_process_environment()
    os.environ["TPU_WORKER_HOSTNAMES"] = "a,b"
    assert distributed.cluster_environment() and distributed.multi_process_environment()
    del os.environ["TPU_WORKER_HOSTNAMES"]
    os.environ["JAX_NUM_PROCESSES"] = "2"
    assert distributed.multi_process_environment() and not distributed.cluster_environment()
  finally:
    os.environ.clear()
    os.environ.update(saved)


def test_train_py_says_what_is_missing_before_starting(tmp_path):
  env = dict(os.environ, JAX_COORDINATOR_ADDRESS="127.0.0.1:1")
  proc = subprocess.run([sys.executable, "train.py", "configs/tiny_train.yaml",
                         f"output_dir={tmp_path}"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
  assert proc.stderr.startswith("error: distributed: coordinator_address given without "
                                "num_processes, process_id"), proc.stderr
  assert not list(tmp_path.iterdir())



def test_processes_exit_cleanly_while_beating(tmp_path):
  """The liveness thread stops before JAX shuts its client down at exit: a thread still inside a
  call into the client when the interpreter finalizes aborts the process (rc −6, "FATAL: exception
  not rethrown"; with beats back to back, 5 of 5 such runs aborted before the fix)."""
  code = ("import time; from a2jax import configs, distributed; distributed.BEAT_SECONDS = 0.0; "
          "distributed.initialize(configs.DistributedConfig()); time.sleep(1)")
  multiprocess.run(["-c", code], timeout=120, log_dir=tmp_path)

ROWS_DRIVER = """
import json, sys
import a2jax, jax, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh
from a2jax import configs, distributed
from a2jax.train import batches
from a2jax.train.step import batch_shardings

cfg = configs.load("tiny_train", ["train.batch_size=16"])
distributed.initialize(cfg.distributed)
# data 2 × fsdp 4, the fsdp axis spanning both processes: each data row holds 2 devices of each
by_process = np.array(jax.devices()).reshape(2, 2, 2)           # (process, data, device)
grid = by_process.transpose(1, 0, 2).reshape(2, 4, 1, 1)
mesh = Mesh(grid, ("data", "fsdp", "context", "tensor"), axis_types=(AxisType.Auto,) * 4)
rows = batches.host_row_indices(16, mesh)
loader = batches.host_loader(cfg, rows, start_step=1)           # the batch of step 2
local = next(loader)
shapes = {k: jax.ShapeDtypeStruct((16, *v.shape[1:]), v.dtype) for k, v in local.items()}
with jax.set_mesh(mesh):
  got = batches.global_batch(local, batch_shardings(shapes, mesh), 16, rows)
  got = {k: multihost_utils.process_allgather(v, tiled=True) for k, v in got.items()}
records = batches.record_dataset(cfg)                           # what one process builds
for k, v in got.items():
  np.testing.assert_array_equal(v, np.stack([records[16 + i][k] for i in range(16)]), err_msg=k)
print("rows", json.dumps(rows.tolist()), "global batch equal", flush=True)
"""


def test_rows_of_a_batch_axis_spanning_processes(tmp_path):
  """On a mesh whose fsdp axis spans the processes, process 0 holds rows 0–3 and 8–11 of a batch of
  16: each process reads exactly its rows, and the global batch is the one one process builds."""
  (tmp_path / "driver.py").write_text(ROWS_DRIVER)
  finished = multiprocess.run([tmp_path / "driver.py"], timeout=240, log_dir=tmp_path)
  assert "rows [0, 1, 2, 3, 8, 9, 10, 11] global batch equal" in finished[0].log, finished[0].log
  assert "rows [4, 5, 6, 7, 12, 13, 14, 15] global batch equal" in finished[1].log, finished[1].log


def test_config_files_of_earlier_versions_still_load(tmp_path):
  """config.yaml files written before the `distributed` section hold train.distributed: null."""
  import yaml
  raw = configs.to_dict(configs.load("tiny_train"))
  del raw["distributed"]
  raw["train"]["distributed"] = None
  (tmp_path / "old.yaml").write_text(yaml.safe_dump(raw))
  assert configs.load(tmp_path / "old.yaml") == configs.load("tiny_train")
  raw["train"]["distributed"] = True
  (tmp_path / "old.yaml").write_text(yaml.safe_dump(raw))
  with pytest.raises(ConfigError, match="train.distributed = True is retired: processes join"):
    configs.load(tmp_path / "old.yaml")
