"""UMT5Encoder: the umT5-XXL text encoder = transformers `UMT5EncoderModel`.

T5 encoder with umT5's difference: every layer owns a relative-position bias table (T5 shares the
first layer's). RMS norms without mean subtraction in float32, attention without 1/√d scaling,
gated-gelu (tanh) FFN, no biases anywhere. Submodules carry the transformers state-dict names
(`shared`, `encoder.block.N.layer.0.SelfAttention.q`, …) so the converter is structural; the layers
are one `nn.scan` over params stacked on a leading "layers" axis, and `layer.0` / `layer.1` are
spelled `layer_0` / `layer_1`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from a2jax import sharding
from a2jax.attention import attention
from a2jax.configs import UMT5Config
from a2jax.models.layers import Dense, RMSNorm, dtype_of, gelu_tanh, partitioned


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bidirectional T5 buckets of (key − query) for a self-attention of `length` tokens: (L, L) int32.

  Half the buckets for keys after the query; within each half, exact buckets below
  `num_buckets // 4`, logarithmic ones up to `max_distance`, the last one beyond. Computed on the
  host in float32 exactly as the reference does (its float32 log decides the bucket edges).
  """
  position = np.arange(length, dtype=np.int64)
  relative = position[None, :] - position[:, None]
  half = num_buckets // 2
  buckets = (relative > 0).astype(np.int64) * half
  distance = np.abs(relative)
  max_exact = half // 2
  # distances below max_exact take the exact branch; the max(·, 1) only keeps log finite there
  log_ratio = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
               / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
  large = np.minimum(max_exact + log_ratio.astype(np.int64), half - 1)
  return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


class UMT5Attention(nn.Module):
  """Self-attention with this layer's relative-position bias: (B, L, D) → (B, L, D)."""

  config: UMT5Config

  @nn.compact
  def __call__(self, x: jax.Array, buckets: jax.Array, mask: jax.Array) -> jax.Array:
    """x (B, L, D); buckets (L, L) int32; mask (B, L) bool, False for padding."""
    cfg = self.config
    dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    inner = cfg.num_heads * cfg.d_kv
    b, length, _ = x.shape

    def heads(name):
      y = Dense(inner, ("embed", "heads"), use_bias=False, dtype=dtype, param_dtype=param_dtype,
                name=name)(x)
      return sharding.constrain(y.reshape(b, length, cfg.num_heads, cfg.d_kv),
                                ("batch", "tokens", "act_heads", "act_kv"))

    q, k, v = heads("q"), heads("k"), heads("v")
    table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, dtype=jnp.float32,
                     param_dtype=param_dtype, name="relative_attention_bias",
                     embedding_init=partitioned(nn.initializers.normal(1.0), (None, "heads")))
    bias = jnp.transpose(table(buckets), (2, 0, 1))[None]  # (1, H, L, L) float32, like the logits
    out = attention(q, k, v, backend="xla", bias=bias, kv_mask=mask, scale=1.0)  # T5: no 1/√d
    out = out.reshape(b, length, inner)
    return Dense(cfg.d_model, ("heads", "embed"), use_bias=False, dtype=dtype,
                 param_dtype=param_dtype, name="o")(out)


class UMT5LayerSelfAttention(nn.Module):
  """x + attention(rms_norm(x)) (transformers `UMT5LayerSelfAttention`)."""

  config: UMT5Config

  @nn.compact
  def __call__(self, x: jax.Array, buckets: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = self.config
    h = RMSNorm(cfg.layer_norm_epsilon, dtype=dtype_of(cfg.dtype),
                param_dtype=dtype_of(cfg.param_dtype), name="layer_norm")(x)
    return x + UMT5Attention(cfg, name="SelfAttention")(h, buckets, mask).astype(x.dtype)


class UMT5DenseGatedActDense(nn.Module):
  """wo(gelu_tanh(wi_0 x) · wi_1 x): (B, L, D) → (B, L, D)."""

  config: UMT5Config

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dense = dict(use_bias=False, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
    gate = gelu_tanh(Dense(cfg.d_ff, ("embed", "mlp"), name="wi_0", **dense)(x))
    h = gate * Dense(cfg.d_ff, ("embed", "mlp"), name="wi_1", **dense)(x)
    h = sharding.constrain(h, ("batch", "tokens", "act_mlp"))
    return Dense(cfg.d_model, ("mlp", "embed"), name="wo", **dense)(h)


class UMT5LayerFF(nn.Module):
  """x + ffn(rms_norm(x)) (transformers `UMT5LayerFF`)."""

  config: UMT5Config

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    h = RMSNorm(cfg.layer_norm_epsilon, dtype=dtype_of(cfg.dtype),
                param_dtype=dtype_of(cfg.param_dtype), name="layer_norm")(x)
    return x + UMT5DenseGatedActDense(cfg, name="DenseReluDense")(h).astype(x.dtype)


class UMT5Block(nn.Module):
  """One encoder layer, the body of the scan: carry x (B, L, D) float32 → same."""

  config: UMT5Config

  @nn.compact
  def __call__(self, x: jax.Array, buckets: jax.Array, mask: jax.Array):
    x = UMT5LayerSelfAttention(self.config, name="layer_0")(x, buckets, mask)
    x = UMT5LayerFF(self.config, name="layer_1")(x)
    return sharding.constrain(x, ("batch", "tokens", "act_embed")), None


class UMT5Stack(nn.Module):
  """The encoder stack on embeddings: scanned blocks, then the final RMS norm."""

  config: UMT5Config

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x (B, L, D) float32, mask (B, L) bool → (B, L, D) in the compute dtype."""
    cfg = self.config
    buckets = jnp.asarray(relative_position_buckets(
        x.shape[1], cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance))
    blocks = nn.scan(UMT5Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = blocks(cfg, name="block")(x, buckets, mask)
    return RMSNorm(cfg.layer_norm_epsilon, dtype=dtype_of(cfg.dtype),
                   param_dtype=dtype_of(cfg.param_dtype), name="final_layer_norm")(x)


class UMT5Encoder(nn.Module):
  """umT5 encoder: token ids (B, L) and attention mask (B, L) → hidden states (B, L, d_model).

  The residual stream stays float32 (the reference's bfloat16 run keeps it in bfloat16; float32 is
  closer to its float32 run); matmuls run in `config.dtype`. Padded keys (mask 0) are ignored by
  every query; the outputs at padded positions are computed but meaningless (`a2jax.text` zeroes
  them, as the release does).
  """

  config: UMT5Config

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    cfg = self.config
    x = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.float32,
                 param_dtype=dtype_of(cfg.param_dtype), name="shared",
                 embedding_init=partitioned(nn.initializers.normal(1.0), ("vocab", "embed")))(input_ids)
    x = sharding.constrain(x, ("batch", "tokens", "act_embed"))
    return UMT5Stack(cfg, name="encoder")(x, attention_mask.astype(bool))


def init_abstract_boxed(cfg: UMT5Config, length: int = 8):
  """eval_shape of init (logical boxes kept): the parameter tree without memory."""
  ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
  return jax.eval_shape(lambda i: UMT5Encoder(cfg).init(jax.random.key(0), i, i), ids)["params"]


def init_params(cfg: UMT5Config, key: jax.Array, mesh=None):
  """Random parameters (unboxed), placed on their shardings when a mesh is given."""
  boxed = init_abstract_boxed(cfg)
  abstract, shardings = (sharding.unboxed_shardings(boxed, mesh) if mesh
                         else (nn.meta.unbox(boxed), None))
  ids = jnp.zeros((1, 8), jnp.int32)
  init = lambda k: nn.meta.unbox(UMT5Encoder(cfg).init(k, ids, ids)["params"])
  return jax.jit(init, out_shardings=shardings)(key)
