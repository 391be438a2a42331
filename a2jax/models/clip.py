"""CLIPVisionEncoder: the CLIP ViT-H/14 vision tower that turns reference images into image tokens.

Equal to transformers' `CLIPVisionModel` (and `CLIPVisionModelWithProjection` when the config asks
for the projection). Submodules carry the transformers state-dict names (`embeddings`,
`pre_layrnorm` (sic), `encoder.layers.N.self_attn.q_proj`, `mlp.fc1`, `post_layernorm`,
`visual_projection`); the N encoder layers are one `nn.scan` over stacked parameters with a leading
"layers" axis.

The image tokens of the release are the penultimate layer's hidden states (transformers'
`hidden_states[-2]`, Wan's `use_31_block`): `__call__` runs layers 0..N−2 only; the last layer, the
pooled class token and the projection run with `full_tower=True` (evaluation).

Shapes: B images, P = (image_size / patch_size)² patches, S = P + 1 tokens (257 for ViT-H/14 at
224²), D = hidden_size, H heads.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from a2jax import sharding
from a2jax.attention import attention
from a2jax.configs import CLIPConfig
from a2jax.errors import InputError
from a2jax.models.layers import Dense, LayerNorm, dtype_of, gelu_exact, gelu_tanh, partitioned

ACTIVATIONS = {
    "gelu": gelu_exact,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
}


class PatchEmbedding(nn.Module):
  """Conv2d with kernel = stride = patch and no bias; kernel (p, p, C, D)."""

  cfg: CLIPConfig

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    """pixels (B, image_size, image_size, C) → (B, P, D) float32."""
    cfg = self.cfg
    dtype = dtype_of(cfg.dtype)
    p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
    kernel = self.param("kernel", partitioned(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                        (p, p, c, d), dtype_of(cfg.param_dtype))
    b, grid = pixels.shape[0], cfg.image_size // p
    # (B, grid, p, grid, p, C): a stride-p conv with a p×p kernel is one matmul over the patches.
    patches = pixels.astype(dtype).reshape(b, grid, p, grid, p, c)
    x = jnp.einsum("bhpwqc,pqcd->bhwd", patches, kernel.astype(dtype),
                   preferred_element_type=jnp.float32)
    return x.reshape(b, grid * grid, d)


class CLIPVisionEmbeddings(nn.Module):
  """Patch embedding, class token prepended, learned positions added."""

  cfg: CLIPConfig

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    """pixels (B, image_size, image_size, C) → (B, S, D) float32."""
    cfg = self.cfg
    pdtype = dtype_of(cfg.param_dtype)
    d, s = cfg.hidden_size, num_tokens(cfg)
    x = PatchEmbedding(cfg, name="patch_embedding")(pixels)
    cls = self.param("class_embedding", partitioned(nn.initializers.normal(1.0), ("embed",)), (d,),
                     pdtype)
    pos = nn.Embed(s, d, embedding_init=partitioned(nn.initializers.normal(0.02), (None, "embed")),
                   dtype=jnp.float32, param_dtype=pdtype, name="position_embedding")(jnp.arange(s))
    cls = jnp.broadcast_to(cls.astype(jnp.float32), (x.shape[0], 1, d))
    return jnp.concatenate([cls, x], axis=1) + pos[None]


class CLIPAttention(nn.Module):
  """Multi-head self-attention: q/k/v/out projections with biases, scale 1/√head_dim."""

  cfg: CLIPConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x (B, S, D) → (B, S, D)."""
    cfg = self.cfg
    dense = functools.partial(Dense, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    split = lambda t: t.reshape(*t.shape[:2], heads, d // heads)  # (B, S, H, D/H)
    q = split(dense(d, axes=("embed", "heads"), name="q_proj")(x))
    k = split(dense(d, axes=("embed", "heads"), name="k_proj")(x))
    v = split(dense(d, axes=("embed", "heads"), name="v_proj")(x))
    out = attention(q, k, v, backend=cfg.attention)
    out = sharding.constrain(out, ("batch", "tokens", "act_heads", "act_kv"))
    return dense(d, axes=("heads", "embed"), name="out_proj")(out.reshape(*out.shape[:2], d))


class CLIPMLP(nn.Module):
  """fc1 (D → intermediate) → activation → fc2 (intermediate → D)."""

  cfg: CLIPConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    dense = functools.partial(Dense, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
    h = ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, axes=("embed", "mlp"), name="fc1")(x))
    h = sharding.constrain(h, ("batch", "tokens", "act_mlp"))
    return dense(cfg.hidden_size, axes=("mlp", "embed"), name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
  """Pre-norm layer: x + attn(LN1(x)), then + mlp(LN2(x)). The residual stream stays float32."""

  cfg: CLIPConfig

  def setup(self):
    cfg = self.cfg
    norm = functools.partial(LayerNorm, eps=cfg.layer_norm_eps, axis_name="embed",
                             dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
    self.layer_norm1 = norm()
    self.self_attn = CLIPAttention(cfg)
    self.layer_norm2 = norm()
    self.mlp = CLIPMLP(cfg)

  def __call__(self, x: jax.Array, active: jax.Array) -> tuple[jax.Array, None]:
    """One `nn.scan` step over x (B, S, D) float32: the layer where `active` (a scalar bool), else x
    unchanged. A skipped layer is a branch not taken: its weights are neither read nor copied."""
    if self.is_initializing():
      return self.forward(x), None
    return nn.cond(active, CLIPEncoderLayer.forward, lambda _, x: x, self, x), None

  def forward(self, x: jax.Array) -> jax.Array:
    """x (B, S, D) float32 → (B, S, D) float32."""
    x = x + self.self_attn(self.layer_norm1(x)).astype(jnp.float32)
    x = x + self.mlp(self.layer_norm2(x)).astype(jnp.float32)
    return sharding.constrain(x, ("batch", "tokens", "act_embed"))


class CLIPEncoder(nn.Module):
  """The N encoder layers as one scan over stacked parameters (`layers`, leading axis N)."""

  cfg: CLIPConfig

  @nn.compact
  def __call__(self, x: jax.Array, num_layers: int) -> jax.Array:
    """x (B, S, D) float32 through layers 0..num_layers−1 → (B, S, D) float32."""
    n = self.cfg.num_hidden_layers
    layers = nn.scan(CLIPEncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=n, metadata_params={nn.PARTITION_NAME: "layers"})(self.cfg, name="layers")
    x, _ = layers(x, jnp.arange(n) < num_layers)
    return x


class CLIPVisionEncoder(nn.Module):
  """transformers `CLIPVisionModel`, channels-last. See the module docstring."""

  cfg: CLIPConfig

  @nn.compact
  def __call__(self, pixel_values: jax.Array, full_tower: bool = False):
    """pixel_values (B, image_size, image_size, C), CLIP-normalised (see `a2jax.preprocess`).

    Returns the penultimate layer's hidden states (B, S, D) in the compute dtype: the image tokens
    of sampling. With `full_tower`, every layer runs and a dict comes back: `last_hidden_state`
    (B, S, D), `pooler_output` (B, D) = post_layernorm of the class token, and `image_embeds`
    (B, projection_dim) when the config has the projection.
    """
    cfg = self.cfg
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    size = cfg.image_size
    if pixel_values.ndim != 4 or pixel_values.shape[1:] != (size, size, cfg.num_channels):
      raise InputError(f"pixel_values have shape {pixel_values.shape}; expected (B, {size}, {size}, "
                       f"{cfg.num_channels}) channels-last: preprocess the images with "
                       "a2jax.preprocess.ClipImageProcessor")
    norm = functools.partial(LayerNorm, eps=cfg.layer_norm_eps, axis_name="embed",
                             dtype=jnp.float32, param_dtype=pdtype)
    x = CLIPVisionEmbeddings(cfg, name="embeddings")(pixel_values)
    x = norm(name="pre_layrnorm")(x)
    x = sharding.constrain(x, ("batch", "tokens", "act_embed"))
    n = cfg.num_hidden_layers
    x = CLIPEncoder(cfg, name="encoder")(x, n if full_tower else n - 1)
    if not (full_tower or self.is_initializing()):
      return x.astype(dtype)
    pooled = norm(name="post_layernorm")(x[:, 0])
    out = {"last_hidden_state": x.astype(dtype), "pooler_output": pooled.astype(dtype)}
    if cfg.with_projection:
      out["image_embeds"] = Dense(cfg.projection_dim, axes=("embed", None), use_bias=False,
                                  dtype=dtype, param_dtype=pdtype, name="visual_projection")(pooled)
    return out


def num_tokens(cfg: CLIPConfig) -> int:
  """Tokens per image: patches + the class token (257 for ViT-H/14 at 224²)."""
  return (cfg.image_size // cfg.patch_size) ** 2 + 1


@functools.partial(jax.jit, static_argnames=("cfg",))
def encode_references(params, cfg: CLIPConfig, images: jax.Array) -> jax.Array:
  """Image tokens of N references per sample, concatenated in reference order.

  images (B, N, image_size, image_size, C), each CLIP-preprocessed (`ClipImageProcessor`) →
  (B, S·N, D): tokens of reference 0, then reference 1, … (the transformer's `image` input).
  """
  if images.ndim != 5:
    raise InputError(f"references have shape {images.shape}; expected (B, N, {cfg.image_size}, "
                     f"{cfg.image_size}, {cfg.num_channels}): stack the preprocessed references")
  b, n = images.shape[:2]
  tokens = CLIPVisionEncoder(cfg).apply({"params": params}, images.reshape(b * n, *images.shape[2:]))
  return tokens.reshape(b, n * tokens.shape[1], tokens.shape[2])


def init_abstract_boxed(cfg: CLIPConfig, batch: int = 1):
  """eval_shape of init (logical boxes kept): the parameter tree without memory."""
  pixels = jax.ShapeDtypeStruct((batch, cfg.image_size, cfg.image_size, cfg.num_channels),
                                jnp.float32)
  model = CLIPVisionEncoder(cfg)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), pixels)["params"]


def init_params(cfg: CLIPConfig, key: jax.Array, mesh=None):
  """Random parameters (unboxed), placed on their shardings when a mesh is given."""
  boxed = init_abstract_boxed(cfg)
  abstract, shardings = sharding.unboxed_shardings(boxed, mesh) if mesh else (nn.meta.unbox(boxed), None)
  pixels = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels))
  init = lambda k: nn.meta.unbox(CLIPVisionEncoder(cfg).init(k, pixels)["params"])
  return jax.jit(init, out_shardings=shardings)(key)
