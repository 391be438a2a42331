"""Training metrics: throughput and MFU from the analytic FLOP model (a2jax.flops), a JSONL file,
TensorBoard events, a progress line, and a jax.profiler window.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any

import jax


# Dense bfloat16 peak FLOP/s per device, keyed by a lower-case substring of `device.device_kind`;
# the first matching key wins (so "v5 lite" precedes "v5").
PEAK_FLOPS = (
    ("v5 lite", 197e12),   # TPU v5e
    ("v5e", 197e12),
    ("v6 lite", 918e12),   # TPU v6e (Trillium)
    ("v6e", 918e12),
    ("v5p", 459e12),
    ("v5", 459e12),        # TPU v5p reports "TPU v5"
    ("v4", 275e12),
    ("tpu7x", 2307e12),
    ("h200", 989e12),
    ("h100", 989e12),      # SXM; dense, no sparsity
    ("a100", 312e12),
)


def peak_flops(device_kind: str) -> float | None:
  """Peak bfloat16 FLOP/s of one device of this kind, or None when unknown (CPU)."""
  kind = device_kind.lower()
  return next((peak for key, peak in PEAK_FLOPS if key in kind), None)


class MetricsWriter:
  """Appends metric records to `{run}/metrics.jsonl` and TensorBoard events under
  `{run}/tensorboard/` (when tensorboardX is installed); only process 0 writes."""

  def __init__(self, run_dir: str | os.PathLike):
    self.enabled = jax.process_index() == 0
    self.path = pathlib.Path(run_dir) / "metrics.jsonl"
    self._tb = None
    if not self.enabled:
      return
    try:
      from tensorboardX import SummaryWriter
    except ImportError:
      print("tensorboardX is not installed: metrics go to metrics.jsonl only", file=sys.stderr)
    else:
      self._tb = SummaryWriter(os.fspath(pathlib.Path(run_dir) / "tensorboard"))

  def truncate_after(self, step: int) -> None:
    """Drops records past `step` (written after the checkpoint a resumed run starts from)."""
    if not self.enabled or not self.path.exists():
      return
    kept = [line for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    self.path.write_text("".join(line + "\n" for line in kept))

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": step, **{k: float(v) for k, v in scalars.items() if v is not None}}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for name, value in record.items():
        if name != "step":
          self._tb.add_scalar(f"train/{name}", value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def progress_line(step: int, total: int, m: dict[str, Any]) -> str:
  line = (f"step {step}/{total}  loss {m['loss']:.4f}  grad_norm {m['grad_norm']:.3f}  "
          f"lr {m['lr']:.3e}  {m['step_time_s']:.3f} s/step")
  if m.get("tflops_per_device") is not None:
    line += f"  {m['tflops_per_device']:.1f} TFLOP/s/device"
  if m.get("mfu") is not None:
    line += f"  MFU {100 * m['mfu']:.1f}%"
  return line


class ProfileWindow:
  """Traces steps [start, start + count) with jax.profiler into `logdir` (start None: never)."""

  def __init__(self, logdir: str | os.PathLike, start: int | None, count: int):
    self.logdir, self.start, self.stop = os.fspath(logdir), start, (start or 0) + count
    self.active = False

  def before_step(self, step: int) -> None:
    if self.start is not None and step == self.start and not self.active:
      jax.profiler.start_trace(self.logdir)
      self.active = True

  def after_step(self, step: int, result: Any) -> None:
    if self.active and step + 1 >= self.stop:
      jax.block_until_ready(result)
      jax.profiler.stop_trace()
      self.active = False
