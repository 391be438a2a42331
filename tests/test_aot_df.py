"""Ahead-of-time compiles of one diffusion-forcing window of the full-size SkyReels-V2 DF 14B
(`python -m a2jax.aot --program df_window`): every row of the window's timestep matrix in one
program, for a v5p-8 and for 8×H100 without the hardware; and a long video's windows, which need
no more device memory than its first, full window."""

import re

import pytest

from a2jax import aot
from test_aot import GIB, V5P_HBM, run_aot

CAUSAL = ("--causal-block", "5", "--ar-step", "5")  # the SkyReels-V2 release's asynchronous setting


@pytest.mark.slow
def test_v5p8_df_window_fits():
  """97×544×960 (25 latent frames, 51,000 tokens), causal blocks of 5 frames started 5 rows apart
  (70 rows of 50 steps), the CFG pair as the batch, splash attention, on a v5p-8 (4 chips) with
  fsdp 4 (measured 13.4 GiB per chip)."""
  rc, result = run_aot("--program", "df_window", "--target", "tpu:v5p:2x2x1", "--mesh", "fsdp=4",
                       "--attention", "splash", *CAUSAL)
  assert rc == 0, result
  print("v5p-8 DF window:", {k: v for k, v in result.items() if k != "windows"})
  (window,) = result["windows"]
  assert (window["latent_frames"], window["prefix"], window["rows"]) == (25, 0, 70)
  assert result["tokens"] == 25 * 34 * 60 and result["branches"] == 2 and result["steps"] == 50
  # Block-causal self-attention runs one splash call per query block (5), plus cross-attention.
  assert window["custom_calls"].get("tpu_custom_call", 0) >= 25 // 5 + 1, window["custom_calls"]
  assert 0 < result["peak_bytes"] < V5P_HBM


@pytest.mark.slow
def test_long_video_needs_one_window():
  """A 1,437-frame video (360 latent frames) in 97-frame windows with 17 frames of history: one
  first window, 16 of the same length after a 5-frame history prefix, and a shorter last one;
  each distinct shape compiles once (full-size 14B, 8×H100, where a compile is cheap). The
  windows run one after another, so the video's peak is the largest window's: the first."""
  with open(aot.gpu_spec_path()) as f:
    device_memory = int(re.search(r"device_memory_size:\s*(\d+)", f.read()).group(1))
  rc, result = run_aot("--program", "df_window", "--target", "cuda:1x8", "--mesh", "fsdp=8",
                       "--attention", "cudnn", *CAUSAL, "--video-frames", "1437",
                       "--overlap-history", "17")
  assert rc == 0, result
  windows = result["windows"]
  print("8×GPU long video:", [(w["latent_frames"], w["prefix"], w["windows"], w["peak_gib"])
                              for w in windows])
  assert [(w["latent_frames"], w["prefix"], w["windows"]) for w in windows] == [
      (25, 0, 1), (25, 5, 16), (20, 5, 1)]
  assert result["plan_windows"] == 18
  first = windows[0]["peak_bytes"]
  # Same shape, same buffers: equal up to a few bytes of constants (the timestep matrices).
  assert result["peak_bytes"] == pytest.approx(first, rel=1e-4)
  assert windows[2]["peak_bytes"] < first
  assert 0 < result["peak_bytes"] < min(device_memory, 80 * GIB)
