"""A2Transformer: the SkyReels-A2 diffusion transformer (Wan2.1-I2V DiT), channels-last.

Equal to diffusers' `WanTransformer3DModel` built with the I2V options (`image_dim`,
`added_kv_proj_dim`). Submodules carry the diffusers state-dict names (`blocks`, `attn1.to_q`,
`norm_added_k`, `condition_embedder.time_embedder`, …); the blocks are one `nn.scan` over stacked
parameters with a leading "layers" axis, rematerialised by the config's policy.

Shapes: B batch, f/h/w latent frames/height/width, S = f·(h/2)·(w/2) video tokens, D = heads·head_dim,
T text tokens (512 for the release), I image tokens (257 per reference).

Diffusion forcing (SkyReels-V2's `SkyReelsV2Transformer3DModel`) is the same network with three
options: timesteps per latent frame (B, f), whose time embedding and modulation apply to that
frame's tokens; block-causal self-attention over `num_frame_per_block` frames; and the fps
embedding (`inject_sample_info`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from a2jax import sharding
from a2jax.attention import attention
from a2jax.configs import TransformerConfig
from a2jax.errors import InputError
from a2jax.models.layers import (Dense, LayerNorm, RMSNorm, dtype_of, gelu_exact, gelu_tanh,
                                 partitioned, timestep_embedding)

REMAT_POLICIES = {
    "full": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def rope_table(cfg: TransformerConfig, grid: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
  """cos, sin of the 3D RoPE for a patched grid (f, h, w): each (S, head_dim // 2) float32.

  Head dim split t:h:w (rope_dims); pair i of each part rotates by position · θ^(−2i/dim_part).
  Computed in float64 with numpy (static shapes) like diffusers, then cast.
  """
  angles = []
  for part_dim, size in zip(cfg.rope_dims, grid):
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, part_dim, 2, dtype=np.float64) / part_dim))
    angles.append(np.outer(np.arange(size, dtype=np.float64), inv_freq))  # (size, part_dim/2)
  f, h, w = grid
  t_ang = np.broadcast_to(angles[0][:, None, None, :], (f, h, w, angles[0].shape[-1]))
  h_ang = np.broadcast_to(angles[1][None, :, None, :], (f, h, w, angles[1].shape[-1]))
  w_ang = np.broadcast_to(angles[2][None, None, :, :], (f, h, w, angles[2].shape[-1]))
  table = np.concatenate([t_ang, h_ang, w_ang], axis=-1).reshape(f * h * w, -1)
  return np.cos(table).astype(np.float32), np.sin(table).astype(np.float32)


def frames_to_tokens(v: jax.Array, tokens: int) -> jax.Array:
  """A per-frame vector v (B, F, D) as a per-token one: (B, 1, D) when F = 1 (one value for every
  token), else (B, S, D) with frame i's value on its S/F tokens (tokens are frame-major)."""
  return v if v.shape[1] == 1 else jnp.repeat(v, tokens // v.shape[1], axis=1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates interleaved pairs (x[2i], x[2i+1]) of x (B, S, H, Dh) by the angles of (S, Dh/2)."""
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  x1, x2 = pairs[..., 0], pairs[..., 1]
  c, s = cos[None, :, None, :], sin[None, :, None, :]
  out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


class FeedForward(nn.Module):
  """diffusers FeedForward: net.0.proj (in → hidden) → gelu → net.2 (hidden → out)."""

  hidden: int
  out: int
  activation: str  # "gelu_tanh" | "gelu" | "silu"
  axes: tuple[str, str]  # logical (in/out, hidden) names
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    act = {"gelu_tanh": gelu_tanh, "gelu": gelu_exact, "silu": nn.silu}[self.activation]
    y = act(dense(self.hidden, axes=self.axes, name="net_0")(x))
    y = sharding.constrain(y, ("batch", "tokens", "act_mlp"))
    return dense(self.out, axes=self.axes[::-1], name="net_2")(y)


class Attention(nn.Module):
  """WanAttention: q/k/v/out projections, RMSNorm across heads on q and k, optional RoPE; for the
  cross-attention an extra image branch (`add_k_proj`, `add_v_proj`, `norm_added_k`) that attends
  from the same normalised queries, its output added before `to_out`."""

  cfg: TransformerConfig
  image_branch: bool = False

  @nn.compact
  def __call__(self, x, context, rope=None, image=None, causal_block=None):
    """x (B, S, D); context (B, L, D) (x itself for self-attention); image (B, I, D) → (B, S, D).
    causal_block: block-causal self-attention over blocks of that many tokens."""
    cfg = self.cfg
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    dense = functools.partial(Dense, dtype=dtype, param_dtype=pdtype)
    norm = functools.partial(RMSNorm, eps=cfg.eps, axis_name="heads", dtype=dtype, param_dtype=pdtype)
    d, heads = cfg.inner_dim, cfg.num_attention_heads
    split = lambda t: t.reshape(*t.shape[:2], heads, cfg.attention_head_dim)

    q = split(norm(name="norm_q")(dense(d, axes=("embed", "heads"), name="to_q")(x)))
    k = split(norm(name="norm_k")(dense(d, axes=("embed", "heads"), name="to_k")(context)))
    v = split(dense(d, axes=("embed", "heads"), name="to_v")(context))
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = attention(q, k, v, backend=cfg.attention, causal_block=causal_block)
    if self.image_branch:
      k_img = split(norm(name="norm_added_k")(
          dense(d, axes=("embed", "heads"), name="add_k_proj")(image)))
      v_img = split(dense(d, axes=("embed", "heads"), name="add_v_proj")(image))
      out = out + attention(q, k_img, v_img, backend=cfg.attention)
    out = sharding.constrain(out, ("batch", "tokens", "act_heads", "act_kv"))
    return dense(d, axes=("heads", "embed"), name="to_out_0")(out.reshape(*out.shape[:2], d))


class Block(nn.Module):
  """WanTransformerBlock with adaLN: 6 modulation vectors = table + time projection (float32)."""

  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, inputs):
    """x (B, S, D) in compute dtype; inputs = (text (B, T, D), image (B, I, D) | None,
    time_mod float32 (B, 6, D) or per latent frame (B, f, 6, D), rope (cos, sin)).
    Returns (x, None) for `nn.scan`."""
    text, image, time_mod, rope = inputs
    cfg = self.cfg
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    d = cfg.inner_dim
    table = self.param("scale_shift_table",
                       partitioned(lambda key, shape, dt: jax.random.normal(key, shape, dt) / d**0.5,
                                   (None, None, "embed")), (1, 6, d), pdtype)
    per_frame = time_mod if time_mod.ndim == 4 else time_mod[:, None]  # (B, f | 1, 6, D)
    mod = table.astype(jnp.float32)[:, None] + per_frame
    shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = (
        frames_to_tokens(mod[:, :, i], x.shape[1]) for i in range(6))
    causal_block = None
    if cfg.num_frame_per_block > 1:  # the model's embed makes time_mod per frame then
      causal_block = cfg.num_frame_per_block * (x.shape[1] // per_frame.shape[1])

    plain_norm = functools.partial(LayerNorm, eps=cfg.eps, use_affine=False, dtype=jnp.float32)
    h = (plain_norm()(x) * (1 + scale_msa) + shift_msa).astype(dtype)
    attn = Attention(cfg, name="attn1")(h, h, rope=rope, causal_block=causal_block)
    x = (x.astype(jnp.float32) + attn.astype(jnp.float32) * gate_msa).astype(dtype)
    x = sharding.constrain(x, ("batch", "tokens", "act_embed"))

    h = LayerNorm(eps=cfg.eps, use_affine=cfg.cross_attn_norm, dtype=dtype, param_dtype=pdtype,
                  name="norm2")(x)
    x = x + Attention(cfg, image_branch=image is not None, name="attn2")(h, text, image=image)

    h = (plain_norm()(x) * (1 + c_scale) + c_shift).astype(dtype)
    ff = FeedForward(cfg.ffn_dim, d, "gelu_tanh", ("embed", "mlp"), dtype, pdtype, name="ffn")(h)
    x = (x.astype(jnp.float32) + ff.astype(jnp.float32) * c_gate).astype(dtype)
    return sharding.constrain(x, ("batch", "tokens", "act_embed")), None


class TwoLayerMLP(nn.Module):
  """linear_1 → activation → linear_2 (diffusers TimestepEmbedding / PixArtAlphaTextProjection)."""

  features: int
  activation: str  # "silu" | "gelu_tanh"
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(Dense, self.features, dtype=self.dtype, param_dtype=self.param_dtype)
    act = nn.silu if self.activation == "silu" else gelu_tanh
    return dense(axes=("mlp", "embed"), name="linear_2")(act(dense(axes=("embed", "mlp"),
                                                                   name="linear_1")(x)))


class ImageEmbedder(nn.Module):
  """WanImageEmbedding: float32 LayerNorm → FeedForward (gelu) → float32 LayerNorm."""

  cfg: TransformerConfig

  @nn.compact
  def __call__(self, image):
    """image (B, I, image_dim) → (B, I, D)."""
    dtype, pdtype = dtype_of(self.cfg.dtype), dtype_of(self.cfg.param_dtype)
    norm = functools.partial(LayerNorm, eps=1e-5, dtype=dtype, param_dtype=pdtype)
    d = self.cfg.inner_dim
    # diffusers FeedForward(image_dim, D, mult=1): hidden width = image_dim.
    h = FeedForward(self.cfg.image_dim, d, "gelu", ("embed", "mlp"), dtype, pdtype,
                    name="ff")(norm(name="norm1")(image))
    return norm(name="norm2")(h)


class ConditionEmbedder(nn.Module):
  """WanTimeTextImageEmbedding: time MLP + 6-way projection, text projection, image embedder."""

  cfg: TransformerConfig

  @nn.compact
  def __call__(self, t, text, image):
    """t (B,) timesteps, or (B, f) per latent frame; text (B, T, text_dim); image (B, I, image_dim)
    | None → temb t.shape + (D,) f32, time_mod t.shape + (6, D) f32, text (B, T, D), image
    (B, I, D) | None."""
    cfg = self.cfg
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    d = cfg.inner_dim
    # The time path stays float32: the release keeps the modulation in float32.
    temb = TwoLayerMLP(d, "silu", jnp.float32, pdtype, name="time_embedder")(
        timestep_embedding(t.reshape(-1), cfg.freq_dim))
    time_mod = Dense(6 * d, axes=("embed", "mlp"), dtype=jnp.float32, param_dtype=pdtype,
                     name="time_proj")(nn.silu(temb))
    text = TwoLayerMLP(d, "gelu_tanh", dtype, pdtype, name="text_embedder")(text)
    if image is not None:
      image = ImageEmbedder(cfg, name="image_embedder")(image)
    return temb.reshape(*t.shape, d), time_mod.reshape(*t.shape, 6, d), text, image


class PatchEmbedding(nn.Module):
  """Conv3d with kernel = stride = patch, computed as one matmul over patches."""

  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x):
    """x (B, f, h, w, C) → tokens (B, S, D)."""
    cfg = self.cfg
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    pt, ph, pw = cfg.patch_size
    d = cfg.inner_dim
    kernel = self.param("kernel", partitioned(
        nn.initializers.lecun_normal(in_axis=(0, 1, 2, 3), out_axis=4),
        (None, None, None, "conv_in", "embed")), (pt, ph, pw, cfg.in_channels, d), pdtype)
    bias = self.param("bias", partitioned(nn.initializers.zeros, ("embed",)), (d,), pdtype)
    b, f, h, w, c = x.shape
    patches = x.reshape(b, f // pt, pt, h // ph, ph, w // pw, pw, c)
    patches = patches.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, -1, pt * ph * pw * c)
    # Tokens are laid out (batch, tokens) before the matmul: with the input's height split over
    # `context` and its batch over `fsdp`, XLA (jax 0.10.2) differentiates a matmul on the 5-D
    # layout followed by the token reshape wrongly (the kernel's gradient).
    patches = sharding.constrain(patches.astype(dtype), ("batch", "tokens", None))
    tokens = jnp.einsum("bsk,kd->bsd", patches, kernel.reshape(-1, d).astype(dtype),
                        preferred_element_type=jnp.float32) + bias.astype(jnp.float32)
    return tokens.astype(dtype)


def block_stack(cfg: TransformerConfig, num_layers: int):
  """The scanned, optionally rematerialised Block over `num_layers` stacked layers: a module class
  taking (cfg) and called as (tokens, (text, image, time_mod, rope)) → (tokens, None)."""
  block = Block
  if cfg.remat != "none":
    block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
  return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=nn.broadcast, length=num_layers,
                 metadata_params={nn.PARTITION_NAME: "layers"})


def apply_layers(cfg: TransformerConfig, block_params, tokens, block_inputs):
  """Runs the layers whose stacked params are `block_params` (a slice along "layers" of
  params["blocks"], e.g. block 0 alone or blocks 1..L−1): tokens (B, S, D) → (B, S, D)."""
  layers = jax.tree.leaves(block_params)[0].shape[0]
  stack = block_stack(cfg, layers)(cfg)
  return stack.apply({"params": block_params}, tokens, block_inputs)[0]


class A2Transformer(nn.Module):
  """The A2 DiT. __call__(x, t, text, image) → velocity = head(run_blocks(embed(...))).

  x (B, f, h, w, in_channels) latents ‖ mask ‖ condition (36 channels for A2);
  t (B,) timesteps in [0, 1000] (the release feeds integers; their float value is used);
  text (B, T, text_dim) encoder states (T = 512 for the release, zero-padded past the prompt);
  image (B, I, image_dim) CLIP tokens of all references (I = 257·N), or None for text-only models.
  Returns (B, f, h, w, out_channels) in the compute dtype.

  The three stages are methods for `apply(..., method=...)` (step caching reuses the blocks'
  residual while embed and head run every step).
  """

  cfg: TransformerConfig

  def setup(self):
    cfg = self.cfg
    pdtype = dtype_of(cfg.param_dtype)
    pt, ph, pw = cfg.patch_size
    d = cfg.inner_dim
    self.patch_embedding = PatchEmbedding(cfg)
    self.condition_embedder = ConditionEmbedder(cfg)
    self.blocks = block_stack(cfg, cfg.num_layers)(cfg)
    self.scale_shift_table = self.param(
        "scale_shift_table",
        partitioned(lambda key, shape, dt: jax.random.normal(key, shape, dt) / d**0.5,
                    (None, None, "embed")), (1, 2, d), pdtype)
    self.proj_out = Dense(cfg.out_channels * pt * ph * pw, axes=("embed", None),
                          dtype=dtype_of(cfg.dtype), param_dtype=pdtype)
    self.norm_out = LayerNorm(eps=cfg.eps, use_affine=False, dtype=jnp.float32)  # no params
    if cfg.inject_sample_info:
      # SkyReels-V2's frame-rate class (0: 16 fps, 1: any other) → a six-way modulation added to
      # every frame's; diffusers' FeedForward(D, 6D, mult=1, "linear-silu") is Linear·SiLU·Linear.
      self.fps_embedding = nn.Embed(2, d, param_dtype=pdtype, embedding_init=partitioned(
          nn.initializers.normal(1.0), (None, "embed")))
      self.fps_projection = FeedForward(d, 6 * d, "silu", ("embed", "mlp"), jnp.float32, pdtype)

  def __call__(self, x, t, text, image=None, fps_index=None):
    tokens, temb, block_inputs = self.embed(x, t, text, image, fps_index)
    return self.head(self.run_blocks(tokens, block_inputs), temb, x.shape)

  def embed(self, x, t, text, image=None, fps_index=None):
    """→ tokens (B, S, D), temb float32 (B, D) or (B, f, D), block_inputs (text (B, T, D), image
    (B, I, D) | None, time_mod float32 (B, 6, D) or (B, f, 6, D), rope (cos, sin) each
    (S, head_dim/2)). Per-frame t (B, f) gives per-frame temb and time_mod; so does block-causal
    attention (num_frame_per_block > 1), which needs the frame count. fps_index (B,) int: the
    frame-rate class of an `inject_sample_info` model."""
    self._check_inputs(x, t, text, image, fps_index)
    pt, ph, pw = self.cfg.patch_size
    grid = (x.shape[1] // pt, x.shape[2] // ph, x.shape[3] // pw)
    tokens = self.patch_embedding(x)
    tokens = sharding.constrain(tokens, ("batch", "tokens", "act_embed"))
    if t.ndim == 1 and self.cfg.num_frame_per_block > 1:
      t = jnp.broadcast_to(t[:, None], (t.shape[0], grid[0]))
    temb, time_mod, text, image = self.condition_embedder(t, text, image)
    if self.cfg.inject_sample_info:
      fps_mod = self.fps_projection(self.fps_embedding(fps_index[:, None]).astype(jnp.float32))
      fps_mod = fps_mod.reshape(-1, 6, self.cfg.inner_dim)  # (B, 1, 6D) → (B, 6, D)
      time_mod = time_mod + (fps_mod if t.ndim == 1 else fps_mod[:, None])
    text = sharding.constrain(text, ("batch", "context_tokens", "act_embed"))
    cos, sin = rope_table(self.cfg, grid)
    return tokens, temb, (text, image, time_mod, (jnp.asarray(cos), jnp.asarray(sin)))

  def run_blocks(self, tokens, block_inputs):
    """All layers: tokens (B, S, D) → (B, S, D)."""
    return self.blocks(tokens, block_inputs)[0]

  def head(self, tokens, temb, x_shape):
    """Output norm, modulation and projection: tokens (B, S, D), temb (B, D) or per frame
    (B, f, D) → velocity (B, f, h, w, out_channels) for inputs of shape `x_shape` (B, f, h, w, ·)."""
    cfg = self.cfg
    b, f, hh, ww = x_shape[:4]
    pt, ph, pw = cfg.patch_size
    grid = (f // pt, hh // ph, ww // pw)
    per_frame = temb if temb.ndim == 3 else temb[:, None]  # (B, f | 1, D)
    mod = self.scale_shift_table.astype(jnp.float32)[:, :, None] + per_frame[:, None]
    shift, scale = (frames_to_tokens(mod[:, i], tokens.shape[1]) for i in range(2))
    h = self.norm_out(tokens)
    h = (h * (1 + scale) + shift).astype(dtype_of(cfg.dtype))
    out = self.proj_out(h).reshape(b, *grid, pt, ph, pw, cfg.out_channels)
    out = out.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, f, hh, ww, cfg.out_channels)
    return sharding.constrain(out, ("batch", "frames", "height", "width", "channels"))

  def _check_inputs(self, x, t, text, image, fps_index):
    cfg = self.cfg
    if x.ndim != 5 or x.shape[-1] != cfg.in_channels:
      raise InputError(f"latents have shape {x.shape}; expected (B, f, h, w, {cfg.in_channels})")
    pt, ph, pw = cfg.patch_size
    if x.shape[1] % pt or x.shape[2] % ph or x.shape[3] % pw:
      raise InputError(f"latent grid {x.shape[1:4]} is not divisible by patch {cfg.patch_size}: "
                       "use frames = 4k+1 and H, W multiples of 16")
    frames = x.shape[1] // pt
    if t.shape not in ((x.shape[0],), (x.shape[0], frames)):
      raise InputError(f"timesteps have shape {t.shape}; expected ({x.shape[0]},) or one per "
                       f"latent frame ({x.shape[0]}, {frames})")
    if frames % cfg.num_frame_per_block:
      raise InputError(f"{frames} latent frames do not split into causal blocks of "
                       f"{cfg.num_frame_per_block}: use a multiple of it")
    if cfg.inject_sample_info != (fps_index is not None):
      raise InputError("fps_index (B,) is required by a model with inject_sample_info (0: 16 fps, "
                       "1: other) and refused otherwise")
    if fps_index is not None and fps_index.shape != (x.shape[0],):
      raise InputError(f"fps_index has shape {fps_index.shape}; expected ({x.shape[0]},)")
    if text.ndim != 3 or text.shape[0] != x.shape[0] or text.shape[-1] != cfg.text_dim:
      raise InputError(f"text states have shape {text.shape}; expected (B, T, {cfg.text_dim})")
    if (image is None) != (cfg.image_dim is None):
      raise InputError("image tokens are required by an I2V config (image_dim set) and refused "
                       "otherwise: pass the CLIP tokens of the references")
    if image is not None and (image.ndim != 3 or image.shape[0] != x.shape[0]
                              or image.shape[-1] != cfg.image_dim):
      raise InputError(f"image tokens have shape {image.shape}; expected (B, 257·N, {cfg.image_dim})")


def example_inputs(cfg: TransformerConfig, make, batch: int = 1, frames: int | None = None,
                   text_len: int = 1, image_len: int = 1) -> tuple:
  """The smallest inputs `A2Transformer` accepts (x, t, text, image, fps_index), each built as
  make(shape, dtype) (zeros, or ShapeDtypeStruct for eval_shape): 2×2 patches of `frames` latent
  frames (default: one causal block)."""
  pt, ph, pw = cfg.patch_size
  frames = cfg.num_frame_per_block if frames is None else frames
  return (make((batch, frames * pt, 2 * ph, 2 * pw, cfg.in_channels), jnp.float32),
          make((batch,), jnp.float32),
          make((batch, text_len, cfg.text_dim), jnp.float32),
          None if cfg.image_dim is None else make((batch, image_len, cfg.image_dim), jnp.float32),
          make((batch,), jnp.int32) if cfg.inject_sample_info else None)


def init_abstract_boxed(cfg: TransformerConfig, batch: int = 1, text_len: int = 1,
                        image_len: int = 1):
  """eval_shape of init (logical boxes kept): the parameter tree without memory."""
  model = A2Transformer(cfg)
  inputs = example_inputs(cfg, jax.ShapeDtypeStruct, batch, text_len=text_len, image_len=image_len)
  return jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), *inputs)["params"]


def init_params(cfg: TransformerConfig, key: jax.Array, mesh=None):
  """Random parameters (unboxed), placed on their shardings when a mesh is given."""
  model = A2Transformer(cfg)
  boxed = init_abstract_boxed(cfg)
  abstract, shardings = sharding.unboxed_shardings(boxed, mesh) if mesh else (nn.meta.unbox(boxed), None)
  inputs = example_inputs(cfg, jnp.zeros)
  init = lambda k: nn.meta.unbox(model.init(k, *inputs)["params"])
  return jax.jit(init, out_shardings=shardings)(key)
