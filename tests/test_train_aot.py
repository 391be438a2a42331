"""Ahead-of-time compiles of the full-size training step (configs/a2_14b_train.yaml: 81×480×832,
3 references, one sample per chip, fsdp over all chips, full remat, float32 master params and Adam
state, bfloat16 compute, splash attention, the DiT alone) for TPU v5p slices, without the hardware.
One compile per subprocess (`python -m a2jax.aot --program train_step`)."""

import pytest

from a2jax import aot, configs
from test_aot import V5P_HBM, run_aot


@pytest.mark.slow
@pytest.mark.parametrize("target, mesh, batch", [("tpu:v5p:2x2x2", "fsdp=8", 8),
                                                 ("tpu:v5p:4x4x4", "fsdp=64", 64)])
def test_a2_14b_train_step_fits_v5p(target, mesh, batch):
  rc, result = run_aot("--target", target, "--mesh", mesh, "--preset", "a2_14b_train",
                       "--program", "train_step", "--batch", str(batch), timeout=2400)
  assert rc == 0, result
  print(f"{target} train step:", result)
  assert (result["program"], result["remat"], result["attention"]) == ("train_step", "full", "splash")
  assert result["custom_calls"].get("tpu_custom_call", 0) >= 6, result["custom_calls"]  # fwd + bwd
  assert 0 < result["peak_bytes"] < V5P_HBM
  cfg = configs.load("a2_14b_train").transformer
  forward = aot.transformer_flops(cfg, aot.VideoShape())["total"]
  assert result["tokens"] == 21 * 30 * 52
  assert result["flops"] == pytest.approx(3 * batch * forward)
  assert result["flops_with_remat"] == pytest.approx(4 * batch * forward)
