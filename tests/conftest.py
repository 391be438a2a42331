"""Test setup: CPU backend with 8 simulated devices, fixed threads, shared fixtures."""

import gc
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# 8 simulated devices; collectives between them may wait long on a loaded 2-core machine before
# XLA would abort the process.
for flag in ("--xla_force_host_platform_device_count=8",
             "--xla_cpu_collective_call_terminate_timeout_seconds=900",
             "--xla_cpu_collective_timeout_seconds=900"):
  if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

# One persistent compilation cache for the processes the tests start (train.py, sample.py, several
# processes of one job): a program that took a second or more to compile is read back afterwards
# instead of compiled again. The test process itself keeps its programs in memory only (below).
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="a2jax-tests-jax-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _COMPILATION_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import a2jax  # noqa: E402,F401  before jax: chooses the backends as every entry point does
import jax  # noqa: E402
import pytest  # noqa: E402
from release_util import tiny_converted_release  # noqa: E402

jax.config.update("jax_enable_compilation_cache", False)


def pytest_sessionfinish(session, exitstatus):
  shutil.rmtree(_COMPILATION_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Each module's compiled programs are freed when it ends (after its own fixtures): one pytest
  process runs the whole suite, and every module's executables would otherwise stay in memory."""
  yield
  jax.clear_caches()
  gc.collect()



@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
  try:
    import torch
  except ImportError:
    return
  torch.set_num_threads(2)
  torch.manual_seed(0)


@pytest.fixture(scope="session")
def release(tmp_path_factory):
  """The SkyReels-A2 `tiny_converted_release`."""
  return tiny_converted_release(tmp_path_factory, "a2")
