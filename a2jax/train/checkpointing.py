"""Training checkpoints: an orbax `CheckpointManager` under `{run}/checkpoints/<step>/`.

Each step folder holds three named items:
  state   the TrainState: step, float32 master params, optimizer state, EMA params (sharded arrays;
          every host writes and reads only its shards)
  data    the data iterator's state, one small JSON file per host (grain's checkpoint handler)
  config  the run's whole config as JSON, for the record
Saves are asynchronous (the device→host copy blocks the step, the writing does not) and atomic: a
step folder appears only once complete, so after a crash `latest_step()` is the last good one.
"""

from __future__ import annotations

import os
from typing import Any

import grain
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
                       "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    """At multiples of the interval, and at a preemption notice (multi-host TPU)."""
    return step % self.every == 0 or self.manager.reached_preemption(step)

  def save(self, step: int, state: TrainState, data_iterator: Any, cfg: configs.Config) -> None:
    """Starts saving (returns once the arrays are copied off the devices)."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(configs.to_dict(cfg))), force=True)

  def restore(self, step: int, abstract: TrainState, shardings: TrainState,
              data_iterator: Any) -> tuple[TrainState, dict[str, Any]]:
    """(state on `shardings`, saved config dict); `data_iterator` is moved to the saved position."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=grain.checkpoint.CheckpointRestore(data_iterator), config=ocp.args.JsonRestore()))
    return restored["state"], restored["config"]

  def wait(self) -> None:
    """Blocks until pending saves are committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def trained_params(directory: str | os.PathLike, step: int | None = None) -> Any:
  """The transformer parameters a run's checkpoint gives for sampling: its EMA when the run keeps
  one, else its parameters, of checkpoint `step` (default: the newest), as host arrays; save them
  with `a2jax.checkpoints.save_params` as a converted folder's `transformer/`."""
  missing = lambda step: CheckpointError(
      f"{directory} holds no complete checkpoint{'' if step is None else f' of step {step}'}: "
      "point at a run's {output_dir}/{run_name}/checkpoints after train.py has saved one")
  if not os.path.isdir(directory):
    raise missing(step)
  options = ocp.CheckpointManagerOptions(create=False, read_only=True)
  with ocp.CheckpointManager(os.fspath(directory), options=options, item_names=("state",)) as manager:
    step = max(manager.all_steps(), default=None) if step is None else step
    if step not in manager.all_steps():
      raise missing(step)
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  return state["ema_params"] if state.get("ema_params") is not None else state["params"]
