"""Typed errors of a2jax. Each carries a one-line message that names the problem and the fix."""


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

