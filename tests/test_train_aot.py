"""Ahead-of-time compiles of the full-size training step (configs/a2_14b_train.yaml: 81×480×832,
3 references, one sample per chip, fsdp over all chips, full remat, float32 master params, Adam's
moments in bfloat16, bfloat16 compute, splash attention, the DiT alone) for a TPU v5p-8 (4 chips,
one host), and of the LoRA step for a v6e-8, without the hardware. One compile per subprocess
(`python -m a2jax.aot --program train_step`). Larger v5p slices, measured once and not compiled
here to keep the suite's time (docs/training.md "Training"): v5p-16 (`v5p:2x2x2`) fsdp 8, float32 moments,
74.4 GiB per chip; v5p-128 (`v5p:4x4x4`) fsdp 64, 40.3 GiB."""

import pytest

from a2jax import configs, flops
from test_aot import V5P_HBM, run_aot


@pytest.mark.slow
def test_a2_14b_train_step_fits_v5p8():
  """The full fine-tune on a v5p-8 (`v5p:2x2x1`, 4 chips of 95.74 GiB), fsdp 4, batch 4, with the
  preset's bfloat16 Adam moments (measured 88.8 GiB per chip; with float32 moments the compiler
  refuses it: 106.3 GiB)."""
  assert configs.load("a2_14b_train").train.moments_dtype == "bfloat16"
  rc, result = run_aot("--target", "tpu:v5p:2x2x1", "--mesh", "fsdp=4", "--preset", "a2_14b_train",
                       "--program", "train_step", "--batch", "4", timeout=2400)
  assert rc == 0, result
  print("v5p-8 train step:", result)
  assert (result["program"], result["remat"], result["attention"]) == ("train_step", "full", "splash")
  assert result["mesh"] == {"data": 1, "fsdp": 4, "context": 1, "tensor": 1}
  assert result["custom_calls"].get("tpu_custom_call", 0) >= 6, result["custom_calls"]  # fwd + bwd
  assert 0 < result["peak_bytes"] < V5P_HBM
  cfg = configs.load("a2_14b_train").transformer
  forward = flops.transformer_flops(cfg, flops.VideoShape())["total"]
  assert result["tokens"] == 21 * 30 * 52
  assert result["flops"] == pytest.approx(3 * 4 * forward)
  assert result["flops_with_remat"] == pytest.approx(4 * 4 * forward)


V6E_HBM = 32 * 1024**3


@pytest.mark.slow
def test_a2_14b_lora_train_step_fits_v6e8():
  """The LoRA step (configs/a2_14b_lora.yaml: rank-32 adapters on the attention projections, the
  base frozen in bfloat16) on a v6e-8, 8 chips of 32 GiB: fsdp 4 × context 2, one sample per two
  chips (measured 29.6 GiB per chip; with fsdp 8 and one sample per chip the compiler asks for
  42.1 GiB of temporaries). The full fine-tune (float32 master params and Adam state) needs 51 GiB
  per chip there."""
  rc, result = run_aot("--target", "tpu:v6e:2x4", "--mesh", "fsdp=4,context=2", "--preset",
                       "a2_14b_lora", "--program", "train_step", "--batch", "4", timeout=2400)
  assert rc == 0, result
  print("v6e-8 LoRA train step:", result)
  assert (result["program"], result["remat"], result["attention"]) == (
      "lora_train_step", "full", "splash")
  assert 0 < result["peak_bytes"] < V6E_HBM
  cfg = configs.load("a2_14b_lora").transformer
  assert result["lora_params"] == cfg.num_layers * 32 * (
      8 * (cfg.inner_dim + cfg.inner_dim) + 2 * (cfg.added_kv_proj_dim + cfg.inner_dim))
