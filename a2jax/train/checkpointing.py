"""Training checkpoints: an orbax `CheckpointManager` under `{run}/checkpoints/<step>/`.

Each step folder holds two named items:
  state   the TrainState: step, float32 master params, optimizer state, EMA params (sharded arrays;
          every process writes and reads only its shards, into one shared folder); for a LoRA run
          the adapters in their place, the frozen base left out (train.py reads it again from
          train.init_from or the seed)
  config  the run's whole config as JSON, for the record
The data position is the step (a2jax.train.batches), so nothing per process is saved and a
checkpoint restores onto any number of processes and devices. Saves are asynchronous (the
device→host copy blocks the step, the writing does not) and atomic: a step folder appears only once
complete, so after a crash `latest_step()` is the last good one.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from a2jax import configs
from a2jax.errors import CheckpointError
from a2jax.train.state import TrainState


class Checkpoints:
  """Saving and restoring a run's checkpoints."""

  def __init__(self, directory: str | os.PathLike, *, every: int, keep: int,
               async_save: bool = True):
    self.every = every
    options = ocp.CheckpointManagerOptions( max_to_keep=keep, enable_async_checkpointing=async_save,
        create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        os.fspath(directory), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    """At multiples of the interval."""
    return step % self.every == 0

  def save(self, step: int, state: TrainState, cfg: configs.Config) -> None:
    """Starts saving (returns once the arrays are copied off the devices); every process calls it."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state.replace(frozen=None)),
        config=ocp.args.JsonSave(configs.to_dict(cfg))), force=True)

  def restore(self, step: int, abstract: TrainState,
              shardings: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """(state on `shardings`, whatever mesh and process count it was saved from; saved config
    dict). A LoRA state comes back with frozen = None (the base is not in the checkpoint)."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract.replace(frozen=None), shardings.replace(frozen=None))
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore()))
    return restored["state"], restored["config"]

  def wait(self) -> None:
    """Blocks until pending saves are committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def trained_params(directory: str | os.PathLike, step: int | None = None) -> Any:
  """The transformer parameters a run's checkpoint gives for sampling: its EMA when the run keeps
  one, else its parameters, of checkpoint `step` (default: the newest), as host arrays; save them
  with `a2jax.checkpoints.save_params` as a converted folder's `transformer/`. For a LoRA run use
  `trained_lora`."""
  state, saved = read_checkpoint(directory, step)
  if (saved.get("train") or {}).get("lora") is not None:
    raise CheckpointError(f"{directory} is a LoRA run: read its adapters with trained_lora(…) or "
                          "python -m convert_weights export-lora")
  return jax.device_get(state["ema_params"] if state.get("ema_params") is not None
                        else state["params"])


def trained_lora(directory: str | os.PathLike, step: int | None = None, ema: bool = True
                 ) -> tuple[Any, configs.LoRAConfig]:
  """(LoRA tree {"blocks": {module: {projection: {"lora_a" (L, in, r), "lora_b" (L, r, out)}}}} as
  float32 host arrays, its LoRAConfig: rank, alpha, targets) of a LoRA run's checkpoint `step`
  (default: the newest): the EMA adapters when `ema` and the run keeps them, else the trained ones."""
  state, saved = read_checkpoint(directory, step)
  lora = (saved.get("train") or {}).get("lora")
  if lora is None:
    raise CheckpointError(f"{directory} is a full fine-tune (train.lora is null): read its "
                          "parameters with trained_params(…)")
  use_ema = ema and state.get("ema_params") is not None
  adapters = jax.device_get(state["ema_params" if use_ema else "params"])
  return adapters, configs.build(configs.LoRAConfig, lora, "train.lora")


def read_checkpoint(directory: str | os.PathLike,
                    step: int | None = None) -> tuple[Any, dict[str, Any]]:
  """(state as arrays on this process's first device, saved config dict) of checkpoint `step`
  (None: the newest), read on any number of processes and devices."""
  missing = lambda step: CheckpointError(
      f"{directory} holds no complete checkpoint{'' if step is None else f' of step {step}'}: "
      "point at a run's {output_dir}/{run_name}/checkpoints after train.py has saved one")
  if not os.path.isdir(directory):
    raise missing(step)
  # a reader saves nothing: saying so spares orbax's warning that it sets save_interval_steps=0
  options = ocp.CheckpointManagerOptions(create=False, read_only=True, save_interval_steps=0)
  with ocp.CheckpointManager(os.fspath(directory), options=options,
                             item_names=("state", "config")) as manager:
    step = max(manager.all_steps(), default=None) if step is None else step
    if step not in manager.all_steps():
      raise missing(step)
    # Onto this process's first device, whatever mesh and process count wrote it (a target taken
    # from the saved shardings would need the writer's devices).
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    saved = ocp.StandardCheckpointHandler().metadata(pathlib.Path(directory, str(step), "state"))
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                          saved.tree)
    # a checkpoint written without the run's config (not by train.py) reads as a full fine-tune
    items = {"state": ocp.args.StandardRestore(target)}
    if os.path.isdir(os.path.join(directory, str(step), "config")):
      items["config"] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"], restored.get("config") or {}
