"""a2jax: SkyReels-A2 elements-to-video in JAX/Flax.

Importing a2jax first chooses which JAX backends the process may start (a2jax/platforms.py): on a
machine without a TPU or GPU, the installed TPU and CUDA plugins stay silent.
"""

from a2jax import platforms as _platforms

_platforms.configure()


def __getattr__(name: str):
  """`a2jax.configs`, `a2jax.models`, … after a plain `import a2jax` (imported on first use)."""
  import importlib
  try:
    return importlib.import_module(f"a2jax.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"a2jax.{name}":
      raise
    raise AttributeError(f"module 'a2jax' has no attribute {name!r}") from None
