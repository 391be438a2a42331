"""Test setup: CPU backend with 8 simulated devices, fixed threads, shared fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402



@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
  try:
    import torch
  except ImportError:
    return
  torch.set_num_threads(2)
  torch.manual_seed(0)
