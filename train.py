"""Flow-matching fine-tuning of the A2 transformer on encoded triplets (the DiT alone).

    python train.py configs/a2_14b_train.yaml run_name=a2_ft output_dir=/ckpt key=value …

The same command runs on every host of a pod (docs/multi-host.md "Multi-host": processes join through the
`distributed` section or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID). `run_name=`
and `output_dir=` (any bare key of the `train` section) set `train.*`; other overrides are dotted
(`mesh.fsdp=8`, `data.data_dir=…`).
Everything lands under {output_dir}/{run_name}/: config.yaml, checkpoints/<step>/ (orbax),
metrics.jsonl, tensorboard/ (events and profiler traces), train.log (the libraries' log records:
orbax, grain, JAX, absl; train.process_<i>.log for process i of several).

The script reads top to bottom: config, distributed, mesh, model/optimizer/shardings, restore,
data, step, loop. Resume order (restore): the latest complete checkpoint of the run (its state; the
data position is its step, so any process count resumes it) if there is one; otherwise the
transformer of `train.init_from` (a converted a2jax folder) with a fresh optimizer; otherwise random
parameters from `train.seed`.

A LoRA run (`train.lora` set) trains adapters on a frozen base. Its checkpoints hold the adapters
(and their optimizer state and EMA), not the base: on resume the adapters come from the checkpoint
and the base is read again from `train.init_from`, or drawn again from `train.seed` without one;
the run refuses to resume on a base other than the checkpoint's (init_from, seed or transformer
section changed).

SIGTERM (a TPU VM's preemption notice) saves a checkpoint at a step all processes agree on and ends
the run with status 0; the same command resumes it. A lost process stops the others with one line
naming it (a2jax.distributed).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import a2jax  # noqa: F401  first: it chooses the JAX backends before jax is imported
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from a2jax import checkpoints, configs, distributed, families, logs, sharding
from a2jax.errors import TrainingError
from a2jax.runner import run_main
from a2jax.flops import step_flops
from a2jax.train import batches, metrics, optimizer
from a2jax.train.checkpointing import Checkpoints
from a2jax.train.preemption import PreemptionNotice
from a2jax.models.transformer import init_params
from a2jax.train.state import abstract_state, init_state
from a2jax.train.step import batch_shardings, jit_train_step

TRAIN_KEYS = frozenset(f.name for f in dataclasses.fields(configs.TrainConfig))


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
  """(config path or preset name, dotted overrides); bare `train` keys get the `train.` prefix."""
  if not argv or "=" in argv[0] or argv[0] in ("-h", "--help"):
    raise SystemExit(__doc__)
  overrides = []
  for item in argv[1:]:
    key = item.partition("=")[0]
    overrides.append(f"train.{item}" if key in TRAIN_KEYS else item)
  return argv[0], overrides


def check_finite(step: int, values: dict[str, float], ckpt: Checkpoints, ckpt_dir: str) -> None:
  if np.isfinite(values["loss"]) and np.isfinite(values["grad_norm"]):
    return
  ckpt.wait()  # the last good checkpoint is committed before the run stops
  raise TrainingError(
      f"step {step}: loss = {values['loss']}, grad norm = {values['grad_norm']} (not finite); the "
      f"last good checkpoint is step {ckpt.latest_step()} in {ckpt_dir}: lower train.learning_rate "
      "or check the data, then resume")


def check_same_base(saved: dict, cfg: configs.Config, ckpt_dir: str, step: int) -> None:
  """A LoRA checkpoint holds no base: resuming needs the base it was trained on."""
  now = configs.to_dict(cfg)
  base_of = lambda c: (c["train"]["init_from"], c["transformer"],
                       None if c["train"]["init_from"] else c["train"]["seed"])
  if base_of(saved) != base_of(now):
    raise TrainingError(
        f"step {step} of {ckpt_dir} was trained on the base train.init_from = "
        f"{saved['train']['init_from']!r} (seed {saved['train']['seed']}, its transformer section): "
        "resume with that base, or start a new run_name")


def lora_count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def main(argv: list[str] | None = None) -> int:
  # --- config -------------------------------------------------------------------------------
  path, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  cfg = configs.load(path, overrides)
  families.require_references(cfg, path)
  tc = cfg.train
  run_dir = os.path.join(tc.output_dir, tc.run_name)
  ckpt_dir = os.path.join(run_dir, "checkpoints")

  # --- distributed: before anything touches a device -----------------------------------------
  distributed.initialize(cfg.distributed)
  preemption = PreemptionNotice()  # from here on SIGTERM means: save at an agreed step, exit 0
  primary = jax.process_index() == 0
  if primary:
    os.makedirs(run_dir, exist_ok=True)
    checkpoints.write_config(run_dir, cfg)

  # --- mesh -----------------------------------------------------------------------------------
  mesh = sharding.make_mesh(cfg.mesh)
  replicated = NamedSharding(mesh, PartitionSpec())


  # --- model, optimizer, shardings -------------------------------------------------------------
  tx = optimizer.make_optimizer(tc)
  ema = tc.ema_decay is not None
  abstract, shardings = abstract_state(cfg.transformer, tx, mesh, ema, tc.lora)
  for tree, tree_shardings in ((abstract.params, shardings.params), (abstract.frozen, shardings.frozen)):
    sharding.check_replication(tree, tree_shardings, mesh)
  # made by a program so that they are global arrays, replicated over every process's devices
  init_key, step_key = jax.jit(lambda: tuple(jax.random.split(jax.random.key(tc.seed))),
                               out_shardings=(replicated, replicated))()

  # from here on the libraries (orbax, grain, JAX) log into the run folder, not the terminal
  with logs.to_file(logs.process_file(run_dir, "train")), jax.set_mesh(mesh):
    # --- restore (resume order in the module docstring) ----------------------------------------
    ckpt = Checkpoints(ckpt_dir, every=tc.checkpoint_every, keep=tc.keep_checkpoints,
                       async_save=tc.async_checkpoints)
    writer = metrics.MetricsWriter(run_dir)
    start = ckpt.latest_step()
    # the transformer of train.init_from, or None (random from init_key); a LoRA run's frozen base
    base_abstract, base_shardings = (abstract.frozen, shardings.frozen) if tc.lora else (
        abstract.params, shardings.params)
    read_base = lambda: checkpoints.load_params(checkpoints.component_path(
        tc.init_from, "transformer"), base_abstract, base_shardings) if tc.init_from else None
    if start is not None:
      state, saved = ckpt.restore(start, abstract, shardings)
      if tc.lora:
        check_same_base(saved, cfg, ckpt_dir, start)
        base = read_base()
        state = state.replace(frozen=base if base is not None else
                              init_params(cfg.transformer, init_key, mesh))
      changed = sorted(k for k in saved if saved[k] != configs.to_dict(cfg)[k])
      writer.truncate_after(start)
      print(f"resumed from step {start} of {ckpt_dir}"
            + (f" (config sections changed since: {changed})" if changed else ""), flush=True)
    else:
      start = 0
      state = init_state(cfg.transformer, tx, mesh, ema, key=init_key, params=read_base(),
                         lora=tc.lora)
      print(f"starting from {tc.init_from or 'random parameters'}"
            + (f" with LoRA adapters (rank {tc.lora.rank}, alpha {tc.lora.alpha:g}, "
               f"{len(tc.lora.targets)} targets, {lora_count(state.params):,} parameters)"
               if tc.lora else ""), flush=True)

    # --- data: this process's rows of each step's global batch, from the step after `start` ---
    rows = batches.host_row_indices(tc.batch_size, mesh)
    data_iterator = batches.host_loader(cfg, rows, start)

    # --- step: compiled once for the batch shapes ----------------------------------------------
    local = next(data_iterator)
    b_shardings = batch_shardings({k: jax.ShapeDtypeStruct((tc.batch_size, *v.shape[1:]), v.dtype)
                                   for k, v in local.items()}, mesh)
    batch = batches.global_batch(local, b_shardings, tc.batch_size, rows)
    began = time.perf_counter()
    train_step = distributed.compile_together(jit_train_step(cfg, tx, mesh, shardings, b_shardings),
                                              state, batch, step_key, name="train step")
    flops = step_flops(cfg, {k: v.shape for k, v in batch.items()})
    peak = metrics.peak_flops(jax.devices()[0].device_kind)
    print(f"compiled the train step in {time.perf_counter() - began:.1f} s; "
          f"{flops / 1e12:.1f} TFLOP per step (analytic)", flush=True)

    # --- loop -----------------------------------------------------------------------------------
    # Metrics are read one step late, so the host never stalls the device queue, except at log and
    # checkpoint steps: a checkpoint is written only after its own step's loss was found finite.
    profile = metrics.ProfileWindow(os.path.join(run_dir, "tensorboard"), tc.profile_start_step,
                                    tc.profile_steps)
    pending, window, preempted = [], [], False
    window_start = time.perf_counter()
    for step in range(start + 1, tc.steps + 1):
      if batch is None:
        batch = batches.global_batch(next(data_iterator), b_shardings, tc.batch_size, rows)
      profile.before_step(step)
      state, step_metrics = train_step(state, batch, step_key)
      batch = None
      profile.after_step(step, step_metrics)
      pending.append((step, step_metrics))
      preempted = preemption.reached(step)
      save = ckpt.should_save(step) or step == tc.steps or preempted
      log = step % tc.log_every == 0 or step == tc.steps
      ready, pending = (pending, []) if save or log else (pending[:-1], pending[-1:])
      for s, m in ready:
        values = {k: float(v) for k, v in jax.device_get(m).items()}
        check_finite(s, values, ckpt, ckpt_dir)
        window.append(values)
      if log:
        now = time.perf_counter()
        step_time = (now - window_start) / len(window)
        tflops = flops / step_time / jax.device_count() / 1e12
        record = {"loss": float(np.mean([w["loss"] for w in window])),
                  "grad_norm": float(np.mean([w["grad_norm"] for w in window])),
                  "lr": window[-1]["lr"], "step_time_s": step_time, "tflops_per_device": tflops,
                  "mfu": tflops * 1e12 / peak if peak else None}
        writer.write(step, record)
        if primary:
          print(metrics.progress_line(step, tc.steps, record), flush=True)
        window, window_start = [], now
      if save:
        ckpt.save(step, state, cfg)
      if preempted:
        break
    ckpt.wait()
    ckpt.close()
    writer.close()
    preemption.close()
  if preempted and primary:
    print(f"preempted (SIGTERM): saved step {step} in {ckpt_dir}; the same command resumes the run",
          flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(run_main(main))
