"""Typed errors of a2jax. Each carries a one-line message that names the problem and the fix."""

import sys
from typing import Callable, Sequence


class A2JaxError(Exception):
  """Base class of every error a2jax raises on purpose."""


class ConfigError(A2JaxError, ValueError):
  """A config file, override or `config.json` is invalid (unknown key, bad type, impossible shape)."""


class ConversionError(A2JaxError, ValueError):
  """A reference state dict does not match the a2jax model (missing, unexpected or mis-shaped keys)."""


class CheckpointError(A2JaxError, ValueError):
  """A converted a2jax folder or a training checkpoint is missing, incomplete or does not fit the config."""


class ShardingError(A2JaxError, ValueError):
  """A mesh does not fit the devices, or parameters end up replicated on a mesh that could shard them."""


class InputError(A2JaxError, ValueError):
  """User input to a model, the pipeline or an entry point is invalid (shapes, counts, files)."""


class TrainingError(A2JaxError, FloatingPointError):
  """A training run cannot go on (a non-finite loss or gradient, a failed training stage)."""


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
  """Runs a command-line entry point: an A2JaxError ends it with its one-line message on stderr
  and exit status 2, not a traceback; in a multi-process run, an error caused by a lost process
  ends it with one line naming that process (a2jax.distributed.stop_if_process_lost)."""
  try:
    return main(argv)
  except A2JaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception as e:
    from a2jax import distributed
    distributed.stop_if_process_lost(e)
    raise
