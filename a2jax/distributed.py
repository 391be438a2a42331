"""Several processes (TPU pod hosts, SLURM or MPI tasks): what the launcher's environment says."""

from __future__ import annotations

import os


def multi_process_environment() -> bool:
  """Whether the launcher says this is one of several processes (TPU pod, SLURM, MPI, explicit),
  readable before jax starts."""
  env = os.environ
  counts = (env.get(k, "1") for k in ("JAX_PROCESS_COUNT", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
  return (any(c.isdigit() and int(c) > 1 for c in counts) or "JAX_COORDINATOR_ADDRESS" in env
          or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
