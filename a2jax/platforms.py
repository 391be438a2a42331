"""Which JAX backends a process may start, decided before jax is imported.

Installed with its `tpu` and `cuda` extras (what `make test` installs: they serve deviceless
ahead-of-time compilation), a2jax has libtpu and the CUDA plugin even on a machine without a TPU or
a GPU. Left alone, jax imports the CUDA plugin's kernels at `import jax` and initialises every
plugin when its backends start: each prints driver warnings or a traceback ("Could not find cuda
drivers", "Unable to load CUDA", "could not determine TPU accelerator type") although the CPU then
works. So, on a machine without the accelerator, this module (run first by `import a2jax`):
- makes `cpu` the default of JAX_PLATFORMS when the machine has neither a TPU nor an NVIDIA GPU
  (an explicit JAX_PLATFORMS is kept), so libtpu and the CUDA plugin never start;
- when the machine has no NVIDIA GPU, keeps the CUDA plugin from loading at all: its kernel modules
  (`jax_cuda12_plugin`) are reported missing, which jax handles quietly, and its PJRT plugin
  (`jax_plugins.xla_cuda12`) registers nothing. A process that compiles for CUDA ahead of time
  sets A2JAX_CUDA_AOT=1 before it starts (`python -m a2jax.aot --target cuda:…` does it itself).
On a TPU VM or a GPU machine nothing changes. It must run before jax is imported: entry points
import a2jax first.

It also sizes the CPU client's thread pools when the CPU simulates several devices (the tests' 8,
the multi-process tests' 4 per process): XLA:CPU runs a program's collectives on its intra-op pool,
max(cores, devices) threads by default, and each collective holds its thread until every device
arrives. Devices that run independent collectives in different orders can hold every thread, and
the program then waits until XLA's collective timeout aborts the process: the sharded encoder on 8
devices of a 2-core machine hung within 21 repetitions, twice, every pool thread waiting in a
rendezvous; with 64 threads, 230 ran. PJRT_NPROC (read by XLA for both of its CPU pools) becomes 8
per device unless already set.
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.machinery
import os
import re
import sys
import types

CUDA_AOT_ENV = "A2JAX_CUDA_AOT"
CUDA_KERNELS = "jax_cuda12_plugin"
CUDA_PJRT_PLUGIN = "jax_plugins.xla_cuda12"
GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips
CPU_THREADS_ENV = ("PJRT_NPROC", "NPROC")  # XLA's CPU pool size, first set wins
CPU_THREADS_PER_DEVICE = 8


def has_nvidia_gpu() -> bool:
  return os.path.exists("/proc/driver/nvidia/version") or bool(glob.glob("/dev/nvidia[0-9]*"))


def has_tpu() -> bool:
  """A TPU VM: TPU chips on the PCI bus (what jax itself looks for), or the accel device files."""
  for vendor_file in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor_file) as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return bool(glob.glob("/dev/accel[0-9]*"))


class _WithoutCudaPlugin(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Import hook: the CUDA kernels are not found; the PJRT plugin is a module that registers
  nothing (a missing plugin module would make jax log a warning)."""

  def find_spec(self, name, path=None, target=None):
    if name == CUDA_KERNELS or name.startswith(CUDA_KERNELS + "."):
      raise ModuleNotFoundError(f"{name}: no NVIDIA GPU on this machine (a2jax.platforms)",
                                name=name)
    if name == CUDA_PJRT_PLUGIN:
      return importlib.machinery.ModuleSpec(name, self)
    return None

  def create_module(self, spec):
    return None

  def exec_module(self, module: types.ModuleType) -> None:
    module.initialize = lambda: None


def cuda_plugin_blocked() -> bool:
  return any(isinstance(f, _WithoutCudaPlugin) for f in sys.meta_path)


def simulated_cpu_devices(environ=None) -> int:
  """How many devices the CPU client will simulate (XLA_FLAGS or JAX_NUM_CPU_DEVICES); 1 if not set."""
  environ = os.environ if environ is None else environ
  found = re.findall(r"--xla_force_host_platform_device_count=(\d+)", environ.get("XLA_FLAGS", ""))
  counts = [int(c) for c in found]
  if environ.get("JAX_NUM_CPU_DEVICES", "").isdigit():
    counts.append(int(environ["JAX_NUM_CPU_DEVICES"]))
  return max(counts, default=1)


def size_cpu_thread_pools(environ=None) -> None:
  """PJRT_NPROC = 8 per simulated CPU device when there are several and no pool size is set (see
  the module docstring)."""
  environ = os.environ if environ is None else environ
  devices = simulated_cpu_devices(environ)
  if devices > 1 and not any(environ.get(k) for k in CPU_THREADS_ENV):
    environ["PJRT_NPROC"] = str(max(os.cpu_count() or 1, CPU_THREADS_PER_DEVICE * devices))


def configure() -> None:
  """Chooses the platforms for this process (see the module docstring); idempotent."""
  size_cpu_thread_pools()  # read when the CPU client starts, which may still be ahead
  if "jax" in sys.modules:
    return  # too late to change what jax loads; leave the process as it is
  gpu = has_nvidia_gpu()
  if not gpu and not has_tpu():
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if not gpu and os.environ.get(CUDA_AOT_ENV) != "1" and not cuda_plugin_blocked():
    sys.meta_path.insert(0, _WithoutCudaPlugin())
