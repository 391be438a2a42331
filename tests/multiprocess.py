"""Several processes on this machine as the hosts of one job (DESIGN.md §9): each a subprocess with
4 simulated CPU devices, joined through a2jax.distributed by JAX_COORDINATOR_ADDRESS (127.0.0.1 and a
free port), JAX_NUM_PROCESSES and JAX_PROCESS_ID, all in one persistent compilation cache.

Nothing may hang: every wait has a deadline, at which the process groups started here (and only
those, by PID) are killed; a failure shows every process's log.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, devices: int,
                base: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of process `process_id` of `num_processes` on this machine."""
  env = dict(os.environ if base is None else base)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
             XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices}", *flags]),
             JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
             JAX_PROCESS_ID=str(process_id))
  return env


@dataclasses.dataclass
class Finished:
  returncode: int
  log: str


class Processes:
  """`argv` run as processes 0 … n−1 of one job (`argv` may be a function of the process id)."""

  def __init__(self, argv, *, num_processes: int = 2, devices: int = 4, log_dir: pathlib.Path,
               env: dict[str, str] | None = None, cwd: pathlib.Path = REPO):
    port = free_port()
    self.logs = [pathlib.Path(log_dir) / f"process_{i}.log" for i in range(num_processes)]
    self.procs = []
    for i, log in enumerate(self.logs):
      args = argv(i) if callable(argv) else argv
      with open(log, "w") as out:
        self.procs.append(subprocess.Popen(
            [sys.executable, *map(str, args)], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
            env=process_env(i, num_processes, port, devices, env), start_new_session=True))

  def log(self, i: int) -> str:
    return self.logs[i].read_text(errors="replace")

  def all_logs(self) -> str:
    return "\n".join(f"----- process {i} (rc {p.returncode}) -----\n{self.log(i)}"
                     for i, p in enumerate(self.procs))

  def signal(self, i: int, sig: int) -> None:
    if self.procs[i].poll() is None:
      os.killpg(self.procs[i].pid, sig)

  def kill_all(self) -> None:
    for i in range(len(self.procs)):
      self.signal(i, signal.SIGKILL)
    for p in self.procs:
      p.wait()

  def wait_for(self, condition, timeout: float, what: str) -> None:
    """Polls `condition()` until true; past `timeout` seconds (or when a process ended first
    without making it true) kills everything and fails with every log."""
    deadline = time.monotonic() + timeout
    while not condition():
      if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
        if condition():
          return
        self.kill_all()
        raise AssertionError(f"{what}: not within {timeout:.0f} s\n{self.all_logs()}")
      time.sleep(0.1)

  def wait(self, timeout: float) -> list[Finished]:
    """Every process's (return code, log); past `timeout` seconds kills them all and fails."""
    deadline = time.monotonic() + timeout
    for p in self.procs:
      try:
        p.wait(max(deadline - time.monotonic(), 0.1))
      except subprocess.TimeoutExpired:
        self.kill_all()
        raise AssertionError(f"processes still running after {timeout:.0f} s: killed\n"
                             f"{self.all_logs()}") from None
    return [Finished(p.returncode, self.log(i)) for i, p in enumerate(self.procs)]

  def wait_ok(self, timeout: float) -> list[Finished]:
    """`wait`, failing with every log unless every process exited 0 (a signal is a failure)."""
    finished = self.wait(timeout)
    if any(f.returncode != 0 for f in finished):
      raise AssertionError(f"a process failed\n{self.all_logs()}")
    return finished

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.kill_all()  # no process of a test outlives it, whatever happened


def run(argv, *, timeout: float, log_dir: pathlib.Path, **kwargs) -> list[Finished]:
  """Runs `argv` as one job of several processes to the end; fails with every log unless all exit 0."""
  with Processes(argv, log_dir=log_dir, **kwargs) as procs:
    return procs.wait_ok(timeout)
