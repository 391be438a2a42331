"""Weight-only quantization of the transformer blocks' matmul kernels (`transformer.weights`).

Each Dense kernel inside the scanned blocks (attn1 / attn2 to_q, to_k, to_v, to_out_0, add_k_proj,
add_v_proj, ffn net_0 / net_2) becomes int8 or fp8 (float8_e4m3fn) values plus one float32 scale
per output channel: kernel (L, in, out) → kernel (L, in, out) int8|fp8 and `kernel_scale` (L, out),
kernel ≈ q · scale. Symmetric, absmax: scale = max|w| / 127 (int8, rounded to nearest) or
max|w| / 448 (fp8, the cast rounds to nearest even). Biases, norms, the modulation tables, the
patch / text / time / image embedders and the output head keep their dtype.

`Dense` (a2jax/models/layers.py) sees the `kernel_scale` next to its kernel and computes
(x @ q) · scale, which equals x @ (q · scale) per output channel; the model code is the same for
every `weights` setting. The converted folder stays bfloat16: quantization runs at load
(`A2Pipeline.from_folder`, after LoRA merging), jitted leaf by leaf on the kernels' shardings.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from a2jax.errors import ConfigError

# weights setting → (stored dtype, largest magnitude it holds)
# (configs.QUANTIZED_WEIGHTS adds "native": the kernels stay in the config's param dtype)
FORMATS = {"int8": (jnp.int8, 127.0), "fp8": (jnp.float8_e4m3fn, 448.0)}
SCALE = "kernel_scale"


def quantize_kernel(kernel: jax.Array, weights: str) -> tuple[jax.Array, jax.Array]:
  """kernel (..., in, out) → (q (..., in, out) int8|fp8, scale (..., out) float32) with
  kernel ≈ q · scale[..., None, :]; a channel of zeros gets scale 1."""
  dtype, qmax = FORMATS[weights]
  w = kernel.astype(jnp.float32)
  amax = jnp.max(jnp.abs(w), axis=-2)
  scale = jnp.where(amax > 0, amax / qmax, 1.0)
  x = w / scale[..., None, :]
  if jnp.issubdtype(dtype, jnp.integer):
    x = jnp.clip(jnp.round(x), -qmax, qmax)
  return x.astype(dtype), scale


def dequantize_kernel(q: jax.Array, scale: jax.Array) -> jax.Array:
  """q (..., in, out), scale (..., out) → float32 kernel (..., in, out)."""
  return q.astype(jnp.float32) * scale[..., None, :]


def target_paths(tree: dict) -> list[tuple[str, ...]]:
  """Paths of the Dense modules (dicts holding a "kernel") under tree["blocks"]."""
  def walk(node: dict, path: tuple[str, ...]) -> list[tuple[str, ...]]:
    if "kernel" in node:
      return [path]
    return [p for key, child in node.items() if isinstance(child, dict)
            for p in walk(child, path + (key,))]
  return walk(tree["blocks"], ("blocks",))


def _replace(tree: dict, path: tuple[str, ...], module: dict) -> dict:
  """A copy of the nested dict `tree` (untouched subtrees shared) with the module at `path` set."""
  if not path:
    return module
  return {**tree, path[0]: _replace(tree[path[0]], path[1:], module)}


def module_at(tree: dict, path: tuple[str, ...]) -> dict:
  for part in path:
    tree = tree[part]
  return tree


def _scale_sharding(kernel_sharding: Any, ndim: int) -> Any:
  """The scale's sharding: the kernel's with its input axis (second to last) dropped."""
  if not isinstance(kernel_sharding, NamedSharding):
    return None
  spec = tuple(kernel_sharding.spec) + (None,) * (ndim - len(kernel_sharding.spec))
  return NamedSharding(kernel_sharding.mesh, PartitionSpec(*spec[:-2], spec[-1]))


def check_float_kernels(params: dict) -> None:
  """Raises ConfigError if `params` (a transformer tree) is quantized already: LoRA merging and
  quantization need the float kernels."""
  if any(SCALE in module_at(params, path) for path in target_paths(params)):
    raise ConfigError("the transformer's kernels are quantized already: merge LoRAs at load "
                      "(A2Pipeline.from_folder(loras=...)), which quantizes after merging")


def quantize_params(params: dict, weights: str) -> dict:
  """The transformer params with the blocks' kernels quantized to `weights` ("native": unchanged).

  One jitted quantization per kernel whose outputs keep the kernel's sharding (the scale: the
  kernel's output-axis sharding), so on a mesh nothing is gathered; untouched leaves are shared.
  Peak memory: the float params plus the quantized copy of one kernel at a time, until the caller
  drops the float tree.
  """
  if weights == "native":
    return params
  check_float_kernels(params)
  for path in target_paths(params):
    module = module_at(params, path)
    kernel = module["kernel"]
    kernel_sharding = getattr(kernel, "sharding", None)
    out = None
    if isinstance(kernel_sharding, NamedSharding):
      out = (kernel_sharding, _scale_sharding(kernel_sharding, kernel.ndim))
    q, scale = jax.jit(quantize_kernel, static_argnums=1, out_shardings=out)(kernel, weights)
    params = _replace(params, path, {**module, "kernel": q, SCALE: scale})
  return params


def quantize_abstract(boxed: Any, weights: str) -> Any:
  """The abstract quantized tree of `quantize_params` from an `init_abstract_boxed` result (logical
  boxes kept): kernels in the stored dtype, scales boxed with the kernel's names less its input
  axis, so `sharding.unboxed_shardings` places them by the logical rules."""
  if weights == "native":
    return boxed
  dtype = FORMATS[weights][0]
  for path in target_paths(boxed):
    module = module_at(boxed, path)
    box = module["kernel"]
    value = box.unbox() if isinstance(box, nn.LogicallyPartitioned) else box
    q = jax.ShapeDtypeStruct(value.shape, dtype)
    scale = jax.ShapeDtypeStruct(value.shape[:-2] + value.shape[-1:], jnp.float32)
    if isinstance(box, nn.LogicallyPartitioned):
      q = box.replace_boxed(q)
      scale = box.replace(value=scale, names=tuple(box.names[:-2]) + tuple(box.names[-1:]))
    boxed = _replace(boxed, path, {**module, "kernel": q, SCALE: scale})
  return boxed
