"""Small shared pieces: dtypes, logically partitioned Dense, float32 norms, timestep embedding.

Every parameter carries logical axis names (see `a2jax.sharding.LOGICAL_RULES`); submodules are named
after the reference's state-dict names so that the converters are structural.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
  return DTYPES[name]


def partitioned(init, axes: Sequence[str | None]):
  """`init` with logical axis names attached (flax boxes the value for `get_partition_spec`)."""
  return nn.with_logical_partitioning(init, tuple(axes))


class Dense(nn.Module):
  """Linear layer y = x W + b with logical axes (in_axis, out_axis) on W; matmul in `dtype` with
  float32 accumulation on the MXU/tensor cores, result in `dtype`.

  When the params hold a `kernel_scale` (out,) next to the kernel, the kernel is stored quantized
  (int8 or fp8, a2jax/models/quant.py) and y = (x @ q) · scale: the same as x @ (q · scale) per
  output channel, with the scale applied to the float32 product instead of the whole kernel.
  """

  features: int
  axes: tuple[str | None, str | None]
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", partitioned(nn.initializers.lecun_normal(), self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype),
                   preferred_element_type=jnp.float32)
    if self.has_variable("params", "kernel_scale"):
      y = y * self.get_variable("params", "kernel_scale").astype(jnp.float32)
    if self.use_bias:
      bias = self.param("bias", partitioned(nn.initializers.zeros, (self.axes[1],)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """x / rms(x) · scale over the last axis, computed in float32, returned in `dtype`."""

  eps: float = 1e-6
  axis_name: str | None = "norm"
  use_scale: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    if self.use_scale:
      scale = self.param("scale", partitioned(nn.initializers.ones, (self.axis_name,)),
                         (x.shape[-1],), self.param_dtype)
      y = y * scale.astype(jnp.float32)
    return y.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis in float32 (optionally affine); output in `dtype`."""

  eps: float = 1e-6
  use_affine: bool = True
  axis_name: str | None = "norm"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    if self.use_affine:
      d = x.shape[-1]
      scale = self.param("scale", partitioned(nn.initializers.ones, (self.axis_name,)), (d,),
                         self.param_dtype)
      bias = self.param("bias", partitioned(nn.initializers.zeros, (self.axis_name,)), (d,),
                        self.param_dtype)
      y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [cos | sin] of timesteps t (B,) → (B, dim) float32.

  Same as diffusers' `get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0)`.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


def gelu_exact(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=False)
