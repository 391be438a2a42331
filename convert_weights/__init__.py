"""Converters between the PyTorch checkpoints (diffusers / transformers / original Wan) and a2jax."""

import a2jax  # noqa: F401  first: it chooses the JAX backends before jax is imported
