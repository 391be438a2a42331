"""Training-time LoRA: the transformer run with adapters merged one layer at a time.

`a2jax.models.lora.merge` gives a whole merged copy of the parameters, fine for sampling but not
for training the 14B model: the gradient of a merged copy keeps one (in, out) kernel per targeted
projection of every layer alive between the forward and the backward pass. Here the blocks are a
`lax.scan` over (layer params, layer adapters) whose body merges that layer's kernels
(kernel + scale · a @ b, in the kernel's dtype) and runs `Block`; under the config's remat the body
is recomputed in the backward pass, so only one layer's merged kernels exist at a time.
Measured ahead of time, the full-size step at 81×480×832 still needs 42 GiB of temporaries per
v6e chip (docs/training.md "Training a LoRA"): not yet where it should be.

Shapes: lora tree {"blocks": {module: {projection: {"lora_a": (L, in, r), "lora_b": (L, r, out)}}}}
mirroring params["blocks"] (kernels (L, in, out)).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import Mesh

from a2jax.configs import LoRAConfig, TransformerConfig
from a2jax.models import lora as lora_format
from a2jax.models.transformer import REMAT_POLICIES, A2Transformer, Block, init_abstract_boxed


def targeted_modules(lora_tree: Any) -> list[tuple[str, ...]]:
  """Module paths (e.g. ("attn1", "to_q")) that carry adapters in a LoRA (sub)tree."""
  return sorted({path[:-1] for path in traverse_util.flatten_dict(lora_tree)})


def merge_layer(layer_params: Any, layer_lora: Any, scale: float) -> Any:
  """One layer's params with each targeted kernel (in, out) replaced by kernel + scale · a @ b
  (float32 sum, cast to the kernel's dtype); a (in, r), b (r, out)."""
  flat = traverse_util.flatten_dict(layer_params)
  factors = traverse_util.flatten_dict(layer_lora)
  for module in targeted_modules(layer_lora):
    a, b = (factors[module + (k,)].astype(jnp.float32) for k in ("lora_a", "lora_b"))
    # Written with a unit batch dimension: the "save_dots" / "offload" remat policies keep dots
    # without batch dimensions, which would store every layer's (in, out) delta for the backward.
    delta = jnp.einsum("xir,xro->io", a[None], b[None])
    kernel = flat[module + ("kernel",)]
    flat[module + ("kernel",)] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat)


def run_blocks(cfg: TransformerConfig, block_params: Any, block_lora: Any, scale: float,
               tokens: jax.Array, block_inputs: Any) -> jax.Array:
  """All layers with their adapters: tokens (B, S, D) → (B, S, D); block_params and block_lora
  are stacked along a leading layer axis (params["blocks"], lora["blocks"])."""
  block = Block(cfg)

  def layer(x, layer_trees):
    merged = merge_layer(*layer_trees, scale)
    return block.apply({"params": merged}, x, block_inputs)

  if cfg.remat != "none":
    layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
  return jax.lax.scan(layer, tokens, (block_params, block_lora))[0]


def forward(cfg: TransformerConfig, params: Any, lora: Any, scale: float, x: jax.Array,
            t: jax.Array, text: jax.Array, image: jax.Array | None) -> jax.Array:
  """A2Transformer(cfg) with `params` (frozen base) plus `lora` at `scale` = alpha / rank; inputs
  and output as A2Transformer.__call__."""
  model = A2Transformer(cfg)
  variables = {"params": params}
  tokens, temb, block_inputs = model.apply(variables, x, t, text, image, method="embed")
  tokens = run_blocks(cfg, params["blocks"], lora["blocks"], scale, tokens, block_inputs)
  return model.apply(variables, tokens, temb, x.shape, method="head")


def abstract_lora(cfg: TransformerConfig, lora: LoRAConfig, mesh: Mesh) -> tuple[Any, Any]:
  """(abstract float32 LoRA tree, its NamedShardings on `mesh`: a (layers, in, None), b (layers,
  None, out) by the logical rules, each factor sharded like the kernel dimension it shares)."""
  boxed = init_abstract_boxed(cfg)
  base = nn.meta.unbox(boxed)
  abstract = jax.eval_shape(
      lambda key: lora_format.init_lora(base, lora.targets, lora.rank, key), jax.random.key(0))
  return abstract, lora_format.lora_shardings(boxed, abstract, mesh)


def init(cfg: TransformerConfig, lora: LoRAConfig, key: jax.Array, mesh: Mesh | None) -> Any:
  """Fresh adapters (a random, b zero: the model starts as the base), placed on their shardings
  when a mesh is given."""
  shardings = abstract_lora(cfg, lora, mesh)[1] if mesh else None
  base = nn.meta.unbox(init_abstract_boxed(cfg))
  return jax.jit(lambda k: lora_format.init_lora(base, lora.targets, lora.rank, k),
                 out_shardings=shardings)(key)

