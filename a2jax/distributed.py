"""Several processes (TPU pod hosts, GPU nodes, SLURM or MPI tasks): joining them, and stopping
cleanly when one of them is lost.

Every entry point (train.py, sample.py, python -m a2jax.data.encode) calls `initialize(cfg.distributed)`
before anything touches a device. Where the settings come from, first found wins per field:
  1. the config's `distributed` section (distributed.coordinator_address=host:port …)
  2. the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
  3. none of these: JAX's own detection when the launcher says there are several processes (TPU
     pod slice, SLURM, Open MPI); otherwise one process and no `jax.distributed.initialize()`.
A half-given setting (an address without a count, a process id ≥ the count) is a one-line error.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import sys
import threading
import time

from a2jax.configs import DistributedConfig
from a2jax.errors import ConfigError

# field of DistributedConfig → the environment variable that fills it when the config leaves it null
ENVIRONMENT = {"coordinator_address": "JAX_COORDINATOR_ADDRESS",
               "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
# exit status of a process that stops because another one was lost
LOST_PROCESS_EXIT = 3

# Liveness beats of every process (a counter each in the coordination service's key-value store):
# a process whose counter stands still for LOST_AFTER seconds is lost. Faster than JAX's heartbeat
# check, whose detection aborts the survivors instead of letting them say what happened.
BEAT_SECONDS = 0.5
LOST_AFTER = 3.0
STOP_BEATING_TIMEOUT = 10.0

_client = None  # the coordination service's client once several processes joined
_barriers = 0    # barriers passed: each gets its own name
BARRIER_TIMEOUT_MS = 3_600_000  # a full-size compile on a busy host may take many minutes


def cluster_environment() -> bool:
  """Whether the launcher says this is one of several processes that JAX detects by itself (TPU pod
  slice, SLURM, Open MPI); readable before jax starts."""
  env = os.environ
  counts = (env.get(k, "1") for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
  return (any(c.isdigit() and int(c) > 1 for c in counts)
          or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def multi_process_environment() -> bool:
  """Whether this process is told (by the launcher or the JAX_* variables) that it is one of several."""
  num = os.environ.get(ENVIRONMENT["num_processes"], "1")
  return (cluster_environment() or ENVIRONMENT["coordinator_address"] in os.environ
          or (num.isdigit() and int(num) > 1))


def resolve(cfg: DistributedConfig, environ=None) -> DistributedConfig:
  """The config with its null fields filled from the environment (ENVIRONMENT), validated."""
  environ = os.environ if environ is None else environ
  filled = {}
  for field, var in ENVIRONMENT.items():
    if getattr(cfg, field) is None and environ.get(var, "") != "":
      value = environ[var]
      if field != "coordinator_address":
        if not value.strip().isdigit():
          raise ConfigError(f"{var}={value!r} is not a non-negative integer")
        value = int(value)
      filled[field] = value
  try:
    cfg = dataclasses.replace(cfg, **filled)
  except ConfigError as e:
    raise ConfigError(f"{e} (from the config's distributed section and {', '.join(ENVIRONMENT.values())})") from None
  given = [f for f in ENVIRONMENT if getattr(cfg, f) is not None]
  if given and cfg.num_processes != 1 and len(given) < len(ENVIRONMENT):
    missing = [f for f in ENVIRONMENT if f not in given]
    raise ConfigError(
        f"distributed: {', '.join(given)} given without {', '.join(missing)}: set all three "
        f"(distributed.{missing[0]}=… or {ENVIRONMENT[missing[0]]}), or none to let JAX detect "
        "a TPU pod slice, SLURM or Open MPI")
  address = cfg.coordinator_address
  if address is not None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
      raise ConfigError(f"distributed.coordinator_address = {address!r} is not host:port "
                        "(process 0's address and a free port, e.g. 10.0.0.2:1234)")
  return cfg


def initialize(cfg: DistributedConfig) -> None:
  """Joins the other processes (`jax.distributed.initialize`) when there are several (see the
  module docstring); no-op for one process or when already joined. Call before any device use."""
  global _client
  import jax
  from jax._src import distributed as jax_distributed
  cfg = resolve(cfg)
  if jax_distributed.global_state.client is not None:
    return
  timeouts = dict(initialization_timeout=cfg.initialization_timeout,
                  heartbeat_timeout_seconds=cfg.heartbeat_timeout)
  if cfg.num_processes is not None:
    if cfg.num_processes == 1:
      return
    jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id,
                               **timeouts)
  elif cluster_environment():
    jax.distributed.initialize(**timeouts)
  else:
    return
  _client = jax_distributed.global_state.client
  _start_beating(_client, jax.process_index())


def barrier(name: str) -> None:
  """Waits until every process reaches `name`, through the coordination service (no device
  collective); no-op for one process. After a compile: the first collective of a program sets up
  its CPU (gloo) connections and gives up after 30 s, and processes can finish compiling far apart
  (only process 0 writes the persistent compilation cache, so the others compile what it reads)."""
  global _barriers
  if _client is None:
    return
  _barriers += 1
  _client.wait_at_barrier(f"a2jax/{_barriers}/{name}", BARRIER_TIMEOUT_MS)


def compile_together(jitted, *args, name: str, **static):
  """`jitted.lower(*args, **static).compile()`, then `barrier`: the processes start the program, and
  its first collective, together. Call the result with `args` only (`static` is compiled in)."""
  compiled = jitted.lower(*args, **static).compile()
  barrier(f"compiled {name}")
  return compiled


def _beat_key(process: int) -> str:
  return f"a2jax/alive/{process}"


def _start_beating(client, process: int) -> None:
  """A thread that counts up this process's key in the coordination service's store every
  BEAT_SECONDS: how the others tell, in seconds, whether it still runs. Stopped at exit, before
  JAX shuts its client down: a thread still inside a call into the client when the interpreter
  finalizes aborts the process ("FATAL: exception not rethrown", seen on a finished run)."""
  stop = threading.Event()

  def beat():
    while True:
      try:
        client.key_value_increment(_beat_key(process), 1)
      except Exception:  # the service is gone; the main thread finds out by itself
        return
      if stop.wait(BEAT_SECONDS):
        return

  thread = threading.Thread(target=beat, name="a2jax-liveness", daemon=True)
  thread.start()

  def stop_beating():
    stop.set()
    thread.join(timeout=STOP_BEATING_TIMEOUT)  # a call into a lost service must not hold the exit
  atexit.register(stop_beating)  # runs before jax's own exit handler, registered at import


def _lost_processes(client, count: int) -> list[int]:
  """The processes whose beat stopped: read every counter twice, LOST_AFTER seconds apart. The
  coordination service lives in process 0: when it does not answer, process 0 is the lost one."""
  def read() -> dict[int, str | None]:
    beats = {}
    for process in range(count):
      try:
        beats[process] = client.key_value_try_get(_beat_key(process))
      except Exception as e:
        if "NOT_FOUND" not in str(e):
          raise
        beats[process] = None
    return beats
  try:
    before = read()
    time.sleep(LOST_AFTER)
    after = read()
  except Exception:
    return [0]
  return [p for p in range(count) if after[p] is None or after[p] == before[p]]


def stop_if_process_lost(error: BaseException) -> None:
  """Called with an exception of a multi-process run: when processes were lost (a collective
  failed because a peer died), prints one line naming them and ends this process with
  LOST_PROCESS_EXIT, before the coordination service's own heartbeat check would abort it. Returns
  (after LOST_AFTER seconds) when this is one process or every process still beats.

  A lost process 0 takes the coordination service with it: the others then end at once with
  JAX's own fatal message ("the JAX distributed service detected fatal errors"), which this
  cannot intercept."""
  if _client is None:
    return
  import jax
  count = jax.process_count()
  lost = _lost_processes(_client, count)
  if not lost:
    return
  print(f"error: lost process{'es' if len(lost) > 1 else ''} {', '.join(map(str, lost))} of "
        f"{count} ({type(error).__name__}: {str(error).splitlines()[0][:160]}); this process "
        f"{jax.process_index()} stops: restart every process with the same command, a training run "
        "resumes from its last checkpoint", file=sys.stderr, flush=True)
  os._exit(LOST_PROCESS_EXIT)
